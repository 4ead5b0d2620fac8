"""Message types: msgspec Structs, frozen, keyword-only, tagged ``<domain>.<name>.v<N>``.

Every domain module (``hardware``, ``vm``, ``storage``, ``catalogue``, ``jobs``) declares its
structs and an ``ENDPOINTS`` tuple of ``EndpointSpec`` (verb, request type, response type);
agents bind handlers to those specs and the CLI calls through them, so both sides share
one contract. ``docs/contracts.md`` is generated from these tuples.

    >>> from shared.codec import encode
    >>> encode(Ack(message="ok"))
    b'{"type":"ack.v1","message":"ok"}'
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec


def new_id() -> str:
    """A fresh id for an event, a job or an idempotency key."""
    return uuid.uuid4().hex


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every event: who published it, when, and the id JetStream dedups on."""

    host: str
    event_id: str = msgspec.field(default_factory=new_id)
    time: float = msgspec.field(default_factory=time.time)


class Empty(msgspec.Struct, frozen=True, kw_only=True, tag="empty.v1"):
    """The request of an endpoint that takes no parameters."""


class Ack(msgspec.Struct, frozen=True, kw_only=True, tag="ack.v1"):
    """The reply of an endpoint that only confirms."""

    message: str = ""


class AgentStarted(Event, frozen=True, kw_only=True, tag="agent.started.v1"):
    agent: str
    version: str
    metrics_url: str


class AgentStopping(Event, frozen=True, kw_only=True, tag="agent.stopping.v1"):
    agent: str
    reason: str = ""


class HostDown(Event, frozen=True, kw_only=True, tag="host.down.v1"):
    """No agent of ``down_host`` has beaten for the TTL (or all of them stopped).

    Every watching host publishes it with the same event id, derived from the start time of
    the host's agents, so JetStream stores it once per run of that host.
    """

    down_host: str
    last_beat: float
    agents: list[str] = []
    reason: str = ""


class HostUp(Event, frozen=True, kw_only=True, tag="host.up.v1"):
    """``up_host`` beats again after it was down (stored once, like ``HostDown``)."""

    up_host: str
    agents: list[str] = []


class Problem(msgspec.Struct, frozen=True, kw_only=True):
    """Something on an agent's host that an operator should fix; the agent keeps working.

    ``kind`` is a stable word for scripts (``kvm-access``), ``what`` says what is wrong and
    what it costs, ``fix`` what to run.
    """

    kind: str
    what: str
    fix: str


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True, tag="host.heartbeat.v1"):
    """An agent's record in KV ``hosts`` (key ``<host>.<agent>``), refreshed within the TTL."""

    host: str
    agent: str
    version: str
    started: float
    time: float
    metrics_url: str
    details: dict[str, Any] = {}
    problems: list[Problem] = []  # what ``phyllome status`` shows under the agent


Req = TypeVar("Req")
Resp = TypeVar("Resp")


@dataclass(frozen=True)
class EndpointSpec(Generic[Req, Resp]):
    """One request/reply endpoint: ``phy.<host>.<service>.<verb>``, typed end to end.

    Callers hand the spec itself to the bus, so the request is checked and the reply typed::

        info = await bus.call(host, storage_api.INFO, VolumeQuery(name="d"))  # -> VolumeInfo

    Specs are validated when built (like ``nats.micro`` endpoint configs): a bad service or
    verb fails at import, not at the first call.
    """

    service: str
    verb: str
    request: type[Req]
    response: type[Resp]
    doc: str
    max_payload: int = 1 << 20

    def __post_init__(self) -> None:
        for what, token in (("service", self.service), ("verb", self.verb)):
            if not token or not token.replace("_", "").isalnum() or not token.islower():
                raise ValueError(f"endpoint {what} {token!r}: lower-case letters, digits and _")
        if self.max_payload <= 0:
            raise ValueError(f"endpoint {self.service}.{self.verb}: max_payload must be > 0")
