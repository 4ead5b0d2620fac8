"""What every ``phyllome`` subcommand shares: connecting, output, exit codes, job progress.

Importing this module (and building a command's parser) imports neither nats-py, asyncio
nor rich (tests/unit/test_cli_imports.py): ``request`` speaks to NATS through the small
blocking client of ``cli.syncbus``; ``call`` imports the bus (nats-py) when a command needs
more than one request; rich is imported for a progress bar or a message on a terminal.

Exit codes: 0 ok, 1 the request was refused or failed, 2 bad usage, 3 NATS or the agent
could not be reached, 130 interrupted (Ctrl-C). With ``--json`` a result is JSON on stdout
and an error is JSON on stderr, ``{"error": {"kind": ..., "message": ...}}``, with the same
exit codes; without it, sizes, rates and times are written for people.

    def cmd_pools(args):
        async def go(bus):
            return await bus.call(args.host, storage_api.POOLS, Empty())
        show(args, call(args, go), columns=[("name", "POOL"), ("free_bytes", "FREE")])
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypedDict, TypeVar

from shared.codec import to_builtins
from shared.config import DEFAULT_NATS_URL, default_host, default_state_dir
from shared.errors import NotAuthorized, PhyError, Unavailable
from shared.messages import EndpointSpec
from shared.messages.jobs import JobAccepted, JobFinished, JobProgress, JobRef, job_endpoints

if TYPE_CHECKING:
    import asyncio

    from rich.console import Console

    from cli.syncbus import SyncBus
    from shared.bus import Bus

T = TypeVar("T")
Req = TypeVar("Req")
Resp = TypeVar("Resp")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
FOLLOW_S = 7 * 24 * 3600.0  # a followed job may run long; Ctrl-C stops following, not the job
CANCEL_WAIT_S = 30.0  # how long --cancel-on-interrupt waits for the job to say it ended
# Fields holding a unix time, shown as a date in text mode (besides any ``*_at``).
TIME_FIELDS = frozenset({"time", "modified", "created", "started", "finished"})

_consoles: dict[str, Console] = {}


def _console(name: str) -> Console:
    if name not in _consoles:
        from rich.console import Console

        _consoles[name] = Console(stderr=name == "err_console")
    return _consoles[name]


def __getattr__(name: str) -> Console:
    """``console`` and ``err_console``: rich consoles on stdout and stderr, made (and rich
    imported, 20-30 ms) the first time a command prints through one."""
    if name not in ("console", "err_console"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _console(name)


def add_common(parser: argparse.ArgumentParser, json_flag: bool = True) -> None:
    """Options every subcommand takes."""
    if json_flag:
        parser.add_argument("--json", action="store_true",
                            help="machine-readable output: JSON on stdout, errors as JSON on "
                                 "stderr (same exit codes)")
    parser.add_argument("--host", default=this_host(),
                        help="the host whose agent to ask (default: this host)")
    parser.add_argument("--nats", default=os.environ.get("PHYLLOME_NATS_URL", DEFAULT_NATS_URL),
                        help="NATS URL (default: $PHYLLOME_NATS_URL or %(default)s)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a reply")


def add_job_options(parser: argparse.ArgumentParser) -> None:
    """Options of a command that starts a job and follows it (``run_job``)."""
    parser.add_argument("--detach", action="store_true", help="print the job and return at once")
    parser.add_argument("--cancel-on-interrupt", action="store_true",
                        help="Ctrl-C cancels the job (without it, the job goes on)")


def group(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
          help: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """A command made of subcommands (``phyllome vm``); given alone, it lists them."""
    parser = sub.add_parser(name, help=help)
    parser.set_defaults(func=lambda args: _list_subcommands(parser))
    return parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND")


def _list_subcommands(parser: argparse.ArgumentParser) -> NoReturn:
    parser.print_help()
    sys.exit(EXIT_USAGE)


def this_host() -> str:
    """The host this CLI runs on, as the agents name it."""
    return os.environ.get("PHYLLOME_HOST") or default_host()


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


def connect_wait() -> float:
    """How long a command waits for NATS to accept a connection (PHYLLOME_CONNECT_WAIT)."""
    return float(os.environ.get("PHYLLOME_CONNECT_WAIT", "3"))


def _where_the_identity_is(e: NotAuthorized) -> NotAuthorized:
    env = Path(os.environ.get("PHYLLOME_STATE_DIR") or default_state_dir()) / "secure" / \
        "operator.env"
    return NotAuthorized(f"{e.message}; the CLI's identity is in {env}: "
                         f"`set -a; . {env}; set +a`")


async def connect(args: argparse.Namespace) -> Bus:
    """The CLI's connection; turned away, it says where the CLI's identity is."""
    from shared.bus import Bus

    try:
        return await Bus.connect(args.nats, name="phyllome-cli", host=args.host,
                                 give_up_after=connect_wait(), **credentials())
    except NotAuthorized as e:
        raise _where_the_identity_is(e) from None


def connect_sync(args: argparse.Namespace, name: str = "phyllome-cli") -> SyncBus:
    """The blocking connection of a one-shot command (``cli.syncbus``), with the same
    identity, servers and wait as ``connect``."""
    from cli.syncbus import SyncBus

    try:
        return SyncBus.connect(args.nats, name=name, give_up_after=connect_wait(),
                               **credentials())
    except NotAuthorized as e:
        raise _where_the_identity_is(e) from None


def call(args: argparse.Namespace, fn: Callable[[Bus], Awaitable[T]]) -> T:
    """Connect, run ``fn(bus)``, close; errors become a message on stderr and an exit code."""
    import asyncio
    import logging

    async def go() -> T:
        bus = await connect(args)
        try:
            return await fn(bus)
        finally:
            await bus.close()

    if getattr(args, "json", False):
        logging.disable(logging.WARNING)  # stderr carries only the JSON error
    try:
        return asyncio.run(go())
    except PhyError as e:
        fail(e, args)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


def call_sync(args: argparse.Namespace, fn: Callable[[SyncBus], T]) -> T:
    """``call`` for a command of a few requests: connect with ``cli.syncbus``, run
    ``fn(bus)``, close; errors become a message on stderr and an exit code."""
    try:
        with connect_sync(args) as bus:
            return fn(bus)
    except PhyError as e:
        fail(e, args)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


def fail(e: PhyError, args: argparse.Namespace | None = None) -> NoReturn:
    """Report ``e`` (as JSON with ``--json``) and exit: 3 when something was unreachable,
    else 1."""
    error(args, e.kind, str(e), EXIT_UNREACHABLE if isinstance(e, Unavailable) else EXIT_FAILED)


def error(args: argparse.Namespace | None, kind: str, message: str, code: int) -> NoReturn:
    """The one way a command ends in error: a line for people, or with ``--json`` the object
    ``{"error": {"kind", "message"}}``, on stderr; then exit ``code``."""
    if getattr(args, "json", False):
        print(json.dumps({"error": {"kind": kind, "message": message}}), file=sys.stderr)
    else:
        _say("red", "error", message)
    sys.exit(code)


def warn(args: argparse.Namespace, message: str) -> None:
    """Something the user should know that does not stop the command, on stderr (with
    ``--json`` as ``{"warning": {"message"}}``)."""
    if getattr(args, "json", False):
        print(json.dumps({"warning": {"message": message}}), file=sys.stderr)
    else:
        _say("yellow", "warning", message)


def _say(color: str, label: str, message: str) -> None:
    """``label: message`` on stderr, the label in color on a terminal (through rich, which
    knows NO_COLOR and the terminal); to a pipe or file plain text, without importing rich."""
    if not sys.stderr.isatty():
        print(f"{label}: {message}", file=sys.stderr, flush=True)
        return
    from rich.markup import escape

    _console("err_console").print(f"[{color}]{label}:[/{color}] {escape(message)}",
                                          highlight=False, soft_wrap=True)



def human_bytes(n: float) -> str:
    """``shared.fileops.human_bytes``, imported when a table needs it (fileops imports hashlib,
    ctypes and mmap, which most commands never use)."""
    from shared.fileops import human_bytes as human

    return human(n)


def print_json(obj: Any) -> None:
    """``obj`` as indented JSON, as ``json.dumps(..., indent=2)`` writes it: msgspec encodes
    and indents in a tenth of the time (a 2,000-device ``hw report``: 15 ms, not 200 ms)."""
    import msgspec

    text = msgspec.json.format(msgspec.json.encode(obj, enc_hook=str), indent=2).decode()
    if not text.isascii():  # json.dumps escapes non-ASCII characters; so do we
        text = json.dumps(json.loads(text), indent=2)
    print(text)


def print_table(rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, str]], *,
                wrap: bool = False) -> None:
    """An aligned table: ``columns`` are (key, header) pairs.

    The first column (what a user types next: an id, a name) is never cut. When the terminal
    is narrower than the table, the widest other columns give way first, down to their
    header's width, and their values are cut short with "…" (or wrapped onto more lines
    with ``wrap``: a FIELD/VALUE table). Output to a pipe or file is never cut.
    """
    cells = [[humanize(key, row.get(key)) for key, _ in columns] for row in rows]
    headers = [header for _, header in columns]
    widths = [max([len(header), *(len(c[i]) for c in cells)]) for i, header in enumerate(headers)]
    room = _terminal_width()
    if room is not None:
        floors = [widths[0]] + [min(w, max(len(h), 4)) for w, h in zip(widths[1:], headers[1:],
                                                                      strict=True)]
        while sum(widths) + 2 * (len(widths) - 1) > room:
            i = max(range(len(widths)), key=lambda i: widths[i] - floors[i])
            if widths[i] <= floors[i]:
                break
            widths[i] -= 1
    out = [_line(headers, widths)]
    for row_cells in cells:
        if wrap:
            parts = [textwrap.wrap(c, w, break_on_hyphens=False) or [""]
                     for c, w in zip(row_cells, widths, strict=True)]
            for n in range(max(len(p) for p in parts)):
                out.append(_line([p[n] if n < len(p) else "" for p in parts], widths))
        else:
            out.append(_line([c if len(c) <= w else c[:w - 1] + "…"
                              for c, w in zip(row_cells, widths, strict=True)], widths))
    print("\n".join(out))


def print_fields(fields: Iterable[tuple[str, Any]]) -> None:
    """One object as a FIELD/VALUE table, long values wrapped, never cut."""
    print_table([{"k": k, "v": humanize(k, v)} for k, v in fields],
                [("k", "FIELD"), ("v", "VALUE")], wrap=True)


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def _terminal_width() -> int | None:
    """The terminal's columns (``COLUMNS`` first), or None for a pipe or file."""
    if os.environ.get("COLUMNS", "").isdigit():
        return int(os.environ["COLUMNS"])
    if not sys.stdout.isatty():
        return None
    return shutil.get_terminal_size().columns


