"""Helpers for tests, benchmarks and trying the server without real weights.

Nothing in the server imports this package.
"""
