"""Pure cluster logic: placement, host views from heartbeats, the host-down watch."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from services.hardware.hostwatch import HostWatch
from services.hardware.resources import memory_bytes
from shared.cluster import HostView, host_views
from shared.errors import InsufficientResources
from shared.messages import HostDown, HostUp
from shared.messages.hardware import HostCaps, HostResources
from shared.messages.hosts import Heartbeat, HeartbeatDetails
from shared.messages.storage import PoolRoom
from shared.messages.vm import VmRecord, VmSpec
from shared.placement import committed_mib, needs, place

pytestmark = pytest.mark.unit
GiB = 1 << 30


def view(host: str, *, state: str = "up", mem_gib: float = 8, free_gib: float = 100,
         **res: Any) -> HostView:
    resources = HostResources(memory_total_bytes=int(16 * GiB),
                              memory_available_bytes=int(mem_gib * GiB),
                              uefi=True, secure_boot=True, tpm=True)
    return HostView(host=host, state=state, agents=["hardware", "storage", "vm"],  # type: ignore[arg-type]
                    resources=msgspec.structs.replace(resources, **res),
                    caps=HostCaps(arch="x86_64", nested=False, kvm_usable=False),
                    pools={"default": PoolRoom(path="/p", free_bytes=int(free_gib * GiB))},
                    reason="" if state == "up" else "no heartbeat for 30 s")


def test_most_memory_left_wins_and_the_reason_says_why() -> None:
    choice = place(needs(VmSpec(name="x", memory_mib=1024, tpm="emulated-2.0")),
                   [view("a", mem_gib=4), view("b", mem_gib=6), view("c", state="down")])
    assert choice.host == "b"
    assert choice.reason == ("b: up, 5.0 GiB memory left after this VM (most of 2 host(s) "
                             "that fit), has UEFI, TPM")
    assert choice.passed_over == {"a": "fits, with less memory left than b",
                                  "c": "down (no heartbeat for 30 s)"}


def test_memory_promised_to_defined_vms_counts() -> None:
    records = [VmRecord(spec=VmSpec(name=f"v{i}", memory_mib=4096), host="b") for i in range(3)]
    choice = place(needs(VmSpec(name="x", memory_mib=2048)), [view("a", mem_gib=4),
                   view("b", mem_gib=8)], committed_mib(records))
    assert choice.host == "a"  # b: 16 - 12 GiB promised = 4 GiB, a: 4 GiB; a tie: the name


@pytest.mark.parametrize(("spec", "host_res", "why"), [
    (VmSpec(name="x", memory_mib=9000), {}, "memory free after its 0 MiB of VMs, the VM "
     "needs 9000 MiB"),
    (VmSpec(name="x", tpm="emulated-2.0"), {"tpm": False}, "no swtpm for an emulated TPM"),
    (VmSpec(name="x", secure_boot=True), {"secure_boot": False}, "no Secure Boot firmware"),
    (VmSpec(name="x", firmware="uefi"), {"uefi": False}, "no UEFI firmware (OVMF)"),
    (VmSpec(name="x", nested=True), {}, "no nested virtualization under a usable KVM"),
    (VmSpec(name="x", hostdevs=["0000:01:00.0"]), {}, "no passable device 0000:01:00.0"),
])
def test_every_refusal_is_named(spec: VmSpec, host_res: dict[str, Any], why: str) -> None:
    with pytest.raises(InsufficientResources, match="no host can take this VM") as e:
        place(needs(spec), [view("a", **host_res), view("z", state="down")])
    assert why in e.value.message and "z: down (no heartbeat for 30 s)" in e.value.message


def test_disk_room_and_missing_pool() -> None:
    with pytest.raises(InsufficientResources, match="pool 'default' has 1.0 GiB free, the "
                       "disk needs 2.0 GiB"):
        place(needs(VmSpec(name="x"), disk_bytes=2 * GiB), [view("a", free_gib=1)])
    with pytest.raises(InsufficientResources, match="no pool 'fast'"):
        place(needs(VmSpec(name="x"), pool="fast"), [view("a")])
    with pytest.raises(InsufficientResources, match="no hosts known"):
        place(needs(VmSpec(name="x")), [])


def beat(host: str, agent: str, t: float) -> Heartbeat:
    return Heartbeat(host=host, agent=agent, version="1", started=1.0, time=t, metrics_url="")


def test_host_views_up_down_and_remembered() -> None:
    views = host_views([beat("a", "vm", 100.0), beat("a", "storage", 99.0),
                        beat("b", "vm", 80.0)], now=101.0, ttl_s=20,
                       known=["c"], vm_hosts=["a", "c", "c"])
    assert [(v.host, v.state, v.vms) for v in views] == [("a", "up", 1), ("b", "up", 0),
                                                         ("c", "down", 2)]
    assert views[0].agents == ["storage", "vm"] and views[0].reason == ""
    assert views[1].reason == "its last beat is 21 s away by this clock: a clock is off"
    assert views[2].reason == "no heartbeat (expired)"


def test_a_host_view_merges_what_each_agent_published() -> None:
    caps = HostCaps(arch="x86_64", kvm_usable=True)
    res = HostResources(cpus=8, memory_available_bytes=GiB)
    room = PoolRoom(path="/p", free_bytes=2 * GiB)
    beats = [msgspec.structs.replace(beat("a", "hardware", 100.0), details=HeartbeatDetails(
                 caps=caps, resources=res)),
             msgspec.structs.replace(beat("a", "storage", 100.0), details=HeartbeatDetails(
                 pools={"default": room})),
             beat("a", "vm", 100.0)]
    (a,) = host_views(beats, now=100.0, ttl_s=20)
    assert (a.caps, a.resources, a.pools) == (caps, res, {"default": room})
    # through JSON as KV holds it, and as `phyllome hosts --json` prints it
    again = msgspec.json.decode(msgspec.json.encode(beats[0]), type=Heartbeat)
    assert again.details.resources == res
    assert msgspec.json.decode(b'{"host":"a","agent":"hardware","version":"1","started":1,'
                               b'"time":2,"metrics_url":"","details":{"caps":null,'
                               b'"newer_field":1}}', type=Heartbeat).details.caps is None


@pytest.mark.parametrize("jump", [-3600.0, 3600.0])
def test_a_clock_jump_changes_no_verdict(jump: float) -> None:
    """Liveness comes from the server's TTL, not from anyone's wall clock."""
    beats = [beat("a", "vm", 100.0), beat("b", "vm", 99.0)]
    steady = host_views(beats, now=101.0, ttl_s=20)
    jumped = host_views(beats, now=101.0 + jump, ttl_s=20)
    assert [(v.host, v.state) for v in steady] == [(v.host, v.state) for v in jumped] == [
        ("a", "up"), ("b", "up")]
    w = HostWatch("a", ttl_s=10)  # the down/up watcher runs on the monotonic clock
    assert w.observe([("b.vm", 1, beats[1])], now=0.0) == []
    assert w.observe([("b.vm", 2, beat("b", "vm", 99.0 + jump))], now=9.0) == []


def test_host_watch_says_down_once_then_up_with_ids_every_watcher_shares() -> None:
    w1, w2 = HostWatch("a", ttl_s=10), HostWatch("b", ttl_s=10)
    entries = [("c.vm", 5, beat("c", "vm", 1000.0)), ("a.vm", 6, beat("a", "vm", 1000.0))]
    for w in (w1, w2):
        assert w.observe(entries, now=0.0) == []
    fresh = [entries[0], ("a.vm", 9, beat("a", "vm", 1005.0))]
    assert w1.observe(fresh, now=5.0) == []
    # w2 sees one more beat of c before it stops: the same id all the same
    assert w2.observe([("c.vm", 7, beat("c", "vm", 1001.0)), entries[1]], now=1.0) == []
    down1, down2 = w1.observe(fresh, now=10.5), w2.observe(fresh, now=11.0)
    assert [type(e) for e in down1] == [HostDown] and [type(e) for e in down2] == [HostDown]
    assert down1[0].event_id == down2[0].event_id == "host-down-c-1000"
    assert isinstance(down1[0], HostDown) and down1[0].down_host == "c"
    assert w1.observe(fresh, now=12.0) == []  # said once
    back = [("c.vm", 12, Heartbeat(host="c", agent="vm", version="1", started=2000.0,
                                   time=2000.0, metrics_url=""))]
    up = w1.observe(back, now=13.0)
    assert [type(e) for e in up] == [HostUp, HostDown]  # c is back; a's keys vanished
    assert up[0].event_id == "host-up-c-2000000"


def test_meminfo_parsing() -> None:
    assert memory_bytes("MemTotal:  16 kB\nMemFree: 4 kB\nMemAvailable: 8 kB\n") == (
        16384, 8192)
