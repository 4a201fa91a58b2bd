"""Benchmarks behind `make bench`: side-by-side timings and memory, reported as ratios (see benchmarks/README.md; figures in docs/results.md)."""
