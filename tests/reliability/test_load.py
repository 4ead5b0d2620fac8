"""Load and faults with figures: concurrent requests per agent, a sustained event stream
through a nats-server kill -9, and one idempotency key under 1,000 concurrent creates.

CI runs reduced sizes; ``PHYLLOME_FULL_SIZE=1`` runs the sizes of docs/reliability.md.
Each test prints its figure (``pytest -s``) and appends it to ``build/reliability.jsonl``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import nats
import nats.js.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from shared import contracts, subjects
from shared.bus import Bus
from shared.codec import to_builtins
from shared.messages import AgentStopping
from shared.messages import vm as vm_api
from shared.messages.vm import VmCreate, VmListRequest, VmSpec
from shared.natsserver import NatsServer
from tests.reliability.test_fuzz import overrides
from tests.support.agents import agent_in_process
from tests.support.figures import FULL, figure

CHEAP = {"hardware": "list", "vm": "list", "storage": "pools", "catalogue": "sources"}


def stable(reply: object) -> object:
    """A reply without the figures that move with the rest of the machine (free space)."""
    def strip(v: object) -> object:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k != "free_bytes"}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v
    return strip(to_builtins(reply))


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", subjects.SERVICES)
async def test_concurrent_requests_all_answered(name: str, nats_server: NatsServer,
                                                tmp_path: Path) -> None:
    count = 1000
    opts = overrides(name, tmp_path)
    opts.pop("_kernel", None)
    spec = contracts.spec(name, CHEAP[name])
    async with agent_in_process(name, nats_server.url, tmp_path / "state", "ld", **opts):
        bus = await Bus.connect(nats_server.url, name="load", host="ld", give_up_after=5)
        alone = stable(await bus.call("ld", spec, spec.request()))
        latencies: list[float] = []

        async def one() -> object:
            started = time.perf_counter()
            reply = await bus.call("ld", spec, spec.request(), timeout=60)
            latencies.append(time.perf_counter() - started)
            return reply

        started = time.perf_counter()
        replies = await asyncio.gather(*(one() for _ in range(count)))
        wall = time.perf_counter() - started
        await bus.close()
    wrong = [r for r in replies if stable(r) != alone]
    assert not wrong, f"{len(wrong)} of {count} replies differ from the answer to one request, " \
                      f"e.g. {wrong[0]!r:.300}"
    figure(f"concurrent {name}.{CHEAP[name]}", requests=count, wall_s=round(wall, 3),
           p50_ms=round(percentile(latencies, 50) * 1000, 2),
           p99_ms=round(percentile(latencies, 99) * 1000, 2))


@pytest.mark.timeout(600)
async def test_event_stream_survives_server_kill_nothing_lost_nothing_duplicated(
        nats_server: NatsServer) -> None:
    rate, seconds = (10_000, 60) if FULL else (5_000, 6)
    total = rate * seconds
    bus = await Bus.connect(nats_server.url, name="pub", host="ev", give_up_after=5)
    await bus.ensure_stream()
    js = bus.js
    subject = subjects.event("ev", "storage", "load")
    await js.add_consumer(subjects.STREAM, ConsumerConfig(
        durable_name="reader", ack_policy=AckPolicy.EXPLICIT, filter_subject=subject,
        max_ack_pending=50_000))
    ids = [f"ev-{i}" for i in range(total)]
    payloads = {i: msgspec.json.encode(AgentStopping(host="ev", agent="storage", event_id=i))
                for i in ids}
    seen: dict[str, int] = {}
    done = asyncio.Event()

    async def read() -> None:
        reader = await nats.connect(nats_server.url, max_reconnect_attempts=-1,
                                    reconnect_time_wait=0.2)
        sub = await reader.jetstream().pull_subscribe_bind("reader", stream=subjects.STREAM)
        while len(seen) < total:
            try:
                msgs = await sub.fetch(1000, timeout=1)
            except (nats.errors.TimeoutError, nats.errors.Error, nats.js.errors.Error):
                continue
            for m in msgs:
                eid = msgspec.json.decode(m.data)["event_id"]
                seen[eid] = seen.get(eid, 0) + 1
                await m.ack()
        done.set()
        await reader.close()

    async def publish(batch: list[str]) -> list[str]:
        """Publish pipelined; return the ids that were not acknowledged (to retry)."""
        futures = []
        for i in batch:
            try:
                futures.append((i, await js.publish_async(
                    subject, payloads[i], headers={"Nats-Msg-Id": i}, wait_stall=1)))
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
                futures.append((i, None))
        failed = []
        for i, fut in futures:
            if fut is None:
                failed.append(i)
                continue
            try:
                await asyncio.wait_for(fut, 5)
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error):
                failed.append(i)
        return failed

    reader_task = asyncio.create_task(read())
    started = time.perf_counter()
    retried = 0
    killed = False
    step = rate // 10
    for n in range(0, total, step):
        batch = ids[n:n + step]
        if not killed and n >= total // 2:
            nats_server.kill()  # kill -9 in the middle
            nats_server.start()
            killed = True
        while batch:
            batch = await publish(batch)
            retried += len(batch)
        target = started + (n + step) / rate
        if (ahead := target - time.perf_counter()) > 0:
            await asyncio.sleep(ahead)  # pace to the target rate
    publish_s = time.perf_counter() - started
    await asyncio.wait_for(done.wait(), 120)
    await reader_task
    info = await js.stream_info(subjects.STREAM)
    await bus.close()
    lost = [i for i in ids if i not in seen]
    redelivered = sum(c - 1 for c in seen.values())
    assert not lost, f"{len(lost)} events lost, e.g. {lost[:5]}"
    assert info.state.messages == total, "the stream holds duplicates or misses events"
    figure("events through nats-server kill -9", events=total, target_rate=rate,
           achieved_rate=round(total / publish_s), retried_publishes=retried,
           stored=info.state.messages, lost=len(lost), consumer_redeliveries=redelivered)


@pytest.mark.timeout(300)
async def test_one_idempotency_key_creates_exactly_one_vm(nats_server: NatsServer,
                                                           tmp_path: Path) -> None:
    opts = overrides("vm", tmp_path)
    async with agent_in_process("vm", nats_server.url, tmp_path / "state", "id",
                                **opts) as agent:
        bus = await Bus.connect(nats_server.url, name="dup", host="id", give_up_after=5)
        create = VmCreate(spec=VmSpec(name="once", firmware="bios"))
        replies = await asyncio.gather(*(
            bus.call("id", vm_api.CREATE, create, idempotency_key="create-once", timeout=120)
            for _ in range(1000)), return_exceptions=True)
        errors = [r for r in replies if isinstance(r, BaseException)]
        vms = await bus.call("id", vm_api.LIST, VmListRequest())
        defined = await agent.handlers.hv.domains()  # libvirt's own list: the truth
        await bus.close()
    assert not errors, errors[:3]
    assert [d.name for d in defined] == ["once"]
    assert [v.spec.name for v in vms.vms] == ["once"]
    assert len({r.uuid for r in replies}) == 1  # type: ignore[union-attr]
    figure("1,000 concurrent duplicate creates", requests=1000, vms_created=len(vms.vms))
