"""``phyllome jobs``: the long work of every agent (pulls, clones, transfers, binds,
migrations), whichever agent runs it.

    phyllome jobs list                  # the jobs of every agent of this host (--all: cluster)
    phyllome jobs show 6f1c...          # one job, found on whichever agent has it
    phyllome jobs watch 6f1c...         # its progress bar until it ends (exit 1 unless done)
    phyllome jobs cancel 6f1c...        # stop it; the agent rolls its work back

The agents are found by ``$SRV.PING`` (those that answer now) and asked through their own
``jobs``/``job``/``cancel`` endpoints; ``--host`` (default: this host) or ``--all`` says
which hosts' agents.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from cli import common
from shared import subjects
from shared.codec import to_builtins
from shared.errors import NotFound, PhyError, Unavailable
from shared.messages import Empty
from shared.messages.jobs import JobAccepted, JobFinished, JobList, JobRef, JobStatus

if TYPE_CHECKING:
    from nats.aio.client import Client

    from shared.bus import Bus

LIST_COLUMNS = [("job_id", "JOB"), ("host", "HOST"), ("agent", "AGENT"), ("kind", "KIND"),
                ("state", "STATE"), ("progress", "PROGRESS"), ("started", "STARTED"),
                ("message", "MESSAGE")]
# The agents whose jobs move bytes (pulls, clones, transfers): their bar shows sizes and rate.
BYTES_AGENTS = {"storage", "catalogue"}
PING_WINDOW_S = 0.5

Agent = tuple[str, str]  # (host, agent name)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    jobs = sub.add_parser("jobs", help="long work of every agent: list, show, watch, cancel")
    cmds = jobs.add_subparsers(dest="jobs_command", metavar="COMMAND")

    p = cmds.add_parser("list", help="the jobs of every agent of the host (or the cluster)")
    _add_scope(p)
    p.set_defaults(func=cmd_list)
    for verb, doc, fn in (("show", "one job's state and progress", cmd_show),
                          ("watch", "follow a job with a progress bar until it ends", cmd_watch),
                          ("cancel", "stop a running job; its agent rolls it back", cmd_cancel)):
        p = cmds.add_parser(verb, help=doc)
        _add_scope(p)
        p.add_argument("job_id", metavar="ID", help="the job id (`phyllome jobs list`)")
        p.set_defaults(func=fn)


def _add_scope(p: argparse.ArgumentParser) -> None:
    common.add_common(p)
    p.add_argument("--all", action="store_true", help="the agents of every host of the cluster")


async def ping_all(nc: Client, window: float) -> list[dict[str, Any]]:
    """Every ``$SRV.PING`` reply that arrives within ``window`` seconds."""
    import nats.errors

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    replies: list[dict[str, Any]] = []
    try:
        await nc.publish("$SRV.PING", b"", reply=inbox)
        deadline = time.monotonic() + window
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except nats.errors.TimeoutError:
                break
            try:
                replies.append(json.loads(msg.data))
            except ValueError:
                continue
    finally:
        await sub.unsubscribe()
    return replies


async def agents_on(bus: Bus, args: argparse.Namespace) -> list[Agent]:
    """The agents that answer ``$SRV.PING`` now, on ``args.host`` or (``--all``) anywhere."""
    found = set()
    for ping in await ping_all(bus.nc, PING_WINDOW_S):
        name = str(ping.get("name", "")).removeprefix("phyllome-")
        host = (ping.get("metadata") or {}).get("host")
        if name in subjects.SERVICES and host and (args.all or host == args.host):
            found.add((str(host), name))
    if not found:
        where = "any host" if args.all else f"host {args.host!r}"
        raise Unavailable(f"no agent of {where} answers; see `phyllome status`"
                          + ("" if args.all else ", or add --all for every host"))
    return sorted(found)


async def on_each(agents: list[Agent], ask: Callable[[Agent], Awaitable[Any]]
                  ) -> list[tuple[Agent, Any]]:
    """``ask`` every agent at once; each answer, or the error it raised, beside its agent."""
    import asyncio

    answers = await asyncio.gather(*(ask(a) for a in agents), return_exceptions=True)
    for answer in answers:
        if isinstance(answer, BaseException) and not isinstance(answer, PhyError):
            raise answer
    return list(zip(agents, answers, strict=True))


async def find(bus: Bus, args: argparse.Namespace, verb: str) -> tuple[Agent, JobStatus]:
    """Call ``verb`` (``job`` or ``cancel``) for ``args.job_id`` on every agent in scope; the
    one agent that knows the job answers, the others say not found."""
    agents = await agents_on(bus, args)

    async def ask(agent: Agent) -> JobStatus:
        from shared import contracts

        host, svc = agent
        status: JobStatus = await bus.call(host, contracts.spec(svc, verb),
                                           JobRef(job_id=args.job_id), timeout=args.timeout)
        return status

    unreachable = []
    for agent, answer in await on_each(agents, ask):
        if isinstance(answer, JobStatus):
            return agent, answer
        if not isinstance(answer, NotFound):
            unreachable.append(f"{agent[1]} of {agent[0]}: {answer.message}")
    if unreachable:
        raise Unavailable(f"no agent that answered has job {args.job_id!r}, and some did not "
                          f"answer: {'; '.join(unreachable)}")
    where = "any host" if args.all else (
        f"host {args.host!r} ({', '.join(a for _, a in agents)}); add --all to look on every "
        "host")
    raise NotFound(f"no job {args.job_id!r} on {where}")


def row(agent: Agent, status: JobStatus) -> dict[str, Any]:
    """A job as the table and ``--json`` show it: where it runs, then its status."""
    host, svc = agent
    out: dict[str, Any] = {"host": host, "agent": svc, **to_builtins(status)}
    out.pop("type", None)
    return out


def _progress(r: dict[str, Any]) -> str:
    done, total = r["done"], r["total"]
    if not total:
        return "-"
    if r["agent"] in BYTES_AGENTS:
        return f"{common.human_bytes(done)} / {common.human_bytes(total)}"
    return f"{done}/{total}"


def cmd_list(args: argparse.Namespace) -> None:
    async def go(bus: Bus) -> list[tuple[Agent, Any]]:
        agents = await agents_on(bus, args)

        async def ask(agent: Agent) -> JobList:
            from shared import contracts

            host, svc = agent
            jobs: JobList = await bus.call(host, contracts.spec(svc, "jobs"), Empty(),
                                           timeout=args.timeout)
            return jobs

        return await on_each(agents, ask)

    answers = common.call(args, go)
    rows = sorted((row(agent, s) for agent, a in answers if isinstance(a, JobList)
                   for s in a.jobs), key=lambda r: r["started"])
    silent = [{"host": h, "agent": a, "error": e.message} for (h, a), e in answers
              if isinstance(e, PhyError)]
    if args.json:
        common.print_json({"jobs": rows, "unreachable": silent})
    elif not rows:
        print("no jobs" + (" on any host" if args.all else f" on host {args.host}"))
    else:
        for r in rows:
            r["progress"] = _progress(r)
            r["started"] = datetime.fromtimestamp(r["started"]).strftime("%Y-%m-%d %H:%M:%S")
        common.print_table(rows, LIST_COLUMNS)
    for s in silent:
        common.err_console.print(f"[red]error:[/red] the {s['agent']} agent of {s['host']} "
                                 f"did not list its jobs: {s['error']}", highlight=False)
    if silent:
        sys.exit(common.EXIT_UNREACHABLE)


def cmd_show(args: argparse.Namespace) -> None:
    agent, status = common.call(args, lambda bus: find(bus, args, "job"))
    common.show(args, row(agent, status))


def cmd_cancel(args: argparse.Namespace) -> None:
    """Exit 0 once the job is cancelled (also when it was already); 1 when it had ended
    otherwise, so there was nothing left to cancel."""
    agent, status = common.call(args, lambda bus: find(bus, args, "cancel"))
    common.show(args, row(agent, status))
    if status.state != "cancelled":
        common.err_console.print(f"[red]error:[/red] job {status.job_id} ({status.kind}) had "
                                 f"already {status.state}: nothing to cancel", highlight=False)
        sys.exit(common.EXIT_FAILED)


def cmd_watch(args: argparse.Namespace) -> None:
    """A running job is followed through its events (from JetStream, so its end is not
    missed); one that has ended already shows its outcome at once."""
    async def go(bus: Bus) -> JobFinished:
        (host, svc), status = await find(bus, args, "job")
        if status.state != "running":
            return JobFinished(host=host, job_id=status.job_id, kind=status.kind,
                               state=status.state, message=status.message,
                               error_kind=status.error_kind, result=status.result)
        accepted = JobAccepted(job_id=status.job_id, kind=status.kind,
                               subject=subjects.event(host, svc, "job", status.job_id))
        return await common.follow_job(bus, host, svc, accepted, quiet=args.json,
                                       bytes_progress=svc in BYTES_AGENTS)

    common.finish_job(args, common.call(args, go))
