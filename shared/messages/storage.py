"""Messages and endpoints of the storage agent: RAW pools and volumes, clones, transfers.

Volumes are addressed as ``pool`` + ``name``. Long work (clone, import, send) answers with a
``JobAccepted``. A transfer from host A to host B is driven by A's ``send`` job, which calls
B's ``receive`` / ``receive_commit`` / ``receive_abort`` endpoints and streams the data
extents as raw chunks on ``phy.<B>.storage.chunk`` (see ``services/storage/transfer.py``).

    >>> from shared.codec import encode
    >>> encode(VolumeRef(pool="default", name="disk0"))
    b'{"type":"storage.volume_ref.v1","pool":"default","name":"disk0"}'
"""

from __future__ import annotations

from typing import Literal

import msgspec

from shared.messages import Ack, Empty, EndpointSpec, Event
from shared.messages.jobs import JobAccepted, job_endpoints

Extent = tuple[int, int]  # (offset, length) in bytes
VolumeChange = Literal["created", "resized", "deleted", "imported", "cloned", "received",
                       "restored"]


class PoolInfo(msgspec.Struct, frozen=True, kw_only=True, tag="storage.pool.v1"):
    """A directory pool: its filesystem's size and free space, and what its volumes use."""

    name: str
    path: str
    capacity_bytes: int
    free_bytes: int
    allocated_bytes: int  # sum over the pool's volumes
    virtual_bytes: int  # sum over the pool's volumes
    volumes: int
    reflink: bool = False  # the filesystem answered a FICLONE probe
    snapshot_bytes: int = 0  # what the snapshots' copies hold on disk (see SnapshotInfo)


class PoolRoom(msgspec.Struct, frozen=True, kw_only=True, tag="storage.pool_room.v1"):
    """A pool as the storage agent's heartbeat shows it, measured before each beat, so that
    placement can tell whether a new disk fits without asking the host."""

    path: str
    reflink: bool = False
    free_bytes: int = 0


class PoolList(msgspec.Struct, frozen=True, kw_only=True, tag="storage.pools.v1"):
    pools: list[PoolInfo]


class VolumeInfo(msgspec.Struct, frozen=True, kw_only=True, tag="storage.volume.v1"):
    """A RAW volume; ``attached_to`` names the VM (``name`` or uuid) that has it as a disk."""

    pool: str
    name: str
    path: str
    virtual_bytes: int
    allocated_bytes: int
    modified: float = 0.0
    attached_to: str = ""
    attached_state: str = ""  # that VM's state
    sha256: str = ""  # only when asked for


class VolumeList(msgspec.Struct, frozen=True, kw_only=True, tag="storage.volumes.v1"):
    volumes: list[VolumeInfo]


class ListVolumes(msgspec.Struct, frozen=True, kw_only=True, tag="storage.list_volumes.v1"):
    pool: str = ""  # empty: every pool


class VolumeRef(msgspec.Struct, frozen=True, kw_only=True, tag="storage.volume_ref.v1"):
    pool: str = "default"
    name: str


class VolumeQuery(msgspec.Struct, frozen=True, kw_only=True, tag="storage.volume_query.v1"):
    """``info``; ``sha256`` reads the whole volume (holes as zeros), which takes a while."""

    pool: str = "default"
    name: str
    sha256: bool = False


class CreateVolume(msgspec.Struct, frozen=True, kw_only=True, tag="storage.create.v1"):
    """A new RAW volume: sparse, or with its blocks reserved when ``preallocate``."""

    pool: str = "default"
    name: str
    size_bytes: int
    preallocate: bool = False


class ResizeVolume(msgspec.Struct, frozen=True, kw_only=True, tag="storage.resize.v1"):
    """Grow a volume (offline: not while a running VM has it); shrinking is refused."""

    pool: str = "default"
    name: str
    size_bytes: int
    preallocate: bool = False


class ImportVolume(msgspec.Struct, frozen=True, kw_only=True, tag="storage.import.v1"):
    """Adopt an existing RAW file from one of the agent's import directories (a job).

    ``move`` renames it into the pool when both are on one filesystem, instead of copying.
    """

    pool: str = "default"
    name: str
    source: str
    move: bool = False


