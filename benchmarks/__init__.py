"""Benchmarks: runnable scripts, one per topic (python -m benchmarks.<name>)."""
