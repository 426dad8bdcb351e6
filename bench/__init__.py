"""Benchmarks run against the shared evaluation data."""