class CloneVolume(msgspec.Struct, frozen=True, kw_only=True, tag="storage.clone.v1"):
    """Copy a volume (a job): reflink when the filesystem can, else a sparse copy."""

    pool: str = "default"
    name: str
    dst_name: str
    dst_pool: str = ""  # empty: the source's pool


class SendVolume(msgspec.Struct, frozen=True, kw_only=True, tag="storage.send.v1"):
    """Stream a volume to the storage agent of ``to_host`` (a job); the source is untouched."""

    pool: str = "default"
    name: str
    to_host: str
    dst_pool: str = "default"
    dst_name: str = ""  # empty: the same name
    bwlimit_bytes_s: int = 0  # 0: as fast as it goes


# -- snapshots: frozen copies of an owner's volumes, and their archives ------------------------

SnapshotMethod = Literal["reflink", "copy"]
# The label of a snapshot its taker keeps only while it works (a backup's, a restore's): the
# storage agent removes such snapshots when it starts, and an archive does not carry it.
TEMPORARY = "temporary"


class SnapshotDisk(msgspec.Struct, frozen=True, kw_only=True, tag="storage.snapshot_disk.v1"):
    """One volume's copy in a snapshot: taken from (and reverted to) ``pool``/``volume``."""

    pool: str
    volume: str
    virtual_bytes: int = 0
    allocated_bytes: int = 0
    method: SnapshotMethod = "reflink"  # "copy": the pool cannot share blocks, not instant


class SnapshotInfo(msgspec.Struct, frozen=True, kw_only=True, tag="storage.snapshot.v1"):
    """A snapshot: copies of some volumes of one ``owner`` (a VM's uuid) and small files,
    kept in ``<pool>/.snapshots/<owner>/<name>/`` (each copy in its own volume's pool).

    ``allocated_bytes`` is what the copies hold on disk; while reflinked, blocks are shared
    with the volumes until either side writes them.
    """

    pool: str
    owner: str
    name: str
    created: float
    disks: list[SnapshotDisk] = []
    files: dict[str, int] = {}  # file name -> size in bytes
    labels: dict[str, str] = {}  # what the owner said about it (the VM's state, ...)
    allocated_bytes: int = 0
    seconds: float = 0.0  # how long taking the copies took


class TakeSnapshot(msgspec.Struct, frozen=True, kw_only=True, tag="storage.take_snapshot.v1"):
    """Copy ``disks`` (reflink, else sparse copy) and write ``files``, all or nothing."""

    pool: str = "default"  # where the snapshot's record and files live
    owner: str
    name: str
    disks: list[VolumeRef] = []
    files: dict[str, bytes] = {}  # small files kept with it (UEFI variables, TPM state)
    labels: dict[str, str] = {}


class SnapshotRef(msgspec.Struct, frozen=True, kw_only=True, tag="storage.snapshot_ref.v1"):
    """One snapshot; for ``snapshot_delete`` an empty ``name`` means every one of the owner."""

    pool: str = "default"
    owner: str
    name: str = ""


class SnapshotQuery(msgspec.Struct, frozen=True, kw_only=True, tag="storage.snapshot_query.v1"):
    pool: str = ""  # empty: every pool
    owner: str = ""  # empty: every owner


class SnapshotList(msgspec.Struct, frozen=True, kw_only=True, tag="storage.snapshots.v1"):
    snapshots: list[SnapshotInfo]


class SnapshotContent(msgspec.Struct, frozen=True, kw_only=True,
                      tag="storage.snapshot_content.v1"):
    """A snapshot with its small files."""

    info: SnapshotInfo
    files: dict[str, bytes] = {}


class RestoreSnapshot(msgspec.Struct, frozen=True, kw_only=True,
                      tag="storage.restore_snapshot.v1"):
    """Put a snapshot's copies back over the volumes they came from (a revert), or, with
    ``targets``, into new volumes (one per disk, in order); ``move`` hands the copies over
    instead of copying them and deletes the snapshot (a restore from an archive)."""

    pool: str = "default"
    owner: str
    name: str
    targets: list[VolumeRef] = []
    move: bool = False


class RestoredVolumes(msgspec.Struct, frozen=True, kw_only=True,
                      tag="storage.restored_volumes.v1"):
    volumes: list[VolumeInfo]
    seconds: float = 0.0


