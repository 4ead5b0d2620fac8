"""What placement reads: the memory promised per host from the vm agents' heartbeats (VM
records only for a heartbeat without the figure), and the memory a caller placed since a
host's last beat (``Recent``), so that a burst spreads."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.cluster import HostView, host_views
from shared.errors import InsufficientResources
from shared.messages.hardware import HostCaps, HostResources
from shared.messages.hosts import Heartbeat, HeartbeatDetails
from shared.messages.storage import PoolRoom
from shared.messages.vm import VmRecord, VmSpec
from shared.placement import (
    Recent,
    beat_revisions,
    lacking_figure,
    memory_left,
    needs,
    place,
    promised_mib,
)

pytestmark = pytest.mark.unit
GiB, MiB = 1 << 30, 1 << 20


def view(host: str, *, promised: int | None = 0, avail_gib: float = 8, total_gib: float = 16,
         agents: tuple[str, ...] = ("hardware", "storage", "vm"), **kw: Any) -> HostView:
    return HostView(host=host, state="up", agents=list(agents), vm_memory_mib=promised,
                    resources=HostResources(memory_total_bytes=int(total_gib * GiB),
                                            memory_available_bytes=int(avail_gib * GiB),
                                            uefi=True),
                    caps=HostCaps(arch="x86_64"),
                    pools={"default": PoolRoom(path="/p", free_bytes=100 * GiB)}, **kw)


def records(host: str, *mibs: int) -> list[VmRecord]:
    return [VmRecord(spec=VmSpec(name=f"{host}{i}", memory_mib=m), host=host)
            for i, m in enumerate(mibs)]


def test_the_heartbeat_figure_is_what_a_host_has_promised() -> None:
    beats = [Heartbeat(host="a", agent="vm", version="1", started=1, time=10, metrics_url="",
                       details=HeartbeatDetails(vm_memory_mib=3072)),
             Heartbeat(host="a", agent="hardware", version="1", started=1, time=10,
                       metrics_url=""),
             Heartbeat(host="b", agent="vm", version="1", started=1, time=10, metrics_url="")]
    a, b = host_views(beats, now=10, ttl_s=20)
    assert (a.vm_memory_mib, b.vm_memory_mib) == (3072, None)
    # the records say otherwise for a: the heartbeat wins; b has no figure: its records count
    assert promised_mib([a, b], records("a", 64) + records("b", 512, 256)) == {
        "a": 3072, "b": 768}
    assert promised_mib([a, b]) == {"a": 3072}  # records not read: b promised nothing known
    # through JSON as KV holds it; a beat from an agent before the figure decodes to None
    old = b'{"host":"b","agent":"vm","version":"1","started":1,"time":2,"metrics_url":""}'
    assert msgspec.json.decode(old, type=Heartbeat).details.vm_memory_mib is None


def test_records_are_read_only_for_hosts_that_could_take_the_vm_and_lack_the_figure() -> None:
    views = [view("a", promised=0), view("b", promised=None),
             view("c", promised=None, agents=("hardware", "storage")),
             msgspec.structs.replace(view("d", promised=None), state="down")]
    need = needs(VmSpec(name="x", memory_mib=1024))
    assert lacking_figure(views, need) == ["b"]
    assert lacking_figure(views[:1], need) == []
    assert lacking_figure(views, needs(VmSpec(name="x", tpm="emulated-2.0"))) == []  # no TPM


def test_a_host_without_the_figure_is_judged_by_its_records() -> None:
    a, b = view("a", promised=None), view("b", promised=0, avail_gib=6)
    promised = promised_mib([a, b], records("a", 12 * 1024))  # a: 16 - 12 GiB = 4 GiB left
    assert place(needs(VmSpec(name="x", memory_mib=1024)), [a, b], promised).host == "b"


def test_memory_placed_since_the_last_beat_counts_against_free_and_total() -> None:
    v = view("a", promised=4096, avail_gib=8, total_gib=16)
    assert memory_left(v, 4096) == 8 * GiB
    assert memory_left(v, 4096, 1024) == 7 * GiB  # free memory knew nothing of it
    assert memory_left(view("a", avail_gib=15), 12 * 1024, 1024) == 3 * GiB  # nor the total
    with pytest.raises(InsufficientResources, match=r"after its 4096 MiB of VMs and 7680 MiB "
                       r"placed since its last beat, the VM needs 1024 MiB"):
        place(needs(VmSpec(name="x", memory_mib=1024)), [v], {"a": 4096}, {"a": 7680})


def test_recent_counts_beats_of_the_figure_else_any_of_the_host() -> None:
    def hb(host: str, agent: str, figure: int | None = None) -> Heartbeat:
        return Heartbeat(host=host, agent=agent, version="1", started=1, time=1,
                         metrics_url="", details=HeartbeatDetails(vm_memory_mib=figure))

    beats = [("a.hardware", 9, hb("a", "hardware")), ("a.vm", 5, hb("a", "vm", 0)),
             ("b.storage", 4, hb("b", "storage")), ("b.vm", 6, hb("b", "vm"))]
    assert beat_revisions(beats) == {"a": 5, "b": 6}


def test_recent_counts_until_two_newer_beats_or_its_age() -> None:
    now = [0.0]
    recent = Recent(max_age_s=30, clock=lambda: now[0])
    recent.add("a", revision=10, memory_mib=512)
    recent.add("a", revision=10, memory_mib=256)
    recent.add("b", revision=7, memory_mib=128)
    assert recent.pending({"a": 10, "b": 7}) == {"a": 768, "b": 128}
    assert recent.pending({"a": 12, "b": 7}) == {"a": 768, "b": 128}  # may predate the define
    assert recent.pending({"a": 12}) == {"a": 768, "b": 128}  # b not beating: kept
    assert recent.pending({"a": 15, "b": 7}) == {"b": 128}  # a's second newer beat counts them
    now[0] = 31.0
    assert recent.pending({"b": 7}) == {}  # too old to matter whatever the beats say


@settings(max_examples=40, deadline=None)
@given(hosts=st.integers(min_value=1, max_value=12), vms=st.integers(min_value=1, max_value=60),
       jitter=st.lists(st.integers(min_value=0, max_value=64), min_size=12, max_size=12))
def test_a_burst_between_two_beats_spreads(hosts: int, vms: int, jitter: list[int]) -> None:
    """Every host reports about the same free memory (the last beat's), none beats during the
    burst: with Recent the VMs spread evenly, where the last beat's best took them all."""
    views = [view(f"h{i:02d}", avail_gib=64, total_gib=128) for i in range(hosts)]
    views = [msgspec.structs.replace(v, resources=msgspec.structs.replace(
        v.resources, memory_available_bytes=64 * GiB + jitter[i] * MiB))  # type: ignore[arg-type]
        for i, v in enumerate(views)]
    recent = Recent()
    revisions = {v.host: 1 for v in views}
    count: dict[str, int] = {}
    for i in range(vms):
        need = needs(VmSpec(name=f"v{i}", memory_mib=512))
        host = place(need, views, {}, recent.pending(revisions)).host
        recent.add(host, revisions[host], need.memory_mib)
        count[host] = count.get(host, 0) + 1
    per = -(-vms // hosts)  # the jitter (< 512 MiB) may shift one VM, never pile them up
    assert max(count.values()) <= per + 1
    assert sum(count.values()) == vms
    without = {place(needs(VmSpec(name="x", memory_mib=512)), views).host for _ in range(3)}
    assert len(without) == 1  # no memo: the same host again and again
