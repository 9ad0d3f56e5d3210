"""Benchmarks, run by `make bench` (`python -m tests.bench [NAME ...]`); never part of pytest."""
