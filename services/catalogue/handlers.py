"""The catalogue endpoints: list/search, info with a VM template, pull (a job), remove,
sources and refresh; the index lives in KV ``images`` so every host sees one catalogue.

KV ``images`` keys: ``entry.<id>`` (CatalogueEntry), ``source.<name>`` (SourceSpec, the
sources added over the bus), ``local.<host>.<id>`` (LocalImage: pulled on that host).

    handlers = Handlers(agent, settings, store, metrics)
    await handlers.begin()      # sources read, KV written, watcher and link prober running
    await handlers.list(ListRequest(family="linux", downloadable=True))
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import TYPE_CHECKING, Any

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from services.catalogue.config import Settings
from services.catalogue.download import ImageAdapter
from services.catalogue.metrics import CatalogueMetrics
from services.catalogue.signature import check_keyring, verify_clearsigned
from services.catalogue.sources import (
    builtin,
    check_id,
    manifest,
    normalize_arch,
    osinfo,
    simplestreams,
)
from shared import subjects
from shared.codec import to_builtins
from shared.errors import BadRequest, Conflict, Forbidden, InvalidName, NotFound, PhyError
from shared.messages import Ack, Empty
from shared.messages.catalogue import (
    CatalogueEntry,
    CatalogueRefreshed,
    Download,
    ImageCounts,
    ImageInfo,
    ImageList,
    ImagePulled,
    ImageRef,
    ImageRefused,
    ImageRemoved,
    ImageSummary,
    LinkChanged,
    ListRequest,
    LocalImage,
    PullRequest,
    RefreshResult,
    SourceAdd,
    SourceCount,
    SourceList,
    SourceRef,
    SourceSpec,
    VmTemplate,
)
from shared.messages.jobs import JobAccepted

if TYPE_CHECKING:
    from shared.agent import Agent
    from shared.jobs import Job

log = logging.getLogger("phyllome.catalogue")

GiB = 1 << 30
# Formats in the order a pull prefers them: RAW needs no conversion.
FORMAT_ORDER = ("raw", "qcow2", "vmdk", "vhdx", "vpc")
PROBE_CONCURRENCY = 8
ARCH_NAME = re.compile(r"^[a-z0-9_]{1,32}$")  # x86_64, aarch64, riscv64, ppc64le
# Words people type for an OS family -> osinfo-db's family names.
FAMILY_ALIASES = {"windows": "winnt", "macos": "darwin"}


def template(entry: CatalogueEntry, local: LocalImage | None = None) -> VmTemplate:
    """VM defaults from an entry's requirements: recommended over minimum over safe defaults;
    the disk is at least the pulled image's size. Windows gets UEFI with Secure Boot and a
    TPM 2.0 by default (Windows 11 requires both, older versions use them)."""
    req = entry.requirements
    rec, low = req.recommended, req.minimum
    disk = max(rec.storage or low.storage, local.size if local else 0) or 10 * GiB
    windows = entry.family.lower() == "winnt"
    return VmTemplate(
        firmware="uefi" if windows else req.firmware or "uefi",
        secure_boot=req.secure_boot or windows, tpm=req.tpm or ("2.0" if windows else ""),
        memory=rec.ram or low.ram or GiB, vcpus=max(rec.cpus, low.cpus, 1), disk=disk,
        profile="windows" if windows else "generic")


def matches(entry: CatalogueEntry, req: ListRequest) -> bool:
    if req.downloadable and not entry.downloadable:
        return False
    if req.source and entry.source != req.source:
        return False
    family = FAMILY_ALIASES.get(req.family.lower(), req.family.lower())
    if family and family not in (entry.family.lower(), entry.distro.lower()):
        return False
    if req.arch and normalize_arch(req.arch) not in entry.archs:
        return False
    if req.search:
        text = " ".join((entry.id, entry.name, entry.vendor, entry.distro, entry.codename,
                         entry.version)).lower()
        return all(word in text for word in req.search.lower().split())
    return True


def choose(entry: CatalogueEntry, arch: str) -> Download:
    """The download a pull of ``entry`` for ``arch`` uses: RAW first, cloud-init first; an
    entry with install media only gives its first ISO (kept as it is, for ``--cdrom``)."""
    usable = [d for d in entry.downloads if d.arch == arch and d.format in FORMAT_ORDER]
    media = [m for m in entry.media if m.arch == arch and m.url]
    if not usable and media:
        return Download(arch=arch, url=media[0].url, format="iso", variant=media[0].variant)
    if not usable:
        have = sorted({f"{d.arch}/{d.format}" for d in entry.downloads})
        raise NotFound(f"{entry.id} has no disk image for {arch}"
                       + (f" (it has {', '.join(have)}; pass --arch)" if have else
                          " (install media only: use its ISO)"))
    return min(usable, key=lambda d: (FORMAT_ORDER.index(d.format), not d.cloud_init))


class Handlers:
    """Handlers of the catalogue endpoints (one per EndpointSpec verb)."""

    def __init__(self, agent: Agent, settings: Settings, store: ImageAdapter,
                 metrics: CatalogueMetrics) -> None:
        self.agent = agent
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.entries: dict[str, CatalogueEntry] = {}
        self.added: dict[str, SourceSpec] = {}
        self.links: dict[str, bool] = {}
        self._kv: KeyValue | None = None
        self._synced = asyncio.Event()
        self._refresh_lock = asyncio.Lock()

    @property
    def kv(self) -> KeyValue:
        assert self._kv is not None, "start() first"
        return self._kv

    async def begin(self) -> None:
        self._kv = await self.agent.bus.kv(subjects.KV_IMAGES)
        self.agent.spawn(self._watch(), "index-watch")
        await asyncio.wait_for(self._synced.wait(), 30)
        await self.refresh(Empty())
        for image in self.store.locals():  # pulled before a restart
            await self.kv.put(self._local_key(image.id), msgspec.json.encode(image))
        for image_id in self.settings.auto_pull:
            await self._auto_pull(image_id)
        if self.settings.probe_interval_s > 0:
            self.agent.spawn(self._probe_loop(), "link-probe")

    async def _auto_pull(self, image_id: str) -> None:
        """Put a local (built-in) image in the pool at start, so `vm create --image` works
        offline on a fresh host (a no-op when the pool has this build already, a new copy
        after a rebuild); remote images are never pulled unasked."""
        entry = self.entries.get(image_id)
        if entry is None:
            return
        local = [d for d in entry.downloads if d.url.startswith("file:")]
        if not local:
            return
        here = normalize_arch(self.settings.arch)  # this host's arch first (others on ask)
        local.sort(key=lambda d: d.arch != here)
        try:
            accepted = await self.pull(PullRequest(id=image_id, arch=local[0].arch))
        except PhyError as e:
            log.warning("auto-pull of %s refused: %s", image_id, e.message)
            return
        log.info("auto-pulling %s (job %s)", image_id, accepted.job_id)

    async def close(self) -> None:
        await self.store.close()

    # -- the index mirror -------------------------------------------------------------------

    async def _watch(self) -> None:
        """Keep ``entries``/``added`` equal to KV: this host's writes and other hosts'."""
        watcher = await self.kv.watchall()
        try:
            async for e in watcher:
                if e is None:
                    self._synced.set()
                    continue
                self._apply(e.key, e.value if e.operation is None else b"")
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    def _apply(self, key: str, value: bytes) -> None:
        kind, _, name = key.partition(".")
        tables: dict[str, dict[str, Any]] = {"entry": self.entries, "source": self.added}
        table = tables.get(kind)
        if table is None:
            return
        if not value:
            table.pop(name, None)
            return
        tp = CatalogueEntry if kind == "entry" else SourceSpec
        try:
            table[name] = msgspec.json.decode(value, type=tp)
        except msgspec.MsgspecError:
            log.debug("KV images/%s: not a %s (newer schema?)", key, tp.__name__)

    def _local_key(self, image_id: str) -> str:
        return f"local.{self.agent.host}.{image_id}"

    # -- sources ----------------------------------------------------------------------------

    def configured(self) -> list[SourceSpec]:
        """The sources from the agent's configuration (not removable over the bus)."""
        out = [SourceSpec(name=builtin.SOURCE, kind="builtin", url=self.settings.builtin_dir,
                          builtin=True)]
        if self.settings.osinfo_dir:
            out.append(SourceSpec(name=osinfo.SOURCE, kind="osinfo",
                                  url=self.settings.osinfo_dir, builtin=True))
        for s in self.settings.sources:
            kind = s.kind if s.kind in ("manifest", "simplestreams") else "manifest"
            out.append(SourceSpec(name=s.name, kind=kind, url=s.url,  # type: ignore[arg-type]
                                  builtin=True, keyring=s.keyring))
        return out

    def all_sources(self) -> list[SourceSpec]:
        mine = self.configured()
        names = {s.name for s in mine}
        return mine + [s for n, s in sorted(self.added.items()) if n not in names]

    async def read_source(self, src: SourceSpec) -> list[CatalogueEntry]:
        """The entries a source publishes now; PhyError says why it could not be read."""
        limit = self.settings.max_index_bytes
        if src.kind == "builtin":
            return await asyncio.to_thread(builtin.entries, src.url)
        if src.kind == "osinfo":
            return await asyncio.to_thread(osinfo.load, src.url)
        if src.keyring and src.kind != "simplestreams":
            raise BadRequest(f"source {src.name!r}: a keyring checks simplestreams "
                             f"indexes only, not a {src.kind}; leave the keyring out")
        if src.kind == "manifest":
            return manifest.parse(await self.store.fetch(src.url, limit), src.url, src.name)
        signed = bool(src.keyring)
        if signed:
            check_keyring(src.keyring)  # before any download: a typo is told at once
        index = simplestreams.index_url(src.url, signed)
        root = simplestreams.root_url(index)
        out: list[CatalogueEntry] = []
        for path in simplestreams.product_paths(await self._fetch_index(src, index)):
            url = root + (simplestreams.signed_path(path) if signed else path)
            out += simplestreams.parse_products(await self._fetch_index(src, url), root,
                                                src.name)
        return out

    async def _fetch_index(self, src: SourceSpec, url: str) -> bytes:
        """An index file of ``src``; only its signed text when the source names a keyring."""
        data = await self.store.fetch(url, self.settings.max_index_bytes)
        if not src.keyring:
            return data
        return await asyncio.to_thread(verify_clearsigned, data, src.keyring, url,
                                       self.settings.gpgv_timeout_s)

    async def refresh(self, req: Empty) -> RefreshResult:
        """Re-read every source; write changed entries to KV and delete vanished ones."""
        return await self._refresh()

    async def _refresh(self, dropped: str = "") -> RefreshResult:
        """Refresh; entries are deleted only for sources this agent read (or ``dropped``):
        another host's catalogue agent may have configured sources this one lacks."""
        async with self._refresh_lock:
            counts: list[SourceCount] = []
            fresh: dict[str, CatalogueEntry] = {}
            for src in self.all_sources():  # earlier sources win an id
                try:
                    found = await self.read_source(src)
                    error = ""
                except PhyError as e:
                    found, error = [e for e in self.entries.values() if e.source == src.name], \
                        e.message
                    log.warning("source %s unreadable, keeping its last entries: %s",
                                src.name, error)
                self.metrics.source_up.labels(source=src.name).set(0 if error else 1)
                taken = [e.id for e in found if e.id in fresh]
                if taken and not error:
                    error = f"ids already taken by an earlier source: {', '.join(taken[:5])}"
                fresh.update({e.id: e for e in found if e.id not in fresh})
                counts.append(SourceCount(name=src.name, error=error, entries=sum(
                    1 for e in found if fresh.get(e.id) is e)))
            await self._write(fresh, {c.name for c in counts} | {dropped})
            self._count_images()
            result = RefreshResult(sources=counts, entries=len(fresh))
        await self.agent.publish("refreshed", CatalogueRefreshed(
            host=self.agent.host, entries=result.entries, sources=counts))
        return result

    async def _write(self, fresh: dict[str, CatalogueEntry], owned: set[str]) -> None:
        for image_id, entry in fresh.items():
            if self.entries.get(image_id) != entry:
                await self.kv.put(f"entry.{image_id}", msgspec.json.encode(entry))
                self.entries[image_id] = entry
        gone = [i for i, e in self.entries.items() if e.source in owned and i not in fresh]
        for image_id in gone:
            await self.kv.delete(f"entry.{image_id}")
            self.entries.pop(image_id, None)

    def _count_images(self) -> None:
        self.metrics.images.clear()
        pulled = {i.id for i in self.store.locals()}
        self.agent.details = msgspec.structs.replace(
            self.agent.details, images=ImageCounts(listed=len(self.entries), pulled=len(pulled)))
        for e in self.entries.values():
            self.metrics.images.labels(source=e.source, state="listed").inc()
            if e.downloadable:
                self.metrics.images.labels(source=e.source, state="downloadable").inc()
            if e.id in pulled:
                self.metrics.images.labels(source=e.source, state="pulled").inc()

    async def sources(self, req: Empty) -> SourceList:
        return SourceList(sources=self.all_sources())

    async def source_add(self, req: SourceAdd) -> SourceSpec:
        check_id(req.name, "source name")
        if any(s.name == req.name for s in self.all_sources()):
            raise Conflict(f"a source named {req.name!r} exists; remove it first")
        self.store.resolve(req.url)  # refuses non-http(s) and file:// outside local dirs
        spec = SourceSpec(name=req.name, kind=req.kind, url=req.url, keyring=req.keyring)
        entries = await self.read_source(spec)  # a bad manifest is refused here, not added
        await self.kv.put(f"source.{req.name}", msgspec.json.encode(spec))
        self.added[req.name] = spec
        await self.refresh(Empty())
        log.info("source %s added (%s, %d entries)", req.name, req.url, len(entries))
        return spec

    async def source_remove(self, req: SourceRef) -> Ack:
        check_id(req.name, "source name")
        if any(s.name == req.name for s in self.configured()):
            raise Forbidden(f"source {req.name!r} comes from the agent's "
                            "configuration; edit [catalogue] to remove it")
        if req.name not in self.added:
            raise NotFound(f"no source named {req.name!r}")
        await self.kv.delete(f"source.{req.name}")
        self.added.pop(req.name, None)
        await self._refresh(dropped=req.name)
        return Ack(message=f"source {req.name} removed")

    # -- entries ----------------------------------------------------------------------------

    def get(self, image_id: str) -> CatalogueEntry:
        check_id(image_id)
        try:
            return self.entries[image_id]
        except KeyError:
            raise NotFound(f"no image {image_id!r}; see 'phyllome images list "
                           "--search'") from None

    async def list(self, req: ListRequest) -> ImageList:
        local = {i.id: i.state for i in self.store.locals()}
        return ImageList(images=[
            ImageSummary(id=e.id, name=e.name, source=e.source, family=e.family,
                         version=e.version, archs=e.archs, downloadable=e.downloadable,
                         local=local.get(e.id, ""))
            for e in sorted(self.entries.values(), key=lambda e: e.id) if matches(e, req)])

    def local_id(self, image_id: str, arch: str) -> str:
        """The pool's name of ``image_id`` pulled for ``arch``: the id itself for this host's
        architecture, ``<id>_<arch>`` for another one (both can be pulled at once; events name
        it as a subject token, which has no dots)."""
        arch = normalize_arch(arch or self.settings.arch)
        if not ARCH_NAME.match(arch):
            raise InvalidName(f"arch {arch[:40]!r} is not an architecture name (x86_64, "
                              "aarch64, ...)")
        return image_id if arch == normalize_arch(self.settings.arch) else \
            check_id(f"{image_id}_{arch}")

    async def info(self, req: ImageRef) -> ImageInfo:
        entry = self.get(req.id)
        name = self.local_id(entry.id, req.arch)
        local = self.store.local(name)
        return ImageInfo(entry=entry, template=template(entry, local), local=local,
                         path=local.path if local else "", sha256=local.sha256 if local else "",
                         pulling=self.agent.jobs.running(f"pull:{name}"),
                         arch=normalize_arch(req.arch or self.settings.arch))

    async def pull(self, req: PullRequest) -> JobAccepted:
        entry = self.get(req.id)
        dl = choose(entry, normalize_arch(req.arch or self.settings.arch))
        name = self.local_id(entry.id, dl.arch)
        if name != entry.id:  # another arch's image: pulled under its own name
            entry = msgspec.structs.replace(entry, id=name)
        try:
            self.store.preflight(entry, dl, req.allow_unverified)
        except PhyError:
            self.metrics.pulls.labels(outcome="refused").inc()
            raise

        async def work(job: Job) -> dict[str, object]:
            return await self._pull(job, entry, dl, req.allow_unverified)

        # two pulls of one image share one job, hence one download
        return self.agent.jobs.start("pull", work, key=f"pull:{entry.id}")

    async def _pull(self, job: Job, entry: CatalogueEntry, dl: Download,
                    allow_unverified: bool) -> dict[str, object]:
        have = self.store.local(entry.id)
        if have is not None and dl.sha256 and have.source_sha256 == dl.sha256:
            await job.progress(have.size, have.size, "already pulled")
            return to_builtins(have)
        try:
            image = await self.store.pull(entry, dl, allow_unverified=allow_unverified,
                                          progress=job.progress)
        except asyncio.CancelledError:
            self.metrics.pulls.labels(outcome="cancelled").inc()
            raise
        except PhyError as e:
            refused = isinstance(e, Forbidden | BadRequest)
            self.metrics.pulls.labels(outcome="refused" if refused else "failed").inc()
            if refused:
                await self.agent.publish("image.refused", ImageRefused(
                    host=self.agent.host, id=entry.id, url=dl.url, reason=e.message), entry.id)
            raise
        self.metrics.pulls.labels(outcome="succeeded").inc()
        await self.kv.put(self._local_key(image.id), msgspec.json.encode(image))
        await self.agent.publish("image.pulled", ImagePulled(host=self.agent.host, image=image),
                                 image.id)
        self._count_images()
        return to_builtins(image)

    async def remove(self, req: ImageRef) -> Ack:
        check_id(req.id)
        name = self.local_id(req.id, req.arch)
        image = self.store.remove(name)
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            await self.kv.delete(self._local_key(name))
        await self.agent.publish("image.removed", ImageRemoved(
            host=self.agent.host, id=name, path=image.path), name)
        self._count_images()
        return Ack(message=f"{name} removed from {image.path}")

    # -- link-rot probing -------------------------------------------------------------------

    async def probe_all(self) -> None:
        """HEAD every download URL once; an event when a URL breaks or comes back."""
        gate = asyncio.Semaphore(PROBE_CONCURRENCY)
        targets = [(e, d.url) for e in list(self.entries.values()) for d in e.downloads
                   if d.format in FORMAT_ORDER
                   and (e.source != osinfo.SOURCE or self.settings.probe_osinfo)]

        async def one(entry: CatalogueEntry, url: str) -> None:
            async with gate:
                ok, status, reason = await self.store.probe(url)
            self.metrics.probes.labels(outcome="ok" if ok else "broken").inc()
            before = self.links.get(url)
            self.links[url] = ok
            if before is None and ok or before == ok:
                return
            await self.agent.publish("link", LinkChanged(
                host=self.agent.host, id=entry.id, url=url, ok=ok, status=status,
                reason=reason), entry.id)

        await asyncio.gather(*(one(e, u) for e, u in targets))
        self.metrics.links_broken.clear()
        for e, url in targets:
            self.metrics.links_broken.labels(source=e.source).inc(0 if self.links[url] else 1)

    async def _probe_loop(self) -> None:
        while not self.agent.stopping.is_set():
            await self.probe_all()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.agent.stopping.wait(),
                                       self.settings.probe_interval_s)
