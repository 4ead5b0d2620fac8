"""The bus against a real nats-server: endpoints, typed errors, bad input, events, KV, jobs."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import msgspec
import nats
import pytest

from shared import subjects
from shared.agent import Agent
from shared.bus import Bus
from shared.codec import encode
from shared.errors import (
    BackendError,
    Cancelled,
    Conflict,
    Internal,
    InvalidMessage,
    InvalidName,
    NotFound,
    PayloadTooLarge,
    PhyError,
    Timeout,
    Unavailable,
)
from shared.jobs import succeeded, wait_job
from shared.messages import Ack, Empty, EndpointSpec
from shared.messages import vm as vm_api
from shared.messages.hosts import Heartbeat
from shared.messages.jobs import JobFinished, JobList, JobProgress, JobRef, JobStatus
from shared.natsserver import NatsServer
from tests.support.agents import agent_config
from tests.support.errors import error_classes
from tests.support.wait import until


class Echo(msgspec.Struct, frozen=True, kw_only=True, tag="test.echo.v1"):
    text: str = "default"
    times: int = 1


class Slow(msgspec.Struct, frozen=True, kw_only=True, tag="test.slow.v1"):
    seconds: float = 0.0


ENDPOINTS = (
    EndpointSpec("catalogue", "echo", Echo, Ack, "Repeat the text."),
    EndpointSpec("catalogue", "fail", Echo, Ack, "Raise NotFound."),
    EndpointSpec("catalogue", "crash", Echo, Ack, "Raise a bug."),
    EndpointSpec("catalogue", "create", Echo, Ack, "Count calls (idempotency)."),
    EndpointSpec("catalogue", "slow", Slow, Ack, "Hold the request until released."),
    EndpointSpec("catalogue", "work", Slow, Ack, "Start a job."),
    EndpointSpec("catalogue", "throw", Echo, Ack, "Raise the error class of kind `text`."),
    EndpointSpec("catalogue", "relay", Echo, Ack, "Call `throw` on this host (a peer call)."),
    EndpointSpec("catalogue", "abandon", Echo, Ack, "Count calls, then be cancelled."),
    EndpointSpec("catalogue", "hold", Echo, Ack, "Count calls, then wait until cancelled."),
    EndpointSpec("catalogue", "start", Echo, Ack, "An endpoint named like a lifecycle step."),
)
ERRORS = {cls.kind: cls for cls in error_classes()}


class Handlers:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.created = 0
        self.abandoned = 0
        self.held: list[asyncio.Task[object] | None] = []
        self.slow_entered, self.slow_release = asyncio.Event(), asyncio.Event()

    async def echo(self, req: Echo) -> Ack:
        return Ack(message=req.text * req.times)

    async def fail(self, req: Echo) -> Ack:
        raise NotFound(f"test: no thing named {req.text}")

    async def crash(self, req: Echo) -> Ack:
        raise ZeroDivisionError("bug")

    async def create(self, req: Echo) -> Ack:
        self.created += 1
        await asyncio.sleep(0.05)  # hold the first call open so duplicates overlap it
        if req.text == "refuse":
            raise Conflict(f"test: refused at call {self.created}")
        return Ack(message=f"created {self.created}")

    async def throw(self, req: Echo) -> Ack:
        raise ERRORS[req.text](f"test: a {req.text} error")

    async def relay(self, req: Echo) -> Ack:
        return await self.agent.bus.request(subject("throw"), req, Ack)

    async def abandon(self, req: Echo) -> Ack:
        self.abandoned += 1
        await asyncio.sleep(0.05)
        raise asyncio.CancelledError  # as when the job it awaited was cancelled

    async def hold(self, req: Echo) -> Ack:
        self.held.append(asyncio.current_task())
        await asyncio.Event().wait()
        raise AssertionError("not reached")

    async def start(self, req: Echo) -> Ack:
        return Ack(message=f"endpoint start {req.text}")

    async def slow(self, req: Slow) -> Ack:
        self.slow_entered.set()
        await self.slow_release.wait()
        return Ack(message="released")

    async def work(self, req: Slow) -> Ack:
        async def run(job) -> dict[str, object]:  # type: ignore[no-untyped-def]
            for i in range(5):
                await job.progress(i + 1, 5, "step")
                await asyncio.sleep(req.seconds)
            return {"steps": 5}

        accepted = self.agent.jobs.start("work", run)
        return Ack(message=accepted.job_id)


async def setup(agent: Agent) -> Handlers:
    return Handlers(agent)


class WithLifecycle(Handlers):
    """Handlers that hold resources (``shared.agent.Lifecycle``) and serve a verb ``start``."""

    def __init__(self, agent: Agent) -> None:
        super().__init__(agent)
        self.steps: list[str] = []

    async def begin(self) -> None:
        self.steps.append("begin")

    async def close(self) -> None:
        self.steps.append("close")


async def setup_with_lifecycle(agent: Agent) -> WithLifecycle:
    handlers = WithLifecycle(agent)
    await handlers.begin()
    return handlers


@pytest.fixture
async def agent(nats_server: NatsServer, tmp_path: Path):  # type: ignore[no-untyped-def]
    a = Agent("catalogue", agent_config("catalogue", nats_server.url, tmp_path))
    await a.start(setup, ENDPOINTS)
    yield a
    await a.drain()


@pytest.fixture
async def client(nats_server: NatsServer):  # type: ignore[no-untyped-def]
    bus = await Bus.connect(nats_server.url, name="test", host="h1", give_up_after=5)
    yield bus
    await bus.close()


def subject(verb: str, host: str = "h1") -> str:
    return subjects.command(host, "catalogue", verb)


async def raw(client: Bus, verb: str, payload: bytes) -> nats.aio.msg.Msg:
    return await client.nc.request(subject(verb), payload, timeout=5)


async def test_request_reply_and_empty_body_defaults(agent: Agent, client: Bus) -> None:
    reply = await client.request(subject("echo"), Echo(text="ab", times=2), Ack)
    assert reply == Ack(message="abab")
    assert await client.request(subject("echo"), None, Ack) == Ack(message="default")


async def test_bad_inputs_get_typed_errors_and_the_agent_stays_up(
        agent: Agent, client: Bus, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    cases = [
        (b'{"text": ', "invalid_message", "malformed JSON"),
        (b'{"text": 5}', "invalid_message", "Expected `str`, got `int`"),
        (b'{"type": "vm.spec.v1"}', "invalid_message", "Invalid value 'vm.spec.v1'"),
        (b"[1, 2]", "invalid_message", "Expected `object`"),
        (b'{"text": "' + b"x" * (1 << 20) + b'"}', "payload_too_large", "over the limit"),
    ]
    for payload, kind, text in cases:
        msg = await raw(client, "echo", payload)
        assert msg.headers is not None and "Nats-Service-Error-Code" in msg.headers
        body = msgspec.json.decode(msg.data)
        assert body["kind"] == kind and text in body["message"], body
    with pytest.raises(InvalidMessage):
        await client.request(subject("echo"), {"times": "x"}, Ack)
    with pytest.raises(PayloadTooLarge):
        await client.request(subject("echo"), Echo(text="y" * (2 << 20)), Ack)
    assert await client.request(subject("echo"), Echo(text="ok"), Ack) == Ack(message="ok")
    assert not [r for r in caplog.records if r.exc_info], "bad input logged as an exception"


async def test_errors_cross_the_bus_as_the_same_class(agent: Agent, client: Bus) -> None:
    with pytest.raises(NotFound, match="no thing named zz"):
        await client.request(subject("fail"), Echo(text="zz"), Ack)
    with pytest.raises(Internal) as crashed:
        await client.request(subject("crash"), Echo(), Ack)
    assert str(crashed.value) == ("catalogue on h1: unexpected error in crash; see the agent "
                                  "log")
    assert await client.request(subject("echo"), Echo(text="ok"), Ack) == Ack(message="ok")


async def test_every_error_class_crosses_the_bus_with_its_origin(agent: Agent,
                                                                 client: Bus) -> None:
    for kind, cls in ERRORS.items():
        with pytest.raises(PhyError) as caught:
            await client.request(subject("throw"), Echo(text=kind), Ack)
        err = caught.value
        assert type(err) is cls, f"{cls.__name__} came back as {type(err).__name__}"
        assert (err.kind, err.code, err.message, err.origin) == (
            kind, cls.code, f"test: a {kind} error", "h1/catalogue.throw")
        assert str(err) == f"catalogue on h1: test: a {kind} error"


async def test_an_error_from_a_peer_keeps_the_peers_origin(agent: Agent, client: Bus) -> None:
    with pytest.raises(Conflict) as caught:
        await client.request(subject("relay"), Echo(text="conflict"), Ack)
    assert caught.value.origin == "h1/catalogue.throw"  # not the relaying endpoint
    with pytest.raises(InvalidMessage) as bad:
        await client.request(subject("echo"), {"times": "x"}, Ack)
    assert bad.value.origin == "h1/catalogue.echo"


async def test_a_host_that_does_not_exist_fails_fast(agent: Agent, client: Bus) -> None:
    started = time.monotonic()
    with pytest.raises(Unavailable, match="no catalogue agent for host 'nohost'"):
        await client.request(subject("echo", "nohost"), Echo(), Ack, timeout=30)
    assert time.monotonic() - started < 10  # "no responders" at once, not the 30 s timeout
    with pytest.raises(InvalidName):
        await client.call("bad.host", vm_api.JOBS, Empty())


async def test_slow_handler_does_not_block_other_requests(agent: Agent, client: Bus) -> None:
    slow = asyncio.create_task(client.request(subject("slow"), Slow(), Ack, timeout=30))
    await asyncio.wait_for(agent.handlers.slow_entered.wait(), 10)
    assert await client.request(subject("echo"), Echo(text="q"), Ack) == Ack(message="q")
    assert not slow.done()  # answered while the slow one is held in its handler
    agent.handlers.slow_release.set()
    assert await slow == Ack(message="released")


async def test_an_endpoint_named_start_is_served_and_drain_closes_the_handlers(
        nats_server: NatsServer, tmp_path: Path, client: Bus) -> None:
    a = Agent("catalogue", agent_config("catalogue", nats_server.url, tmp_path))
    await a.start(setup_with_lifecycle, ENDPOINTS)
    try:
        reply = await client.request(subject("start"), Echo(text="x"), Ack)
        assert (reply.message, a.handlers.steps) == ("endpoint start x", ["begin"])
    finally:
        await a.drain()
    assert a.handlers.steps == ["begin", "close"]


async def test_stop_serving_refuses_new_calls_and_finishes_those_in_flight(
        agent: Agent, client: Bus) -> None:
    slow = asyncio.create_task(client.request(subject("slow"), Slow(), Ack, timeout=30))
    await asyncio.wait_for(agent.handlers.slow_entered.wait(), 10)
    await agent.bus.stop_serving()
    with pytest.raises(Unavailable, match="no catalogue agent for host 'h1' answers"):
        await client.request(subject("echo"), Echo(), Ack)
    agent.handlers.slow_release.set()
    assert await asyncio.wait_for(slow, 10) == Ack(message="released")


async def test_idempotency_key_acts_once(agent: Agent, client: Bus) -> None:
    replies = await asyncio.gather(*[
        client.request(subject("create"), Echo(), Ack, idempotency_key="k1") for _ in range(50)])
    assert {r.message for r in replies} == {"created 1"}
    assert agent.handlers.created == 1
    other = await client.request(subject("create"), Echo(), Ack, idempotency_key="k2")
    assert other.message == "created 2"


async def test_a_duplicate_of_a_failed_call_gets_the_same_error(agent: Agent,
                                                                client: Bus) -> None:
    for _ in range(2):
        with pytest.raises(Conflict, match="refused at call 1$"):
            await asyncio.wait_for(client.request(
                subject("create"), Echo(text="refuse"), Ack, idempotency_key="f1"), 5)
    assert agent.handlers.created == 1


async def test_a_duplicate_of_a_cancelled_call_is_answered_and_a_retry_acts(
        agent: Agent, client: Bus) -> None:
    calls = [client.request(subject("abandon"), Echo(), Ack, idempotency_key="c1")
             for _ in range(5)]
    outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
    assert all(isinstance(o, Cancelled) for o in outcomes), outcomes
    assert agent.handlers.abandoned == 1
    with pytest.raises(Cancelled, match="abandon was cancelled before it finished"):
        await asyncio.wait_for(client.request(subject("abandon"), Echo(), Ack,
                                              idempotency_key="c1"), 5)
    assert agent.handlers.abandoned == 2, "nothing was done, so a retry acts again"


async def test_a_duplicate_of_a_call_whose_task_was_cancelled_is_answered(
        agent: Agent, client: Bus) -> None:
    held = agent.handlers.held

    def hold(key: str | None) -> asyncio.Task[Ack]:
        return asyncio.create_task(client.request(subject("hold"), Echo(), Ack, timeout=2,
                                                  idempotency_key=key))

    first = hold("h1")
    await until("the first call to be held", lambda: len(held) == 1, timeout=5)
    duplicate = hold("h1")
    unkeyed = hold(None)  # runs its handler once the duplicate (sent before) is waiting
    await until("the unkeyed call to be held", lambda: len(held) == 2, timeout=5)
    for task in held:
        assert task is not None
        task.cancel()  # the agent's tasks of the calls, as a shutdown would
    with pytest.raises(Cancelled, match="the agent stopped before hold finished"):
        await asyncio.wait_for(duplicate, 5)
    for cancelled in (first, unkeyed):  # no reply for a cancelled call: its deadline says so
        with pytest.raises(Timeout):
            await cancelled
    assert len(held) == 2


async def test_the_same_key_on_another_verb_acts_there_too(agent: Agent, client: Bus) -> None:
    created = await client.request(subject("create"), Echo(), Ack, idempotency_key="v1")
    echoed = await client.request(subject("echo"), Echo(text="e"), Ack, idempotency_key="v1")
    assert (created.message, echoed.message) == ("created 1", "e")


async def test_the_same_key_with_another_body_is_refused(agent: Agent, client: Bus) -> None:
    assert (await client.request(subject("create"), Echo(text="a"), Ack,
                                 idempotency_key="b1")).message == "created 1"
    with pytest.raises(Conflict, match="idempotency key 'b1' was first used with another "
                                       "request; a new request needs a new key"):
        await client.request(subject("create"), Echo(text="b"), Ack, idempotency_key="b1")
    assert agent.handlers.created == 1


async def test_a_restarted_agent_replays_the_first_reply_from_kv(
        nats_server: NatsServer, tmp_path: Path, client: Bus) -> None:
    first = Agent("catalogue", agent_config("catalogue", nats_server.url, tmp_path))
    await first.start(setup, ENDPOINTS)
    try:
        reply = await client.request(subject("create"), Echo(), Ack, idempotency_key="r1")
        with pytest.raises(Conflict, match="refused at call 2"):
            await client.request(subject("create"), Echo(text="refuse"), Ack,
                                 idempotency_key="r2")
    finally:
        await first.drain()
    second = Agent("catalogue", agent_config("catalogue", nats_server.url, tmp_path))
    await second.start(setup, ENDPOINTS)
    try:
        again = await client.request(subject("create"), Echo(), Ack, idempotency_key="r1")
        with pytest.raises(Conflict, match="refused at call 2") as refused:
            await client.request(subject("create"), Echo(text="refuse"), Ack,
                                 idempotency_key="r2")
        assert (again, second.handlers.created) == (reply, 0)
        assert refused.value.origin == "h1/catalogue.create"
        info = await client.js.stream_info(f"KV_{subjects.KV_IDEMPOTENCY}")
        assert info.config.max_age == 24 * 3600, "kept replies expire after a day"
    finally:
        await second.drain()


async def test_micro_discovery_and_heartbeat(agent: Agent, client: Bus,
                                             nats_server: NatsServer) -> None:
    from cli.status import collect

    rows = await asyncio.to_thread(collect, nats_server.url, 0.3)
    mine = [r for r in rows if r["host"] == "h1" and r["agent"] == "catalogue"]
    assert mine and mine[0]["healthy"] and mine[0]["metrics_url"] == agent.metrics_url
    assert {r["agent"] for r in rows if not r["healthy"]} == {"hardware", "vm", "storage"}
    beats = await client.kv_values(subjects.KV_HOSTS, Heartbeat)
    assert [(b.host, b.agent) for b in beats] == [("h1", "catalogue")]
    info = await client.nc.request("$SRV.INFO.phyllome-catalogue", b"", timeout=2)
    endpoints = {e["name"] for e in msgspec.json.decode(info.data)["endpoints"]}
    assert {"echo", "jobs", "job", "cancel"} <= endpoints


async def test_status_lists_an_agent_in_kv_that_does_not_answer(
        agent: Agent, client: Bus, nats_server: NatsServer) -> None:
    from cli.status import collect

    hosts = await client.kv(subjects.KV_HOSTS)
    await hosts.put(subjects.heartbeat_key("h9", "vm"), encode(Heartbeat(
        host="h9", agent="vm", version="1", started=time.time(), time=time.time(),
        metrics_url="")))
    rows = await asyncio.to_thread(collect, nats_server.url, 0.3)
    silent = [r for r in rows if (r["host"], r["agent"]) == ("h9", "vm")]
    assert silent and not silent[0]["healthy"] and silent[0]["heartbeat_age_s"] is not None
    assert [r["healthy"] for r in rows if (r["host"], r["agent"]) == ("h1", "catalogue")] == [True]


async def test_events_are_deduplicated_by_event_id(agent: Agent, client: Bus) -> None:
    from shared.messages import AgentStopping

    event = AgentStopping(host="h1", agent="catalogue", reason="test")
    subj = subjects.event("h1", "catalogue", "agent.stopping")
    assert await client.publish_event(subj, event)
    assert await client.publish_event(subj, event)
    seen = [data async for _s, _t, data in client.events(subj)]
    assert len(seen) == 1 and msgspec.json.decode(seen[0])["event_id"] == event.event_id
    started = [d async for _s, _t, d in client.events("phy.evt.h1.catalogue.agent.started")]
    assert len(started) == 1


async def test_job_progress_outcome_and_cancel(agent: Agent, client: Bus) -> None:
    ack = await client.request(subject("work"), Slow(seconds=0.01), Ack)
    status = await agent.jobs.wait(ack.message)
    assert status.state == "succeeded" and status.result == {"steps": 5}
    events = [msgspec.json.decode(d) async for _s, _t, d in
              client.events(subjects.event("h1", "catalogue", "job", ack.message))]
    assert events[-1]["type"] == "job.finished.v1" and events[-1]["state"] == "succeeded"
    assert any(e["type"] == "job.progress.v1" for e in events)

    ack = await client.request(subject("work"), Slow(seconds=5), Ack)
    cancelled = await client.request(subject("cancel"), JobRef(job_id=ack.message), JobStatus)
    assert cancelled.state == "cancelled" and cancelled.error_kind == Cancelled.kind
    jobs = await client.request(subject("jobs"), None, JobList)
    assert {j.state for j in jobs.jobs} == {"succeeded", "cancelled"}
    with pytest.raises(NotFound, match="no job 'nope'"):
        await client.request(subject("job"), JobRef(job_id="nope"), JobStatus)
    finished = msgspec.json.decode(
        [d async for _s, _t, d in client.events(cancelled_subject(ack.message))][-1],
        type=JobFinished)
    assert finished.state == "cancelled"


def cancelled_subject(job_id: str) -> str:
    return subjects.event("h1", "catalogue", "job", job_id)


async def test_nats_down_at_start_is_retried_with_backoff(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = NatsServer(tmp_path / "late", port=-1)
    server.start()
    port = server.port
    server.stop()
    caplog.set_level(logging.WARNING)
    connecting = asyncio.create_task(Bus.connect(f"nats://127.0.0.1:{port}", name="t", host="h1"))
    await until("a retry to be logged", lambda: "retrying in" in caplog.text, timeout=10)
    assert "NATS not reachable at nats://127.0.0.1:" in caplog.text
    server.start()
    bus = await asyncio.wait_for(connecting, 15)
    await bus.close()
    server.stop()
    with pytest.raises(Unavailable, match="cannot reach NATS"):
        await Bus.connect(f"nats://127.0.0.1:{port}", name="t", host="h1", give_up_after=0.5)


async def test_agent_survives_nats_restart_on_the_same_port(
        agent: Agent, nats_server: NatsServer) -> None:
    nats_server.kill()
    nats_server.start()
    bus = await Bus.connect(nats_server.url, name="after", host="h1", give_up_after=5)
    try:
        async def echo() -> Ack | None:
            try:
                reply: Ack = await bus.request(subject("echo"), Echo(text="back"), Ack,
                                               timeout=1)
                return reply
            except Unavailable:
                return None

        reply = await until("the agent to answer after the restart", echo, timeout=20,
                            interval=0.1)
        assert reply == Ack(message="back")
        assert agent.metrics.bus_reconnects._value.get() >= 1
        assert await agent.publish("agent.started", msgspec.structs.replace(
            _started(agent), event_id="after-restart"))
    finally:
        await bus.close()


def _started(agent: Agent):  # type: ignore[no-untyped-def]
    from shared.messages import AgentStarted

    return AgentStarted(host=agent.host, agent=agent.name, version=agent.version,
                        metrics_url=agent.metrics_url)


async def test_metrics_endpoint_serves_common_series(agent: Agent, client: Bus) -> None:
    import httpx

    await client.request(subject("echo"), Echo(), Ack)
    async with httpx.AsyncClient() as http:
        text = (await http.get(agent.metrics_url)).text
    assert 'phyllome_catalogue_requests_total{endpoint="echo",outcome="ok"}' in text
    assert "phyllome_catalogue_bus_connected 1.0" in text
    assert "phyllome_catalogue_build_info" in text
    assert encode(Ack()) == b'{"type":"ack.v1","message":""}'


async def test_a_job_cancelled_before_its_work_began_is_cancelled(agent: Agent,
                                                                 client: Bus) -> None:
    started: list[int] = []

    async def work(job) -> dict[str, object]:  # type: ignore[no-untyped-def]
        started.append(1)
        return {}

    accepted = agent.jobs.start("never", work)  # no await in between: the task has not run
    status = await agent.jobs.cancel(JobRef(job_id=accepted.job_id))
    assert status.state == "cancelled" and not started
    outcomes = [msgspec.json.decode(data, type=JobFinished) async for _s, _t, data in
                client.events(accepted.subject) if b'"job.finished.v1"' in data]
    assert [o.state for o in outcomes] == ["cancelled"]  # the outcome event went out, once


async def test_wait_job_follows_the_progress_events_to_the_outcome(agent: Agent,
                                                                   client: Bus) -> None:
    seen: list[str] = []
    all_seen = asyncio.Event()

    async def work(job) -> dict[str, object]:  # type: ignore[no-untyped-def]
        for i in range(3):
            await job.progress(i + 1, 4, f"step {i + 1}", now=True)
        await all_seen.wait()  # ends only once the waiter has seen every step's event
        return {"steps": 3}

    async def on_progress(event: JobProgress) -> None:
        seen.append(event.message)
        if len(seen) == 3:
            all_seen.set()

    accepted = agent.jobs.start("steps", work)
    outcome = await wait_job(client, "h1", "catalogue", accepted, timeout=10,
                             on_progress=on_progress)
    assert outcome.state == "succeeded" and outcome.result == {"steps": 3}
    assert seen == ["step 1", "step 2", "step 3"]


async def test_wait_job_sees_a_job_that_ended_before_the_call(agent: Agent,
                                                              client: Bus) -> None:
    async def work(job) -> dict[str, object]:  # type: ignore[no-untyped-def]
        raise Conflict("the disk is busy; stop the VM first")

    accepted = agent.jobs.start("early", work)
    await agent.jobs.wait(accepted.job_id)
    outcome = await wait_job(client, "h1", "catalogue", accepted.job_id, timeout=10)
    assert (outcome.state, outcome.error_kind) == ("failed", Conflict.kind)
    assert outcome.message == "the disk is busy; stop the VM first"
    with pytest.raises(BackendError, match=r"early job \w+ on h1 failed: the disk is busy"):
        succeeded(outcome)


async def test_wait_job_times_out_naming_the_job(agent: Agent, client: Bus) -> None:
    async def work(job) -> dict[str, object]:  # type: ignore[no-untyped-def]
        await asyncio.Event().wait()
        return {}

    accepted = agent.jobs.start("forever", work)
    with pytest.raises(Timeout, match=f"catalogue job {accepted.job_id} on h1 did not finish "
                                      r"within 0.5 s"):
        await wait_job(client, "h1", "catalogue", accepted, timeout=0.5)
    await agent.jobs.cancel(JobRef(job_id=accepted.job_id))


async def test_wait_job_for_an_agent_that_is_gone_fails_at_once(agent: Agent,
                                                                client: Bus) -> None:
    started = time.monotonic()
    with pytest.raises(Unavailable, match="no storage agent for host 'h1' answers"):
        await wait_job(client, "h1", "storage", "0123abcd", timeout=60)
    assert time.monotonic() - started < 30  # not at the deadline
