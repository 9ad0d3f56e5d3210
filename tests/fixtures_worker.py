"""Fixtures for worker processes."""
