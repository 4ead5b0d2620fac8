"""Figures from reliability tests: printed (``pytest -s``) and appended to
``build/reliability.jsonl``, from which docs/reliability.md is written."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

FULL = os.environ.get("PHYLLOME_FULL_SIZE") == "1"
FIGURES = Path(__file__).resolve().parents[2] / "build" / "reliability.jsonl"


def figure(name: str, **values: Any) -> None:
    line = {"test": name, "full_size": FULL, "time": time.time(), **values}
    print(json.dumps(line))
    FIGURES.parent.mkdir(exist_ok=True)
    with FIGURES.open("a") as f:
        f.write(json.dumps(line) + "\n")
