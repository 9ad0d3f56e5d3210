"""Fixtures for Drupal databases: SQLite copies of ../shared/drupal/sites, PostgreSQL, MariaDB."""