def show(args: argparse.Namespace, obj: Any, columns: Sequence[tuple[str, str]] | None = None,
         rows_key: str | None = None) -> None:
    """``--json`` prints the object as it is; otherwise a table of its rows (or its fields),
    sizes, rates and times written for people."""
    if getattr(args, "json", False):
        print_json(obj)
        return
    data = to_builtins(obj)
    if rows_key is not None:
        data = data[rows_key]
    if isinstance(data, list) and columns:
        print_table(data, columns)
    elif isinstance(data, dict):
        print_fields((k, v) for k, v in data.items() if k != "type")
    else:
        print(data)


def humanize(key: str, value: Any) -> str:
    """One value of field ``key`` for people: sizes in KiB..TiB, rates per second, unix
    times as dates, seconds with their unit, nested objects in a few words."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        if key == "rate" or key.endswith("_bytes_s"):
            return f"{human_bytes(value)}/s"
        if key.endswith("_bytes") or key in ("bytes", "size"):
            return human_bytes(value)
        if (key in TIME_FIELDS or key.endswith("_at")) and value > 1e9:
            return datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M:%S")
        if key.endswith("_s") or key == "seconds":
            return f"{value * 1000:.0f} ms" if 0 < value < 0.1 else f"{value:.1f} s"
        return f"{value:.1f}" if isinstance(value, float) else str(value)
    if isinstance(value, dict):
        return summarize(value)
    if isinstance(value, list | tuple):
        return ", ".join(humanize(key, v) for v in value) or "-"
    return str(value)


def summarize(obj: dict[str, Any]) -> str:
    """A nested object in a few words: a volume as ``pool/name (size)``, a thing with a name
    or id as that, else its plain fields as ``key=value``."""
    if "pool" in obj and "name" in obj:
        size = obj.get("virtual_bytes")
        return f"{obj['pool']}/{obj['name']}" + (f" ({human_bytes(size)})" if size else "")
    for key in ("name", "id", "job_id"):
        if isinstance(obj.get(key), str) and obj[key]:
            return str(obj[key])
    nested = [summarize(v) for v in obj.values() if isinstance(v, dict)]  # what was made
    return " ".join([*nested, *(f"{k}={humanize(k, v)}" for k, v in obj.items()
                                if k != "type" and not isinstance(v, dict)
                                and v not in (None, "", [], {}))])


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
    """Show a job's progress (bytes, rate, ETA) until it finishes; returns its outcome."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from shared.jobs import wait_job

    columns: list[Any] = [TextColumn("{task.description}"), BarColumn()]
    if bytes_progress:
        columns += [DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=_console("err_console"), disable=quiet,
                  transient=True) as progress:
        task = progress.add_task(accepted.kind, total=None)

        async def draw(event: JobProgress) -> None:
            progress.update(task, completed=event.done, total=event.total or None,
                            description=f"{accepted.kind} {event.message}".strip())

        return await wait_job(bus, host, svc, accepted, timeout=FOLLOW_S, on_progress=draw)


