"""Benchmarks of the margin-softmax heads: ``python -m bench``."""
