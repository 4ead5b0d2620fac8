"""Volume transfer between two storage agents over NATS: the data path of cold migration.

Host A's ``Sender`` streams a volume to host B's ``Receiver``:

1. A -> ``phy.B.storage.receive`` ``TransferOffer``: the extent map (data only) and a stamp
   of the source. B claims the name, makes a sparse temporary file of the volume's size and
   answers ``TransferAccepted`` with the ranges it already holds (empty unless resuming) and
   the transfer's chunk key: 32 random bytes that B keeps in memory only (a restarted B
   hands out a new one when A offers again), sent only in the reply to A's offer (A's
   inbox: with per-identity inbox prefixes no other identity can read it).
2. A -> ``phy.B.storage.chunk`` requests, at most ``window`` and ``MAX_INFLIGHT`` bytes in
   flight (nats-server drops messages to a client with over 64 MiB pending, by default: a
   bigger window measured slower, with chunks lost and sent again). The body is raw
   bytes, headers ``Phy-Transfer``, ``Phy-Offset``, ``Phy-Checksum`` and ``Phy-Auth``.
   ``Phy-Checksum`` is the checksum of each leaf of the chunk (extents cut at multiples of
   ``LEAF``; chunks are whole leaves): xxh3-128 when the ``xxhash`` package is installed
   (15 GB/s), else BLAKE2b-128 (about 1 GB/s here, which then bounds the transfer); the
   offer names which. ``Phy-Auth`` is the HMAC-SHA256 under the chunk key of the transfer
   id, offset and checksums (``chunk_mac``): anyone may publish on the chunk subject, only
   A can sign (the checksums bind the data; they are not cryptographic, which is enough
   while only B may subscribe to the subject and see a signed chunk). B drops a chunk
   whose ``Phy-Auth`` is wrong or missing without an answer (counted in
   ``phyllome_storage_chunks_dropped_total{reason="forged"}`` and logged): if it was A's
   own chunk, damaged on the way, it goes unacknowledged and A's cut-and-resume path sends
   it again.
   B checks the checksums, writes at the offset (holes stay holes; past the page cache with
   O_DIRECT where the filesystem allows, since B fsyncs it all anyway) and answers
   with an empty body, or a typed error: ``InvalidMessage`` (corrupt: A sends it again),
   ``NotFound`` (B lost the transfer, e.g. it restarted: A offers again and resumes from
   what B has on disk), ``BadRequest`` (outside the extent map: A gives up). A bad chunk is
   dropped and costs the transfer nothing; only B's own failures (out of space, I/O) roll
   the transfer back, and A's abort does.
   B fsyncs every ``commit_every`` bytes or second and then records the committed ranges
   in a state file next to the temporary file, so a restarted B resumes from them.
3. A -> ``phy.B.storage.receive_commit`` with the volume digest: a sha256 over the size and
   every leaf's place and checksum, sorted. B computes it from the leaves it verified, checks
   they tile the extent map and that it holds no data outside it, and links the file into
   place. (A plain sha256 of a 20 GiB volume would hash 19 GiB of holes: seconds of CPU on
   each side; this costs nothing beyond the chunk checks.) On failure or cancel A calls
   ``receive_abort`` (best effort); B also rolls back transfers idle for ``stale_s``.

The transfer id is derived from the source (host, volume, stamp) and the destination, so
sending the same unchanged volume again after a crash of A resumes too.

    sender = Sender(bus, pools, host="h1")
    info = await sender.send("default", "disk0", to_host="h2", dst_pool="default",
                             dst_name="disk0")
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import hmac
import logging
import os
import secrets
import struct
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from services.storage.volumes import (
    OpenVolume,
    Pool,
    Pools,
    check_name,
    check_pool_name,
    zero_outside,
)
from shared import natsfast, subjects
from shared.bus import Bus
from shared.errors import (
    BackendError,
    BadRequest,
    Cancelled,
    InsufficientResources,
    InvalidMessage,
    NotFound,
    PhyError,
    Timeout,
    Unavailable,
    error_from_reply,
    to_reply,
)
from shared.fileops import human_bytes
from shared.messages import Empty, Event
from shared.messages import storage as storage_api
from shared.messages.storage import (
    Extent,
    IncomingTransfer,
    TransferAbort,
    TransferAccepted,
    TransferCommit,
    TransferCompleted,
    TransferFailed,
    TransferOffer,
    TransferProgress,
    TransferResumed,
    TransferStarted,
    VolumeInfo,
)

log = logging.getLogger("phyllome.storage.transfer")

H_TRANSFER = "Phy-Transfer"
H_OFFSET = "Phy-Offset"
H_DIGEST = "Phy-Checksum"
H_AUTH = "Phy-Auth"
MAX_EXTENTS = 20_000  # keeps the offer under 1 MiB; more are merged across small holes
LEAF = 512 << 10  # checksum unit; a chunk is whole leaves, so it fits a 1 MiB max_payload
HEADER_ROOM = 4096  # bytes of a chunk message that are not data
MAX_INFLIGHT = 32 << 20  # half of nats-server's default max_pending per client
CHUNK_TRIES = 5
BEST_EFFORT = (nats.errors.Error, OSError, PhyError)  # replies to a peer that may be gone

Emit = Callable[[str, Event], Awaitable[Any]]


def chunk_subject(host: str) -> str:
    """Where the data chunks for ``host``'s storage agent go (not a micro endpoint: raw bytes)."""
    return subjects.command(host, "storage", "chunk")