def finish_job(args: argparse.Namespace, outcome: JobFinished) -> None:
    """Print a job's outcome and exit non-zero unless it succeeded."""
    if getattr(args, "json", False):
        print_json(outcome)
    elif outcome.state == "succeeded":
        print(f"{outcome.kind}: done", flush=True)
        if outcome.result:
            show(args, outcome.result)
    if outcome.state != "succeeded":
        error(args, outcome.error_kind or outcome.state,
              f"{outcome.kind} {outcome.state}: {outcome.message}", EXIT_FAILED)


def request(args: argparse.Namespace, spec: EndpointSpec[Req, Resp], req: Req, *,
            timeout: float | None = None, key: str | None = None) -> Resp:
    """One call of ``spec`` on the agent of ``args.host``: connect, call, close (through
    ``cli.syncbus``: a one-shot command answers without importing nats-py and asyncio)."""
    return call_sync(args, lambda bus: bus.call(
        args.host, spec, req, timeout=timeout or args.timeout, idempotency_key=key))


@dataclass(frozen=True)
class Interrupted:
    """Ctrl-C during a job command: the job (None when its agent had not answered yet), and
    how it ended when we cancelled it."""

    accepted: JobAccepted | None
    outcome: JobFinished | None = None


def run_job(args: argparse.Namespace, spec: EndpointSpec[Req, JobAccepted], req: Req, *,
            bytes_progress: bool = True) -> None:
    """Start a job endpoint, then follow it with a progress bar until it ends (exit status
    from its outcome), or with ``--detach`` print the job id and return at once.

    Ctrl-C stops following, not the job (it runs in its agent): we say so and how to cancel
    it, or with ``--cancel-on-interrupt`` cancel it and wait for it to say it ended.
    """
    import asyncio
    import signal

    detach = getattr(args, "detach", False)

    async def go(bus: Bus) -> JobAccepted | JobFinished | Interrupted:
        loop = asyncio.get_running_loop()
        interrupted = asyncio.Event()
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
        try:
            accepted = await _unless(interrupted, bus.call(args.host, spec, req,
                                                           timeout=args.timeout))
            if accepted is None or detach:
                return accepted or Interrupted(None)
            outcome = await _unless(interrupted, follow_job(
                bus, args.host, spec.service, accepted, quiet=args.json,
                bytes_progress=bytes_progress))
            if outcome is not None:
                return outcome
        finally:
            loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C ends us at once
        if not getattr(args, "cancel_on_interrupt", False):
            return Interrupted(accepted)
        _jobs, _status, cancel = job_endpoints(spec.service)
        await bus.call(args.host, cancel, JobRef(job_id=accepted.job_id), timeout=args.timeout)
        ended = await asyncio.wait_for(follow_job(bus, args.host, spec.service, accepted,
                                                  quiet=True), CANCEL_WAIT_S)
        return Interrupted(accepted, ended)

    outcome = call(args, go)
    if isinstance(outcome, JobAccepted):
        show(args, outcome)
    elif isinstance(outcome, Interrupted):
        _say_interrupted(args, outcome)
    else:
        finish_job(args, outcome)


