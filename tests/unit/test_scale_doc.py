"""docs/scale.md quotes the rows bench/bench_scale.py writes into docs/benchmarks.md: every
row it names is there, and every kind of row the bench writes is quoted."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def figures_rows() -> list[str]:
    """The last cell of each line of scale.md's table of figures: the row it comes from."""
    text = (REPO / "docs" / "scale.md").read_text()
    section = text.split("## The figures", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    return [line.rstrip(" |").rsplit("| ", 1)[-1].strip() for line in lines[1:]]


def test_the_figures_of_scale_md_are_rows_of_benchmarks_md() -> None:
    table = (REPO / "docs" / "benchmarks.md").read_text()
    benches = {line.split(" | ")[0].removeprefix("| ") for line in table.splitlines()
               if line.startswith("| scale: ")}
    written = set(re.findall(r'Result\(\s*"(scale: [^"]+)"',
                             (REPO / "bench" / "bench_scale.py").read_text()))
    quoted = figures_rows()
    assert quoted and set(quoted) <= benches, set(quoted) - benches
    assert written == set(quoted), written ^ set(quoted)
