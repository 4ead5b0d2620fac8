"""``phyllome storage``: pools, RAW volumes, clones and transfers to other hosts.

    phyllome storage pools
    phyllome storage volumes [POOL]
    phyllome storage create disk0 20G [--preallocate]
    phyllome storage clone default/disk0 fast/disk1
    phyllome storage info disk1 --sha256 --json
    phyllome storage send disk1 --to h2 [--bwlimit 100M]
    phyllome storage delete disk1

Every volume argument is ``[POOL/]NAME``: ``POOL/NAME``, or just ``NAME`` in pool
``default`` (a clone's new volume: in the source's pool).
"""

from __future__ import annotations

import argparse
from typing import Any

from cli import common
from shared.errors import InvalidName
from shared.messages import Empty
from shared.messages import storage as storage_api
from shared.messages.storage import (
    CloneVolume,
    CreateVolume,
    ImportVolume,
    ListVolumes,
    ResizeVolume,
    SendVolume,
    VolumeQuery,
    VolumeRef,
)

POOL_COLUMNS = [("name", "POOL"), ("path", "PATH"), ("capacity", "SIZE"), ("free", "FREE"),
                ("allocated", "ALLOCATED"), ("volumes", "VOLUMES"), ("reflink", "REFLINK")]
VOLUME_COLUMNS = [("pool", "POOL"), ("name", "NAME"), ("virtual", "SIZE"),
                  ("allocated", "ALLOCATED"), ("attached", "VM")]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmds = common.group(sub, "storage", "storage pools, RAW volumes, clones, transfers")

    p = cmds.add_parser("pools", help="pools with their size and free space")
    common.add_common(p)
    p.set_defaults(func=cmd_pools)

    p = cmds.add_parser("volumes", help="volumes of a pool (default: of all pools)")
    common.add_common(p)
    p.add_argument("pool", nargs="?", default="")
    p.set_defaults(func=cmd_volumes)

    p = cmds.add_parser("create", help="create a RAW volume (sparse unless --preallocate)")
    common.add_common(p)
    p.add_argument("volume", help="[POOL/]NAME")
    p.add_argument("size", type=common.parse_size, help="e.g. 20G, 512M")
    p.add_argument("--preallocate", action="store_true", help="reserve every block now")
    p.set_defaults(func=cmd_create)

    p = cmds.add_parser("resize", help="grow a volume (no running VM may use it)")
    common.add_common(p)
    p.add_argument("volume", help="[POOL/]NAME")
    p.add_argument("size", type=common.parse_size)
    p.add_argument("--preallocate", action="store_true")
    p.set_defaults(func=cmd_resize)

    p = cmds.add_parser("clone", help="reflink or sparse copy of a volume")
    common.add_common(p)
    p.add_argument("src", help="[POOL/]NAME")
    p.add_argument("dst", help="[POOL/]NAME of the new volume (default pool: the source's)")
    common.add_job_options(p)
    p.set_defaults(func=cmd_clone)

    p = cmds.add_parser("import", help="adopt a RAW file from an import directory")
    common.add_common(p)
    p.add_argument("source", help="absolute path of the file")
    p.add_argument("volume", help="[POOL/]NAME of the new volume")
    p.add_argument("--move", action="store_true", help="rename instead of copying")
    common.add_job_options(p)
    p.set_defaults(func=cmd_import)

    p = cmds.add_parser("delete", help="delete a volume (no running VM may use it)")
    common.add_common(p)
    p.add_argument("volume", help="[POOL/]NAME")
    p.set_defaults(func=cmd_delete)

    p = cmds.add_parser("info", help="one volume")
    common.add_common(p)
    p.add_argument("volume", help="[POOL/]NAME")
    p.add_argument("--sha256", action="store_true", help="read it all and give its sha256")
    p.set_defaults(func=cmd_info)

    p = cmds.add_parser("send", help="stream a volume to another host's storage agent")
    common.add_common(p)
    p.add_argument("volume", help="[POOL/]NAME")
    p.add_argument("--to", required=True, dest="to_host", help="the destination host")
    p.add_argument("--to-pool", default="default", help="the destination pool")
    p.add_argument("--to-name", default="", help="the name there (default: the same)")
    p.add_argument("--bwlimit", type=common.parse_size, default=0,
                   help="bytes per second, e.g. 100M (default: no limit)")
    common.add_job_options(p)
    p.set_defaults(func=cmd_send)


