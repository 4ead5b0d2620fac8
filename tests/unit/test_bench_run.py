"""``python -m bench.run --only X`` updates X's rows of docs/benchmarks.md and keeps the rest."""

from __future__ import annotations

from bench.run import merged

OLD = """# Benchmarks

Machine: m. Run: then.

| benchmark | measure | ours | theirs | ratio | target | note |
|---|---|---|---|---|---|---|
| bus request/reply | p50 | 1 | 2 | 2x | - |  |
| vm snapshot | 20 GiB | 9 | 9 | 1x | - |  |
| vm snapshot | 200 GiB | 9 | 9 | 1x | - |  |
| vm start | median | 3 | 3 | 1x | - |  |

## Reading the misses

- kept as it is
"""


def test_a_partial_run_replaces_its_rows_and_keeps_the_others() -> None:
    text = merged(OLD, ["| vm snapshot | 20 GiB | 1 | 9 | 9x | - |  |"], "Rows of x run now.")
    lines = text.splitlines()
    assert lines[2:4] == ["Machine: m. Run: then.", "Rows of x run now."]
    table = [line for line in lines if line.startswith("| ") and "benchmark" not in line]
    assert table == ["| bus request/reply | p50 | 1 | 2 | 2x | - |  |",
                     "| vm start | median | 3 | 3 | 1x | - |  |",
                     "| vm snapshot | 20 GiB | 1 | 9 | 9x | - |  |"]
    assert text.endswith("## Reading the misses\n\n- kept as it is\n")
