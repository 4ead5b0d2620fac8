"""``phyllome vm snapshot|backup|restore|schedules``: whole-VM snapshots and backups.

    phyllome vm snapshot create web before-upgrade [--quiesce]
    phyllome vm snapshot list web [--json]
    phyllome vm snapshot revert web before-upgrade [--force]
    phyllome vm snapshot delete web before-upgrade
    phyllome vm backup web --to /srv/backups                 # one archive, now (a job)
    phyllome vm backup web --to /srv/backups --every 1d --keep 7
    phyllome vm backup web --every off                       # no more scheduled backups
    phyllome vm schedules
    phyllome vm restore /srv/backups/web-20260101T000000.000Z.phybak [--name web2] [--host h2]

A snapshot holds the VM's disks, NVRAM, TPM state and spec (see docs/guests.md).
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys

from cli import common
from shared.messages import Empty
from shared.messages import vm as vm_api
from shared.messages.vm import (
    BackupScheduleList,
    VmBackup,
    VmBackupSchedule,
    VmRestore,
    VmSnapshot,
    VmSnapshotCreate,
    VmSnapshotList,
    VmSnapshotRef,
    VmSnapshotRevert,
)

COPY_TIMEOUT_S = 3600.0  # a snapshot where the pool cannot reflink copies the disks
SNAPSHOT_COLUMNS = [("name", "NAME"), ("created", "CREATED"), ("state", "VM WAS"),
                    ("method", "METHOD"), ("size", "SIZE"), ("nvram", "NVRAM"),
                    ("tpm", "TPM"), ("quiesced", "QUIESCED")]
SCHEDULE_COLUMNS = [("vm", "VM"), ("to", "TO"), ("every", "EVERY"), ("keep", "KEEP"),
                    ("next", "NEXT RUN"), ("last", "LAST RUN")]
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_every(text: str) -> float:
    """``1d``, ``12h``, ``30m``, ``3600`` -> seconds; ``off`` -> 0."""
    t = text.strip().lower()
    if t == "off":
        return 0.0
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw]?)", t)
    if not m:
        raise argparse.ArgumentTypeError(f"not a period: {text!r} (e.g. 1d, 12h, 30m, off)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def register(cmds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``snapshot``, ``backup``, ``restore`` and ``schedules`` to ``phyllome vm``."""
    snap = cmds.add_parser("snapshot", help="snapshots of a VM: create, list, revert, delete")
    verbs = snap.add_subparsers(dest="snapshot_command", metavar="COMMAND")

    p = verbs.add_parser("create", help="snapshot disks, NVRAM, TPM state (a running VM too)")
    common.add_common(p)
    p.add_argument("vm")
    p.add_argument("name")
    p.add_argument("--quiesce", action="store_true",
                   help="freeze the guest's filesystems through its guest agent (else pause)")
    p.set_defaults(func=cmd_create)

    p = verbs.add_parser("list", help="a VM's snapshots")
    common.add_common(p)
    p.add_argument("vm")
    p.set_defaults(func=cmd_list)

    p = verbs.add_parser("revert", help="give a stopped VM back all of a snapshot")
    common.add_common(p)
    p.add_argument("vm")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="power a running VM off first")
    p.set_defaults(func=cmd_revert)

    p = verbs.add_parser("delete", help="delete a snapshot")
    common.add_common(p)
    p.add_argument("vm")
    p.add_argument("name")
    p.set_defaults(func=cmd_delete)

    p = cmds.add_parser("backup", help="a backup archive of a VM, now or on a schedule")
    common.add_common(p)
    p.add_argument("vm")
    p.add_argument("--to", default="", metavar="DIR",
                   help="directory on the VM's host the archive goes into")
    p.add_argument("--every", type=parse_every, default=None, metavar="PERIOD",
                   help="back up on a schedule (1d, 12h, ...; the first run is now); off "
                        "removes the schedule")
    p.add_argument("--keep", type=int, default=0,
                   help="with --every: keep the newest N archives (default: all)")
    p.add_argument("--quiesce", action="store_true",
                   help="freeze the guest's filesystems through its guest agent (else pause)")
    p.add_argument("--detach", action="store_true", help="print the job and return at once")
    p.set_defaults(func=cmd_backup)

    p = cmds.add_parser("restore", help="define a VM from a backup archive (on --host)")
    common.add_common(p)
    p.add_argument("archive", help="absolute path of the archive, readable on that host")
    p.add_argument("--name", default="", help="restore as a copy of this name (new uuid)")
    p.add_argument("--pool", default="default", help="pool for its disks")
    p.add_argument("--detach", action="store_true", help="print the job and return at once")
    p.set_defaults(func=cmd_restore)

    p = cmds.add_parser("schedules", help="the backup schedules of a host")
    common.add_common(p)
    p.set_defaults(func=cmd_schedules)


