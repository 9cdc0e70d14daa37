"""Benchmarks of ``umup_compile``; ``python -m benchmarks`` runs the harness (see README)."""
