"""Shared test set-up: the repository on sys.path, markers by folder."""

from __future__ import annotations

import pytest

# The fixtures every layer shares (a real nats-server, libvirt, loop filesystems, an HTTP
# server, the tiny guest): registered once here, so test modules name them as parameters only.
pytest_plugins = ["tests.support.nats", "tests.support.libvirt", "tests.support.loopfs",
                  "tests.support.httpserver", "tests.support.tiny",
                  "tests.support.debian"]

LAYERS = ("unit", "integration", "system", "cluster", "reliability")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test in tests/<layer>/ carries that layer's marker unless it names one itself."""
    for item in items:
        parts = item.path.parts
        layer = next((p for p in LAYERS if p in parts), None)
        if layer and not any(item.get_closest_marker(m) for m in (*LAYERS, "bench")):
            item.add_marker(getattr(pytest.mark, layer))
