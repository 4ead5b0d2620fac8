"""Pure parts of the vm agent: libvirt words, the accelerator decision, metrics, disk checks."""

from __future__ import annotations

import ast
import asyncio
import grp
import ipaddress
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import msgspec
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from services.vm import accel, addresses, health, hostfs, networks
from services.vm.addresses import AddressWatch
from services.vm.handlers import Handlers, random_mac, redacted
from services.vm.hypervisor import Domain, DomainStats
from services.vm.libvirt_backend import event_words, state_words
from services.vm.metrics import VmMetrics
from shared.errors import BadRequest, Conflict, NotFound
from shared.messages.hardware import Passthrough, PciDevice
from shared.messages.net import Network
from shared.messages.vm import (
    AcceleratorDecision,
    AddressSource,
    GuestAddress,
    Nic,
    VmAddressesChanged,
    VmSpec,
)
from tests.support.require import require
from tests.support.wait import until

pytestmark = pytest.mark.unit


def test_vm_libvirt_numbers_become_words() -> None:
    assert event_words(2, 0) == ("started", "booted")
    assert event_words(5, 1) == ("stopped", "destroyed")
    assert event_words(3, 0) == ("suspended", "paused")
    assert event_words(99, 7) == ("99", "7")
    assert state_words(1, 1) == ("running", "booted")
    assert state_words(5, 2) == ("shutoff", "destroyed")
    assert state_words(3, 1) == ("paused", "user")
    assert state_words(42, 0) == ("unknown", "")


async def test_vm_accelerator_forced_cached_and_refused(tmp_path: Path) -> None:
    forced = await accel.decide("tcg", tmp_path, tmp_path, deadline_s=1)
    assert (forced.accelerator, forced.kvm_usable) == ("tcg", None)
    with pytest.raises(BadRequest, match="not one of auto, kvm, tcg"):
        await accel.decide("xen", tmp_path, tmp_path, deadline_s=1)

    cached = AcceleratorDecision(policy="auto", accelerator="kvm", kvm_usable=True,
                                 note="cached", boot_id=accel.boot_id())
    (tmp_path / accel.CACHE_NAME).write_bytes(msgspec.json.encode(cached))
    assert await accel.decide("auto", tmp_path / "no-image", tmp_path, deadline_s=1) == cached

    stale = msgspec.structs.replace(cached, boot_id="another-boot")
    (tmp_path / accel.CACHE_NAME).write_bytes(msgspec.json.encode(stale))
    fresh = await accel.decide("auto", tmp_path / "no-image", tmp_path, deadline_s=1)
    assert fresh.accelerator == "tcg" and "probe guest is missing" in fresh.note
    # a probe that could not run is not remembered: the next start asks again
    assert msgspec.json.decode((tmp_path / accel.CACHE_NAME).read_bytes(),
                               type=AcceleratorDecision) == stale


class FakeHypervisor:
    """Only what the metrics collector reads."""

    def bulk_stats(self) -> list[DomainStats]:
        return [
            DomainStats(uuid="u1", name="web", state="running", cpu_time_s=1.5,
                        memory_bytes=256 << 20, block_read_bytes=4096, net_rx_bytes=10,
                        net_rx_packets=3, net_tx_packets=2),
            DomainStats(uuid="u2", name="db", state="shutoff"),
        ]


