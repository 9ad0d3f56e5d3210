"""sfrelay: Salesforce Outbound Messages in, Drupal user accounts out."""

__version__ = "0.1.0"
