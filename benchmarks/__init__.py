"""Benchmarks: ``python -m benchmarks`` runs them all and writes JSON, Markdown and a plot; each module also runs
alone (``python -m benchmarks.<name>``). Shared timing and machine helpers live in ``benchmarks.common``."""