async def _unless(interrupted: asyncio.Event, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None when ``interrupted`` is set first (``work`` is cancelled)."""
    import asyncio

    doing = asyncio.ensure_future(work)
    waiting = asyncio.ensure_future(interrupted.wait())
    try:
        either: set[asyncio.Future[Any]] = {doing, waiting}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
        if not doing.done():
            doing.cancel()
    return doing.result() if doing.done() and not doing.cancelled() else None


def _say_interrupted(args: argparse.Namespace, stop: Interrupted) -> NoReturn:
    where = "" if args.host == this_host() else f" --host {args.host}"
    if stop.accepted is None:
        error(args, "interrupted", "interrupted before the agent answered; "
              f"`phyllome jobs list{where}` shows whether the job started", EXIT_INTERRUPTED)
    job = f"{stop.accepted.kind} job {stop.accepted.job_id}"
    if stop.outcome is not None:
        error(args, "interrupted", f"interrupted: {job} {stop.outcome.state}"
              + (f" ({stop.outcome.message})" if stop.outcome.message else ""), EXIT_INTERRUPTED)
    error(args, "interrupted",
          f"interrupted: the job goes on ({job} on {args.host}); "
          f"`phyllome jobs cancel {stop.accepted.job_id}{where}` stops it, "
          f"`phyllome jobs watch {stop.accepted.job_id}{where}` follows it again",
          EXIT_INTERRUPTED)
