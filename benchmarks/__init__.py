"""Benchmarks of alignbench against named baselines; run on demand (see README.md here), never in CI."""
