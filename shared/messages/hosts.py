"""The records of KV ``hosts``: each agent's heartbeat, with what it tells the cluster.

Every agent rewrites its record (key ``<host>.<agent>``) within the bucket's TTL; the NATS
server drops a record its agent stopped rewriting, so a host with no record is down. Each
agent fills its own part of ``details``; readers (``phyllome hosts``, placement) merge the
parts of one host's records::

    >>> hb = Heartbeat(host="h1", agent="storage", version="1", started=1.0, time=2.0,
    ...                metrics_url="", details=HeartbeatDetails(
    ...                    pools={"default": PoolRoom(path="/p", free_bytes=8)}))
    >>> hb.details.pools["default"].free_bytes
    8
"""

from __future__ import annotations

import msgspec

from shared.messages.catalogue import ImageCounts
from shared.messages.hardware import HostCaps, HostResources, StuckWrite
from shared.messages.storage import PoolRoom
from shared.messages.vm import AcceleratorDecision


class HeartbeatDetails(msgspec.Struct, frozen=True, kw_only=True, tag="host.details.v1"):
    """What an agent tells the cluster beside being alive; each agent sets its own fields."""

    caps: HostCaps | None = None  # the hardware agent
    resources: HostResources | None = None  # the hardware agent, refreshed before each beat
    stuck_writes: dict[str, StuckWrite] = {}  # the hardware agent: by device, writes stuck
    pools: dict[str, PoolRoom] = {}  # the storage agent, refreshed before each beat
    accelerator: AcceleratorDecision | None = None  # the vm agent
    # the vm agent, before each beat: memory promised to the VMs defined on its host, running
    # or not (placement reads it here, not every VM record); None from an agent before it
    vm_memory_mib: int | None = None
    images: ImageCounts | None = None  # the catalogue agent


class Problem(msgspec.Struct, frozen=True, kw_only=True, tag="host.problem.v1"):
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
    details: HeartbeatDetails = HeartbeatDetails()
    problems: list[Problem] = []  # what ``phyllome status`` shows under the agent
