"""Messages and endpoints of the catalogue agent: the OS image store.

A ``CatalogueEntry`` is one OS or image the catalogue knows (from osinfo-db, an image server
or the built-in set); its ``downloads`` are the disk images a pull can fetch, its
``requirements`` what the guest needs, and ``VmTemplate`` the VM defaults those imply
(``vm create --image ID`` reads them). A pulled image is a ``LocalImage``: a verified RAW
file in the image pool of one host.

    >>> from shared.codec import encode
    >>> encode(ImageRef(id="debian11"))
    b'{"type":"catalogue.image_ref.v1","id":"debian11"}'
"""

from __future__ import annotations

from typing import Literal

import msgspec

from shared.messages import Ack, Empty, EndpointSpec, Event
from shared.messages.jobs import JobAccepted, job_endpoints

SourceType = Literal["osinfo", "simplestreams", "manifest", "builtin"]
Firmware = Literal["", "uefi", "bios"]  # the VM agent's words; "" = either
LocalState = Literal["ready", "unverified"]


class Resources(msgspec.Struct, frozen=True, kw_only=True):
    """CPUs, RAM and disk in base units (bytes); 0 means not stated."""

    cpus: int = 0
    ram: int = 0
    storage: int = 0


class Requirements(msgspec.Struct, frozen=True, kw_only=True):
    """What a guest OS needs; ``firmware`` empty = either, ``tpm`` empty = none needed."""

    minimum: Resources = Resources()
    recommended: Resources = Resources()
    firmware: Firmware = ""
    secure_boot: bool = False
    tpm: str = ""


class Download(msgspec.Struct, frozen=True, kw_only=True):
    """One downloadable disk image of an entry, as its source publishes it."""

    arch: str
    url: str
    format: str  # raw, qcow2, vmdk, vhdx, vpc, containerdisk
    sha256: str = ""
    size: int = 0
    compression: str = ""  # "", "xz", "gz", "zst"
    cloud_init: bool = False
    variant: str = ""


class Media(msgspec.Struct, frozen=True, kw_only=True):
    """An install medium (ISO) of an entry."""

    arch: str
    url: str = ""
    variant: str = ""
    volume_id: str = ""


class CatalogueEntry(msgspec.Struct, frozen=True, kw_only=True, tag="catalogue.entry.v1"):
    """One OS/image in the catalogue; stored in KV ``images`` under ``entry.<id>``."""

    id: str
    name: str
    source: str
    vendor: str = ""
    family: str = ""
    distro: str = ""
    version: str = ""
    codename: str = ""
    release_date: str = ""
    eol_date: str = ""
    archs: list[str] = []
    downloads: list[Download] = []
    media: list[Media] = []
    requirements: Requirements = Requirements()
    upstream_id: str = ""  # osinfo URI or simplestreams product name

    @property
    def downloadable(self) -> bool:
        return any(d.format != "containerdisk" for d in self.downloads)


class LocalImage(msgspec.Struct, frozen=True, kw_only=True, tag="catalogue.local.v1"):
    """A pulled image: a RAW file in a host's image pool (KV key ``local.<host>.<id>``)."""

    id: str
    host: str
    path: str
    sha256: str  # of the RAW file
    size: int  # bytes of the RAW file (its virtual size)
    state: LocalState
    source: str
    url: str
    source_sha256: str = ""  # of the downloaded payload, as published and verified
    source_format: str = "raw"
    pulled_at: float = 0.0
    # the image's architecture ("": pulled before archs were kept, the catalogue host's);
    # an image of another arch than the host's has the id ``<entry id>_<arch>``
    arch: str = ""


class ImageCounts(msgspec.Struct, frozen=True, kw_only=True, tag="catalogue.image_counts.v1"):
    """The catalogue agent's heartbeat: how many entries it lists and how many are pulled."""

    listed: int = 0
    pulled: int = 0


class VmTemplate(msgspec.Struct, frozen=True, kw_only=True):
    """VM defaults implied by an entry's requirements (``vm create --image`` uses them)."""

    firmware: Literal["uefi", "bios"]
    secure_boot: bool
    tpm: str
    memory: int
    vcpus: int
    disk: int
    machine: str = "q35"
    # "windows": Hyper-V enlightenments and a local-time clock (osinfo family winnt)
    profile: Literal["generic", "windows"] = "generic"


class SourceSpec(msgspec.Struct, frozen=True, kw_only=True, tag="catalogue.source.v1"):
    """A configured image source (KV key ``source.<name>``)."""

    name: str
    kind: SourceType
    url: str = ""
    builtin: bool = False  # from the agent's configuration, not removable over the bus
    # a binary GPG keyring on the catalogue agent's host: the index is read only as .sjson
    # files whose signature gpgv verifies against it; "" = unsigned (only sha256 checked)
    keyring: str = ""