def _when(t: float) -> str:
    if not t:
        return "-"
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _method(s: VmSnapshot) -> str:
    return {"copy": "copy (not instant: the pool cannot reflink)",
            "mixed": "mixed (some disks copied)"}.get(s.method, s.method)


def cmd_create(args: argparse.Namespace) -> None:
    snap: VmSnapshot = common.request(
        args, vm_api.SNAPSHOT_CREATE, VmSnapshotCreate(vm=args.vm, name=args.name,
                                                       quiesce=args.quiesce),
        timeout=max(args.timeout, COPY_TIMEOUT_S))
    if args.json:
        common.print_json(snap)
        return
    held = "" if not snap.paused_s else (
        f"; the guest was {'frozen' if snap.quiesced else 'paused'} {snap.paused_s * 1000:.1f} ms")
    common.console.print(f"snapshot {snap.name} of VM {snap.vm}: {_method(snap)}, "
                         f"{len(snap.disks)} disk(s), NVRAM {'yes' if snap.nvram else 'no'}, "
                         f"TPM {'yes' if snap.tpm else 'no'}{held}", highlight=False)


def cmd_list(args: argparse.Namespace) -> None:
    found: VmSnapshotList = common.request(args, vm_api.SNAPSHOT_LIST, VmSnapshotRef(vm=args.vm))
    if args.json:
        common.print_json(found)
        return
    common.print_table([{"name": s.name, "created": _when(s.created), "state": s.state,
                         "method": s.method, "size": common.human_bytes(s.allocated_bytes),
                         "nvram": s.nvram, "tpm": s.tpm, "quiesced": s.quiesced}
                        for s in found.snapshots], SNAPSHOT_COLUMNS)


def cmd_revert(args: argparse.Namespace) -> None:
    info = common.request(args, vm_api.SNAPSHOT_REVERT, VmSnapshotRevert(
        vm=args.vm, name=args.name, force=args.force), timeout=max(args.timeout, COPY_TIMEOUT_S))
    if args.json:
        common.print_json(info)
        return
    common.console.print(f"VM {info.name} reverted to snapshot {args.name}; it is {info.state}",
                         highlight=False)


def cmd_delete(args: argparse.Namespace) -> None:
    ack = common.request(args, vm_api.SNAPSHOT_DELETE, VmSnapshotRef(vm=args.vm, name=args.name))
    if args.json:
        common.print_json(ack)
    else:
        common.console.print(ack.message, highlight=False)


def cmd_backup(args: argparse.Namespace) -> None:
    if args.every is None:
        if not args.to:
            common.err_console.print("[red]error:[/red] give --to DIR (and --every PERIOD for "
                                     "a schedule)", highlight=False)
            sys.exit(common.EXIT_USAGE)
        common.run_job(args, vm_api.BACKUP, VmBackup(vm=args.vm, to=args.to,
                                                     quiesce=args.quiesce))
        return
    listed: BackupScheduleList = common.request(args, vm_api.SCHEDULE_BACKUP, VmBackupSchedule(
        vm=args.vm, to=args.to, every_s=args.every, keep=args.keep))
    _show_schedules(args, listed)


def cmd_restore(args: argparse.Namespace) -> None:
    """The vm agent of ``--host`` reads the archive and defines the VM there."""
    common.run_job(args, vm_api.RESTORE, VmRestore(archive=args.archive, name=args.name,
                                                   pool=args.pool))


def cmd_schedules(args: argparse.Namespace) -> None:
    _show_schedules(args, common.request(args, vm_api.BACKUP_SCHEDULES, Empty()))


def _show_schedules(args: argparse.Namespace, listed: BackupScheduleList) -> None:
    if args.json:
        common.print_json(listed)
        return
    common.print_table([{"vm": s.vm, "to": s.to, "every": _period(s.every_s),
                         "keep": s.keep or "all", "next": _when(s.next_run),
                         "last": _when(s.last_run)} for s in listed.schedules],
                       SCHEDULE_COLUMNS)


def _period(seconds: float) -> str:
    for unit, size in sorted(_UNITS.items(), key=lambda u: -u[1]):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
