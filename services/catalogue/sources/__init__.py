"""Where catalogue entries come from: osinfo-db, image servers, the built-in set.

Each source module turns what its source publishes into ``CatalogueEntry`` values and does
no network I/O itself (the agent fetches index files through ``download.Fetcher``), so a
parser can be tested on bytes alone::

    >>> check_id("debian11")
    'debian11'
    >>> normalize_arch("amd64")
    'x86_64'
"""

from __future__ import annotations

import re

from shared.errors import InvalidName

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Debian/Ubuntu/Go spellings of architectures -> the kernel's (and osinfo-db's).
_ARCHES = {"amd64": "x86_64", "x86-64": "x86_64", "arm64": "aarch64", "i386": "i686",
           "386": "i686", "ppc64el": "ppc64le", "armhf": "armv7l", "arm": "armv7l"}

# Suffix -> compression of a downloaded payload (the payload's magic bytes decide in the end).
COMPRESSIONS = {".xz": "xz", ".gz": "gz", ".zst": "zst"}


def check_id(value: str, what: str = "image id") -> str:
    """``value`` if it can name an image file and a KV key, else InvalidName."""
    if not isinstance(value, str) or not _ID.match(value) or ".." in value:
        raise InvalidName(
            f"{what} {value!r} is not valid: use 1-128 letters, digits, '.', '-' or '_', "
            "starting with a letter or digit (no path separators, no '..')")
    return value


def safe_id(value: str) -> str:
    """An id made from free text (a simplestreams product name): invalid characters -> '-'."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", value).strip("-._")
    cleaned = re.sub(r"\.{2,}", ".", cleaned)[:128]
    return check_id(cleaned or "unnamed")


def normalize_arch(arch: str) -> str:
    return _ARCHES.get(arch.lower(), arch.lower())


def compression_of(url: str) -> str:
    """The compression a URL's suffix announces ("" for none)."""
    path = url.split("?", 1)[0].lower()
    for suffix, name in COMPRESSIONS.items():
        if path.endswith(suffix):
            return name
    return ""


def rewrite(url: str, mirrors: dict[str, str]) -> str:
    """``url`` with the longest matching mirror prefix replaced (air-gapped sites, tests)."""
    best = max((p for p in mirrors if url.startswith(p)), key=len, default="")
    return mirrors[best] + url[len(best):] if best else url
