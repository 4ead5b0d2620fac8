"""The storage agent's endpoints: typed request in, typed reply (or a job) out.

Volume changes are published as ``phy.evt.<host>.storage.volume.<change>``; clones, imports
and sends are jobs whose blocking file work runs in a thread that a cancel stops within one
copy step. A volume that a running VM on this host has as a disk (KV ``vms``) is not
resized, cloned, sent or deleted.

    handlers = Handlers(agent, pools, settings, StorageMetrics(agent.registry, pools))
    await handlers.create(CreateVolume(pool="default", name="disk0", size_bytes=1 << 30))
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from typing import TypeVar

import msgspec

from services.storage.config import Settings
from services.storage.metrics import StorageMetrics
from services.storage.snapshots import Snapshots
from services.storage.transfer import Receiver, Sender, SendStats
from services.storage.volumes import CloneResult, Pools, Progress, VolumeStore, check_name
from shared import subjects
from shared.agent import Agent
from shared.codec import to_builtins
from shared.errors import BadRequest, Conflict, NotFound, PhyError, Unavailable
from shared.jobs import Job
from shared.messages import Ack, Empty, Event
from shared.messages.jobs import JobAccepted
from shared.messages.storage import (
    CloneVolume,
    CreateVolume,
    ExportSnapshot,
    ImportSnapshot,
    ImportVolume,
    IncomingList,
    ListVolumes,
    PoolList,
    ResizeVolume,
    RestoredVolumes,
    RestoreSnapshot,
    SendVolume,
    SnapshotContent,
    SnapshotInfo,
    SnapshotList,
    SnapshotQuery,
    SnapshotRef,
    TakeSnapshot,
    TransferAbort,
    TransferAccepted,
    TransferCommit,
    TransferOffer,
    VolumeChange,
    VolumeChanged,
    VolumeInfo,
    VolumeList,
    VolumeQuery,
    VolumeRef,
)
from shared.messages.vm import VmRecord

T = TypeVar("T")
# States in which a VM holds its disks open.
BUSY_STATES = frozenset({"running", "blocked", "paused", "shutting-down", "pmsuspended",
                         "unknown"})


class Handlers:
    def __init__(self, agent: Agent, pools: Pools, settings: Settings,
                 metrics: StorageMetrics, snapshots: Snapshots) -> None:
        self.agent = agent
        self.store: VolumeStore = pools
        self.snaps = snapshots
        self.settings = settings
        self.metrics = metrics
        self.receiver = Receiver(
            pools, host=agent.host, max_chunk_bytes=max(settings.chunk_bytes, 8 << 20),
            commit_every=settings.commit_every, commit_interval_s=settings.commit_interval_s,
            stale_s=settings.stale_s, emit=self._emit_transfer, on_chunk=self._received,
            on_drop=lambda reason: self.metrics.chunks_dropped.labels(reason=reason).inc())
        self.sender = Sender(
            agent.bus, pools, host=agent.host, chunk_bytes=settings.chunk_bytes,
            window=settings.window, chunk_timeout_s=settings.chunk_timeout_s,
            resume_timeout_s=settings.resume_timeout_s, emit=self._emit_transfer,
            observe=self._sent)

    async def begin(self) -> None:
        await self.receiver.start(self.agent.bus.nc)
        self.agent.spawn(self.receiver.maintain(self.agent.stopping), "incoming-transfers")

    async def close(self) -> None:
        await self.receiver.close()
        self.store.close()

    # -- events and metrics ------------------------------------------------------------------

    async def _emit_transfer(self, kind: str, event: Event) -> None:
        await self.agent.publish(kind, event, getattr(event, "transfer_id", None))

    async def _changed(self, info: VolumeInfo, change: VolumeChange) -> None:
        await self.agent.publish(f"volume.{change}", VolumeChanged(
            host=self.agent.host, pool=info.pool, name=info.name, change=change,
            virtual_bytes=info.virtual_bytes, allocated_bytes=info.allocated_bytes))

    def _received(self, _tid: str, n: int) -> None:
        self.metrics.copied.labels(op="receive").inc(n)

    def _sent(self, stats: SendStats, outcome: str) -> None:
        m = self.metrics
        m.transfers.labels(direction="send", outcome=outcome).inc()
        m.copied.labels(op="send").inc(stats.sent_bytes)
        m.wire.inc(stats.wire_bytes)
        m.checksum_failures.labels(side="send").inc(stats.corrupt_chunks)
        if outcome == "completed":
            m.duration.labels(op="send").observe(stats.seconds)
            m.throughput.labels(op="send").observe(stats.sent_bytes / max(stats.seconds, 1e-9))

    def _copied(self, op: str, result: CloneResult) -> None:
        m = self.metrics
        m.clones.labels(method=result.method, outcome="succeeded").inc()
        m.copied.labels(op=op).inc(result.copied_bytes)
        m.holes.labels(op=op).inc(result.hole_bytes)
        m.duration.labels(op=op).observe(result.seconds)
        if result.copied_bytes:
            m.throughput.labels(op=op).observe(result.copied_bytes / max(result.seconds, 1e-9))

    # -- VMs using volumes -------------------------------------------------------------------

    async def _users(self) -> dict[str, VmRecord]:
        """VMs of this host by the real path of each of their disks."""
        try:
            records = await self.agent.bus.kv_values(subjects.KV_VMS, VmRecord)
        except Exception as e:
            raise Unavailable(f"cannot read KV {subjects.KV_VMS!r} to check which "
                              f"VMs use which volumes ({e!r}); try again") from None
        users: dict[str, VmRecord] = {}
        for rec in records:
            if rec.host != self.agent.host:
                continue
            for disk in rec.spec.disks:
                users[os.path.realpath(disk.path)] = rec
        return users

    async def _with_user(self, info: VolumeInfo) -> VolumeInfo:
        rec = (await self._users()).get(info.path)
        if rec is None:
            return info
        return msgspec.structs.replace(info, attached_to=rec.spec.name or rec.spec.uuid,
                                       attached_state=rec.state)

    async def _not_in_use(self, pool: str, name: str, doing: str) -> VolumeInfo:
        info = await self._with_user(self.store.info(pool, name))
        if info.attached_to and info.attached_state in BUSY_STATES:
            raise Conflict(f"{pool}/{name} is a disk of VM {info.attached_to!r}, which "
                           f"is {info.attached_state}; shut it down before you {doing} it")
        return info

    # -- endpoints ---------------------------------------------------------------------------

    async def pools(self, req: Empty) -> PoolList:
        infos = await asyncio.to_thread(
            lambda: [msgspec.structs.replace(self.store.pool_info(n),
                                             snapshot_bytes=self.snaps.used_bytes(n))
                     for n in sorted(self.store.pools)])
        return PoolList(pools=infos)

    async def volumes(self, req: ListVolumes) -> VolumeList:
        names = [req.pool] if req.pool else sorted(self.store.pools)
        vols = await asyncio.to_thread(
            lambda: [v for n in names for v in self.store.volumes(n)])
        users = await self._users()
        out = []
        for v in vols:
            rec = users.get(v.path)
            out.append(v if rec is None else msgspec.structs.replace(
                v, attached_to=rec.spec.name or rec.spec.uuid, attached_state=rec.state))
        return VolumeList(volumes=out)

    async def info(self, req: VolumeQuery) -> VolumeInfo:
        info = await self._with_user(self.store.info(req.pool, req.name))
        if req.sha256:
            digest = await asyncio.to_thread(self.store.sha256, req.pool, req.name)
            info = msgspec.structs.replace(info, sha256=digest)
        return info

    async def create(self, req: CreateVolume) -> VolumeInfo:
        info = await asyncio.to_thread(self.store.create, req.pool, req.name, req.size_bytes,
                                       preallocate=req.preallocate)
        await self._changed(info, "created")
        return info

    async def resize(self, req: ResizeVolume) -> VolumeInfo:
        await self._not_in_use(req.pool, req.name, "resize")
        info = await asyncio.to_thread(self.store.resize, req.pool, req.name, req.size_bytes,
                                       preallocate=req.preallocate)
        await self._changed(info, "resized")
        return await self._with_user(info)

    async def delete(self, req: VolumeRef) -> Ack:
        await self._not_in_use(req.pool, req.name, "delete")
        info = await asyncio.to_thread(self.store.delete, req.pool, req.name)
        await self._changed(info, "deleted")
        return Ack(message=f"deleted {info.pool}/{info.name}")

    async def clone(self, req: CloneVolume) -> JobAccepted:
        src = await self._not_in_use(req.pool, req.name, "clone")
        dst_pool = self.store.pool(req.dst_pool or req.pool)
        check_name(req.dst_name, "destination name")
        # Claimed now, so that a second clone to the same name is refused at once.
        self.store.claim(dst_pool, req.dst_name)

        async def work(job: Job) -> dict[str, object]:
            try:
                result = await self._blocking(job, lambda progress, cancel: self.store.clone(
                    src.pool, src.name, dst_pool.name, req.dst_name, progress=progress,
                    cancel=cancel, claimed=True), src.allocated_bytes)
            except BaseException:
                self.metrics.clones.labels(method="any", outcome="failed").inc()
                raise
            finally:
                self.store.release(dst_pool, req.dst_name)
            self._copied("clone", result)
            await self._changed(result.volume, "cloned")
            return {"method": result.method, "seconds": round(result.seconds, 6),
                    "copied_bytes": result.copied_bytes, "hole_bytes": result.hole_bytes,
                    "volume": to_builtins(result.volume)}

        return self.agent.jobs.start("clone", work)

    async def import_file(self, req: ImportVolume) -> JobAccepted:
        pool = self.store.pool(req.pool)
        self.store.check_importable(req.source)
        self.store.claim(pool, req.name)

        async def work(job: Job) -> dict[str, object]:
            try:
                result = await self._blocking(job, lambda progress, cancel: self.store.import_file(
                    req.source, pool.name, req.name, move=req.move, progress=progress,
                    cancel=cancel, claimed=True), 0)
            except BaseException:
                self.metrics.clones.labels(method="any", outcome="failed").inc()
                raise
            finally:
                self.store.release(pool, req.name)
            self._copied("import", result)
            await self._changed(result.volume, "imported")
            return {"method": result.method, "seconds": round(result.seconds, 6),
                    "copied_bytes": result.copied_bytes, "volume": to_builtins(result.volume)}

        return self.agent.jobs.start("import", work)

    async def send(self, req: SendVolume) -> JobAccepted:
        await self._not_in_use(req.pool, req.name, "send")
        dst_name = req.dst_name or req.name
        check_name(dst_name, "destination name")
        if req.bwlimit_bytes_s < 0:
            raise BadRequest(
                f"bandwidth limit {req.bwlimit_bytes_s} is negative; 0 means no limit")
        await self.sender.check_destination(req.to_host, req.dst_pool)

        async def work(job: Job) -> dict[str, object]:
            stats = SendStats()

            async def progress(done: int, total: int) -> None:
                await job.progress(done, total, f"sending to {req.to_host}")

            info = await self.sender.send(
                req.pool, req.name, to_host=req.to_host, dst_pool=req.dst_pool,
                dst_name=dst_name, bwlimit=req.bwlimit_bytes_s, progress=progress, stats=stats)
            await job.progress(stats.data_bytes, stats.data_bytes, "sent")
            return {"transfer_id": stats.transfer_id, "seconds": round(stats.seconds, 6),
                    "data_bytes": stats.data_bytes, "sent_bytes": stats.sent_bytes,
                    "wire_bytes": stats.wire_bytes, "attempts": stats.attempts,
                    "corrupt_chunks": stats.corrupt_chunks, "sha256": stats.sha256,
                    "volume": to_builtins(info)}

        return self.agent.jobs.start("send", work)

    # -- the receiving side ------------------------------------------------------------------

    async def receive(self, req: TransferOffer) -> TransferAccepted:
        return await self.receiver.offer(req)

    async def receive_commit(self, req: TransferCommit) -> VolumeInfo:
        try:
            info = await self.receiver.commit(req)
        except PhyError as e:
            if e.kind == "backend":
                self.metrics.checksum_failures.labels(side="receive").inc()
                self.metrics.transfers.labels(direction="receive", outcome="failed").inc()
            raise
        self.metrics.transfers.labels(direction="receive", outcome="completed").inc()
        await self._changed(info, "received")
        return info

    async def receive_abort(self, req: TransferAbort) -> Ack:
        await self.receiver.abort(req)
        return Ack(message=f"transfer {req.transfer_id} rolled back")

    async def incoming(self, req: Empty) -> IncomingList:
        return IncomingList(transfers=self.receiver.transfers())

    # -- snapshots and their archives (services/storage/snapshots.py) ------------------------

    async def snapshot(self, req: TakeSnapshot) -> SnapshotInfo:
        """Request-reply, not a job: a reflink snapshot takes milliseconds, and the vm agent
        keeps a running guest paused until this answers."""
        return await asyncio.to_thread(self.snaps.take, req.pool, req.owner, req.name,
                                       req.disks, req.files, req.labels)

    async def snapshots(self, req: SnapshotQuery) -> SnapshotList:
        return SnapshotList(snapshots=await asyncio.to_thread(self.snaps.find, req.pool,
                                                              req.owner))

    async def snapshot_read(self, req: SnapshotRef) -> SnapshotContent:
        info, files = await asyncio.to_thread(self.snaps.read, req.pool, req.owner, req.name)
        return SnapshotContent(info=info, files=files)

    async def snapshot_restore(self, req: RestoreSnapshot) -> RestoredVolumes:
        started = time.monotonic()
        if not req.targets:
            info = await asyncio.to_thread(self.snaps.get, req.pool, req.owner, req.name)
            for disk in info.disks:
                with suppress(NotFound):  # deleted since: the restore makes it again
                    await self._not_in_use(disk.pool, disk.volume, "revert")
        vols = await asyncio.to_thread(self.snaps.restore, req.pool, req.owner, req.name,
                                       req.targets, move=req.move)
        for vol in vols:
            await self._changed(vol, "restored")
        return RestoredVolumes(volumes=vols, seconds=round(time.monotonic() - started, 6))

    async def snapshot_delete(self, req: SnapshotRef) -> Ack:
        gone = await asyncio.to_thread(self.snaps.delete, req.pool, req.owner, req.name)
        return Ack(message=f"deleted {len(gone)} snapshot(s) of {req.owner}: "
                           f"{', '.join(gone) or '-'}")

    async def snapshot_export(self, req: ExportSnapshot) -> JobAccepted:
        info = await asyncio.to_thread(self.snaps.get, req.pool, req.owner, req.name)
        total = sum(d.allocated_bytes for d in info.disks)

        async def work(job: Job) -> dict[str, object]:
            return await self._blocking(job, lambda progress, cancel: self.snaps.export(
                req.pool, req.owner, req.name, req.dir, req.prefix, host=self.agent.host,
                keep=req.keep, progress=progress, cancel=cancel), total)

        return self.agent.jobs.start("backup", work)

    async def snapshot_import(self, req: ImportSnapshot) -> JobAccepted:
        async def work(job: Job) -> dict[str, object]:
            info = await self._blocking(job, lambda progress, cancel: self.snaps.import_(
                req.archive, req.pool, req.owner, req.name, req.labels, progress=progress,
                cancel=cancel), 0)
            return {"snapshot": to_builtins(info)}

        return self.agent.jobs.start("restore", work)

    # -- helpers -----------------------------------------------------------------------------

    async def _blocking(self, job: Job, fn: Callable[[Progress, threading.Event], T],
                        total: int) -> T:
        """Run file work in a thread, relaying its progress; a cancel stops and awaits it."""
        cancel = threading.Event()
        seen = [0, total]

        def progress(done: int, of: int) -> None:
            seen[0], seen[1] = done, of

        fut = asyncio.get_running_loop().run_in_executor(None, fn, progress, cancel)
        started = time.monotonic()
        try:
            while True:
                done, _ = await asyncio.wait({fut}, timeout=0.25)
                if done:
                    result = fut.result()
                    await job.progress(seen[1], seen[1])
                    return result
                if time.monotonic() - started > 0.2:
                    await job.progress(seen[0], seen[1])
        except asyncio.CancelledError:
            cancel.set()
            with suppress(BaseException):
                await asyncio.wait({fut})
            raise
