"""Run every ``bench/bench_*.py`` and write the table to docs/benchmarks.md.

    python -m bench.run [--quick] [--only bus,storage]

With ``--only`` the rows of the other benchmarks stay as they were (the run line says
which were run now); the sections after the table (what the misses mean) are kept as
written.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import inspect
import os
import traceback
from pathlib import Path

from bench.common import Result, machine

ROOT = Path(__file__).resolve().parents[1]
HEADER = """# Benchmarks

Each row runs our path and the tool a user would use instead, in the same run, on the same
files or server. **ratio** is how many times faster we are (above 1.0) or slower (below
1.0): their time / our time, or our rate / their rate.
Regenerate with `make bench` (`python -m bench.run`).

"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    p.add_argument("--only", default="", help="comma-separated bench names (bus, storage...)")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = p.parse_args()
    names = sorted(f.stem for f in (ROOT / "bench").glob("bench_*.py"))
    if args.only:
        wanted = {f"bench_{n}" for n in args.only.split(",")}
        names = [n for n in names if n in wanted or any(n.startswith(w) for w in wanted)]
    rows: list[str] = []
    failures: list[str] = []
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        print(f"running {name}...", flush=True)
        try:
            out = module.run(args.quick)
            results: list[Result] = asyncio.run(out) if inspect.iscoroutine(out) else out
        except Exception:
            failures.append(f"- `{name}` failed: see `python -m bench.{name}`")
            traceback.print_exc()
            continue
        for r in results:
            print(r.row(), flush=True)
            rows.append(r.row())
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    quick = " (quick sizes)" if args.quick else ""
    load = f"load average {os.getloadavg()[0]:.1f} at the end"
    out = Path(args.out)
    old_rows, notes = previous(out)
    if args.only:
        rows = merged(old_rows, rows)
        quick += f"; rows of {', '.join(names)} from this run, the others from earlier runs"
    text = HEADER + f"Machine: {machine()}. Run: {stamp}{quick}; {load}.\n\n"
    text += ("| benchmark | measure | ours | theirs | ratio | target | note |\n"
             "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    if failures:
        text += "\n" + "\n".join(failures) + "\n"
    out.write_text(text + notes)
    print(f"wrote {args.out}")


def merged(old: list[str], new: list[str]) -> list[str]:
    """``old`` with the rows of each benchmark in ``new`` put in place of its old ones."""
    def name(row: str) -> str:
        return row.split(" | ")[0]

    known = {name(r) for r in old}
    fresh: dict[str, list[str]] = {}  # a benchmark of old -> its new rows and new ones after
    last = ""
    for row in new:
        last = name(row) if name(row) in known or not last else last
        fresh.setdefault(last, []).append(row)
    out: list[str] = []
    for row in old:
        if name(row) not in fresh:
            out.append(row)
        elif not any(name(r) == name(row) for r in out):
            out += fresh[name(row)]
    return out + [r for r in new if r not in out]


def previous(path: Path) -> tuple[list[str], str]:
    """The table rows of the file ``path`` holds, and what follows the table from its first
    ``## `` heading on (written by hand: kept)."""
    if not path.exists():
        return [], ""
    lines = path.read_text().splitlines(keepends=True)
    rows = [line.rstrip("\n") for line in lines
            if line.startswith("| ") and not line.startswith(("| benchmark |", "|---"))]
    start = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
    notes = "".join(lines[start:])
    return rows, "\n" + notes if notes else ""


if __name__ == "__main__":
    main()
