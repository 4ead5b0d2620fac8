"""Run every ``bench/bench_*.py`` and write the table to docs/benchmarks.md.

    python -m bench.run [--quick] [--only bus,storage]   # --only: update those rows only
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import inspect
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
    p.add_argument("--only", default="",
                   help="comma-separated bench names (bus, storage...); their rows replace "
                        "theirs in the existing file, the others are kept")
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
    out = Path(args.out)
    if args.only and out.exists():
        text = merged(out.read_text(), rows, f"Rows of {', '.join(names)} run {stamp}{quick}.")
    else:
        text = HEADER + f"Machine: {machine()}. Run: {stamp}{quick}.\n\n"
        text += ("| benchmark | measure | ours | theirs | ratio | target | note |\n"
                 "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    if failures:
        text += "\n" + "\n".join(failures) + "\n"
    out.write_text(text)
    print(f"wrote {args.out}")


def merged(old: str, rows: list[str], note: str) -> str:
    """``old`` with the rows of the benchmarks just run replacing theirs (a row belongs to the
    benchmark named in its first cell) and the rest kept, for a run with ``--only``."""
    lines = old.splitlines()
    ran = {row.split(" | ")[0] for row in rows}
    table = [i for i, line in enumerate(lines) if line.startswith("| ") and i > 0
             and lines[i - 1].startswith(("|---", "| "))]
    if not table:
        return old.rstrip("\n") + "\n\n" + "\n".join(rows) + "\n"
    kept = [lines[i] for i in table if lines[i].split(" | ")[0] not in ran]
    before = lines[: table[0]]
    stamp = next((i for i, line in enumerate(before) if line.startswith("Machine: ")), None)
    if stamp is not None:
        before.insert(stamp + 1, note)
    return "\n".join([*before, *kept, *rows, *lines[table[-1] + 1:]]) + "\n"


if __name__ == "__main__":
    main()