class ExportSnapshot(msgspec.Struct, frozen=True, kw_only=True, tag="storage.export_snapshot.v1"):
    """Write a snapshot as one backup archive in ``dir`` (a job; format in
    ``services/storage/archive.py``); ``keep`` > 0 then removes the oldest archives of the
    same ``prefix`` there beyond that many."""

    pool: str = "default"
    owner: str
    name: str
    dir: str
    prefix: str = ""  # the archive: <dir>/<prefix><UTC time: 20260101T000000.000Z>.phybak
    keep: int = 0


class ImportSnapshot(msgspec.Struct, frozen=True, kw_only=True, tag="storage.import_snapshot.v1"):
    """Read a backup archive into snapshot ``name`` of ``owner`` in ``pool`` (a job): every
    disk lands in that pool, every sha256 is checked before the snapshot appears."""

    archive: str
    pool: str = "default"
    owner: str
    name: str
    labels: dict[str, str] = {}  # over the archived snapshot's own


# -- the receiving side of a transfer (called by the sending agent) ----------------------------


class TransferOffer(msgspec.Struct, frozen=True, kw_only=True, tag="storage.transfer_offer.v1"):
    """The sender's extent map and identity of the source; repeated after a cut to resume."""

    transfer_id: str
    src_host: str
    src_pool: str
    src_name: str
    pool: str
    name: str
    virtual_bytes: int
    extents: list[Extent]  # data extents, sorted, not overlapping
    source_stamp: str  # size, mtime and inode of the source: a change means start over
    checksum: str = "blake2b-128"  # of each chunk's leaves: blake2b-128 or xxh3-128


class TransferAccepted(msgspec.Struct, frozen=True, kw_only=True,
                       tag="storage.transfer_accepted.v1"):
    """What the receiver already holds on disk (fsynced), so the sender skips it."""

    transfer_id: str
    committed: list[Extent] = []
    max_chunk_bytes: int = 0
    chunk_key: str = ""  # hex; each chunk carries an HMAC under it (services/storage/transfer.py)


class TransferCommit(msgspec.Struct, frozen=True, kw_only=True, tag="storage.transfer_commit.v1"):
    """All chunks are acknowledged: check the volume digest, then publish the volume."""

    transfer_id: str
    sha256: str  # over the leaves' checksums: see services.storage.transfer.volume_digest


class TransferAbort(msgspec.Struct, frozen=True, kw_only=True, tag="storage.transfer_abort.v1"):
    transfer_id: str
    reason: str = ""


class IncomingTransfer(msgspec.Struct, frozen=True, kw_only=True, tag="storage.incoming.v1"):
    transfer_id: str
    src_host: str
    pool: str
    name: str
    virtual_bytes: int
    data_bytes: int
    committed_bytes: int
    idle_s: float


class IncomingList(msgspec.Struct, frozen=True, kw_only=True, tag="storage.incoming_list.v1"):
    transfers: list[IncomingTransfer]


# -- events ------------------------------------------------------------------------------------


class VolumeChanged(Event, frozen=True, kw_only=True, tag="storage.volume_changed.v1"):
    """``phy.evt.<host>.storage.volume.<change>``"""

    pool: str
    name: str
    change: VolumeChange
    virtual_bytes: int = 0
    allocated_bytes: int = 0


class TransferStarted(Event, frozen=True, kw_only=True, tag="storage.transfer_started.v1"):
    """``phy.evt.<host>.storage.transfer.started.<transfer_id>`` (and so on for the others)."""

    transfer_id: str
    pool: str
    name: str
    to_host: str
    dst_pool: str
    dst_name: str
    virtual_bytes: int
    data_bytes: int


class TransferProgress(Event, frozen=True, kw_only=True, tag="storage.transfer_progress.v1"):
    transfer_id: str
    done_bytes: int
    data_bytes: int
    wire_bytes: int
    rate_bytes_s: float


class TransferResumed(Event, frozen=True, kw_only=True, tag="storage.transfer_resumed.v1"):
    """The receiver already held ``committed_bytes``; only the rest is sent again."""

    transfer_id: str
    attempt: int
    committed_bytes: int
    data_bytes: int


class TransferCompleted(Event, frozen=True, kw_only=True, tag="storage.transfer_completed.v1"):
    transfer_id: str
    data_bytes: int
    wire_bytes: int
    seconds: float
    rate_bytes_s: float
    sha256: str  # the volume digest both sides agreed on (see TransferCommit)
    attempts: int = 1


