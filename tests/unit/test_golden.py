"""Golden files are rewritten only when asked with ``PHYLLOME_REGENERATE=1``."""

from __future__ import annotations

import pytest

from tests.support.golden import regenerating

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("value, rewrites", [
    ("1", True), ("0", False), ("", False), ("false", False), ("yes", False), (None, False)])
def test_only_1_regenerates(monkeypatch: pytest.MonkeyPatch, value: str | None,
                            rewrites: bool) -> None:
    if value is None:
        monkeypatch.delenv("PHYLLOME_REGENERATE", raising=False)
    else:
        monkeypatch.setenv("PHYLLOME_REGENERATE", value)
    assert regenerating() is rewrites
