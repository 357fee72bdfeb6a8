"""Benchmarks, splits and tokenisation."""
