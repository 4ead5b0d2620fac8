"""Plain image manifests (JSON or TOML), the simplest image server there is.

The shape, strictly validated (unknown keys are refused so that a typo like ``sha265`` is
an error, not an unverified image)::

    {"images": [{"id": "tiny", "name": "Tiny", "version": "1", "arch": "x86_64",
                 "url": "tiny.raw.xz", "sha256": "<64 hex>", "size": 1234, "format": "raw",
                 "requirements": {"firmware": "uefi", "secure_boot": true, "tpm": "2.0",
                                  "cpus": 1, "memory": 268435456, "disk": 1073741824}}]}

Relative URLs are resolved against the manifest's own URL.

    >>> parse(b'{"images": []}', "http://h/m.json", "lab")
    []
"""

from __future__ import annotations

import re
import tomllib
from typing import Annotated, Literal
from urllib.parse import urljoin

import msgspec

from services.catalogue.sources import check_id, compression_of, normalize_arch
from shared.errors import BadRequest, PhyError
from shared.messages.catalogue import CatalogueEntry, Download, Requirements, Resources

FORMATS = ("raw", "qcow2", "vmdk", "vhdx", "vpc")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
NonNeg = Annotated[int, msgspec.Meta(ge=0)]


class ManifestRequirements(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    firmware: Literal["", "uefi", "efi", "bios"] = ""
    secure_boot: bool = False
    tpm: Literal["", "1.2", "2.0"] = ""
    cpus: NonNeg = 0
    memory: NonNeg = 0
    disk: NonNeg = 0


class ManifestImage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: str
    name: str
    arch: str
    url: str
    format: Literal["raw", "qcow2", "vmdk", "vhdx", "vpc"]
    version: str = ""
    sha256: str = ""
    size: NonNeg = 0
    family: str = ""
    vendor: str = ""
    requirements: ManifestRequirements = ManifestRequirements()


class Manifest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    images: list[ManifestImage]


def parse(data: bytes, url: str, source: str) -> list[CatalogueEntry]:
    """Entries of a manifest fetched from ``url``; BadRequest says what and where is wrong."""
    where = f"manifest of source {source!r} ({url})"
    try:
        if url.split("?", 1)[0].endswith(".toml") or not data.lstrip().startswith(b"{"):
            manifest = msgspec.convert(tomllib.loads(data.decode()), Manifest)
        else:
            manifest = msgspec.json.decode(data, type=Manifest)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise BadRequest(f"{where}: {e}; each image needs id, name, arch, url and format "
                         f"({'/'.join(FORMATS)})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"{where}: neither JSON nor TOML: {e}") from None
    entries: dict[str, CatalogueEntry] = {}
    for i, img in enumerate(manifest.images):
        at = f"{where}: images[{i}]"
        try:
            check_id(img.id)
        except PhyError as e:
            raise BadRequest(f"{at}: {e.message}") from None
        if img.sha256 and not _SHA256.match(img.sha256):
            raise BadRequest(f"{at} ({img.id}): sha256 must be 64 hex digits, got "
                             f"{img.sha256!r}")
        if img.id in entries:
            raise BadRequest(f"{at}: id {img.id!r} appears twice")
        r = img.requirements
        dl = Download(arch=normalize_arch(img.arch), url=urljoin(url, img.url), format=img.format,
                      sha256=img.sha256.lower(), size=img.size,
                      compression=compression_of(img.url))
        entries[img.id] = CatalogueEntry(
            id=img.id, name=img.name, source=source, vendor=img.vendor, family=img.family,
            version=img.version, archs=[dl.arch], downloads=[dl], upstream_id=img.url,
            requirements=Requirements(
                minimum=Resources(cpus=r.cpus, ram=r.memory, storage=r.disk),
                firmware="uefi" if r.firmware == "efi" else r.firmware,
                secure_boot=r.secure_boot, tpm=r.tpm))
    return list(entries.values())
