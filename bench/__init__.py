"""Benchmarks of the core package (`python -m bench.throughput --help`); see bench/README.md."""
