"""``phyllome images``: the OS image catalogue (osinfo-db, image servers, built-in images).

    phyllome images list --downloadable --family linux   # this machine's arch (--all-arches)
    phyllome images info debian11 --json        # VM template; RAW path and sha256 once pulled
    phyllome images pull phyllome-tiny          # progress bar; non-zero exit when refused
    phyllome images sources list
    phyllome images sources add lab http://mirror.lan/images.json --type manifest
    phyllome images sources add ubuntu https://cloud-images.ubuntu.com/releases/ \
        --type simplestreams --keyring /usr/share/keyrings/ubuntu-cloudimage-keyring.gpg
"""

from __future__ import annotations

import argparse
import platform
from typing import Any

import msgspec

from cli import common
from shared.codec import to_builtins
from shared.messages import Empty
from shared.messages import catalogue as catalogue_api
from shared.messages.catalogue import (
    ImageInfo,
    ImageRef,
    ListRequest,
    PullRequest,
    SourceAdd,
    SourceList,
    SourceRef,
)

LIST_COLUMNS = [("id", "ID"), ("name", "NAME"), ("family", "FAMILY"), ("version", "VERSION"),
                ("source", "SOURCE"), ("downloadable", "DOWNLOAD"), ("local", "LOCAL")]
ARCH_COLUMN = ("archs", "ARCH")
SOURCE_COLUMNS = [("name", "NAME"), ("kind", "TYPE"), ("url", "URL"), ("signature", "SIGNATURE"),
                  ("builtin", "CONFIGURED")]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmds = common.group(sub, "images", "the OS image catalogue: list, info, pull, sources")

    p = cmds.add_parser("list", help="catalogue entries")
    common.add_common(p)
    p.add_argument("--search", default="", metavar="TEXT", help="words in id, name, vendor")
    p.add_argument("--family", default="", help="OS family or distro (linux, winnt, debian)")
    p.add_argument("--arch", default="", help="architecture (x86_64, aarch64, amd64, ...); "
                   f"default: this machine's ({platform.machine()})")
    p.add_argument("--all-arches", action="store_true",
                   help="entries of every architecture, with an ARCH column")
    p.add_argument("--source", default="", help="only entries of this source")
    p.add_argument("--downloadable", action="store_true",
                   help="only entries with a downloadable disk image")
    p.set_defaults(func=cmd_list)

    p = cmds.add_parser("info", help="one entry, its VM template, its local RAW file")
    common.add_common(p)
    p.add_argument("id")
    p.set_defaults(func=cmd_info)

    p = cmds.add_parser("pull", help="download, verify and convert an image to RAW")
    common.add_common(p)
    p.add_argument("id")
    p.add_argument("--arch", default="", help="architecture (default: the host's)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="pull an image that has no published sha256 (marked unverified)")
    common.add_job_options(p)
    p.set_defaults(func=cmd_pull)

    p = cmds.add_parser("remove", help="delete a pulled image from the host's pool")
    common.add_common(p)
    p.add_argument("id")
    p.add_argument("--arch", default="", help="the image pulled for this architecture "
                   "(default: the host's)")
    p.set_defaults(func=cmd_remove)

    p = cmds.add_parser("refresh", help="re-read every source")
    common.add_common(p)
    p.set_defaults(func=cmd_refresh)

    src = cmds.add_parser("sources", help="image sources (list, add, remove)")
    common.add_common(src)
    src.set_defaults(func=cmd_sources)
    scmds = src.add_subparsers(dest="sources_command", metavar="COMMAND")
    p = scmds.add_parser("list", help="the configured sources and how each is trusted")
    common.add_common(p)
    p.set_defaults(func=cmd_sources)
    p = scmds.add_parser("add", help="add a manifest or simplestreams source")
    common.add_common(p)
    p.add_argument("name")
    p.add_argument("url")
    p.add_argument("--type", dest="kind", choices=("manifest", "simplestreams"),
                   default="manifest")
    p.add_argument("--keyring", default="",
                   help="simplestreams: a binary GPG keyring on the catalogue agent's host; "
                        "the signed index (.sjson) is read and its signature checked")
    p.set_defaults(func=cmd_source_add)
    p = scmds.add_parser("remove", help="remove a source and its entries")
    common.add_common(p)
    p.add_argument("name")
    p.set_defaults(func=cmd_source_remove)



def cmd_list(args: argparse.Namespace) -> None:
    """Entries for this machine's architecture (or ``--arch``), and those that name none;
    every one with ``--all-arches``."""
    result = common.request(args, catalogue_api.LIST, ListRequest(
        search=args.search, family=args.family, arch=args.arch,
        downloadable=args.downloadable, source=args.source))
    if not (args.arch or args.all_arches):
        here = platform.machine()
        result = msgspec.structs.replace(result, images=[
            i for i in result.images if not i.archs or here in i.archs])
    columns = [*LIST_COLUMNS, ARCH_COLUMN] if args.all_arches else LIST_COLUMNS
    common.show(args, result, columns, rows_key="images")


def info_rows(info: ImageInfo) -> list[tuple[str, Any]]:
    """The fields a person reads first, in a fixed order."""
    e, t, req = info.entry, info.template, info.entry.requirements
    rows: list[tuple[str, Any]] = [
        ("id", e.id), ("name", e.name), ("source", e.source), ("vendor", e.vendor),
        ("family", e.family), ("version", e.version), ("released", e.release_date),
        ("end of life", e.eol_date), ("archs", e.archs),
        ("min cpus / ram / disk", f"{req.minimum.cpus} / {common.human_bytes(req.minimum.ram)}"
                                  f" / {common.human_bytes(req.minimum.storage)}"),
        ("template", f"{t.machine}, {t.firmware}"
                     f"{', secure boot' if t.secure_boot else ''}"
                     f"{f', TPM {t.tpm}' if t.tpm else ''}, {t.vcpus} vCPU, "
                     f"{common.human_bytes(t.memory)} RAM, {common.human_bytes(t.disk)} disk"),
    ]
    rows += [(f"image {d.arch}", f"{d.format} {d.url}"
              + ("" if d.sha256 else " (no sha256: --allow-unverified)"))
             for d in e.downloads]
    rows += [(f"media {m.arch}", m.url) for m in e.media if m.url][:4]
    if info.local is not None:
        rows += [("path", info.path), ("sha256", info.sha256), ("state", info.local.state)]
    return [(k, v) for k, v in rows if v not in ("", [], None)]


def cmd_info(args: argparse.Namespace) -> None:
    info = common.request(args, catalogue_api.INFO, ImageRef(id=args.id))
    if args.json:
        common.print_json(info)
    else:
        common.print_fields(info_rows(info))


def cmd_pull(args: argparse.Namespace) -> None:
    req = PullRequest(id=args.id, arch=args.arch, allow_unverified=args.allow_unverified)

    common.run_job(args, catalogue_api.PULL, req)


def cmd_remove(args: argparse.Namespace) -> None:
    common.show(args, common.request(args, catalogue_api.REMOVE,
                                     ImageRef(id=args.id, arch=args.arch)))


def cmd_refresh(args: argparse.Namespace) -> None:
    result = common.request(args, catalogue_api.REFRESH, Empty())
    common.show(args, result, [("name", "SOURCE"), ("entries", "ENTRIES"), ("error", "ERROR")],
                rows_key="sources")


def source_rows(sources: SourceList) -> list[dict[str, Any]]:
    """Each source with how its index is trusted: a signature, or nothing beyond sha256."""
    rows = []
    for s in sources.sources:
        row = to_builtins(s)
        row["signature"] = (f"checked ({s.keyring})" if s.keyring else
                            "local files" if s.kind in ("builtin", "osinfo") else "unsigned")
        rows.append(row)
    return rows


def cmd_sources(args: argparse.Namespace) -> None:
    sources = common.request(args, catalogue_api.SOURCES, Empty())
    if args.json:
        common.print_json(sources)
    else:
        common.print_table(source_rows(sources), SOURCE_COLUMNS)


def cmd_source_add(args: argparse.Namespace) -> None:
    common.show(args, common.request(args, catalogue_api.SOURCE_ADD, SourceAdd(
        name=args.name, url=args.url, kind=args.kind, keyring=args.keyring)))


def cmd_source_remove(args: argparse.Namespace) -> None:
    common.show(args, common.request(args, catalogue_api.SOURCE_REMOVE, SourceRef(name=args.name)))