def split_volume(text: str, pool: str = "default") -> tuple[str, str]:
    """``pool/name`` or ``name`` -> (pool, name); a bare name is in ``pool``."""
    given, sep, name = text.partition("/")
    if not sep:
        return pool, text
    if "/" in name or not given or not name:
        raise InvalidName(f"{text!r}: give POOL/NAME or NAME, a volume name has no '/'")
    return given, name


def _volume(args: argparse.Namespace, text: str, pool: str = "default") -> tuple[str, str]:
    try:
        return split_volume(text, pool)
    except InvalidName as e:
        common.fail(e, args)


def cmd_pools(args: argparse.Namespace) -> None:
    reply = common.request(args, storage_api.POOLS, Empty(), timeout=args.timeout)
    if args.json:
        common.print_json(reply)
        return
    common.print_table([{
        "name": p.name, "path": p.path, "capacity": common.human_bytes(p.capacity_bytes),
        "free": common.human_bytes(p.free_bytes),
        "allocated": common.human_bytes(p.allocated_bytes), "volumes": p.volumes,
        "reflink": p.reflink} for p in reply.pools], POOL_COLUMNS)


def cmd_volumes(args: argparse.Namespace) -> None:
    reply = common.request(args, storage_api.VOLUMES, ListVolumes(pool=args.pool),
                           timeout=args.timeout)
    if args.json:
        common.print_json(reply)
        return
    common.print_table([_volume_row(v) for v in reply.volumes], VOLUME_COLUMNS)


def _volume_row(v: Any) -> dict[str, Any]:
    attached = f"{v.attached_to} ({v.attached_state})" if v.attached_to else ""
    return {"pool": v.pool, "name": v.name, "virtual": common.human_bytes(v.virtual_bytes),
            "allocated": common.human_bytes(v.allocated_bytes), "attached": attached}


def cmd_create(args: argparse.Namespace) -> None:
    pool, name = _volume(args, args.volume)
    req = CreateVolume(pool=pool, name=name, size_bytes=args.size, preallocate=args.preallocate)
    info = common.request(args, storage_api.CREATE, req, timeout=max(args.timeout, 300))
    common.show(args, info)


def cmd_resize(args: argparse.Namespace) -> None:
    pool, name = _volume(args, args.volume)
    req = ResizeVolume(pool=pool, name=name, size_bytes=args.size, preallocate=args.preallocate)
    info = common.request(args, storage_api.RESIZE, req, timeout=max(args.timeout, 300))
    common.show(args, info)


def cmd_delete(args: argparse.Namespace) -> None:
    pool, name = _volume(args, args.volume)
    ack = common.request(args, storage_api.DELETE, VolumeRef(pool=pool, name=name),
                         timeout=args.timeout)
    common.print_json(ack) if args.json else print(ack.message)


def cmd_info(args: argparse.Namespace) -> None:
    pool, name = _volume(args, args.volume)
    req = VolumeQuery(pool=pool, name=name, sha256=args.sha256)
    timeout = max(args.timeout, 3600) if args.sha256 else args.timeout
    info = common.request(args, storage_api.INFO, req, timeout=timeout)
    common.show(args, info)


def cmd_clone(args: argparse.Namespace) -> None:
    pool, name = _volume(args, args.src)
    dst_pool, dst_name = _volume(args, args.dst, pool)
    common.run_job(args, storage_api.CLONE, CloneVolume(
        pool=pool, name=name, dst_name=dst_name, dst_pool=dst_pool))


def cmd_import(args: argparse.Namespace) -> None:
    pool, name = _volume(args, args.volume)
    common.run_job(args, storage_api.IMPORT_FILE, ImportVolume(
        pool=pool, name=name, source=args.source, move=args.move))


def cmd_send(args: argparse.Namespace) -> None:
    pool, name = _volume(args, args.volume)
    common.run_job(args, storage_api.SEND, SendVolume(pool=pool, name=name, to_host=args.to_host,
                                  dst_pool=args.to_pool, dst_name=args.to_name,
                                  bwlimit_bytes_s=args.bwlimit))
