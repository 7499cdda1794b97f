"""Shared pytest set-up. The real-component harness fixtures live in tests/harness/fixtures.py."""

pytest_plugins = ["tests.harness.fixtures"]
