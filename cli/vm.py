"""``phyllome vm``: create, run and look at VMs (the vm agent of a host).

    phyllome vm create demo --image phyllome-tiny --secure-boot --tpm --display both
    phyllome vm start demo
    phyllome vm info demo --json        # state, accelerator, VNC/SPICE host and port
    phyllome vm console demo            # its serial console (Ctrl-] leaves)
    phyllome vm console demo --graphics # vnc:// and spice:// URIs, the viewer command
    phyllome vm stop demo --wait 120 --force   # waits for the power-off (default 60 s)
    phyllome vm clone demo demo2 && phyllome vm delete demo2 --delete-disks
    phyllome vm create web --host auto --memory 2G   # placed on a host that fits, says why
    phyllome vm migrate demo --to b --shutdown       # cold migration, with a progress bar
    phyllome vm attach-disk demo data --bus virtio   # live too when running; detach-disk
    phyllome vm attach-nic demo network:lab          # or bridge:br0, user; detach-nic MAC
    phyllome vm attach-usb demo 046d:c52b            # or bus.device; detach-usb
    phyllome vm snapshot create demo before-upgrade  # and backup/restore: cli/snapshot.py
    phyllome vm share demo /srv/data data            # virtio-fs (stopped VM); unshare TAG
    phyllome vm create cc --confidential sev-snp --vsock --input virtio
    phyllome vm create web --image debian11 --user ana --ssh-key ~/.ssh/id_ed25519.pub \
        --hostname web                                # a cloud-init (NoCloud) seed
    phyllome vm create inst --cdrom /srv/iso/debian.iso --disk-size 20G   # install media
    phyllome vm eject inst; phyllome vm insert inst /srv/iso/other.iso    # live too
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import quote

import msgspec

from cli import common, snapshot
from shared import subjects
from shared.archs import ARCHS, MACHINE
from shared.codec import decode, to_builtins
from shared.config import default_host, load
from shared.errors import Conflict, NotFound, PhyError, Timeout
from shared.messages import catalogue as catalogue_api
from shared.messages import new_id
from shared.messages import vm as vm_api
from shared.messages.catalogue import ImageInfo, ImageRef
from shared.messages.net import DEFAULT_NETWORK
from shared.messages.vm import (
    Cdrom,
    CloudInit,
    Disk,
    Nic,
    Share,
    UsbHostdev,
    VmAttachDisk,
    VmAttachNic,
    VmAttachUsb,
    VmClone,
    VmCreate,
    VmDelete,
    VmDetachDisk,
    VmDetachNic,
    VmDetachUsb,
    VmInfo,
    VmInsert,
    VmList,
    VmListRequest,
    VmMigrate,
    VmRef,
    VmShutdown,
    VmSpec,
    VmStateChanged,
    VmUpdate,
)

if TYPE_CHECKING:
    from shared.bus import Bus

LIST_COLUMNS = [("name", "NAME"), ("host", "HOST"), ("state", "STATE"), ("vcpus", "CPUS"),
                ("memory", "MEMORY"), ("accelerator", "ACCEL"), ("uuid", "UUID")]
MiB = 1 << 20
DEMO_IMAGE = "phyllome-tiny"
DEMO_MIN_MEMORY_MIB = 384  # the tiny disk's UEFI boot resets with less (deploy/images)
STOP_WAIT_S = 60.0  # how long `vm stop` waits for the guest to act on the power button
STOPPED = frozenset({"shutoff", "crashed", "deleted"})


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmds = common.group(sub, "vm", "VMs: create, start, stop, info, console, clone, delete")

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
                   help=f"network:NAME, bridge:NAME, user or none; repeatable (default: one "
                        f"NIC on network {DEFAULT_NETWORK})")
    p.add_argument("--cpu", default="", metavar="MODEL",
                   help="CPU model: host-passthrough, maximum, host-model or a name such as "
                        "Nehalem (default: the host's under KVM, QEMU's maximum under TCG)")
    p.add_argument("--hostdev", action="append", default=[], metavar="ADDR",
                   help="PCI address or mdev UUID to pass through; repeatable")
    p.add_argument("--nested", action="store_true", help="let the guest run its own VMs")
    p.add_argument("--sound", choices=("ich9", "none"), default="none")
    p.add_argument("--kernel", default="", help="direct kernel boot: kernel path")
    p.add_argument("--initrd", default="")
    p.add_argument("--cmdline", default="")
    p.add_argument("--accelerator", choices=("auto", "kvm", "tcg"), default="auto")
    p.add_argument("--arch", choices=ARCHS, default="x86_64",
                   help="guest architecture: aarch64 runs on QEMU's virt machine with AAVMF, "
                        "emulated by TCG on an x86_64 host")
    p.add_argument("--autostart", action="store_true")
    p.add_argument("--vsock", action="store_true", help="a virtio vsock device (guest CID)")
    p.add_argument("--input", choices=("usb", "virtio"), default="usb",
                   help="tablet (and keyboard) on USB or virtio-input")
    p.add_argument("--confidential", choices=("none", "sev", "sev-es", "sev-snp", "tdx"),
                   default="none", help="memory-encrypted guest (needs the CPU, KVM, OVMF)")
    ci = p.add_argument_group("cloud-init (a NoCloud seed on a CD-ROM)")
    ci.add_argument("--user", default="", help="a user to create, with the --ssh-key keys")
    ci.add_argument("--ssh-key", action="append", default=[], metavar="FILE|KEY",
                    help="an OpenSSH public key or a .pub file (repeatable)")
    ci.add_argument("--hostname", default="", help="the guest's host name (RFC 1123)")
    ci.add_argument("--user-data", default="", metavar="FILE",
                    help="#cloud-config YAML or a script (#!), at most 64 KiB")
    ci.add_argument("--network-config", default="", metavar="FILE",
                    help="cloud-init network config (version 2 YAML)")
    p.add_argument("--cdrom", default="", metavar="PATH|IMAGE",
                   help="install media: an ISO path or a pulled catalogue ISO; booted first")
    p.add_argument("--disk-size", type=common.parse_size, default=0, metavar="SIZE",
                   help="a blank RAW disk to install onto, e.g. 20G")
    p.add_argument("--profile", choices=("generic", "windows"), default=None,
                   help="guest OS profile (default: from the image's OS); windows: Hyper-V "
                        "enlightenments, local-time clock, Secure Boot and TPM 2.0")
    p.set_defaults(func=cmd_create)

    p = cmds.add_parser("eject", help="empty the CD-ROM drive (live too when running)")
    common.add_common(p)
    p.add_argument("vm")
    p.set_defaults(func=cmd_media)
    p = cmds.add_parser("insert", help="put an ISO in the CD-ROM drive (live too)")
    common.add_common(p)
    p.add_argument("vm")
    p.add_argument("iso", metavar="PATH|IMAGE", help="an ISO path or a pulled catalogue ISO")
    p.set_defaults(func=cmd_media)

    for verb, doc in (("start", "start a stopped VM"), ("destroy", "power off at once"),
                      ("reboot", "ACPI reboot"), ("suspend", "pause the vCPUs"),
                      ("resume", "continue a paused VM"), ("info", "state, stats, consoles")):
        p = cmds.add_parser(verb, help=doc)
        common.add_common(p)
        p.add_argument("vm", help="name or uuid")
        p.set_defaults(func=cmd_simple, verb=verb)

    p = cmds.add_parser("stop", help="press the ACPI power button and wait for the power-off")
    common.add_common(p)
    p.add_argument("vm")
    wait = p.add_mutually_exclusive_group()
    wait.add_argument("--wait", type=float, default=STOP_WAIT_S, metavar="SECONDS",
                      help="how long to wait for the guest to power off (default %(default)g); "
                           "a guest that ignores the button makes the command fail")
    wait.add_argument("--no-wait", action="store_true",
                      help="press the button and return at once")
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

    p = cmds.add_parser("share", help="share a host directory with a stopped VM (virtio-fs)")
    common.add_common(p)
    p.add_argument("vm")
    p.add_argument("hostdir", help="an absolute directory on the VM's host")
    p.add_argument("tag", help="the guest mounts it with `mount -t virtiofs TAG DIR`")
    p.add_argument("--readonly", action="store_true",
                   help="refused while hosts run QEMU 7.2's virtiofsd (docs/guests.md)")
    p.set_defaults(func=cmd_share)

    p = cmds.add_parser("unshare", help="remove a stopped VM's virtio-fs share")
    common.add_common(p)
    p.add_argument("vm")
    p.add_argument("tag")
    p.set_defaults(func=cmd_share, hostdir=None, readonly=False)

    p = cmds.add_parser("clone", help="copy a stopped VM (new uuid, MACs; disks cloned)")
    common.add_common(p)
    p.add_argument("vm")
    p.add_argument("name", help="name of the copy")
    common.add_job_options(p)
    p.set_defaults(func=cmd_clone)

    p = cmds.add_parser("migrate", help="move a stopped VM to another host (cold)")
    common.add_common(p)
    p.add_argument("vm")
    p.add_argument("--to", required=True, metavar="HOST", help="the host to move it to")
    p.add_argument("--shutdown", action="store_true",
                   help="shut a running VM down first (else it is refused)")
    p.add_argument("--keep-source", action="store_true",
                   help="keep the source host's copy of the disks")
    common.add_job_options(p)
    p.set_defaults(func=cmd_migrate)

    p = cmds.add_parser("console", help="attach to the VM's serial console (Ctrl-] leaves)")
    common.add_common(p)
    p.add_argument("vm")
    p.add_argument("--graphics", action="store_true",
                   help="print the VM's VNC and SPICE URIs and the viewer command instead")
    p.set_defaults(func=cmd_console)

    _register_devices(cmds)
    snapshot.register(cmds)


def _register_devices(cmds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """attach-/detach- disk, nic, usb: on a stopped VM its definition; on a running one
    live as well."""
    verbs = (
        ("attach-disk", "disk", "VOL", "a RAW volume (POOL/NAME or NAME) or a path"),
        ("detach-disk", "disk", "DISK", "the disk's path, POOL/NAME or volume name"),
        ("attach-nic", "nic", "KIND[:SOURCE]", "network:NAME, bridge:NAME or user"),
        ("detach-nic", "mac", "MAC", "the NIC's MAC address (`vm info --json`)"),
        ("attach-usb", "usb", "ID", "vendor:product (046d:c52b) or bus.device (1.4)"),
        ("detach-usb", "usb", "ID", "as it was attached"),
    )
    for verb, dest, metavar, doc in verbs:
        p = cmds.add_parser(verb, help=f"{verb.replace('-', ' ')} ({doc})")
        common.add_common(p)
        p.add_argument("vm")
        p.add_argument(dest, metavar=metavar, help=doc)
        if verb == "attach-disk":
            p.add_argument("--bus", choices=("virtio", "sata"), default="virtio")
            p.add_argument("--readonly", action="store_true")
        if verb == "attach-nic":
            p.add_argument("--mac", default="", help="default: a new one in 52:54:00")
        p.set_defaults(func=cmd_device, verb=verb)


def _disk(text: str) -> Disk:
    if text.startswith("/"):
        return Disk(path=text)
    pool, _, name = text.rpartition("/")
    return Disk(pool=pool or "default", volume=name)


def _nic(text: str, mac: str = "") -> Nic:
    kind, _, source = text.partition(":")
    if kind == "user":
        return Nic(kind="user", mac=mac)
    if kind not in ("network", "bridge") or not source:
        _usage(f"{text!r}: use network:NAME, bridge:NAME or user")
    return Nic(kind=kind, source=source, mac=mac)  # type: ignore[arg-type]


def _nics(given: list[str]) -> list[Nic]:
    """One NIC on the default network unless ``--nic`` says otherwise (``none``: no NIC)."""
    if not given:
        return [Nic(kind="network", source=DEFAULT_NETWORK)]
    if "none" in given:
        if len(given) > 1:
            _usage("--nic none means no NIC at all: give it alone")
        return []
    return [_nic(n) for n in given]


def _usage(message: str) -> NoReturn:
    common.error(None, "bad_request", message, common.EXIT_USAGE)


def _template(info: ImageInfo) -> dict[str, Any]:
    """Defaults an image's catalogue entry implies, for what the command line left out."""
    t = info.template
    return {"memory_mib": max(t.memory // MiB, 16), "vcpus": t.vcpus,
            "firmware": t.firmware or "uefi", "secure_boot": t.secure_boot,
            "tpm": "emulated-2.0" if t.tpm else "none", "profile": t.profile}


def _read(path: str, what: str) -> str:
    try:
        return open(os.path.expanduser(path), encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        _usage(f"{what} {path}: {getattr(e, 'strerror', None) or e}")


def _cloud_init(args: argparse.Namespace) -> CloudInit | None:
    """The seed the options ask for (None: none); files are read here, checked by the agent.
    An ``--ssh-key`` that names no file is the key itself."""
    keys = [_read(k, "--ssh-key").strip() if os.path.isfile(os.path.expanduser(k)) else k
            for k in args.ssh_key]
    if not (args.user or keys or args.hostname or args.user_data or args.network_config):
        return None
    return CloudInit(
        hostname=args.hostname, user=args.user, ssh_keys=keys,
        user_data=_read(args.user_data, "--user-data") if args.user_data else "",
        network_config=_read(args.network_config, "--network-config")
        if args.network_config else "")


def _cdrom(given: str) -> tuple[Cdrom | None, str]:
    """``--cdrom``: a path (absolute, or relative to here) or a catalogue image id."""
    if not given:
        return None, ""
    if "/" in given or os.path.exists(given):
        return Cdrom(path=os.path.abspath(given)), ""
    return Cdrom(), given


def cmd_create(args: argparse.Namespace) -> None:
    """Image defaults, placement and the create itself over one connection."""
    from shared.placement import choose

    disks, nics = [_disk(d) for d in args.disk], _nics(args.nic)  # usage first
    cloud_init, (cdrom, cdrom_image) = _cloud_init(args), _cdrom(args.cdrom)

    async def go(bus: Bus) -> VmInfo:
        values: dict[str, Any] = {"memory_mib": 1024, "vcpus": 2, "firmware": "uefi",
                                  "secure_boot": False, "tpm": "none"}
        if args.image or cdrom_image:
            # any catalogue agent has the cluster's index
            near = args.host if args.host != "auto" else (
                os.environ.get("PHYLLOME_HOST") or default_host())
            values.update(_template(await bus.call(
                near, catalogue_api.INFO, ImageRef(id=args.image or cdrom_image,
                                                   arch=args.arch),
                timeout=args.timeout)))
        given = {"memory_mib": args.memory // MiB if args.memory is not None else None,
                 "vcpus": args.cpus, "firmware": args.firmware,
                 "secure_boot": args.secure_boot, "tpm": "emulated-2.0" if args.tpm else None}
        if args.profile == "windows":
            values.update(firmware="uefi", secure_boot=True, tpm="emulated-2.0")
        values.update({k: v for k, v in given.items() if v is not None})
        if args.profile:
            values["profile"] = args.profile
        spec = VmSpec(
            name=args.name, disks=disks, nics=nics, display=args.display, listen=args.listen,
            password=args.password, hostdevs=args.hostdev, nested=args.nested,
            sound=args.sound, kernel=args.kernel, initrd=args.initrd, cmdline=args.cmdline,
            accelerator=args.accelerator, autostart=args.autostart, cpu=args.cpu,
            vsock=args.vsock, input=args.input, confidential=args.confidential,
            cloud_init=cloud_init, cdrom=cdrom, arch=args.arch, machine=MACHINE[args.arch],
            **values)
        if not (args.image or spec.disks or spec.kernel or args.disk_size or cdrom):
            pxe = "can only try a network boot (PXE)" if spec.nics else "will stop in its firmware"
            common.warn(args, f"VM {spec.name} has nothing to boot (no --image, --disk or "
                        f"--kernel): it {pxe}; give it one of those, or "
                        f"`phyllome vm delete {spec.name}` and create it again")
        host = args.host
        if host == "auto":
            choice = await choose(bus, spec)
            common.err_console.print(f"placed on {choice.reason}", highlight=False)
            host = choice.host
        create = VmCreate(spec=spec, image=args.image, cdrom_image=cdrom_image,
                          disk_size_bytes=args.disk_size)
        return await bus.call(host, vm_api.CREATE, create,
                              timeout=max(args.timeout, 600.0) if args.image else args.timeout,
                              idempotency_key=new_id())

    _show_info(args, common.call(args, go))


def cmd_simple(args: argparse.Namespace) -> None:
    from shared import contracts

    _show_info(args, common.request(args, contracts.spec("vm", args.verb), VmRef(vm=args.vm)))


def cmd_stop(args: argparse.Namespace) -> None:
    """Press the power button, then follow the VM's state events until it is off, up to
    ``--wait``: a guest still in its firmware or boot loader ignores the button, and saying
    "running" with exit 0 would hide that."""
    if args.no_wait and args.force:
        common.error(args, "bad_request", "--force powers off after --wait; it cannot go with "
                     "--no-wait (`phyllome vm destroy` powers off at once)", common.EXIT_USAGE)

    async def go(bus: Bus) -> tuple[VmInfo, str]:
        asked = time.time()
        info = await bus.call(args.host, vm_api.SHUTDOWN, VmShutdown(vm=args.vm),
                              timeout=args.timeout)
        if not (args.no_wait or info.state in STOPPED):
            await _until_stopped(bus, info, asked, args.wait)
        # The agent says last: an event missed (our clock ahead of the server's) changes nothing.
        info = await bus.call(args.host, vm_api.INFO, VmRef(vm=info.uuid), timeout=args.timeout)
        if args.no_wait or info.state in STOPPED:
            return info, "done"
        if not args.force:
            return info, "ignored"
        return await bus.call(args.host, vm_api.DESTROY, VmRef(vm=info.uuid),
                              timeout=args.timeout), "forced"

    info, outcome = common.call(args, go)
    if outcome == "forced":
        common.warn(args, f"the guest ignored the ACPI power button for {args.wait:g} s; "
                    "powered off hard (--force)")
    if outcome == "ignored":
        common.error(args, Timeout.kind,
                     f"VM {info.name} is still {info.state} after {args.wait:g} s: the guest "
                     "ignored the ACPI power button (a guest in its firmware or boot loader, "
                     "or without ACPI, does not act on it); "
                     f"`phyllome vm stop {info.name} --force` powers it off",
                     common.EXIT_FAILED)
    _show_info(args, info)


async def _until_stopped(bus: Bus, info: VmInfo, since: float, wait: float) -> None:
    """Return when the VM's state events say it stopped, or after ``wait`` seconds; replayed
    from ``since``, so a power-off before we subscribed counts. Waits on events, never polls."""
    import asyncio
    import contextlib

    subject = subjects.event(info.host, "vm", "state", info.uuid)

    async def off() -> None:
        stream = bus.events(subject, since=since - 1, follow=True)
        async with contextlib.aclosing(stream):
            async for _subject, _ts, data in stream:
                if decode(data, VmStateChanged).state in STOPPED:
                    return

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(off(), wait)


def cmd_delete(args: argparse.Namespace) -> None:
    """Delete, then name the disks left behind (all of them without ``--delete-disks``; with
    it, those not made for the VM) and how to remove each."""

    async def go(bus: Bus) -> tuple[VmInfo, Any]:
        info = await bus.call(args.host, vm_api.INFO, VmRef(vm=args.vm), timeout=args.timeout)
        ack = await bus.call(args.host, vm_api.DELETE, VmDelete(
            vm=info.uuid, force=args.force, delete_disks=args.delete_disks),
            timeout=args.timeout)
        return info, ack

    info, ack = common.call(args, go)
    kept = [d for d in info.spec.disks if not (args.delete_disks and d.owned)]
    if args.json:
        common.print_json({**to_builtins(ack), "kept_disks": kept})
        return
    common.console.print(ack.message, highlight=False, markup=False)
    for disk in kept:
        if disk.volume:
            name = f"{disk.pool}/{disk.volume}"
            where = "" if args.host == common.this_host() else f" --host {args.host}"
            print(f"kept disk {name}: `phyllome storage delete {name}{where}` removes it")
        else:
            print(f"kept disk {disk.path}: a file, not a volume; remove it yourself")
    if any(d.owned for d in kept):
        print("(`vm delete --delete-disks` also deletes the disks made for a VM)")


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


def cmd_share(args: argparse.Namespace) -> None:
    """``share`` adds a share, ``unshare`` removes one: an update of the stopped VM's list."""

    async def go(bus: Bus) -> VmInfo:
        info: VmInfo = await bus.call(args.host, vm_api.INFO, VmRef(vm=args.vm),
                                      timeout=args.timeout)
        shares = [s for s in info.spec.shares if s.tag != args.tag]
        if args.hostdir is None and len(shares) == len(info.spec.shares):
            raise NotFound(f"VM {info.name} has no share tagged {args.tag!r}: `phyllome vm "
                           f"info {info.name}` lists its shares")
        if args.hostdir is not None:
            if len(shares) < len(info.spec.shares):
                raise Conflict(f"VM {info.name} already has a share tagged {args.tag!r}: "
                               f"pick another tag, or `phyllome vm unshare {info.name} "
                               f"{args.tag}` first")
            shares.append(Share(source=args.hostdir, tag=args.tag, readonly=args.readonly))
        return await bus.call(args.host, vm_api.UPDATE, VmUpdate(vm=args.vm, shares=shares),
                              timeout=args.timeout)

    _show_info(args, common.call(args, go))


def cmd_clone(args: argparse.Namespace) -> None:
    common.run_job(args, vm_api.CLONE, VmClone(vm=args.vm, name=args.name),
                   bytes_progress=False)


def cmd_migrate(args: argparse.Namespace) -> None:
    """The job runs in the vm agent of the VM's host (``--host``); we follow its steps."""
    common.run_job(args, vm_api.MIGRATE, VmMigrate(
        vm=args.vm, to=args.to, shutdown=args.shutdown, keep_source=args.keep_source),
        bytes_progress=False)


def _usb(text: str) -> UsbHostdev:
    """``vendor:product`` or ``bus.device``; the agent checks the digits."""
    if ":" in text:
        vendor, _, product = text.lower().partition(":")
        return UsbHostdev(vendor=vendor, product=product)
    bus, dot, device = text.partition(".")
    if not (dot and bus.isdigit() and device.isdigit()):
        _usage(f"USB device {text!r}: give vendor:product (046d:c52b) or bus.device (1.4, as "
               "lsusb shows them)")
    return UsbHostdev(bus=int(bus), device=int(device))


def cmd_device(args: argparse.Namespace) -> None:
    from shared import contracts

    verb = args.verb
    req: Any
    if verb == "attach-disk":
        disk = msgspec.structs.replace(_disk(args.disk), bus=args.bus, readonly=args.readonly)
        req = VmAttachDisk(vm=args.vm, disk=disk)
    elif verb == "detach-disk":
        req = VmDetachDisk(vm=args.vm, disk=args.disk)
    elif verb == "attach-nic":
        req = VmAttachNic(vm=args.vm, nic=_nic(args.nic, args.mac))
    elif verb == "detach-nic":
        req = VmDetachNic(vm=args.vm, mac=args.mac)
    elif verb == "attach-usb":
        req = VmAttachUsb(vm=args.vm, device=_usb(args.usb))
    else:
        req = VmDetachUsb(vm=args.vm, device=_usb(args.usb))
    _show_info(args, common.request(args, contracts.spec("vm", verb.replace("-", "_")), req))


def cmd_media(args: argparse.Namespace) -> None:
    """``eject`` / ``insert``: the CD-ROM drive of a VM made with ``--cdrom``."""
    if not hasattr(args, "iso"):
        _show_info(args, common.request(args, vm_api.EJECT, VmRef(vm=args.vm)))
        return
    cdrom, image = _cdrom(args.iso)
    req = VmInsert(vm=args.vm, path=cdrom.path if cdrom else "", image=image)
    _show_info(args, common.request(args, vm_api.INSERT, req))


def cmd_console(args: argparse.Namespace) -> None:
    """The serial console, through ``virsh console`` on the VM's own host (libvirt opens the
    pty; Ctrl-] leaves, as virt-manager users know it); ``--graphics`` prints the VNC/SPICE
    URIs with the viewer command. A VM on another host is reached on that host (the CLI
    does not carry a console over NATS)."""
    info: VmInfo = common.request(args, vm_api.INFO, VmRef(vm=args.vm))
    if args.json:
        common.print_json({"name": info.name, "host": info.host, "spice": info.spice,
                           "vnc": info.vnc})
        return
    if args.graphics:
        _graphics(args, info)
        return
    if info.state in STOPPED or info.state == "unknown":
        common.error(args, "conflict", f"VM {info.name} is {info.state}: start it first "
                     f"(`phyllome vm start {info.name}`)", common.EXIT_FAILED)
    if info.host != common.this_host():
        common.error(args, "bad_request", f"VM {info.name} runs on host {info.host}: its serial "
                     f"console opens there (`ssh {info.host} phyllome vm console {info.name}`), "
                     f"or use --graphics", common.EXIT_FAILED)
    virsh = shutil.which("virsh")
    if virsh is None:
        common.error(args, "unavailable", "the serial console needs virsh (Debian package "
                     "libvirt-clients); or use --graphics", common.EXIT_FAILED)
    if not sys.stdin.isatty():
        common.error(args, "bad_request", "the serial console needs a terminal (stdin is not "
                     "one); or use --graphics", common.EXIT_FAILED)
    sys.stdout.flush()
    os.execv(virsh, [virsh, "-c", load("vm").libvirt_uri, "console", info.uuid])


def _graphics(args: argparse.Namespace, info: VmInfo) -> None:
    consoles = [c for c in (info.vnc, info.spice) if c is not None]
    if not consoles:
        fix = (f"start it: `phyllome vm start {info.name}`" if info.state in STOPPED else
               "its display is none; `phyllome vm update --display vnc` changes that while it "
               "is stopped" if info.spec.display == "none" else "its hypervisor gave it no port")
        common.error(args, "conflict", f"VM {info.name} is {info.state} and has no VNC or SPICE "
                     f"console open ({fix})", common.EXIT_FAILED)
    for c in consoles:
        print(f"{c.uri}    remote-viewer {c.uri}")
    # the web gateway's console page (any gateway of the cluster reaches any host's VM)
    listen = os.environ.get("PHYLLOME_WEB_LISTEN", "127.0.0.1:9700")
    print(f"http://{listen}/#/console/{quote(info.name)}/vnc    in a browser (phyllome web)")


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
        "  phyllome vm console demo         its serial console (Ctrl-] leaves)",
        f"  phyllome vm console demo --graphics  {consoles or '(no console yet)'}",
        f"  phyllome events --follow --subject 'phy.evt.{host}.vm.>'",
        "  the vm agent's /metrics (above): phyllome_vm_vms, phyllome_vm_cpu_seconds_total, ...",
    ]
    return lines


def _cloud_init_line(ci: CloudInit | None) -> str | None:
    if ci is None:
        return None
    said = [f"hostname {ci.hostname}" if ci.hostname else "",
            f"user {ci.user}" if ci.user else "",
            f"{len(ci.ssh_keys)} SSH key(s)" if ci.ssh_keys else "",
            "user-data" if ci.user_data else "", "network-config" if ci.network_config else ""]
    return ", ".join([s for s in said if s] + [ci.instance_id])


def _show_info(args: argparse.Namespace, info: VmInfo) -> None:
    if args.json:
        common.print_json(info)
        return
    rows = {"name": info.name, "uuid": info.uuid, "host": info.host,
            "state": f"{info.state} ({info.reason})" if info.reason else info.state,
            "accelerator": info.accelerator + (f" — {info.accelerator_note}"
                                               if info.accelerator_note else ""),
            "arch": f"{info.spec.arch} ({info.spec.machine})",
            "vcpus": info.vcpus, "memory": common.human_bytes(info.memory_mib * MiB),
            "uptime": f"{info.uptime_s:.0f} s" if info.uptime_s else "-",
            "cpu time": f"{info.cpu_time_s:.1f} s",
            "firmware": info.spec.firmware + (" + Secure Boot" if info.spec.secure_boot else ""),
            "tpm": info.spec.tpm, "disks": [d.path for d in info.spec.disks],
            "cdrom": (info.spec.cdrom.path or "(empty)") if info.spec.cdrom else None,
            "cloud-init": _cloud_init_line(info.spec.cloud_init),
            "profile": info.spec.profile if info.spec.profile != "generic" else None,
            "addresses": [f"{a.address}/{a.prefix} ({a.nic})" for a in info.addresses]
            + ([f"from the {info.address_source}"] if info.address_source else []) or None,
            "vnc": info.vnc.uri if info.vnc else None,
            "spice": info.spice.uri if info.spice else None,
            "shares": [f"{s.source} as {s.tag}" for s in info.spec.shares] or None,
            "vsock cid": info.vsock_cid or ("at start" if info.spec.vsock else None),
            "confidential": None if info.spec.confidential == "none"
            else info.spec.confidential}
    common.print_fields(rows.items())
