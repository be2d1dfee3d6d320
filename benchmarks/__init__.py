"""Benchmarks (scripts, not tests): each prints ratios against the obvious alternative."""
