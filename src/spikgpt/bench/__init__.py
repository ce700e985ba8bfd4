"""Benchmarks: tasks, baselines, metrics and reports."""
