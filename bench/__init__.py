"""Benchmark scripts: each prints one JSON object; run by hand, never as timed tests."""