# -- requests and replies -------------------------------------------------------------------


class ListRequest(msgspec.Struct, frozen=True, kw_only=True, tag="catalogue.list.v1"):
    search: str = ""
    family: str = ""
    arch: str = ""
    downloadable: bool = False
    source: str = ""


class ImageSummary(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    source: str
    family: str = ""
    version: str = ""
    archs: list[str] = []
    downloadable: bool = False
    local: str = ""  # "", "ready", "unverified"


class ImageList(msgspec.Struct, frozen=True, kw_only=True, tag="catalogue.image_list.v1"):
    images: list[ImageSummary]


class ImageRef(msgspec.Struct, frozen=True, kw_only=True, tag="catalogue.image_ref.v1"):
    id: str
    arch: str = ""  # which arch's pulled image (default: this host's architecture)


class ImageInfo(msgspec.Struct, frozen=True, kw_only=True, tag="catalogue.image_info.v1"):
    entry: CatalogueEntry
    template: VmTemplate
    local: LocalImage | None = None
    path: str = ""  # the local RAW file, once pulled here
    sha256: str = ""  # its sha256
    pulling: str = ""  # the id of the catalogue job pulling it here now, if one runs
    arch: str = ""  # the architecture ``local``/``path`` are of (the asked one)


class PullRequest(msgspec.Struct, frozen=True, kw_only=True, tag="catalogue.pull.v1"):
    id: str
    arch: str = ""  # default: this host's architecture
    allow_unverified: bool = False


class SourceList(msgspec.Struct, frozen=True, kw_only=True, tag="catalogue.source_list.v1"):
    sources: list[SourceSpec]


class SourceAdd(msgspec.Struct, frozen=True, kw_only=True, tag="catalogue.source_add.v1"):
    name: str
    url: str
    kind: Literal["manifest", "simplestreams"] = "manifest"
    keyring: str = ""  # simplestreams only: see SourceSpec.keyring


class SourceRef(msgspec.Struct, frozen=True, kw_only=True, tag="catalogue.source_ref.v1"):
    name: str


class SourceCount(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    entries: int
    error: str = ""


class RefreshResult(msgspec.Struct, frozen=True, kw_only=True, tag="catalogue.refresh.v1"):
    sources: list[SourceCount]
    entries: int


# -- events ---------------------------------------------------------------------------------


class ImagePulled(Event, frozen=True, kw_only=True, tag="catalogue.image_pulled.v1"):
    image: LocalImage


class ImageRemoved(Event, frozen=True, kw_only=True, tag="catalogue.image_removed.v1"):
    id: str
    path: str


class ImageRefused(Event, frozen=True, kw_only=True, tag="catalogue.image_refused.v1"):
    id: str
    url: str
    reason: str


class LinkChanged(Event, frozen=True, kw_only=True, tag="catalogue.link_changed.v1"):
    """An image URL started or stopped answering (link-rot probing)."""

    id: str
    url: str
    ok: bool
    status: int = 0
    reason: str = ""


class CatalogueRefreshed(Event, frozen=True, kw_only=True, tag="catalogue.refreshed.v1"):
    entries: int
    sources: list[SourceCount]


LIST = EndpointSpec(
    "catalogue", "list", ListRequest, ImageList,
    "Catalogue entries, filtered by text, family, arch, downloadable.")
INFO = EndpointSpec(
    "catalogue", "info", ImageRef, ImageInfo,
    "One entry, its VM template, and the local RAW file once pulled.")
PULL = EndpointSpec(
    "catalogue", "pull", PullRequest, JobAccepted,
    "Download, verify and convert an image to RAW in the pool (a job).")
REMOVE = EndpointSpec(
    "catalogue", "remove", ImageRef, Ack,
    "Delete a pulled image from this host's pool.")
SOURCES = EndpointSpec("catalogue", "sources", Empty, SourceList, "Configured image sources.")
SOURCE_ADD = EndpointSpec(
    "catalogue", "source_add", SourceAdd, SourceSpec,
    "Add a manifest or simplestreams source.")
SOURCE_REMOVE = EndpointSpec(
    "catalogue", "source_remove", SourceRef, Ack,
    "Remove a source and its entries.")
REFRESH = EndpointSpec(
    "catalogue", "refresh", Empty, RefreshResult,
    "Re-read every source into KV images.")
JOBS, JOB, CANCEL = job_endpoints("catalogue")

# What the catalogue agent serves; the job endpoints are added by the agent runtime.
ENDPOINTS = (LIST, INFO, PULL, REMOVE, SOURCES, SOURCE_ADD, SOURCE_REMOVE, REFRESH)
