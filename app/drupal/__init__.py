"""Drupal storage: connecting, schema detection and the D7 / D10 user writers."""
