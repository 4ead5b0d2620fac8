"""What every ``phyllome`` subcommand shares: connecting, output, exit codes, job progress.

Exit codes: 0 ok, 1 the request was refused or failed, 2 bad usage, 3 NATS or the agent
could not be reached.

    def cmd_pools(args):
        async def go(bus):
            return await bus.call(args.host, storage_api.POOLS, Empty())
        show(args, call(args, go), columns=[("name", "POOL"), ("free_bytes", "FREE")])

Rich, nats-py and the bus are imported when a command first needs them, not when this
module is: ``phyllome --help`` and building every parser stay as cheap as argparse
(tests/unit/test_cli_imports.py keeps it so).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any, NoReturn, TypedDict, TypeVar

import msgspec

from shared import subjects
from shared.codec import to_builtins
from shared.config import DEFAULT_NATS_URL, default_host
from shared.errors import PhyError, Unavailable
from shared.fileops import human_bytes as human_bytes  # the CLI's tables use common.human_bytes
from shared.messages import EndpointSpec
from shared.messages.jobs import JobAccepted, JobFinished, JobProgress

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from shared.bus import Bus

T = TypeVar("T")
Req = TypeVar("Req")
Resp = TypeVar("Resp")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


@cache
def _console(stderr: bool) -> Console:
    from rich.console import Console

    return Console(stderr=stderr)


def __getattr__(name: str) -> Console:
    """``common.console`` and ``common.err_console``: made on first use (rich costs tens of
    milliseconds to import, more than a whole ``phyllome vm list`` should)."""
    if name in ("console", "err_console"):
        return _console(name == "err_console")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_common(parser: argparse.ArgumentParser, json_flag: bool = True) -> None:
    """Options every subcommand takes."""
    if json_flag:
        parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--host", default=os.environ.get("PHYLLOME_HOST") or default_host(),
                        help="the host whose agent to ask (default: this host)")
    parser.add_argument("--nats", default=os.environ.get("PHYLLOME_NATS_URL", DEFAULT_NATS_URL),
                        help="NATS URL (default: $PHYLLOME_NATS_URL or %(default)s)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a reply")


class Credentials(TypedDict):
    user: str
    password: str
    creds: str
    ca: str


def credentials() -> Credentials:
    """The NATS identity of this process, from PHYLLOME_NATS_USER/_PASSWORD/_CREDS/_CA."""
    env = os.environ.get
    return Credentials(user=env("PHYLLOME_NATS_USER", ""),
                       password=env("PHYLLOME_NATS_PASSWORD", ""),
                       creds=env("PHYLLOME_NATS_CREDS", ""), ca=env("PHYLLOME_NATS_CA", ""))


async def connect(args: argparse.Namespace) -> Bus:
    from shared.bus import Bus

    return await Bus.connect(args.nats, name="phyllome-cli", host=args.host,
                             give_up_after=float(os.environ.get("PHYLLOME_CONNECT_WAIT", "3")),
                             **credentials())


def call(args: argparse.Namespace, fn: Callable[[Bus], Awaitable[T]]) -> T:
    """Connect, run ``fn(bus)``, close; errors become a message on stderr and an exit code."""
    import asyncio

    async def go() -> T:
        bus = await connect(args)
        try:
            return await fn(bus)
        finally:
            await bus.close()

    try:
        return asyncio.run(go())
    except PhyError as e:
        fail(e)
    except KeyboardInterrupt:
        sys.exit(130)


def fail(e: PhyError) -> NoReturn:
    _console(True).print(f"[red]error:[/red] {e}", highlight=False)
    sys.exit(EXIT_UNREACHABLE if isinstance(e, Unavailable) else EXIT_FAILED)


def print_json(obj: Any) -> None:
    """``obj`` as indented JSON, as ``json.dumps(..., indent=2)`` writes it: msgspec encodes
    and indents in a tenth of the time (a 2,000-device ``hw report``: 15 ms, not 200 ms)."""
    text = msgspec.json.format(msgspec.json.encode(obj, enc_hook=str), indent=2).decode()
    if not text.isascii():  # json.dumps escapes non-ASCII characters; so do we
        text = json.dumps(json.loads(text), indent=2)
    print(text)


def print_table(rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> None:
    """An aligned table: ``columns`` are (key, header) pairs."""
    from rich.table import Table

    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for _, header in columns:
        table.add_column(header)
    for row in rows:
        table.add_row(*(_cell(row.get(key)) for key, _ in columns))
    _console(False).print(table, highlight=False)


def show(args: argparse.Namespace, obj: Any, columns: Sequence[tuple[str, str]] | None = None,
         rows_key: str | None = None) -> None:
    """``--json`` prints the object; otherwise a table of its rows (or its fields)."""
    if getattr(args, "json", False):
        print_json(obj)
        return
    data = to_builtins(obj)
    if rows_key is not None:
        data = data[rows_key]
    if isinstance(data, list) and columns:
        print_table(data, columns)
    elif isinstance(data, dict):
        print_table([{"k": k, "v": v} for k, v in data.items() if k != "type"],
                    [("k", "FIELD"), ("v", "VALUE")])
    else:
        print(data)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, list | tuple):
        return ", ".join(_cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return " ".join(f"{k}={_cell(v)}" for k, v in value.items())
    return str(value)


def parse_size(text: str) -> int:
    """``10G``, ``512M``, ``1.5GiB``, ``4096`` -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in "KMGT" else t
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 10G)") from None
    return int(value * mult)


