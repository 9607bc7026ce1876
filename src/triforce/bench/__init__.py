"""Benchmarks (`triforce bench ...`) and the real documents they read."""