def test_vm_metrics_come_from_one_bulk_call_and_pass_promtool() -> None:
    registry = CollectorRegistry()
    m = VmMetrics(registry, FakeHypervisor(), lambda: {"u1": 1700000000.0})  # type: ignore[arg-type]
    with m.operation("start"):
        pass
    with pytest.raises(Conflict), m.operation("start"):
        raise Conflict("running already")
    text = generate_latest(registry).decode()
    assert 'phyllome_vm_vms{state="running"} 1.0' in text
    assert 'phyllome_vm_vms{state="shutoff"} 1.0' in text
    assert 'phyllome_vm_cpu_seconds_total{uuid="u1",vm="web"} 1.5' in text
    assert 'phyllome_vm_disk_read_bytes_total{uuid="u1",vm="web"} 4096.0' in text
    assert 'phyllome_vm_network_receive_packets_total{uuid="u1",vm="web"} 3.0' in text
    assert 'phyllome_vm_network_transmit_packets_total{uuid="u1",vm="web"} 2.0' in text
    assert 'phyllome_vm_boot_time_seconds{uuid="u1",vm="web"} 1.7e+09' in text
    assert 'operation="start",outcome="conflict"} 1.0' in text
    promtool = shutil.which("promtool")
    require(promtool is not None, "promtool (package prometheus)")
    done = subprocess.run([str(promtool), "check", "metrics"], input=text, text=True,
                          capture_output=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_vm_disks_must_be_raw(tmp_path: Path) -> None:
    raw = tmp_path / "ok.raw"
    raw.write_bytes(bytes(1024))
    hostfs.check_raw(str(raw))
    for magic, fmt in ((b"QFI\xfb", "qcow2"), (b"KDMV", "vmdk"), (b"vhdxfile", "vhdx")):
        bad = tmp_path / f"bad.{fmt}"
        bad.write_bytes(magic + bytes(512))
        with pytest.raises(BadRequest, match=f"is {fmt}, not RAW.*qemu-img convert"):
            hostfs.check_raw(str(bad))
    with pytest.raises(NotFound, match="does not exist"):
        hostfs.check_raw(str(tmp_path / "missing.raw"))
    with pytest.raises(BadRequest, match="not a file"):
        hostfs.check_raw(str(tmp_path))


def _dev(driver: str = "", **passthrough: object) -> PciDevice:
    p = Passthrough(**passthrough) if passthrough else None  # type: ignore[arg-type]
    return PciDevice(address="0000:01:00.0", vendor_id="10de", device_id="1b80", driver=driver,
                     passthrough=p)


def test_vm_hostdev_verdicts() -> None:
    Handlers._passable(_dev("vfio-pci"), ["0000:01:00.0"])
    Handlers._passable(_dev("nvidia", verdict="isolated"), ["0000:01:00.0"])
    with pytest.raises(Conflict, match="also holds 0000:00:1f.3"):
        Handlers._passable(_dev("nvidia", verdict="shared-group", shares_with=["0000:00:1f.3"]),
                           ["0000:01:00.0"])
    with pytest.raises(Conflict, match="cannot be bound"):
        Handlers._passable(_dev("nvidia", verdict="no-iommu"), ["0000:01:00.0"])
    with pytest.raises(Conflict, match="together with 0000:01:00.1"):
        Handlers._passable(_dev("nvidia", verdict="with-companions",
                                companions=["0000:01:00.1"]), ["0000:01:00.0"])
    Handlers._passable(_dev("nvidia", verdict="with-companions", companions=["0000:01:00.1"]),
                       ["0000:01:00.0", "0000:01:00.1"])
    with pytest.raises(Conflict, match="host would lose the boot GPU"):
        Handlers._passable(_dev("i915", verdict="isolated", host_loses=["the boot GPU"]),
                           ["0000:01:00.0"])


def test_vm_macs_and_redaction() -> None:
    mac = random_mac()
    assert mac.startswith("52:54:00:") and len(mac) == 17 and mac != random_mac()
    assert redacted(VmSpec(name="a", password="pw")).password == "********"
    assert redacted(VmSpec(name="a")).password == ""


class _Dom:
    def UUIDString(self) -> str:  # noqa: N802 - libvirt's name
        return "u1"

    def name(self) -> str:
        return "d1"


def test_a_shut_off_domain_has_no_cpu_time() -> None:
    """libvirt 9 reports libvirtd's own CPU time for a domain with no QEMU process."""
    from services.vm.libvirt_backend import _stats

    off = _stats(_Dom(), {"state.state": 5, "state.reason": 0, "cpu.time": 6_560_000_000,
                          "balloon.current": 65536})
    assert (off.state, off.cpu_time_s, off.memory_bytes) == ("shutoff", 0.0, 0)
    on = _stats(_Dom(), {"state.state": 1, "state.reason": 1, "cpu.time": 2_000_000_000,
                         "net.count": 2, "net.0.rx.pkts": 5, "net.1.rx.pkts": 7,
                         "net.0.tx.pkts": 1, "net.1.tx.bytes": 900})
    assert on.cpu_time_s == 2.0
    assert (on.net_rx_packets, on.net_tx_packets, on.net_tx_bytes) == (12, 1, 900)


def test_vm_guest_addresses_leave_loopback_out() -> None:
    from services.vm.libvirt_backend import _addresses

    found = _addresses({
        "lo": {"hwaddr": "00:00:00:00:00:00", "addrs": [{"type": 0, "addr": "127.0.0.1",
                                                          "prefix": 8}]},
        "eth0": {"hwaddr": "52:54:00:aa:bb:cc", "addrs": [
            {"type": 1, "addr": "fe80::1", "prefix": 64},
            {"type": 0, "addr": "10.89.0.17", "prefix": 24}]},
    })
    assert [(a.nic, a.family, a.address, a.prefix) for a in found] == [
        ("eth0", "ipv4", "10.89.0.17", 24), ("eth0", "ipv6", "fe80::1", 64)]
    assert {a.mac for a in found} == {"52:54:00:aa:bb:cc"}


def test_vm_a_subnet_that_overlaps_a_route_or_a_network_is_refused() -> None:
    lan = [(ipaddress.IPv4Network("192.168.1.0/24"), "eth0")]
    nets = [Network(name="phyllome", mode="nat", subnet="10.89.0.0/24")]
    assert "overlaps network phyllome (10.89.0.0/24)" in networks.collision(
        ipaddress.IPv4Network("10.89.0.0/16"), lan, nets)
    assert "route to 192.168.1.0/24 (dev eth0)" in networks.collision(
        ipaddress.IPv4Network("192.168.1.128/25"), lan, nets)
    assert networks.collision(ipaddress.IPv4Network("10.90.0.0/24"), lan, nets) == ""
    assert str(networks.free_subnet(lan, nets)) == "10.89.1.0/24"
    full = [(ipaddress.IPv4Network("10.89.0.0/16"), "vpn0")]
    with pytest.raises(Conflict, match="set \\[vm\\] nat_subnet"):
        networks.free_subnet(full, [])


def test_vm_only_the_libvirt_backend_speaks_libvirt() -> None:
    """The Hypervisor Protocol speaks VmSpec: libvirt and its domain XML stay in one module."""
    libvirt_words = {"libvirt", "libvirtaio", "services.vm.domain_xml"}
    for path in sorted((Path(__file__).parents[2] / "services" / "vm").glob("*.py")):
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        if path.name not in ("libvirt_backend.py", "domain_xml.py"):
            assert not imported & libvirt_words, f"{path.name} imports {imported & libvirt_words}"


@pytest.mark.parametrize(("mode", "owner", "group", "uid", "gids", "ok"), [
    (0o600, 0, 0, 64055, {109, 64055}, False),   # a fresh host without udev: root only
    (0o660, 0, 109, 64055, {109, 64055}, True),  # Debian's udev rule; QEMU's user in kvm
    (0o660, 0, 109, 64055, {64055}, False),      # the rule, but QEMU's user not in kvm
    (0o666, 0, 0, 64055, {64055}, True),
    (0o066, 64055, 0, 64055, {64055}, False),    # the owner's bits win over group and others
    (0o640, 0, 109, 64055, {109}, False),        # read is not enough
    (0o000, 0, 0, 0, {0}, True),                 # QEMU as root ("+0") opens anything
])
def test_vm_kvm_node_access_as_libvirt_checks_it(mode: int, owner: int, group: int, uid: int,
                                                 gids: set[int], ok: bool) -> None:
    assert health.can_open_rw(mode, owner, group, uid, gids) is ok


def test_vm_kvm_access_reads_qemus_user_from_qemu_conf(tmp_path: Path) -> None:
    node, conf = tmp_path / "kvm", tmp_path / "qemu.conf"
    node.touch(mode=0o600)
    nobody = pwd.getpwnam("nobody")
    conf.write_text('#user = "root"\nuser = "nobody"   # comment\ngroup = "nogroup"\n')
    assert health.qemu_identity(str(conf)) == (
        "nobody", nobody.pw_uid,
        set(os.getgrouplist("nobody", nobody.pw_gid)) | {grp.getgrnam("nogroup").gr_gid})
    problem = health.kvm_access(str(node), str(conf))
    assert problem is not None and problem.kind == "kvm-access"
    assert f"QEMU's user nobody cannot open {node} (-rw-------" in problem.what
    assert f"chgrp kvm {node} && chmod 0660 {node}" in problem.fix
    node.chmod(0o666)
    assert health.kvm_access(str(node), str(conf)) is None
    node.chmod(0o600)
    conf.write_text('user = "+0"\n')
    assert health.kvm_access(str(node), str(conf)) is None
    conf.write_text('user = "no-such-user-here"\n')
    assert health.kvm_access(str(node), str(conf)) is None  # no QEMU user: nothing to judge
    assert health.kvm_access(str(tmp_path / "absent"), str(conf)) is None


def test_vm_a_slow_repeated_capability_query_means_reprobing() -> None:
    assert health.reprobing(0.04) is None
    assert health.reprobing(health.REPROBE_S) is None
    slow = health.reprobing(48.2)
    assert slow is not None and "took 48.2 s" in slow.what
    assert "chgrp kvm /dev/kvm && chmod 0660 /dev/kvm" in slow.fix and "make up" in slow.fix


class BootingHypervisor:
    """One running VM with a NIC whose address shows up on the ``lease_on``-th read."""

    connected = True

    def __init__(self, lease_on: int) -> None:
        self.reads = 0
        self.lease_on = lease_on

    async def domains(self) -> list[Domain]:
        return [Domain(uuid="u1", name="web", state="running",
                       spec=VmSpec(name="web", nics=[Nic()]))]

    async def addresses(self, uuid: str) -> tuple[AddressSource, list[GuestAddress]]:
        self.reads += 1
        if self.reads < self.lease_on:
            return "", []
        return "lease", [GuestAddress(nic="vnet0", mac="", family="ipv4",
                                      address="10.89.0.5", prefix=24)]


class Publisher:
    host = "h1"

    def __init__(self) -> None:
        self.events: asyncio.Queue[VmAddressesChanged] = asyncio.Queue()

    async def publish(self, name: str, event: VmAddressesChanged, key: str) -> None:
        self.events.put_nowait(event)


async def test_vm_addresses_are_read_fast_until_a_booting_vm_has_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A booting VM's first address is published after fast reads, not after the slow
    interval; then (and past the window of a VM that never gets one) the slow one applies."""
    hv, agent = BootingHypervisor(lease_on=4), Publisher()
    watch = AddressWatch(agent, hv)  # type: ignore[arg-type]
    loop = asyncio.create_task(watch.run(interval_s=60.0, fast_s=0.01))
    try:
        event = await asyncio.wait_for(agent.events.get(), 5)
        assert (event.name, event.source, hv.reads) == ("web", "lease", 4)
        assert not watch.fast()
        await asyncio.sleep(0.1)
        assert hv.reads == 4  # back on the 60 s interval
    finally:
        loop.cancel()

    monkeypatch.setattr(addresses, "FAST_FOR_S", 0.05)
    never = BootingHypervisor(lease_on=1 << 30)
    watch = AddressWatch(Publisher(), never)  # type: ignore[arg-type]
    loop = asyncio.create_task(watch.run(interval_s=60.0, fast_s=0.01))
    try:
        await until("fast reads", lambda: never.reads >= 3, timeout=5, interval=0.01)
        await until("the window to close", lambda: not watch.fast(), timeout=5, interval=0.01)
        await asyncio.sleep(0.05)  # the read after the last fast sleep
        reads = never.reads
        await asyncio.sleep(0.1)
        assert never.reads == reads
    finally:
        loop.cancel()
