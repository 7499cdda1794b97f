"""Shared pytest set-up. The real-component harness fixtures live in tests/harness/fixtures.py."""
