"""sfrelay's arq workers: queued notifications -> Drupal users."""
