"""A real component a test needs: fail when CI is set (a green CI run means it ran), else skip."""

from __future__ import annotations

import os
import shutil

import pytest


def require(ok: bool, what: str) -> None:
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required (CI is set, so this fails instead of skipping)")
    pytest.skip(f"{what} is not available here")


def require_root() -> None:
    require(os.geteuid() == 0, "root")


def require_binary(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"the {name} binary")
    assert path is not None
    return path