def transfer_id(src_host: str, pool: str, name: str, stamp: str, to_host: str, dst_pool: str,
                dst_name: str) -> str:
    """Same source, unchanged, to the same place: same id, so the receiver can resume."""
    key = "\0".join((src_host, pool, name, stamp, to_host, dst_pool, dst_name)).encode()
    return hashlib.blake2b(key, digest_size=12).hexdigest()


def chunk_mac(key: str, tid: str, offset: str, digests: str) -> str:
    """HMAC-SHA256, under the transfer's chunk key, of a chunk's transfer id, offset and leaf
    checksums (which bind its data): what the ``Phy-Auth`` header must carry."""
    text = f"{tid}\n{offset}\n{digests}".encode()
    return hmac.new(bytes.fromhex(key), text, hashlib.sha256).hexdigest()


def _blake2b(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


CHECKSUMS: dict[str, Callable[[bytes | memoryview], str]] = {"blake2b-128": _blake2b}
try:
    import xxhash

    CHECKSUMS["xxh3-128"] = xxhash.xxh3_128_hexdigest
except ImportError:  # optional: BLAKE2b from the standard library does the same, slower
    pass
PREFERRED_CHECKSUM = "xxh3-128" if "xxh3-128" in CHECKSUMS else "blake2b-128"


class RangeSet:
    """Sorted, merged byte ranges: what a receiver has written or committed."""

    def __init__(self, ranges: list[Extent] | None = None) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for off, length in ranges or []:
            self.add(off, length)

    def add(self, off: int, length: int) -> None:
        if length <= 0:
            return
        end = off + length
        if self._ends and self._starts[-1] <= off <= self._ends[-1]:  # the usual: in order
            self._ends[-1] = max(self._ends[-1], end)
            return
        i = bisect.bisect_left(self._ends, off)  # first range ending at or after off
        j = bisect.bisect_right(self._starts, end)  # ranges starting at or before end
        if i < j:
            off = min(off, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [off]
        self._ends[i:j] = [end]

    def covers(self, off: int, length: int) -> bool:
        i = bisect.bisect_right(self._starts, off) - 1
        return i >= 0 and self._ends[i] >= off + length

    def total(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def ranges(self) -> list[Extent]:
        return [(s, e - s) for s, e in zip(self._starts, self._ends, strict=True)]

    def copy(self) -> RangeSet:
        other = RangeSet()
        other._starts, other._ends = list(self._starts), list(self._ends)
        return other


def coalesce(extents: list[Extent], max_count: int = MAX_EXTENTS) -> list[Extent]:
    """Merge extents across the smallest holes until at most ``max_count`` remain.

    A badly fragmented file would otherwise need an extent map bigger than a message; the
    merged holes are sent as zeros (and written as data on the receiver).
    """
    if len(extents) <= max_count:
        return list(extents)
    gaps = sorted(extents[i + 1][0] - (extents[i][0] + extents[i][1])
                  for i in range(len(extents) - 1))
    limit = gaps[len(extents) - max_count - 1]
    out: list[Extent] = [extents[0]]
    for off, length in extents[1:]:
        last_off, last_len = out[-1]
        if off - (last_off + last_len) <= limit:
            out[-1] = (last_off, off + length - last_off)
        else:
            out.append((off, length))
    return out


def split(off: int, length: int, unit: int) -> list[Extent]:
    """``[off, off + length)`` cut at the absolute multiples of ``unit``."""
    out: list[Extent] = []
    end = off + length
    while off < end:
        cut = min(end, (off // unit + 1) * unit)
        out.append((off, cut - off))
        off = cut
    return out


def leaf_digests(data: bytes, off: int, checksum: str) -> list[str]:
    """The checksum of each leaf of a chunk that starts at ``off``."""
    fn = CHECKSUMS[checksum]
    view = memoryview(data)
    return [fn(view[o - off:o - off + n]) for o, n in split(off, len(data), LEAF)]


Leaves = dict[int, tuple[int, str]]  # offset -> (length, checksum hex)


def volume_digest(size: int, leaves: Leaves) -> str:
    """sha256 of the size and every leaf's (offset, length, checksum), in offset order.

    Equal digests over the same extent map mean equal content: every data byte is under a
    leaf's checksum and every other byte is a hole (read as zeros).
    """
    h = hashlib.sha256(b"phyllome-volume-v1" + struct.pack("<Q", size))
    for off in sorted(leaves):
        length, digest = leaves[off]
        h.update(struct.pack("<QQ", off, length) + bytes.fromhex(digest))
    return h.hexdigest()


def check_map(extents: list[Extent], size: int) -> None:
    """The extent map of an offer: sorted, apart, inside the volume."""
    if len(extents) > MAX_EXTENTS:
        raise BadRequest(f"extent map has {len(extents)} entries; at most {MAX_EXTENTS}")
    pos = 0
    for off, length in extents:
        if off < pos or length <= 0 or off + length > size:
            raise BadRequest(f"extent map is not sorted, overlaps or passes the end at {off}")
        pos = off + length


class RateLimit:
    """Paces the sender to ``rate`` bytes per second on average (0: no limit)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.started = time.monotonic()
        self.sent = 0

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        self.sent += n
        ahead = self.sent / self.rate - (time.monotonic() - self.started)
        if ahead > 0:
            await asyncio.sleep(ahead)


class ChunkChannel(Protocol):
    """What the sender needs to move chunks: a NATS client's ``request``."""

    async def request(self, subject: str, payload: bytes = b"", timeout: float = 0.5,
                      old_style: bool = False, headers: dict[str, Any] | None = None) -> Msg: ...


# -- sender ------------------------------------------------------------------------------------


@dataclass
class SendStats:
    transfer_id: str = ""
    data_bytes: int = 0
    done_bytes: int = 0  # acknowledged or already held by the receiver
    sent_bytes: int = 0  # data acknowledged in this job
    wire_bytes: int = 0  # chunk payloads put on the wire, resends included
    corrupt_chunks: int = 0
    attempts: int = 0
    seconds: float = 0.0
    sha256: str = ""


@dataclass
class _Pass:
    """One pass over the extent map, from an offer to the end or to a cut."""

    key: str  # the receiver's chunk key for this offer (TransferAccepted.chunk_key)
    cut: asyncio.Event = field(default_factory=asyncio.Event)
    fatal: PhyError | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class Sender:
    """Sends volumes of this host to other hosts' storage agents."""

    def __init__(self, bus: Bus, pools: Pools, *, host: str, chunk_bytes: int = 4 << 20,
                 window: int = 8, chunk_timeout_s: float = 10.0, resume_timeout_s: float = 120.0,
                 emit: Emit | None = None, channel: ChunkChannel | None = None,
                 observe: Callable[[SendStats, str], None] | None = None) -> None:
        self.bus = bus
        self.pools = pools
        self.host = host
        self.chunk_bytes = chunk_bytes
        self.window = window
        self.chunk_timeout_s = chunk_timeout_s
        self.resume_timeout_s = resume_timeout_s
        self.emit = emit
        self.channel: ChunkChannel = channel or bus.nc
        self.observe = observe

    async def check_destination(self, to_host: str, dst_pool: str, *,
                                timeout: float = 10.0) -> None:
        """Before a send job starts: the destination's storage agent answers and has the
        pool. A mistyped or down host is refused here, before any job or transfer event."""
        subjects.token(to_host, "destination host")
        if to_host == self.host:
            raise BadRequest("the destination host is this host; use clone instead")
        try:
            pools = await self.bus.call(to_host, storage_api.POOLS, Empty(), timeout=timeout)
        except Unavailable:  # no responders, or no reply in time
            raise Unavailable(f"no storage agent of host {to_host!r} answers: is the name right "
                              "(`phyllome hosts` lists the hosts) and the host up?") from None
        names = sorted(p.name for p in pools.pools)
        if dst_pool not in names:
            raise NotFound(f"host {to_host} has no pool {dst_pool!r} (it has "
                           f"{', '.join(names) or 'none'})")

    async def send(self, pool: str, name: str, *, to_host: str, dst_pool: str, dst_name: str,
                   bwlimit: int = 0,
                   progress: Callable[[int, int], Awaitable[None]] | None = None,
                   stats: SendStats | None = None) -> VolumeInfo:
        """Stream ``pool/name`` to ``to_host``; resumes across cuts until ``resume_timeout_s``
        passes without progress. On failure the receiver is told to roll back."""
        subjects.token(to_host, "host")
        check_pool_name(dst_pool)
        check_name(dst_name)
        if to_host == self.host:
            raise BadRequest("the destination host is this host; use clone instead")
        stats = stats if stats is not None else SendStats()
        vol = self.pools.open_for_reading(pool, name)
        started = time.monotonic()
        tid = transfer_id(self.host, pool, name, vol.stamp, to_host, dst_pool, dst_name)
        stats.transfer_id = tid
        try:
            extents = coalesce(await asyncio.to_thread(vol.extents))
            stats.data_bytes = sum(n for _, n in extents)
            offer = TransferOffer(
                transfer_id=tid, src_host=self.host, src_pool=pool, src_name=name,
                pool=dst_pool, name=dst_name, virtual_bytes=vol.size, extents=extents,
                source_stamp=vol.stamp, checksum=PREFERRED_CHECKSUM)
            await self._emit("transfer.started", TransferStarted(
                host=self.host, transfer_id=tid, pool=pool, name=name, to_host=to_host,
                dst_pool=dst_pool, dst_name=dst_name, virtual_bytes=vol.size,
                data_bytes=stats.data_bytes))
            limiter = RateLimit(bwlimit)
            reporter = asyncio.create_task(self._report(stats, started, progress))
            try:
                info = await self._run(offer, vol, extents, to_host, limiter, stats)
            finally:
                reporter.cancel()
            stats.seconds = time.monotonic() - started
            await self._emit("transfer.completed", TransferCompleted(
                host=self.host, transfer_id=tid, data_bytes=stats.data_bytes,
                wire_bytes=stats.wire_bytes, seconds=stats.seconds,
                rate_bytes_s=stats.sent_bytes / max(stats.seconds, 1e-9), sha256=stats.sha256,
                attempts=stats.attempts))
            self._observe(stats, "completed")
            return info
        except BaseException as e:
            err = e if isinstance(e, PhyError) else (
                Cancelled("transfer cancelled") if isinstance(e, asyncio.CancelledError)
                else BackendError(f"transfer failed: {e!r}"))
            stats.seconds = time.monotonic() - started
            await asyncio.shield(self._fail(to_host, tid, err, stats))
            raise
        finally:
            vol.close()

    async def _fail(self, to_host: str, tid: str, err: PhyError, stats: SendStats) -> None:
        try:
            await self.bus.call(to_host, storage_api.RECEIVE_ABORT,
                                TransferAbort(transfer_id=tid, reason=err.message), timeout=5)
        except PhyError as e:
            log.warning("transfer %s: receiver not told to roll back (%s); it will after its "
                        "idle timeout", tid, e.message)
        await self._emit("transfer.failed", TransferFailed(
            host=self.host, transfer_id=tid, error_kind=err.kind, message=err.message,
            done_bytes=stats.done_bytes, wire_bytes=stats.wire_bytes))
        self._observe(stats, "cancelled" if isinstance(err, Cancelled) else "failed")

    def _observe(self, stats: SendStats, outcome: str) -> None:
        if self.observe:
            self.observe(stats, outcome)

    async def _emit(self, kind: str, event: Event) -> None:
        if self.emit is not None:
            await self.emit(kind, event)

    async def _report(self, stats: SendStats, started: float,
                      progress: Callable[[int, int], Awaitable[None]] | None) -> None:
        last = 0.0
        while True:
            await asyncio.sleep(0.25)
            if progress:
                await progress(stats.done_bytes, stats.data_bytes)
            if time.monotonic() - last >= 1.0:
                last = time.monotonic()
                elapsed = max(last - started, 1e-9)
                await self._emit("transfer.progress", TransferProgress(
                    host=self.host, transfer_id=stats.transfer_id, done_bytes=stats.done_bytes,
                    data_bytes=stats.data_bytes, wire_bytes=stats.wire_bytes,
                    rate_bytes_s=stats.sent_bytes / elapsed))

    async def _run(self, offer: TransferOffer, vol: OpenVolume, extents: list[Extent],
                   to_host: str,
                   limiter: RateLimit, stats: SendStats) -> VolumeInfo:
        last_progress = time.monotonic()
        delay = 0.1
        while True:
            if time.monotonic() - last_progress > self.resume_timeout_s:
                raise Unavailable(
                    f"transfer {offer.transfer_id}: no progress towards {to_host} for "
                    f"{self.resume_timeout_s:.0f} s; giving up (the receiver rolls its partial "
                    "copy back); check that its storage agent runs, then send again")
            try:
                accepted: TransferAccepted = await self.bus.call(
                    to_host, storage_api.RECEIVE, offer, timeout=self.chunk_timeout_s)
            except (Unavailable, NotFound) as e:  # Timeout is an Unavailable
                if stats.attempts == 0 and isinstance(e, Unavailable) and \
                        not isinstance(e, Timeout):
                    raise  # nobody there at all: no point in waiting for a resume
                log.info("transfer %s: receiver not ready (%s); retrying", offer.transfer_id,
                         e.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            stats.attempts += 1
            committed = RangeSet(accepted.committed)
            if stats.attempts > 1 or committed.total():  # a cut, or a send after a crash
                await self._emit("transfer.resumed", TransferResumed(
                    host=self.host, transfer_id=offer.transfer_id, attempt=stats.attempts,
                    committed_bytes=committed.total(), data_bytes=stats.data_bytes))
            chunk = self._chunk_size(accepted)
            before = stats.done_bytes
            digest, complete = await self._pass(offer, vol, extents, to_host, committed, chunk,
                                                limiter, stats, accepted.chunk_key)
            if stats.done_bytes > before:
                last_progress = time.monotonic()
                delay = 0.1
            if not complete:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            stats.sha256 = digest
            try:
                info: VolumeInfo = await self.bus.call(
                    to_host, storage_api.RECEIVE_COMMIT,
                    TransferCommit(transfer_id=offer.transfer_id, sha256=digest),
                    timeout=60 + stats.data_bytes / (100 << 20))
            except (Unavailable, NotFound) as e:
                log.info("transfer %s: commit not answered (%s); offering again",
                         offer.transfer_id, e.message)
                continue
            return info

    def _chunk_size(self, accepted: TransferAccepted) -> int:
        """Whole leaves, within our setting, the server's max_payload and the receiver's."""
        limits = [self.chunk_bytes, int(getattr(self.bus.nc, "max_payload", 1 << 20))
                  - HEADER_ROOM]
        if accepted.max_chunk_bytes:
            limits.append(accepted.max_chunk_bytes)
        return max(LEAF, min(limits) // LEAF * LEAF)

    async def _pass(self, offer: TransferOffer, vol: OpenVolume, extents: list[Extent],
                    to_host: str, committed: RangeSet, chunk: int, limiter: RateLimit,
                    stats: SendStats, key: str) -> tuple[str, bool]:
        """Read and hash every extent (for the digest); send what the receiver lacks."""
        leaves: Leaves = {}
        state = _Pass(key=key)
        window = asyncio.Semaphore(max(1, min(self.window, MAX_INFLIGHT // chunk)))
        stats.done_bytes = committed.total()
        try:
            for c_off, c_len in (c for off, n in extents for c in split(off, n, chunk)):
                await window.acquire()
                if state.cut.is_set():
                    window.release()
                    break
                task = asyncio.create_task(self._chunk(
                    vol, offer.transfer_id, to_host, c_off, c_len, committed.covers(c_off, c_len),
                    leaves, limiter, state, stats))
                task.add_done_callback(lambda _t: window.release())
                state.tasks.add(task)
                task.add_done_callback(state.tasks.discard)
            if state.tasks:
                await asyncio.wait(list(state.tasks))
        finally:
            for task in list(state.tasks):
                task.cancel()
            if state.tasks:
                await asyncio.wait(list(state.tasks))
        if state.fatal is not None:
            raise state.fatal
        if state.cut.is_set():
            return "", False
        return volume_digest(offer.virtual_bytes, leaves), True

    async def _chunk(self, vol: OpenVolume, tid: str, to_host: str, off: int, length: int,
                     held: bool, leaves: Leaves, limiter: RateLimit, state: _Pass,
                     stats: SendStats) -> None:
        data, digests = await asyncio.to_thread(_read_leaves, vol, off, length,
                                                PREFERRED_CHECKSUM)
        for (o, n), d in zip(split(off, length, LEAF), digests, strict=True):
            leaves[o] = (n, d)
        if held:
            return
        await limiter.take(length)
        await self._send_chunk(chunk_subject(to_host), tid, off, data, ",".join(digests),
                               state, stats)

    async def _send_chunk(self, subject: str, tid: str, off: int, data: bytes, b2: str,
                          state: _Pass, stats: SendStats) -> None:
        headers = {H_TRANSFER: tid, H_OFFSET: str(off), H_DIGEST: b2,
                   H_AUTH: chunk_mac(state.key, tid, str(off), b2)}
        for _ in range(CHUNK_TRIES):
            if state.cut.is_set():
                return
            stats.wire_bytes += len(data)
            try:
                if isinstance(self.channel, Client):  # onto the socket at once, no copy
                    msg = await natsfast.request_now(self.channel, subject, data, headers,
                                                     timeout=self.chunk_timeout_s)
                else:
                    msg = await self.channel.request(subject, data,
                                                     timeout=self.chunk_timeout_s,
                                                     headers=headers)
            except (nats.errors.Error, TimeoutError, OSError) as e:
                log.info("transfer %s: chunk at %d not acknowledged (%r); a cut", tid, off, e)
                state.cut.set()
                return
            err = error_from_reply(msg.headers, msg.data)
            if err is None:
                stats.done_bytes += len(data)
                stats.sent_bytes += len(data)
                return
            if isinstance(err, InvalidMessage):
                stats.corrupt_chunks += 1
                log.warning("transfer %s: %s; sending it again", tid, err.message)
                continue
            if not isinstance(err, NotFound):
                state.fatal = state.fatal or err
            state.cut.set()
            return
        state.fatal = state.fatal or BackendError(
            f"transfer {tid}: the chunk at offset {off} arrived corrupt {CHUNK_TRIES} times; "
            "check the network path")
        state.cut.set()


def _read_leaves(vol: OpenVolume, off: int, length: int,
                 checksum: str) -> tuple[bytes, list[str]]:
    data = vol.read(off, length)
    return data, leaf_digests(data, off, checksum)


# -- receiver ----------------------------------------------------------------------------------


class TransferState(msgspec.Struct, frozen=True, kw_only=True):
    """The state file next to an incoming transfer's temporary file."""

    offer: TransferOffer
    committed: list[tuple[int, int, str]] = []  # leaves fsynced: offset, length, checksum


@dataclass
class Incoming:
    offer: TransferOffer
    pool: Pool
    temp: str
    state_name: str
    fd: int = -1
    direct: int = -1  # the same file, O_DIRECT: where received chunks are written
    written: RangeSet = field(default_factory=RangeSet)
    durable: RangeSet = field(default_factory=RangeSet)
    leaves: Leaves = field(default_factory=dict)
    unsynced: int = 0
    last_activity: float = field(default_factory=time.monotonic)
    closed: bool = False
    # Each chunk must carry an HMAC under this key, which only the sender the offer was
    # answered to knows; kept in memory only, so a restarted receiver hands out a new one.
    key: str = field(default_factory=lambda: secrets.token_hex(32))
    syncing: asyncio.Lock = field(default_factory=asyncio.Lock)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    map: RangeSet = field(default_factory=RangeSet)

    @property
    def data_bytes(self) -> int:
        return sum(n for _, n in self.offer.extents)


class Receiver:
    """Receives volumes from other hosts' storage agents into this host's pools."""

    def __init__(self, pools: Pools, *, host: str, max_chunk_bytes: int = 8 << 20,
                 commit_every: int = 256 << 20, commit_interval_s: float = 1.0,
                 stale_s: float = 3600.0, emit: Emit | None = None,
                 on_chunk: Callable[[str, int], None] | None = None,
                 on_drop: Callable[[str], None] | None = None) -> None:
        self.pools = pools
        self.host = host
        self.max_chunk_bytes = max_chunk_bytes
        self.commit_every = commit_every
        self.commit_interval_s = commit_interval_s
        self.stale_s = stale_s
        self.emit = emit
        self.on_chunk = on_chunk
        self.on_drop = on_drop  # called with the reason of each chunk refused
        self.incoming: dict[str, Incoming] = {}
        self.completed: dict[str, VolumeInfo] = {}
        self._sub: Any = None
        self._nc: Any = None

    async def start(self, nc: Any) -> None:
        """Pick up transfers a previous run left on disk, then take chunks."""
        for pool, state_name in list(self.pools.transfer_states()):
            try:
                st = msgspec.json.decode(self.pools.read_small(pool, state_name),
                                         type=TransferState)
                inc = self._adopt(st.offer, pool)
                inc.leaves = {o: (n, d) for o, n, d in st.committed}
                inc.durable = RangeSet([(o, n) for o, n, _ in st.committed])
                inc.written = inc.durable.copy()
                log.info("transfer %s into %s/%s: %s committed, waiting for the sender",
                         st.offer.transfer_id, pool.name, st.offer.name,
                         human_bytes(inc.durable.total()))
            except (PhyError, msgspec.MsgspecError, OSError) as e:
                log.warning("dropping unreadable incoming transfer %s: %r", state_name, e)
                stem = state_name.removesuffix(".json")
                pool.remove(f"{stem}.part")
                pool.remove(state_name)
        self._nc = nc
        self._sub = await nc.subscribe(chunk_subject(self.host), cb=self._on_chunk_msg,
                                       pending_bytes_limit=512 << 20)
        natsfast.receive_big(nc, self._sub, LEAF)  # each chunk copied once off the socket

    async def close(self) -> None:
        """Stop taking chunks; fsync what arrived so the sender can resume after restart."""
        if self._sub is not None:
            with suppress(*BEST_EFFORT):
                await self._sub.unsubscribe()
        for inc in list(self.incoming.values()):
            if inc.tasks:
                await asyncio.wait(list(inc.tasks))
            with suppress(*BEST_EFFORT):
                await self._sync(inc)
            self._close_fd(inc)

    def _adopt(self, offer: TransferOffer, pool: Pool) -> Incoming:
        _, temp, state_name = self.pools.transfer_paths(pool.name, offer.transfer_id)
        self.pools.claim(pool, offer.name)
        inc = Incoming(offer=offer, pool=pool, temp=temp, state_name=state_name,
                       map=RangeSet(offer.extents))
        self.incoming[offer.transfer_id] = inc
        return inc

    def transfers(self) -> list[IncomingTransfer]:
        now = time.monotonic()
        return [IncomingTransfer(
            transfer_id=tid, src_host=i.offer.src_host, pool=i.pool.name, name=i.offer.name,
            virtual_bytes=i.offer.virtual_bytes, data_bytes=i.data_bytes,
            committed_bytes=i.durable.total(), idle_s=now - i.last_activity)
            for tid, i in self.incoming.items()]

    # -- endpoints ---------------------------------------------------------------------------

    async def offer(self, req: TransferOffer) -> TransferAccepted:
        subjects.token(req.transfer_id, "transfer id")
        subjects.token(req.src_host, "source host")
        pool = self.pools.pool(req.pool)
        check_name(req.name)
        if req.virtual_bytes <= 0:
            raise BadRequest(f"virtual size {req.virtual_bytes} is not positive")
        if req.checksum not in CHECKSUMS:
            raise BadRequest(f"storage on {self.host} cannot check {req.checksum!r} chunks "
                             f"(it has {', '.join(CHECKSUMS)}); install the same Phyllome "
                             "dependencies (the xxhash package) on every host")
        check_map(req.extents, req.virtual_bytes)
        inc = self.incoming.get(req.transfer_id)
        if inc is not None and (inc.offer.source_stamp != req.source_stamp or
                                inc.offer.extents != req.extents or inc.pool is not pool or
                                inc.offer.name != req.name):
            await self.rollback(inc, "the source changed; starting over")
            inc = None
        if inc is None:
            self.completed.pop(req.transfer_id, None)
            inc = self._adopt(req, pool)
            try:
                needed = inc.data_bytes
                _, free = pool.space()
                if needed > free:
                    raise InsufficientResources(
                        f"pool {pool.name!r} on {self.host} has {human_bytes(free)} "
                        f"free, the incoming volume {req.name} needs {human_bytes(needed)}")
            except PhyError:
                await self.rollback(inc, "refused")
                raise
        if inc.fd < 0:
            try:
                await asyncio.to_thread(self._open, inc)
            except PhyError:
                await self.rollback(inc, "its temporary file could not be made")
                raise
        inc.last_activity = time.monotonic()
        # A live receiver holds everything it acknowledged; a restarted one what it fsynced.
        return TransferAccepted(transfer_id=req.transfer_id, committed=inc.written.ranges(),
                                max_chunk_bytes=self.max_chunk_bytes, chunk_key=inc.key)

    def _open(self, inc: Incoming) -> None:
        inc.fd, inc.direct, made = self.pools.open_partial(inc.pool, inc.temp,
                                                           inc.offer.virtual_bytes)
        if made:
            inc.written, inc.durable, inc.leaves = RangeSet(), RangeSet(), {}
            self._write_state(inc, {})

    def _close_fd(self, inc: Incoming) -> None:
        if inc.fd >= 0:
            os.close(inc.fd)
            inc.fd = -1
        if inc.direct >= 0:
            os.close(inc.direct)
            inc.direct = -1

    def _write_state(self, inc: Incoming, leaves: Leaves) -> None:
        committed = [(o, n, d) for o, (n, d) in sorted(leaves.items())]
        self.pools.write_atomic(inc.pool, inc.state_name, msgspec.json.encode(
            TransferState(offer=inc.offer, committed=committed)))

    async def commit(self, req: TransferCommit) -> VolumeInfo:
        done = self.completed.get(req.transfer_id)
        if done is not None and req.transfer_id not in self.incoming:
            return done  # a repeated commit whose first reply was lost
        inc = self._get(req.transfer_id)
        if inc.tasks:
            await asyncio.wait(list(inc.tasks))
        if any(not inc.written.covers(off, n) for off, n in inc.offer.extents):
            raise NotFound(f"transfer {req.transfer_id} is missing data; offer it again to "
                           "send the rest")
        await self._sync(inc)
        fd, size, extents = inc.fd, inc.offer.virtual_bytes, inc.offer.extents
        digest = volume_digest(size, inc.leaves)
        tiled = sum(n for n, _ in inc.leaves.values()) == inc.data_bytes
        clean = await asyncio.to_thread(zero_outside, fd, size, extents)
        if digest != req.sha256 or not tiled or not clean:
            why = ("" if clean else "data outside the extent map") or \
                ("" if tiled else "leaves overlap") or \
                f"digest {digest[:16]}... where the sender has {req.sha256[:16]}..."
            await self.rollback(inc, f"verification failed: {why}")
            raise BackendError(f"transfer {req.transfer_id} into {inc.pool.name}/"
                               f"{inc.offer.name} failed its check ({why}); it was rolled "
                               "back, send it again")
        self._close_fd(inc)
        inc.pool.publish(inc.temp, inc.offer.name)
        inc.pool.remove(inc.state_name)
        self.pools.release(inc.pool, inc.offer.name)
        del self.incoming[req.transfer_id]
        self._let_go()
        info = self.pools.info(inc.pool.name, inc.offer.name)
        self.completed[req.transfer_id] = info
        while len(self.completed) > 100:
            self.completed.pop(next(iter(self.completed)))
        return info

    async def abort(self, req: TransferAbort) -> None:
        inc = self.incoming.get(req.transfer_id)
        if inc is not None:
            await self.rollback(inc, req.reason or "the sender gave up")

    def _let_go(self) -> None:
        """No transfer in progress: the chunk buffers kept for reuse are freed."""
        if not self.incoming and self._nc is not None:
            natsfast.drop_buffers(self._nc)

    def _get(self, tid: str) -> Incoming:
        inc = self.incoming.get(tid)
        if inc is None or inc.closed or inc.fd < 0:
            raise NotFound(f"storage on {self.host}: no transfer {tid} in progress; offer it "
                           "(again)")
        return inc

    async def rollback(self, inc: Incoming, reason: str) -> None:
        """Remove everything an incoming transfer wrote; the name is free again."""
        if inc.closed:
            return
        inc.closed = True
        others = [t for t in inc.tasks if t is not asyncio.current_task()]
        if others:
            await asyncio.wait(others)
        async with inc.syncing:
            self._close_fd(inc)
        inc.pool.remove(inc.temp)
        inc.pool.remove(inc.state_name)
        self.pools.release(inc.pool, inc.offer.name)
        self.incoming.pop(inc.offer.transfer_id, None)
        self._let_go()
        log.info("transfer %s into %s/%s rolled back: %s", inc.offer.transfer_id,
                 inc.pool.name, inc.offer.name, reason)
        if self.emit is not None:
            await self.emit("transfer.failed", TransferFailed(
                host=self.host, transfer_id=inc.offer.transfer_id, error_kind="rolled_back",
                message=f"receiver rolled back: {reason}", done_bytes=inc.durable.total()))

    # -- chunks ------------------------------------------------------------------------------

    async def _on_chunk_msg(self, msg: Msg) -> None:
        # One task per chunk, so that hashing and writing overlap; the sender's window bounds
        # how many there are. A chunk not signed with the transfer's key is dropped here,
        # unanswered: it is not from the sender the offer was answered to (or it is from
        # before the receiver restarted), and it must not cost the real transfer anything.
        h = msg.headers or {}
        tid = h.get(H_TRANSFER, "")
        inc = self.incoming.get(tid)
        if inc is not None and not inc.closed and inc.fd >= 0 and not _signed(inc.key, h):
            self._dropped(tid, "forged", f"a chunk at offset {h.get(H_OFFSET, '?')!r} without "
                          f"a valid {H_AUTH} header (not from the sender the offer was "
                          "answered to)")
            return
        task = asyncio.create_task(self._chunk(msg, inc))
        if inc is not None:
            inc.tasks.add(task)
            task.add_done_callback(inc.tasks.discard)

    def _dropped(self, tid: str, reason: str, what: str) -> None:
        log.warning("transfer %s: dropped %s", tid, what)
        if self.on_drop:
            self.on_drop(reason)

    async def _chunk(self, msg: Msg, inc: Incoming | None) -> None:
        """Write one chunk and answer it. A bad chunk (unknown transfer, outside the map,
        failing its checksum) is dropped with an error reply that tells the sender what to
        do; only a failure of this host (out of space, I/O) rolls the transfer back."""
        headers: dict[str, str] | None = None
        body = b""
        try:
            await self._write_chunk(msg, inc)
        except PhyError as e:
            headers, body = to_reply(e)
            tid = (msg.headers or {}).get(H_TRANSFER, "")
            if isinstance(e, NotFound):
                self._dropped(tid, "unknown_transfer", "a chunk of no transfer in progress")
            elif isinstance(e, InvalidMessage):
                self._dropped(tid, "corrupt", e.message)
            elif isinstance(e, BadRequest):
                self._dropped(tid, "invalid", e.message)
            elif inc is not None:
                await self.rollback(inc, e.message)
        if msg.reply and self._nc is not None:
            with suppress(*BEST_EFFORT):
                await self._nc.publish(msg.reply, body, headers=headers)

    async def _write_chunk(self, msg: Msg, inc: Incoming | None) -> None:
        h = msg.headers or {}
        tid = h.get(H_TRANSFER, "")
        if inc is None or inc.closed or inc.fd < 0:
            raise NotFound(f"storage on {self.host}: no transfer {tid!r} in progress; offer it "
                           "(again)")
        try:
            off = int(h.get(H_OFFSET, ""))
        except ValueError:
            raise BadRequest(f"chunk of {tid} without a valid {H_OFFSET} header") from None
        data = msg.data
        if not inc.map.covers(off, len(data)) or not data:
            raise BadRequest(f"chunk of {tid} at {off} (+{len(data)}) is outside the extent map")
        inc.last_activity = time.monotonic()
        digests = h.get(H_DIGEST, "").split(",")
        await asyncio.to_thread(self._check_and_write, inc, off, data, digests)
        for (o, n), d in zip(split(off, len(data), LEAF), digests, strict=True):
            inc.leaves[o] = (n, d)
        inc.written.add(off, len(data))
        inc.unsynced += len(data)
        if self.on_chunk:
            self.on_chunk(tid, len(data))
        if inc.unsynced >= self.commit_every and not inc.syncing.locked():
            task = asyncio.create_task(self._sync(inc))
            inc.tasks.add(task)
            task.add_done_callback(inc.tasks.discard)

    def _check_and_write(self, inc: Incoming, off: int, data: bytes,
                         digests: list[str]) -> None:
        if leaf_digests(data, off, inc.offer.checksum) != digests:
            raise InvalidMessage(f"chunk at offset {off} of transfer {inc.offer.transfer_id} "
                                 f"failed its {inc.offer.checksum} check")
        self.pools.write_partial(inc.pool, inc.fd, inc.direct, off, data, inc.offer.name)

    async def _sync(self, inc: Incoming) -> None:
        """fsync, then record what is now durable, so a restart resumes from there."""
        async with inc.syncing:
            if inc.fd < 0 or inc.closed:
                return
            snapshot, leaves = inc.written.copy(), dict(inc.leaves)
            inc.unsynced = 0
            await asyncio.to_thread(self.pools.sync_partial, inc.fd)
            await asyncio.to_thread(self._write_state, inc, leaves)
            inc.durable = snapshot

    async def maintain(self, stop: asyncio.Event) -> None:
        """Every ``commit_interval_s``: fsync what arrived; roll back transfers idle too long."""
        while not stop.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.commit_interval_s)
            for inc in list(self.incoming.values()):
                if time.monotonic() - inc.last_activity > self.stale_s:
                    await self.rollback(inc, f"no word from the sender for {self.stale_s:.0f} s")
                elif inc.unsynced and not inc.syncing.locked():
                    try:
                        await self._sync(inc)
                    except (OSError, PhyError) as e:
                        log.warning("transfer %s: fsync failed: %r", inc.offer.transfer_id, e)


def _signed(key: str, headers: dict[str, str]) -> bool:
    """Whether a chunk's ``Phy-Auth`` header is the HMAC of its headers under ``key``."""
    want = chunk_mac(key, headers.get(H_TRANSFER, ""), headers.get(H_OFFSET, ""),
                     headers.get(H_DIGEST, ""))
    return hmac.compare_digest(want.encode(), headers.get(H_AUTH, "").encode())
