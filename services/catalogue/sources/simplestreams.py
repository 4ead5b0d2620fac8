"""Simplestreams image servers (the format Incus/LXD and Ubuntu cloud images publish).

``streams/v1/index.json`` lists product files; each product file maps product names to
versions, and each version to items (files) with ``path``, ``sha256`` and ``size``. For
every product the newest version holding a VM disk is an entry; its id is built from the
product's os, release, arch and variant.

A server that signs publishes each file also clear-signed, as ``.sjson`` beside the
``.json``; a source with a keyring reads only those (``signature.py`` checks them)::

    >>> index_url("http://h/ss", signed=True)
    'http://h/ss/streams/v1/index.sjson'
    >>> product_paths(b'{"format": "index:1.0", "index": {"x": {"datatype": "image-downloads",'
    ...               b' "path": "streams/v1/x.json"}}}')
    ['streams/v1/x.json']
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urljoin

import msgspec

from services.catalogue.sources import compression_of, normalize_arch, safe_id
from shared.errors import BadRequest
from shared.messages.catalogue import CatalogueEntry, Download

INDEX_PATH = "streams/v1/index.json"
SIGNED_INDEX_PATH = "streams/v1/index.sjson"

# VM disk item types in order of preference -> their format.
DISK_FTYPES = {"disk-kvm.img": "qcow2", "disk1.img": "qcow2", "uefi1.img": "qcow2",
               "qcow2": "qcow2", "disk.raw": "raw", "raw": "raw"}


class IndexEntry(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    datatype: str = "image-downloads"


class Index(msgspec.Struct, frozen=True, kw_only=True):
    index: dict[str, IndexEntry]
    format: str = "index:1.0"


class Item(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    ftype: str = ""
    sha256: str = ""
    size: int = 0


class Version(msgspec.Struct, frozen=True, kw_only=True):
    items: dict[str, Item] = {}


class Product(msgspec.Struct, frozen=True, kw_only=True):
    arch: str = ""
    os: str = ""
    release: str = ""
    release_title: str = ""
    version: str = ""
    variant: str = ""
    versions: dict[str, Version] = {}


class Products(msgspec.Struct, frozen=True, kw_only=True):
    products: dict[str, Product]
    format: str = "products:1.0"


def _decode(data: bytes, tp: type[Any], what: str) -> Any:
    try:
        return msgspec.json.decode(data, type=tp)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise BadRequest(f"simplestreams {what}: {e}") from None


def index_url(base: str, signed: bool = False) -> str:
    """The index of a server given by its root URL or by the index URL itself; its signed
    form (``.sjson``) when ``signed``."""
    if base.endswith(".sjson") and not signed:
        raise BadRequest(f"{base} is a signed index: name the keyring of its signer "
                         "(--keyring), or give the unsigned .json index")
    if base.endswith((".json", ".sjson")):
        return signed_path(base) if signed else base
    return urljoin(base.rstrip("/") + "/", SIGNED_INDEX_PATH if signed else INDEX_PATH)


def signed_path(path: str) -> str:
    """The clear-signed twin of an index or product file: ``x.json`` -> ``x.sjson``."""
    return path.removesuffix(".json") + ".sjson" if path.endswith(".json") else path


def root_url(base: str) -> str:
    """The server root that item and product paths are relative to."""
    for index in (INDEX_PATH, SIGNED_INDEX_PATH):
        if base.endswith(index):
            return base[: -len(index)]
    return base.rstrip("/") + "/"


def product_paths(index: bytes) -> list[str]:
    """Product file paths of the image-download datatype, relative to the server root."""
    parsed: Index = _decode(index, Index, "index")
    return [e.path for e in parsed.index.values() if e.datatype == "image-downloads"]


def parse_products(data: bytes, root: str, source: str) -> list[CatalogueEntry]:
    """One entry per product that has a VM disk item in some version (the newest wins)."""
    parsed: Products = _decode(data, Products, "product file")
    entries = []
    for name, prod in sorted(parsed.products.items()):
        dl = _newest_disk(prod, root)
        if dl is None:
            continue
        parts = [prod.os, prod.release or prod.version, prod.arch, prod.variant]
        ident = safe_id("-".join(p for p in parts if p) if prod.os else name)
        title = prod.release_title or prod.version or prod.release
        entries.append(CatalogueEntry(
            id=ident, name=f"{prod.os.capitalize()} {title}".strip() if prod.os else name,
            source=source, distro=prod.os, family="linux" if prod.os else "",
            version=prod.version or prod.release, codename=prod.release,
            archs=[dl.arch], downloads=[dl], upstream_id=name))
    return entries


def _newest_disk(prod: Product, root: str) -> Download | None:
    for version in sorted(prod.versions, reverse=True):
        items = prod.versions[version].items
        for ftype, fmt in DISK_FTYPES.items():
            item = next((i for i in items.values() if i.ftype == ftype), None)
            if item is not None and item.path:
                return Download(arch=normalize_arch(prod.arch), url=urljoin(root, item.path),
                                format=fmt, sha256=item.sha256.lower(), size=item.size,
                                compression=compression_of(item.path))
    return None