class TransferFailed(Event, frozen=True, kw_only=True, tag="storage.transfer_failed.v1"):
    transfer_id: str
    error_kind: str
    message: str
    done_bytes: int = 0
    wire_bytes: int = 0


POOLS = EndpointSpec(
    "storage", "pools", Empty, PoolList,
    "Pools with capacity, free and allocated bytes.")
VOLUMES = EndpointSpec(
    "storage", "volumes", ListVolumes, VolumeList,
    "Volumes of one pool, or of all.")
CREATE = EndpointSpec(
    "storage", "create", CreateVolume, VolumeInfo,
    "Create a RAW volume (sparse by default).")
RESIZE = EndpointSpec(
    "storage", "resize", ResizeVolume, VolumeInfo,
    "Grow a volume that no running VM uses.")
DELETE = EndpointSpec(
    "storage", "delete", VolumeRef, Ack,
    "Delete a volume that no running VM uses.")
INFO = EndpointSpec(
    "storage", "info", VolumeQuery, VolumeInfo,
    "One volume; its sha256 when asked.")
IMPORT_FILE = EndpointSpec(
    "storage", "import_file", ImportVolume, JobAccepted,
    "Adopt a RAW file (job); refuses qcow2, VMDK, VHD(X), VDI with the command that "
    "converts it.")
CLONE = EndpointSpec(
    "storage", "clone", CloneVolume, JobAccepted,
    "Reflink or sparse copy of a volume (job).")
SEND = EndpointSpec(
    "storage", "send", SendVolume, JobAccepted,
    "Stream a volume to another host (job).")
RECEIVE = EndpointSpec(
    "storage", "receive", TransferOffer, TransferAccepted,
    "Receiving side: accept (or resume) an incoming transfer.")
RECEIVE_COMMIT = EndpointSpec(
    "storage", "receive_commit", TransferCommit, VolumeInfo,
    "Receiving side: verify the digest and publish the volume.")
RECEIVE_ABORT = EndpointSpec(
    "storage", "receive_abort", TransferAbort, Ack,
    "Receiving side: roll an incoming transfer back.")
INCOMING = EndpointSpec(
    "storage", "incoming", Empty, IncomingList,
    "Incoming transfers not finished yet.")
SNAPSHOT = EndpointSpec(
    "storage", "snapshot", TakeSnapshot, SnapshotInfo,
    "Copy volumes (reflink, else sparse copy) and small files into a snapshot, all or "
    "nothing.", max_payload=16 << 20)
SNAPSHOTS = EndpointSpec(
    "storage", "snapshots", SnapshotQuery, SnapshotList,
    "Snapshots of one owner, one pool, or all.")
SNAPSHOT_READ = EndpointSpec(
    "storage", "snapshot_read", SnapshotRef, SnapshotContent,
    "A snapshot with its small files (UEFI variables, TPM state).")
SNAPSHOT_RESTORE = EndpointSpec(
    "storage", "snapshot_restore", RestoreSnapshot, RestoredVolumes,
    "Put a snapshot's copies back over its volumes, or into new ones; crash-safe.")
SNAPSHOT_DELETE = EndpointSpec(
    "storage", "snapshot_delete", SnapshotRef, Ack,
    "Delete a snapshot, or every snapshot of an owner.")
SNAPSHOT_EXPORT = EndpointSpec(
    "storage", "snapshot_export", ExportSnapshot, JobAccepted,
    "Write a snapshot as a zstd backup archive with sha256 sums (job).")
SNAPSHOT_IMPORT = EndpointSpec(
    "storage", "snapshot_import", ImportSnapshot, JobAccepted,
    "Read a backup archive into a snapshot, every sum checked first (job).")
JOBS, JOB, CANCEL = job_endpoints("storage")

# What the storage agent serves; the job endpoints are added by the agent runtime.
ENDPOINTS = (POOLS, VOLUMES, CREATE, RESIZE, DELETE, INFO, IMPORT_FILE, CLONE, SEND, RECEIVE,
    RECEIVE_COMMIT, RECEIVE_ABORT, INCOMING, SNAPSHOT, SNAPSHOTS, SNAPSHOT_READ, SNAPSHOT_RESTORE,
    SNAPSHOT_DELETE, SNAPSHOT_EXPORT, SNAPSHOT_IMPORT)
