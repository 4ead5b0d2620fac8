"""A migration's commit rides out a KV stream electing a leader (a link that was cut and came
back leaves JetStream answering 503 for some seconds): it waits and tries again instead of
rolling back disks it has moved, and the error it reports past the wait says what happened."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import nats.js.errors
import pytest

from services.vm.migration import through_elections
from services.vm.state import VmStates
from shared.agent import Agent
from shared.codec import encode
from shared.errors import Conflict, Unavailable
from shared.messages.vm import MigrationLock, VmRecord, VmSpec


def test_the_commit_tries_again_while_jetstream_elects_a_leader() -> None:
    calls = []

    async def attempt() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise Unavailable("KV vms did not answer")
        return "handed over"

    assert asyncio.run(through_elections(attempt, wait_s=5)) == "handed over"
    assert len(calls) == 3


def test_the_commit_gives_up_after_the_wait_with_the_last_error() -> None:
    async def attempt() -> None:
        raise Unavailable("KV vms did not answer")

    with pytest.raises(Unavailable, match="did not answer"):
        asyncio.run(through_elections(attempt, wait_s=0.5))


def test_the_commit_does_not_retry_a_conflict() -> None:
    calls = []

    async def attempt() -> None:
        calls.append(1)
        raise Conflict("the record changed under us")

    with pytest.raises(Conflict):
        asyncio.run(through_elections(attempt, wait_s=5))
    assert len(calls) == 1


class Entry:
    def __init__(self, value: bytes) -> None:
        self.value, self.revision = value, 7


class ElectingKv:
    """KV ``vms`` while its stream has no leader: answered 503 (reads too, unless ``kept``)."""

    def __init__(self, kept: bytes = b"") -> None:
        self.kept = kept

    async def get(self, key: str) -> Entry:
        if not self.kept:
            raise nats.js.errors.ServiceUnavailableError()
        return Entry(self.kept)

    async def update(self, key: str, value: bytes, last: int) -> int:
        raise nats.js.errors.ServiceUnavailableError()


class Bus:
    def __init__(self, kv: ElectingKv) -> None:
        self._kv = kv

    async def kv(self, bucket: str) -> ElectingKv:
        return self._kv


class FakeAgent:
    host = "a"

    def __init__(self, kv: ElectingKv) -> None:
        self.bus = Bus(kv)


def test_a_kv_stream_without_a_leader_is_unavailable_not_a_conflict() -> None:
    uuid = "91befb0a-f855-4d93-a085-54113f73f5db"
    states = VmStates(cast(Agent, FakeAgent(ElectingKv())), cast(Any, None), cast(Any, None))
    with pytest.raises(Unavailable, match="electing a new leader: retry in a few seconds"):
        asyncio.run(states.load(uuid))
    # the read is served, the compare-and-set of the commit is not
    locked = VmRecord(spec=VmSpec(name="g1", uuid=uuid), host="a", migration=MigrationLock(
        job_id="j1", source="a", target="b", since=0.0))
    states = VmStates(cast(Agent, FakeAgent(ElectingKv(encode(locked)))), cast(Any, None),
                      cast(Any, None))
    with pytest.raises(Unavailable, match="electing a new leader"):
        asyncio.run(states.hand_over(uuid, "j1", "b", [], "tcg"))
