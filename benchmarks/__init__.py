"""Benchmarks of ``umup_compile``: ``python -m benchmarks <workload>`` (see README.md here)."""
