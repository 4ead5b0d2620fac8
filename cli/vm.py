"""``phyllome vm``: create, run and look at VMs (the vm agent of a host).

    phyllome vm create demo --image phyllome-tiny --secure-boot --tpm --display both
    phyllome vm start demo
    phyllome vm info demo --json        # state, accelerator, VNC/SPICE host and port
    phyllome vm console demo            # spice:// or vnc:// URI (remote-viewer if installed)
    phyllome vm stop demo --wait 60 --force
    phyllome vm clone demo demo2 && phyllome vm delete demo2 --delete-disks
    phyllome vm create web --host auto --memory 2G   # placed on a host that fits, says why
    phyllome vm migrate demo --to b --shutdown       # cold migration, with a progress bar
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import TYPE_CHECKING, Any

from cli import common
from shared.config import default_host
from shared.errors import PhyError
from shared.messages import catalogue as catalogue_api
from shared.messages import new_id
from shared.messages import vm as vm_api
from shared.messages.catalogue import ImageInfo, ImageRef
from shared.messages.vm import (
    Disk,
    Nic,
    VmClone,
    VmCreate,
    VmDelete,
    VmInfo,
    VmList,
    VmListRequest,
    VmMigrate,
    VmRef,
    VmShutdown,
    VmSpec,
    VmUpdate,
)

if TYPE_CHECKING:
    from shared.bus import Bus

LIST_COLUMNS = [("name", "NAME"), ("host", "HOST"), ("state", "STATE"), ("vcpus", "CPUS"),
                ("memory", "MEMORY"), ("accelerator", "ACCEL"), ("uuid", "UUID")]
MiB = 1 << 20
DEMO_IMAGE = "phyllome-tiny"
DEMO_MIN_MEMORY_MIB = 384  # the tiny disk's UEFI boot resets with less (deploy/images)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    vm = sub.add_parser("vm", help="VMs: create, start, stop, info, console, clone, delete")
    cmds = vm.add_subparsers(dest="vm_command", metavar="COMMAND")

    p = cmds.add_parser("create", help="define a VM (it stays stopped until `vm start`)")
    common.add_common(p)
    p.add_argument("name")
    p.add_argument("--image", default="", metavar="ID",
                        help="a pulled catalogue image, cloned into the VM's first disk")
    p.add_argument("--disk", action="append", default=[], metavar="VOL",
                   help="a RAW disk: a volume (POOL/NAME or NAME in pool default) or a path; "
                        "repeatable")
    p.add_argument("--memory", type=common.parse_size, default=None, help="e.g. 512M, 2G")
    p.add_argument("--cpus", type=int, default=None)
    p.add_argument("--firmware", choices=("uefi", "bios"), default=None)
    p.add_argument("--secure-boot", action="store_true", default=None)
    p.add_argument("--tpm", action="store_true", default=None, help="emulated TPM 2.0 (swtpm)")
    p.add_argument("--display", choices=("spice", "vnc", "both", "none"), default="vnc")
    p.add_argument("--listen", default="127.0.0.1", help="console listen address")
    p.add_argument("--password", default="", help="console password (VNC: at most 8)")
    p.add_argument("--nic", action="append", default=[], metavar="KIND[:SOURCE]",
                   help="network:NAME, bridge:NAME or user; repeatable (default: none)")
    p.add_argument("--hostdev", action="append", default=[], metavar="ADDR",
                   help="PCI address or mdev UUID to pass through; repeatable")
    p.add_argument("--nested", action="store_true", help="let the guest run its own VMs")
    p.add_argument("--sound", choices=("ich9", "none"), default="none")
    p.add_argument("--kernel", default="", help="direct kernel boot: kernel path")
    p.add_argument("--initrd", default="")
    p.add_argument("--cmdline", default="")
    p.add_argument("--accelerator", choices=("auto", "kvm", "tcg"), default="auto")
    p.add_argument("--autostart", action="store_true")
    p.set_defaults(func=cmd_create)

    for verb, doc in (("start", "start a stopped VM"), ("destroy", "power off at once"),
                      ("reboot", "ACPI reboot"), ("suspend", "pause the vCPUs"),
                      ("resume", "continue a paused VM"), ("info", "state, stats, consoles")):
        p = cmds.add_parser(verb, help=doc)
        common.add_common(p)
        p.add_argument("vm", help="name or uuid")
        p.set_defaults(func=cmd_simple, verb=verb)

    p = cmds.add_parser("stop", help="ACPI shutdown (optionally wait, then force)")
    common.add_common(p)
    p.add_argument("vm")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for the guest to power off")
    p.add_argument("--force", action="store_true",
                   help="power off hard when the guest did not within --wait")
    p.set_defaults(func=cmd_stop)

    p = cmds.add_parser("delete", help="undefine a VM with its NVRAM and TPM state")
    common.add_common(p)
    p.add_argument("vm")
    p.add_argument("--force", action="store_true", help="power off a running VM first")
    p.add_argument("--delete-disks", action="store_true",
                   help="also delete the disks made for this VM (image clones, clone copies)")
    p.set_defaults(func=cmd_delete)

    p = cmds.add_parser("list", help="VMs of this host (or of every host) from KV vms")
    common.add_common(p)
    p.add_argument("--all", action="store_true", help="every host of the cluster")
    p.set_defaults(func=cmd_list)

    p = cmds.add_parser("update", help="change a stopped VM")
    common.add_common(p)
    p.add_argument("vm")
    p.add_argument("--memory", type=common.parse_size, default=None)
    p.add_argument("--cpus", type=int, default=None)
    p.add_argument("--display", choices=("spice", "vnc", "both", "none"), default=None)
    p.add_argument("--cmdline", default=None)
    p.add_argument("--autostart", choices=("on", "off"), default=None)
    p.add_argument("--accelerator", choices=("auto", "kvm", "tcg"), default=None)
    p.set_defaults(func=cmd_update)

    p = cmds.add_parser("clone", help="copy a stopped VM (new uuid, MACs; disks cloned)")
    common.add_common(p)
    p.add_argument("vm")
    p.add_argument("name", help="name of the copy")
    p.add_argument("--detach", action="store_true", help="print the job and return at once")
    p.set_defaults(func=cmd_clone)

    p = cmds.add_parser("migrate", help="move a stopped VM to another host (cold)")
    common.add_common(p)
    p.add_argument("vm")
    p.add_argument("--to", required=True, metavar="HOST", help="the host to move it to")
    p.add_argument("--shutdown", action="store_true",
                   help="shut a running VM down first (else it is refused)")
    p.add_argument("--keep-source", action="store_true",
                   help="keep the source host's copy of the disks")
    p.add_argument("--detach", action="store_true", help="print the job and return at once")
    p.set_defaults(func=cmd_migrate)

    p = cmds.add_parser("console", help="the VM's spice:// or vnc:// URI (or open it)")
    common.add_common(p)
    p.add_argument("vm")
    p.add_argument("--print", action="store_true", dest="print_only",
                   help="print the URI even when remote-viewer is installed")
    p.set_defaults(func=cmd_console)



def _disk(text: str) -> Disk:
    if text.startswith("/"):
        return Disk(path=text)
    pool, _, name = text.rpartition("/")
    return Disk(pool=pool or "default", volume=name)


def _nic(text: str) -> Nic:
    kind, _, source = text.partition(":")
    if kind == "user":
        return Nic(kind="user")
    if kind not in ("network", "bridge") or not source:
        common.err_console.print(f"[red]error:[/red] --nic {text!r}: use network:NAME, "
                                 "bridge:NAME or user", highlight=False)
        sys.exit(common.EXIT_USAGE)
    return Nic(kind=kind, source=source)  # type: ignore[arg-type]


def _template(info: ImageInfo) -> dict[str, Any]:
    """Defaults an image's catalogue entry implies, for what the command line left out."""
    t = info.template
    return {"memory_mib": max(t.memory // MiB, 16), "vcpus": t.vcpus,
            "firmware": t.firmware or "uefi", "secure_boot": t.secure_boot,
            "tpm": "emulated-2.0" if t.tpm else "none"}


def cmd_create(args: argparse.Namespace) -> None:
    """Image defaults, placement and the create itself over one connection."""
    from shared.placement import choose

    disks, nics = [_disk(d) for d in args.disk], [_nic(n) for n in args.nic]  # usage first

    async def go(bus: Bus) -> VmInfo:
        values: dict[str, Any] = {"memory_mib": 1024, "vcpus": 2, "firmware": "uefi",
                                  "secure_boot": False, "tpm": "none"}
        if args.image:
            # any catalogue agent has the cluster's index
            near = args.host if args.host != "auto" else (
                os.environ.get("PHYLLOME_HOST") or default_host())
            values.update(_template(await bus.call(
                near, catalogue_api.INFO, ImageRef(id=args.image), timeout=args.timeout)))
        given = {"memory_mib": args.memory // MiB if args.memory is not None else None,
                 "vcpus": args.cpus, "firmware": args.firmware,
                 "secure_boot": args.secure_boot, "tpm": "emulated-2.0" if args.tpm else None}
        values.update({k: v for k, v in given.items() if v is not None})
        spec = VmSpec(
            name=args.name, disks=disks, nics=nics, display=args.display, listen=args.listen,
            password=args.password, hostdevs=args.hostdev, nested=args.nested,
            sound=args.sound, kernel=args.kernel, initrd=args.initrd, cmdline=args.cmdline,
            accelerator=args.accelerator, autostart=args.autostart, **values)
        host = args.host
        if host == "auto":
            choice = await choose(bus, spec)
            common.err_console.print(f"placed on {choice.reason}", highlight=False)
            host = choice.host
        return await bus.call(host, vm_api.CREATE, VmCreate(spec=spec, image=args.image),
                              timeout=max(args.timeout, 600.0) if args.image else args.timeout,
                              idempotency_key=new_id())

    _show_info(args, common.call(args, go))


def cmd_simple(args: argparse.Namespace) -> None:
    from shared import contracts

    _show_info(args, common.request(args, contracts.spec("vm", args.verb), VmRef(vm=args.vm)))


def cmd_stop(args: argparse.Namespace) -> None:
    req = VmShutdown(vm=args.vm, timeout_s=args.wait, force=args.force)
    _show_info(args, common.request(args, vm_api.SHUTDOWN, req, timeout=args.timeout + args.wait))


def cmd_delete(args: argparse.Namespace) -> None:
    ack = common.request(args, vm_api.DELETE, VmDelete(vm=args.vm, force=args.force,
                                                       delete_disks=args.delete_disks))
    if args.json:
        common.print_json(ack)
    else:
        common.console.print(ack.message, highlight=False)


def cmd_list(args: argparse.Namespace) -> None:
    """``--all`` reads KV vms here (a VM of a down host shows ``unknown``); else this host's
    vm agent answers."""
    if args.all:
        from shared.cluster import cluster_vms

        reply = VmList(vms=common.call(args, cluster_vms))
    else:
        reply = common.request(args, vm_api.LIST, VmListRequest(all_hosts=False))
    if args.json:
        common.print_json(reply)
        return
    rows = [{"name": r.spec.name, "host": r.host, "state": r.state, "vcpus": r.spec.vcpus,
             "memory": common.human_bytes(r.spec.memory_mib * MiB),
             "accelerator": r.accelerator, "uuid": r.spec.uuid} for r in reply.vms]
    common.print_table(rows, LIST_COLUMNS)


def cmd_update(args: argparse.Namespace) -> None:
    req = VmUpdate(vm=args.vm, vcpus=args.cpus, display=args.display, cmdline=args.cmdline,
                   memory_mib=args.memory // MiB if args.memory is not None else None,
                   autostart=None if args.autostart is None else args.autostart == "on",
                   accelerator=args.accelerator)
    _show_info(args, common.request(args, vm_api.UPDATE, req))


def cmd_clone(args: argparse.Namespace) -> None:
    common.run_job(args, vm_api.CLONE, VmClone(vm=args.vm, name=args.name),
                   bytes_progress=False)


def cmd_migrate(args: argparse.Namespace) -> None:
    """The job runs in the vm agent of the VM's host (``--host``); we follow its steps."""
    common.run_job(args, vm_api.MIGRATE, VmMigrate(
        vm=args.vm, to=args.to, shutdown=args.shutdown, keep_source=args.keep_source),
        bytes_progress=False)


def cmd_console(args: argparse.Namespace) -> None:
    info: VmInfo = common.request(args, vm_api.INFO, VmRef(vm=args.vm))
    uris = [c.uri for c in (info.spice, info.vnc) if c is not None]
    if args.json:
        common.print_json({"name": info.name, "spice": info.spice, "vnc": info.vnc})
        return
    if not uris:
        common.err_console.print(f"[red]error:[/red] VM {info.name} is {info.state} and has no "
                                 "console open (start it; --display must not be none)",
                                 highlight=False)
        sys.exit(common.EXIT_FAILED)
    viewer = shutil.which("remote-viewer")
    if viewer and not args.print_only and sys.stdout.isatty():
        os.execv(viewer, [viewer, uris[0]])
    for uri in uris:
        print(uri)


async def ensure_demo(bus: Bus, host: str) -> list[str]:
    """For the first ``phyllome up`` of a host with no VMs: create and start ``demo`` from
    phyllome-tiny (UEFI + Secure Boot, TPM 2.0, VNC + SPICE); lines that say how to look at it.

    A host that has VMs gets no demo (and no lines); a failure is said, not raised.
    """
    try:
        listed = await bus.call(host, vm_api.LIST, VmListRequest(), timeout=30)
        if listed.vms:
            return []
        tiny: ImageInfo = await bus.call(host, catalogue_api.INFO,
                                         ImageRef(id=DEMO_IMAGE), timeout=30)
        spec = VmSpec(name="demo", vcpus=1, secure_boot=True, tpm="emulated-2.0",
                      display="both", memory_mib=max(tiny.template.memory // MiB,
                                                     DEMO_MIN_MEMORY_MIB))
        await bus.call(host, vm_api.CREATE, VmCreate(spec=spec, image=DEMO_IMAGE), timeout=600)
        info: VmInfo = await bus.call(host, vm_api.START, VmRef(vm="demo"), timeout=60)
    except PhyError as e:
        return [f"demo VM not created: {e}"]
    consoles = "  ".join(c.uri for c in (info.spice, info.vnc) if c is not None)
    lines = [
        f"demo VM `demo` ({DEMO_IMAGE}: UEFI + Secure Boot, TPM 2.0) is {info.state} "
        f"under {info.accelerator.upper()}" + (f" ({info.accelerator_note})"
                                                if info.accelerator_note else ""),
        "  phyllome vm info demo --json     state, uptime, console endpoints",
        f"  phyllome vm console demo         {consoles or '(no console yet)'}",
        f"  phyllome events --follow --subject 'phy.evt.{host}.vm.>'",
        "  the vm agent's /metrics (above): phyllome_vm_vms, phyllome_vm_cpu_seconds_total, ...",
    ]
    return lines


def _show_info(args: argparse.Namespace, info: VmInfo) -> None:
    if args.json:
        common.print_json(info)
        return
    rows = {"name": info.name, "uuid": info.uuid, "host": info.host,
            "state": f"{info.state} ({info.reason})" if info.reason else info.state,
            "accelerator": info.accelerator + (f" — {info.accelerator_note}"
                                               if info.accelerator_note else ""),
            "vcpus": info.vcpus, "memory": common.human_bytes(info.memory_mib * MiB),
            "uptime": f"{info.uptime_s:.0f} s" if info.uptime_s else "-",
            "cpu time": f"{info.cpu_time_s:.1f} s",
            "firmware": info.spec.firmware + (" + Secure Boot" if info.spec.secure_boot else ""),
            "tpm": info.spec.tpm, "disks": [d.path for d in info.spec.disks],
            "vnc": info.vnc.uri if info.vnc else None,
            "spice": info.spice.uri if info.spice else None}
    common.print_table([{"k": k, "v": v} for k, v in rows.items()],
                       [("k", "FIELD"), ("v", "VALUE")])
