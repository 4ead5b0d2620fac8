"""Pure cluster logic: placement, host views from heartbeats, the host-down watch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from services.hardware.hostwatch import HostWatch
from services.hardware.inventory import Inventory, host_caps
from services.hardware.resources import mdev_rooms, memory_bytes, passable
from services.hardware.sysfs import Sysfs
from shared.cluster import HostView, host_views
from shared.errors import InsufficientResources
from shared.messages import HostDown, HostUp
from shared.messages.hardware import GuestArch, HostCaps, HostResources
from shared.messages.hosts import Heartbeat, HeartbeatDetails
from shared.messages.storage import PoolRoom
from shared.messages.vm import VmRecord, VmSpec
from shared.placement import committed_mib, needs, place, refusal
from tests.support.sysfs_tree import FIXTURES, Pci, build

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


# -- host devices, as the hardware agent publishes them from fixture trees ---------------------

GVTG_MDEV = "9f5c1a2e-5f7b-4c1e-8a5b-3a4f1e2d3c4b"  # made on intel-gvtg's iGPU
NVIDIA_CARD = ["0000:01:00.0", "0000:01:00.1", "0000:01:00.2", "0000:01:00.3"]  # intel-desktop


def fixture_view(host: str, fixture: str, tmp_path: Path) -> HostView:
    """A host whose hardware agent published the devices of fixture tree ``fixture``."""
    tree = FIXTURES[fixture]()
    inventory = Inventory(Sysfs(str(build(tmp_path / host, tree).root), root_dev=tree.root_dev))
    inventory.scan()
    devices = inventory.devices()
    return view(host, devices=passable(devices), mdevs=mdev_rooms(devices))


@pytest.fixture
def hosts(tmp_path: Path) -> list[HostView]:
    return [fixture_view("desk", "intel-desktop", tmp_path),
            fixture_view("nic", "sriov-nic", tmp_path),
            fixture_view("gvt", "intel-gvtg", tmp_path)]


@pytest.mark.parametrize(("hostdevs", "host", "has"), [
    (NVIDIA_CARD, "desk", "1 GPU(s) (+3 function(s))"),
    (["0000:03:10.0", "0000:03:10.2"], "nic", "2 VF(s) of 0000:03:00.0"),
    ([GVTG_MDEV.upper()], "gvt", "1 mdev i915-GVTg_V5_4"),
    (["0000:03:00.0", "0000:03:00.1"], "nic", "2 other device(s)"),  # both ports of the PF
])
def test_a_vm_goes_where_its_devices_are_counted_by_what_they_are(
        hosts: list[HostView], hostdevs: list[str], host: str, has: str) -> None:
    choice = place(needs(VmSpec(name="x", hostdevs=hostdevs)), hosts)
    assert choice.host == host and choice.reason.endswith(f"has UEFI, {has}"), choice
    assert len(choice.passed_over) == 2 and all(
        "no passable device" in why or "no mediated device" in why
        for why in choice.passed_over.values()), choice.passed_over


@pytest.mark.parametrize(("hostdevs", "why"), [
    (NVIDIA_CARD[:2], "desk: 0000:01:00.0 must be passed with 0000:01:00.2, 0000:01:00.3 "
                      "(the other functions of its card)"),
    (["0000:00:02.0"], "desk: no passable device 0000:00:02.0"),  # the boot GPU
    (["0000:03:10.4"], "nic: no passable device 0000:03:10.4"),  # no such VF made
    (["0c3b1f7e-0000-4000-8000-000000000001"],
     "gvt: no mediated device 0c3b1f7e-0000-4000-8000-000000000001; make one with "
     "`phyllome hw mdev create PARENT TYPE --uuid 0c3b1f7e-0000-4000-8000-000000000001` "
     "(types with room: i915-GVTg_V5_4 on 0000:00:02.0 (1 free), i915-GVTg_V5_8 on "
     "0000:00:02.0 (2 free))"),
])
def test_devices_a_host_cannot_give_are_named(hosts: list[HostView], hostdevs: list[str],
                                              why: str) -> None:
    with pytest.raises(InsufficientResources, match="no host can take this VM") as e:
        place(needs(VmSpec(name="x", hostdevs=hostdevs)), hosts)
    assert why in e.value.message


def test_a_card_bound_to_vfio_gives_each_function_alone(tmp_path: Path) -> None:
    """The vm agent's own rule: a function on vfio-pci already (``phyllome hw bind`` took
    its whole group) needs nothing more."""
    tree = FIXTURES["intel-desktop"]()
    tree.devices = [Pci(**{**d.__dict__, "driver": "vfio-pci"}) if d.addr in NVIDIA_CARD
                    else d for d in tree.devices]
    inventory = Inventory(Sysfs(str(build(tmp_path, tree).root), root_dev=tree.root_dev))
    inventory.scan()
    devices = inventory.devices()
    bound = view("desk", devices=passable(devices), mdevs=mdev_rooms(devices))
    choice = place(needs(VmSpec(name="x", hostdevs=NVIDIA_CARD[:1])), [bound])
    assert choice.reason.endswith("has UEFI, 1 GPU(s)")


def caps_view(host: str, fixture: str, tmp_path: Path, *, kvm_usable: bool = True) -> HostView:
    """A host whose hardware agent read its caps from fixture tree ``fixture``."""
    tree = FIXTURES[fixture]()
    fs = Sysfs(str(build(tmp_path / host, tree).root), root_dev=tree.root_dev)
    caps = msgspec.structs.replace(host_caps(fs, None), kvm_usable=kvm_usable)
    return msgspec.structs.replace(view(host), caps=caps)


@pytest.mark.parametrize(("mode", "host"), [("sev-snp", "epyc"), ("sev-es", "epyc"),
                                             ("sev", "epyc"), ("tdx", "spr")])
def test_a_confidential_vm_goes_where_its_technology_is(tmp_path: Path, mode: str,
                                                        host: str) -> None:
    views = [caps_view("epyc", "epyc-snp", tmp_path),
             caps_view("spr", "sapphire-rapids-tdx", tmp_path),
             caps_view("amd", "amd-desktop", tmp_path)]
    choice = place(needs(VmSpec(name="x", confidential=mode)), views)  # type: ignore[arg-type]
    assert choice.host == host and mode.upper() in choice.reason
    assert choice.passed_over["amd"] == f"no {mode.upper()} under a usable KVM"


def test_a_confidential_vm_needs_a_usable_kvm(tmp_path: Path) -> None:
    with pytest.raises(InsufficientResources, match="epyc: no SEV-SNP under a usable KVM"):
        place(needs(VmSpec(name="x", confidential="sev-snp")),
              [caps_view("epyc", "epyc-snp", tmp_path, kvm_usable=False)])


ARM = GuestArch(arch="aarch64", emulator="/usr/bin/qemu-system-aarch64", uefi=True,
                secure_boot=True)
X86 = GuestArch(arch="x86_64", emulator="/usr/bin/qemu-system-x86_64", uefi=True,
                secure_boot=True)


def test_an_aarch64_vm_goes_where_its_qemu_and_aavmf_are() -> None:
    spec = VmSpec(name="arm", arch="aarch64", machine="virt", secure_boot=True)
    choice = place(needs(spec), [view("a", mem_gib=12, guest_archs=[X86]),
                                 view("b", guest_archs=[X86, ARM]), view("old")])
    assert choice.host == "b" and "has aarch64, UEFI, Secure Boot" in choice.reason
    assert choice.passed_over["a"] == ("no qemu-system-aarch64 for aarch64 guests "
                                       "(apt-get install qemu-system-arm)")
    assert choice.passed_over["old"].startswith("no qemu-system-aarch64")
    # x86_64 guests still go to hosts from before guest_archs
    assert place(needs(VmSpec(name="x")), [view("old")]).host == "old"


@pytest.mark.parametrize(("have", "spec", "why"), [
    (msgspec.structs.replace(ARM, uefi=False, secure_boot=False), {},
     "no UEFI firmware for aarch64 guests (AAVMF: apt-get install qemu-efi-aarch64)"),
    (msgspec.structs.replace(ARM, secure_boot=False), {"secure_boot": True},
     "no Secure Boot firmware for aarch64 guests (AAVMF with Microsoft's keys"),
    (msgspec.structs.replace(ARM, emulator=""), {}, "no qemu-system-aarch64"),
])
def test_what_a_host_lacks_for_an_aarch64_vm_is_named(have: GuestArch, spec: dict[str, Any],
                                                     why: str) -> None:
    need = needs(VmSpec(name="arm", arch="aarch64", machine="virt", **spec))
    # the refusal migration's preflight applies to its target too
    assert why in (refusal(view("a", guest_archs=[X86, have]), need, 0) or "")
    with pytest.raises(InsufficientResources, match="no host can take this VM"):
        place(need, [view("a", guest_archs=[X86, have])])