async def follow_job(bus: Bus, host: str, svc: str, accepted: JobAccepted, *,
                     quiet: bool = False, bytes_progress: bool = True) -> JobFinished:
    """Show a job's progress (bytes, rate, ETA) until it finishes; returns its outcome.

    Reads the job's events from JetStream from the beginning, so a job that finished before
    we subscribed is still seen. The bar is drawn on a terminal only (rich is not even
    imported when stderr is a pipe or a file).
    """
    subject = subjects.event(host, svc, "job", accepted.job_id)
    decoder = msgspec.json.Decoder(JobProgress | JobFinished)
    with contextlib.ExitStack() as stack:
        bar = None if quiet or not sys.stderr.isatty() else stack.enter_context(
            _progress_bar(bytes_progress))
        task = bar.add_task(accepted.kind, total=None) if bar is not None else None
        stream = bus.events(subject, since=time.time() - 3600, follow=True)
        async with contextlib.aclosing(stream):
            async for _subject, _ts, data in stream:
                try:
                    event = decoder.decode(data)
                except msgspec.MsgspecError:
                    continue
                if isinstance(event, JobFinished):
                    return event
                if bar is not None and task is not None:
                    bar.update(task, completed=event.done, total=event.total or None,
                               description=f"{accepted.kind} {event.message}".strip())
    raise Unavailable(f"lost the events of job {accepted.job_id}")


def _progress_bar(bytes_progress: bool) -> Progress:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns: list[Any] = [TextColumn("{task.description}"), BarColumn()]
    if bytes_progress:
        columns += [DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=_console(True), transient=True)


def finish_job(args: argparse.Namespace, outcome: JobFinished) -> None:
    """Print a job's outcome and exit non-zero unless it succeeded."""
    if getattr(args, "json", False):
        print_json(outcome)
    elif outcome.state == "succeeded":
        _console(False).print(f"{outcome.kind}: done", highlight=False)
        if outcome.result:
            show(args, outcome.result)
    else:
        _console(True).print(f"[red]{outcome.kind} {outcome.state}:[/red] {outcome.message}",
                          highlight=False)
    if outcome.state != "succeeded":
        sys.exit(EXIT_FAILED)


def request(args: argparse.Namespace, spec: EndpointSpec[Req, Resp], req: Req, *,
            timeout: float | None = None, key: str | None = None) -> Resp:
    """One call of ``spec`` on the agent of ``args.host``: connect, call, close."""
    return call(args, lambda bus: bus.call(args.host, spec, req, timeout=timeout or args.timeout,
                                           idempotency_key=key))


def run_job(args: argparse.Namespace, spec: EndpointSpec[Req, JobAccepted], req: Req, *,
            bytes_progress: bool = True) -> None:
    """Start a job endpoint, then follow it with a progress bar until it ends (exit status
    from its outcome), or with ``--detach`` print the job id and return at once."""
    detach = getattr(args, "detach", False)

    async def go(bus: Bus) -> JobAccepted | JobFinished:
        accepted = await bus.call(args.host, spec, req, timeout=args.timeout)
        if detach:
            return accepted
        return await follow_job(bus, args.host, spec.service, accepted, quiet=args.json,
                                bytes_progress=bytes_progress)

    outcome = call(args, go)
    if isinstance(outcome, JobAccepted):
        show(args, outcome)
    else:
        finish_job(args, outcome)
