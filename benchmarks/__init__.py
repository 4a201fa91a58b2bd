"""Benchmarks behind `make bench`: side-by-side timings and memory, reported as ratios (see README.md)."""
