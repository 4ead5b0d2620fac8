"""``phyllome hw``: PCI/IOMMU inventory, passthrough readiness, VFIO, mdev, SR-IOV.

    phyllome hw report --json            # from this host's hardware agent (its live
                                         # inventory); scanned here when none answers
    phyllome hw report --host h2         # another host's, from its hardware agent
    phyllome hw report --local           # scanned here, no agent or NATS needed
    phyllome hw report --sysfs-root DIR  # scanned here, on a recorded or constructed tree
    phyllome hw list --class gpu
    phyllome hw bind 0000:01:00.0        # the device and its group companions -> vfio-pci
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

import msgspec

from cli import common
from shared import subjects
from shared.errors import BadRequest, PhyError, Timeout, Unavailable
from shared.messages import Empty
from shared.messages import hardware as hardware_api
from shared.messages.hardware import (
    BindRequest,
    DeviceQuery,
    DeviceRef,
    HostCaps,
    HwReport,
    MdevCreate,
    MdevRef,
    PciDevice,
    SriovSet,
)

if TYPE_CHECKING:
    from cli.syncbus import SyncBus

DEVICE_COLUMNS = [("address", "ADDRESS"), ("ids", "IDS"), ("class_name", "CLASS"),
                  ("name", "NAME"), ("driver", "DRIVER"), ("iommu_group", "GROUP"),
                  ("verdict", "PASSTHROUGH")]
KINDS = ("gpu", "audio", "usb", "net", "storage")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmds = common.group(sub, "hw", "PCI devices, IOMMU groups, passthrough, host capabilities")

    p = cmds.add_parser("report", help="the passthrough readiness report")
    common.add_common(p)
    p.add_argument("--local", action="store_true",
                   help="scan this machine here instead of asking its hardware agent")
    p.add_argument("--sysfs-root", default=os.environ.get("PHYLLOME_SYSFS_ROOT", "/sys"),
                   help="scan this sysfs tree here instead of /sys (implies --local)")
    p.set_defaults(func=cmd_report)

    p = cmds.add_parser("list", help="PCI devices with their readiness")
    common.add_common(p)
    p.add_argument("--class", dest="kind", choices=KINDS, help="only devices of this kind")
    p.set_defaults(func=cmd_list)

    p = cmds.add_parser("groups", help="IOMMU groups and their members")
    common.add_common(p)
    p.set_defaults(func=cmd_groups)

    p = cmds.add_parser("caps", help="host capabilities (KVM, nested, IOMMU, SEV/TDX)")
    common.add_common(p)
    p.set_defaults(func=cmd_caps)

    p = cmds.add_parser("bind", help="bind a device and its group companions to vfio-pci")
    common.add_common(p)
    p.add_argument("address")
    p.add_argument("--force", action="store_true",
                   help="pass a shared IOMMU group whole (the unrelated devices go too)")
    p.add_argument("--single-gpu", action="store_true",
                   help="allow the boot GPU (the host loses its display)")
    common.add_job_options(p)
    p.set_defaults(func=cmd_bind)

    p = cmds.add_parser("release", help="give a bound group back to its original drivers")
    common.add_common(p)
    p.add_argument("address")
    common.add_job_options(p)
    p.set_defaults(func=cmd_release)

    mcmds = common.group(cmds, "mdev", "mediated devices (vGPU, GVT-g)")
    p = mcmds.add_parser("types", help="mdev types each parent offers")
    common.add_common(p)
    p.set_defaults(func=cmd_mdev_types)
    p = mcmds.add_parser("create", help="create a mediated device")
    common.add_common(p)
    p.add_argument("address")
    p.add_argument("type", help="a type id from `phyllome hw mdev types`")
    p.add_argument("--uuid", default="", help="the new device's UUID (default: a fresh one)")
    p.set_defaults(func=cmd_mdev_create)
    p = mcmds.add_parser("remove", help="remove a mediated device")
    common.add_common(p)
    p.add_argument("uuid")
    p.set_defaults(func=cmd_mdev_remove)

    p = cmds.add_parser("sriov", help="set the number of SR-IOV virtual functions of a PF")
    common.add_common(p)
    p.add_argument("address")
    p.add_argument("num_vfs", type=int)
    p.set_defaults(func=cmd_sriov)


# -- the local report -------------------------------------------------------------------------


def local_report(sysfs_root: str) -> HwReport:
    """The inventory and verdicts of this machine (or a tree), without agent or bus."""
    from services.hardware.inventory import Inventory, host_caps
    from services.hardware.sysfs import Sysfs

    fs = Sysfs(sysfs_root)
    if not fs.exists("bus/pci/devices"):
        raise BadRequest(f"{sysfs_root} has no bus/pci/devices: not a sysfs tree")
    inv = Inventory(fs)
    inv.scan()
    if fs.real and fs.kvm_device():
        from services.hardware.kvm import probe_in_child

        return inv.report(host_caps(fs, probe_in_child()))
    return inv.report(host_caps(fs, None))


def cmd_report(args: argparse.Namespace) -> None:
    """The host's hardware agent answers with its inventory (kept current by uevents, the
    vm agent's boot probe in it); with no agent, or ``--local``/``--sysfs-root``, this
    process scans the tree itself, as the hardware agent would."""
    this_tree = os.path.realpath(args.sysfs_root) == "/sys"
    unreachable = ""
    if this_tree and not args.local:
        answered = agent_report(args)
        if not isinstance(answered, str):
            report, note = answered
            if args.json:
                common.print_json(report)
            else:
                print_report(report, note)
            return
        if args.host != common.this_host():  # another host's hardware is not here to scan
            common.fail(Unavailable(answered), args)
        unreachable = answered
    try:
        report = local_report(args.sysfs_root)
    except PhyError as e:
        common.fail(e, args)
    note = ""
    if report.host.kvm_device and this_tree:
        # the vm agent's verdict is about this host: a recorded or constructed tree is not
        # it (and asking would wait out a missing NATS for nothing, or once more)
        if unreachable.startswith("cannot reach NATS"):
            note = f"boot probe: not known here ({unreachable})"
        else:
            host, note = with_boot_probe(args, report.host)
            report = msgspec.structs.replace(report, host=host)
    if args.json:
        common.print_json(report)
        return
    if this_tree and not args.local:
        note = f"scanned here: {unreachable}" + (f"\n{note}" if note else "")
    print_report(report, note)


def agent_report(args: argparse.Namespace) -> tuple[HwReport, str] | str:
    """The report of ``args.host``'s hardware agent and the boot probe's note, or why none
    answered (NATS unreachable, no hardware agent of that host)."""
    from cli.syncbus import SyncBus

    try:
        bus = SyncBus.connect(args.nats, name="phyllome-cli", give_up_after=0.5,
                              **common.credentials())
    except PhyError as e:
        return e.message
    try:
        with bus:
            report = bus.call(args.host, hardware_api.REPORT, Empty(), timeout=args.timeout)
            host, note = _boot_probe(bus, args.host, report.host)
    except (Unavailable, Timeout) as e:
        return e.message
    except PhyError as e:
        common.fail(e, args)
    return (msgspec.structs.replace(report, host=host),
            f"from the hardware agent of {args.host}\n{note}")


def with_boot_probe(args: argparse.Namespace, caps: HostCaps) -> tuple[HostCaps, str]:
    """``caps`` with the vm agent's KVM boot probe verdict (the ioctl check passing proves
    little: some hosts hang a guest under KVM), read from its heartbeat when NATS answers;
    and a line saying where the verdict came from."""
    from cli.syncbus import SyncBus

    try:
        bus = SyncBus.connect(args.nats, name="phyllome-cli", give_up_after=0.5,
                              **common.credentials())
    except PhyError as e:
        return caps, f"boot probe: not known here ({e.message})"
    with bus:
        return _boot_probe(bus, args.host, caps)


def _boot_probe(bus: SyncBus, host: str, caps: HostCaps) -> tuple[HostCaps, str]:
    from shared.messages.hosts import Heartbeat  # the vm, storage and net messages with it

    try:
        found = bus.kv_entries(subjects.KV_HOSTS, subjects.heartbeat_key(host, "vm"))
        decision = msgspec.json.decode(found[0][2], type=Heartbeat).details.accelerator \
            if found else None
    except (PhyError, msgspec.MsgspecError):
        decision = None
    if decision is None or decision.kvm_usable is None:
        why = decision.note if decision else f"no vm agent of {host} has reported"
        return caps, f"boot probe: not run ({why})"
    verdict = "passed" if decision.kvm_usable else "failed"
    return (msgspec.structs.replace(caps, kvm_boot_probe=verdict, kvm_usable=decision.kvm_usable),
            f"boot probe (vm agent of {host}): {decision.note}")


def print_report(report: HwReport, probe_note: str = "") -> None:
    h = report.host
    con = common.console
    kvm = ("usable (boot probe passed)" if h.kvm_usable else
           f"ioctl check {h.kvm_ioctl}, boot probe {h.kvm_boot_probe}: not proven usable"
           if h.kvm_device else "no /dev/kvm")
    con.print(f"[bold]host[/bold]  {h.arch} {h.cpu_vendor} {h.cpu_model}  "
              f"virt={h.virt_extension or '-'}  kvm: {kvm}  nested={_yn(h.nested)}  "
              f"iommu={_yn(h.iommu)}", highlight=False)
    if probe_note:
        con.print(probe_note, highlight=False, markup=False)
    if h.iommu_hint:
        con.print(f"[yellow]{h.iommu_hint}[/yellow]", highlight=False)
    common.print_table(_device_rows(report.devices), DEVICE_COLUMNS)
    for gpu in report.gpus:
        con.print(f"[bold]GPU[/bold] {gpu.address} {gpu.vendor} {gpu.name}"
                  f"{' boot-vga' if gpu.boot_vga else ''}{' only-gpu' if gpu.only_gpu else ''}",
                  highlight=False)
        for step in gpu.handoff:
            con.print(f"  - {step}", highlight=False)
    for d in report.devices:
        pt = d.passthrough
        if pt is not None and pt.verdict != "no-iommu" and (
                pt.verdict != "isolated" or pt.host_loses):
            con.print(f"{d.address}: {pt.verdict}: {'; '.join(pt.reasons)}", highlight=False)
    print_usb(report.devices)
    for p in report.problems:
        con.print(f"[red]problem[/red] {p}", highlight=False)


def print_usb(devices: list[PciDevice]) -> None:
    """USB devices by controller: passing one (a Bluetooth adapter) means passing them all."""
    for d in devices:
        if not d.usb:
            continue
        verdict = d.passthrough.verdict if d.passthrough else "-"
        common.console.print(f"USB controller {d.address} ({verdict}) carries:",
                             highlight=False)
        for u in d.usb:
            common.console.print(f"  {u.port} {u.vendor_id}:{u.product_id} {u.manufacturer} "
                                 f"{u.product} ({u.kind})", highlight=False)


def _yn(v: bool | None) -> str:
    return "?" if v is None else "yes" if v else "no"


def _device_rows(devices: list[PciDevice]) -> list[dict[str, Any]]:
    return [{"address": d.address, "ids": f"{d.vendor_id}:{d.device_id}",
             "class_name": d.class_name or d.class_code, "name": d.name or "-",
             "driver": d.driver or "-", "iommu_group": d.iommu_group,
             "verdict": d.passthrough.verdict if d.passthrough else "-"} for d in devices]


# -- through the agent ------------------------------------------------------------------------



def cmd_list(args: argparse.Namespace) -> None:
    result = common.request(args, hardware_api.LIST, DeviceQuery(kind=args.kind))
    if args.json:
        common.print_json(result)
    else:
        common.print_table(_device_rows(result.devices), DEVICE_COLUMNS)
        print_usb(result.devices)


def cmd_groups(args: argparse.Namespace) -> None:
    result = common.request(args, hardware_api.GROUPS, Empty())
    if args.json:
        common.print_json(result)
        return
    if not result.iommu:
        common.console.print(result.hint, highlight=False)
    common.print_table([{"id": g.id, "devices": g.devices} for g in result.groups],
                       [("id", "GROUP"), ("devices", "DEVICES")])


def cmd_caps(args: argparse.Namespace) -> None:
    common.show(args, common.request(args, hardware_api.CAPS, Empty()))


def cmd_bind(args: argparse.Namespace) -> None:
    common.run_job(args, hardware_api.BIND, BindRequest(
        address=args.address, force=args.force, single_gpu=args.single_gpu),
        bytes_progress=False)


def cmd_release(args: argparse.Namespace) -> None:
    common.run_job(args, hardware_api.RELEASE, DeviceRef(address=args.address),
                   bytes_progress=False)


def cmd_mdev_types(args: argparse.Namespace) -> None:
    result = common.request(args, hardware_api.LIST, DeviceQuery())
    rows = [{"parent": d.address, "id": t.id, "name": t.name,
             "available": t.available_instances, "instances": t.instances}
            for d in result.devices for t in d.mdev_types]
    if args.json:
        common.print_json(rows)
    else:
        common.print_table(rows, [("parent", "PARENT"), ("id", "TYPE"), ("name", "NAME"),
                                  ("available", "AVAILABLE"), ("instances", "INSTANCES")])


def cmd_mdev_create(args: argparse.Namespace) -> None:
    common.show(args, common.request(args, hardware_api.MDEV_CREATE, MdevCreate(
        address=args.address, mdev_type=args.type, uuid=args.uuid)))


def cmd_mdev_remove(args: argparse.Namespace) -> None:
    common.show(args, common.request(args, hardware_api.MDEV_REMOVE, MdevRef(uuid=args.uuid)))


def cmd_sriov(args: argparse.Namespace) -> None:
    dev = common.request(args, hardware_api.SRIOV_SET,
                         SriovSet(address=args.address, num_vfs=args.num_vfs))
    if args.json:
        common.print_json(dev)
    else:
        common.console.print(f"{dev.address}: {dev.sriov_numvfs} of {dev.sriov_totalvfs} VFs: "
                             f"{', '.join(dev.virtfns) or '-'}", highlight=False)
