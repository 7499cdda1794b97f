"""Shared pytest set-up. The real-component harness fixtures live in tests/harness/fixtures.py.

`-m root` selects the tests that need root, network namespaces and the Debian packages; without
them those tests skip with the reason (never fail).  A test that uses one of the harness fixtures
is such a test even if its author forgot the mark.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.harness.fixtures"]

HARNESS_FIXTURES = frozenset(
    {
        "test_images",
        "upstream_registry",
        "containerd_factory",
        "containerd_instance",
        "cri_client",
        "cluster",
        "containerd_line",
    }
)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by mark
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        uses = HARNESS_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if uses and item.get_closest_marker("root") is None:
            item.add_marker(pytest.mark.root)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None:
        from tests.harness.fixtures import missing_requirements  # loaded by pytest_plugins

        reason = missing_requirements()
        if reason:
            pytest.skip(reason)
