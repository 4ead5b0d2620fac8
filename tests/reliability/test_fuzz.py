"""Every endpoint of every agent fuzzed through the real bus.

Per agent: ``FUZZ_PER_AGENT`` messages (10,000 by default; ``PHYLLOME_FUZZ_PER_AGENT`` for a
longer run) spread over its endpoints — shaped requests from hypothesis strategies built on
the msgspec request types, wrong-typed JSON and raw bytes. Pass: every reply is a typed error
or a valid result, nothing is logged as an unhandled exception, the agent still answers, and
its memory is steady.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import time
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from shared import contracts, subjects
from shared.codec import decode
from shared.errors import ErrorReply
from shared.natsserver import NatsServer
from tests.support.agents import agent_in_process
from tests.support.figures import figure
from tests.support.fuzz import fuzz_payloads
from tests.support.libvirt import TEST_HOST_XML
from tests.support.nats import nats_server
from tests.support.sysfs_tree import TreeKernel, amd_desktop, build

__all__ = ["nats_server"]

FUZZ_PER_AGENT = int(os.environ.get("PHYLLOME_FUZZ_PER_AGENT", "10000"))
CONCURRENCY = 64
KNOWN_KINDS = {"bad_request", "invalid_message", "invalid_name", "payload_too_large",
               "forbidden", "not_found", "conflict", "insufficient_resources", "cancelled",
               "unavailable", "timeout", "backend"}
# Endpoints that only start a job whose effects the fuzz does not need: fewer messages.
SLOW = {"bind", "release", "pull", "refresh", "send", "clone", "import", "start", "reboot",
        "shutdown", "boot_probe"}


def overrides(name: str, tmp: Path) -> dict[str, Any]:
    if name == "hardware":
        tree = build(tmp / "sys", amd_desktop())
        return {"sysfs_root": str(tree.root), "_kernel": TreeKernel(tree)}
    if name == "vm":
        host = tmp / "libvirt-host.xml"
        host.write_text(TEST_HOST_XML)
        return {"libvirt_uri": f"test://{host}", "accelerator": "tcg"}
    if name == "catalogue":
        return {"extra": {"osinfo_dir": "", "probe_interval_s": 0, "auto_pull": []}}
    return {}


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", subjects.SERVICES)
async def test_fuzz_agent_endpoints(name: str, nats_server: NatsServer, tmp_path: Path,
                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    specs = contracts.endpoints(name)
    weights = {s.verb: (1 if s.verb in SLOW else 4) for s in specs}
    unit = FUZZ_PER_AGENT / sum(weights.values())
    plan = [(s, p) for s in specs
            for p in fuzz_payloads(s.request, max(20, int(unit * weights[s.verb])))]
    opts = overrides(name, tmp_path)
    kernel = opts.pop("_kernel", None)
    async with agent_in_process(name, nats_server.url, tmp_path / "state", "fz", **opts) as agent:
        if kernel is not None:
            agent.handlers.fs.after_write = kernel
        nc = await nats.connect(nats_server.url)
        gate = asyncio.Semaphore(CONCURRENCY)
        problems: list[str] = []
        counts = {"ok": 0, "error": 0}

        async def send(spec: Any, payload: bytes) -> None:
            async with gate:
                try:
                    msg = await nc.request(subjects.command("fz", name, spec.verb), payload,
                                           timeout=30)
                except nats.errors.TimeoutError:
                    problems.append(f"{spec.verb}: no reply to {payload[:120]!r}")
                    return
            if msg.headers and "Nats-Service-Error-Code" in msg.headers:
                reply = msgspec.json.decode(msg.data, type=ErrorReply)
                counts["error"] += 1
                if reply.kind not in KNOWN_KINDS:
                    problems.append(f"{spec.verb}: {reply.kind} for {payload[:120]!r}: "
                                    f"{reply.message}")
            else:
                decode(msg.data, spec.response)  # a valid result of the declared type
                counts["ok"] += 1

        started = time.perf_counter()
        half = len(plan) // 2
        await asyncio.gather(*(send(s, p) for s, p in plan[:half]))
        gc.collect()
        rss_half = rss_mib()
        await asyncio.gather(*(send(s, p) for s, p in plan[half:]))
        gc.collect()
        rss_end = rss_mib()
        took = time.perf_counter() - started
        ping = await nc.request(f"$SRV.PING.{subjects.micro_name(name)}", b"", timeout=5)
        assert b'"fz"' in ping.data, "the agent stopped answering"
        await nc.close()
    assert not problems, "\n".join(problems[:20])
    unhandled = [r for r in caplog.records if r.exc_info]
    assert not unhandled, f"{len(unhandled)} unhandled: {unhandled[0].getMessage()}"
    assert counts["ok"] + counts["error"] == len(plan) >= 0.95 * FUZZ_PER_AGENT
    assert rss_end - rss_half < 64, f"memory grew {rss_end - rss_half:.0f} MiB in the 2nd half"
    figure(f"fuzz {name}", messages=len(plan), endpoints=len(specs), ok=counts["ok"],
           typed_errors=counts["error"], unhandled=0, seconds=round(took, 1),
           rss_growth_2nd_half_mib=round(rss_end - rss_half, 1))
