"""Storage handler logic over a fake store: volumes in use are refused, store errors pass."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Mapping

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from services.storage.config import Settings
from services.storage.handlers import Handlers
from services.storage.metrics import StorageMetrics
from services.storage.snapshots import Snapshots
from services.storage.volumes import CloneResult, Pool, Pools, Progress
from shared import subjects
from shared.errors import (
    BadRequest,
    Conflict,
    InsufficientResources,
    InvalidName,
    NotFound,
    Unavailable,
)
from shared.messages import Event
from shared.messages.storage import (
    CloneVolume,
    CreateVolume,
    ImportVolume,
    ListVolumes,
    PoolInfo,
    ResizeVolume,
    SendVolume,
    VolumeInfo,
    VolumeQuery,
    VolumeRef,
)
from shared.messages.vm import Disk, VmRecord, VmSpec, VmState

pytestmark = pytest.mark.unit

HOST = "h1"
DISK0 = "/nowhere/default/disk0"


class FakeStore:
    """Volumes in memory; it records what would change them and raises ``fail`` when set.

    It holds no ``Pool`` (each keeps a directory open), so ``pool`` finds none."""

    def __init__(self, *volumes: VolumeInfo) -> None:
        self.vols = {(v.pool, v.name): v for v in volumes}
        self.changes: list[tuple[str, str, str]] = []
        self.fail: Exception | None = None

    def _check(self) -> None:
        if self.fail is not None:
            raise self.fail

    @property
    def pools(self) -> Mapping[str, Pool]:
        return {}

    def close(self) -> None:
        pass

    def pool(self, name: str) -> Pool:
        raise NotFound(f"no pool {name!r}")

    def claim(self, pool: Pool, name: str) -> None:
        self.changes.append(("claim", pool.name, name))

    def release(self, pool: Pool, name: str) -> None:
        self.changes.append(("release", pool.name, name))

    def pool_info(self, name: str) -> PoolInfo:
        raise NotFound(f"no pool {name!r}")

    def volumes(self, pool_name: str) -> list[VolumeInfo]:
        self._check()
        return [v for (p, _), v in sorted(self.vols.items()) if p == pool_name]

    def info(self, pool_name: str, name: str) -> VolumeInfo:
        self._check()
        try:
            return self.vols[pool_name, name]
        except KeyError:
            raise NotFound(f"no volume {pool_name}/{name}") from None

    def sha256(self, pool_name: str, name: str, *, progress: Progress | None = None,
               cancel: threading.Event | None = None) -> str:
        return "0" * 64

    def create(self, pool_name: str, name: str, size: int, *,
               preallocate: bool = False) -> VolumeInfo:
        self._check()
        self.changes.append(("create", pool_name, name))
        info = VolumeInfo(pool=pool_name, name=name, path=f"/nowhere/{pool_name}/{name}",
                          virtual_bytes=size, allocated_bytes=0)
        self.vols[pool_name, name] = info
        return info

    def resize(self, pool_name: str, name: str, size: int, *,
               preallocate: bool = False) -> VolumeInfo:
        self._check()
        self.changes.append(("resize", pool_name, name))
        info = msgspec.structs.replace(self.info(pool_name, name), virtual_bytes=size)
        self.vols[pool_name, name] = info
        return info

    def delete(self, pool_name: str, name: str) -> VolumeInfo:
        self._check()
        self.changes.append(("delete", pool_name, name))
        return self.vols.pop((pool_name, name))

    def clone(self, src_pool: str, name: str, dst_pool: str, dst_name: str, *,
              progress: Progress | None = None, cancel: threading.Event | None = None,
              claimed: bool = False) -> CloneResult:
        raise AssertionError("clones run as jobs, which these tests do not start")

    def import_file(self, source: str, pool_name: str, name: str, *, move: bool = False,
                    progress: Progress | None = None, cancel: threading.Event | None = None,
                    claimed: bool = False) -> CloneResult:
        raise AssertionError("imports run as jobs, which these tests do not start")

    def check_importable(self, source: str) -> str:
        return source


class FakeBus:
    """KV ``vms`` as a list, or an error to raise when it is read."""

    nc = None

    def __init__(self, vms: list[VmRecord] | Exception) -> None:
        self.vms = vms

    async def kv_values(self, bucket: str, tp: type) -> list[VmRecord]:
        assert (bucket, tp) == (subjects.KV_VMS, VmRecord)
        if isinstance(self.vms, Exception):
            raise self.vms
        return self.vms


class FakeAgent:
    """The parts of ``Agent`` the handlers use outside jobs; events are kept in a list."""

    def __init__(self, vms: list[VmRecord] | Exception) -> None:
        self.host = HOST
        self.registry = CollectorRegistry()
        self.bus = FakeBus(vms)
        self.events: list[tuple[str, Event]] = []

    async def publish(self, kind: str, event: Event, ident: str | None = None) -> bool:
        self.events.append((kind, event))
        return True


def _vm(state: VmState, *, host: str = HOST, path: str = DISK0) -> VmRecord:
    return VmRecord(spec=VmSpec(name="web", uuid="u1", disks=[Disk(path=path)]), host=host,
                    state=state)


def _handlers(vms: list[VmRecord] | Exception) -> tuple[Handlers, FakeStore, FakeAgent]:
    store = FakeStore(VolumeInfo(pool="default", name="disk0", path=DISK0,
                                 virtual_bytes=1 << 30, allocated_bytes=4096))
    agent = FakeAgent(vms)
    settings = Settings(pools={}, import_dirs=[])
    metrics = StorageMetrics(CollectorRegistry(), store)  # type: ignore[arg-type]
    return (Handlers(agent, store, settings, metrics, Snapshots(Pools({}))),  # type: ignore[arg-type]
            store, agent)


@pytest.mark.parametrize("state", ["running", "paused", "unknown"])
async def test_storage_a_disk_of_a_busy_vm_is_not_changed(state: VmState) -> None:
    handlers, store, agent = _handlers([_vm(state)])
    refusals: list[tuple[Callable[[], Awaitable[object]], str]] = [
        (lambda: handlers.delete(VolumeRef(name="disk0")), "delete"),
        (lambda: handlers.resize(ResizeVolume(name="disk0", size_bytes=2 << 30)), "resize"),
        (lambda: handlers.clone(CloneVolume(name="disk0", dst_name="disk1")), "clone"),
        (lambda: handlers.send(SendVolume(name="disk0", to_host="h2")), "send"),
    ]
    for call, doing in refusals:
        with pytest.raises(Conflict, match=f"disk of VM 'web', which is {state}; shut it down "
                                           f"before you {doing} it"):
            await call()
    assert store.changes == [] and agent.events == []


@pytest.mark.parametrize("vm", [_vm("shutoff"), _vm("running", host="h2"),
                                _vm("running", path="/nowhere/default/other")])
async def test_storage_a_volume_no_running_vm_here_uses_is_changed(vm: VmRecord) -> None:
    handlers, store, agent = _handlers([vm])
    resized = await handlers.resize(ResizeVolume(name="disk0", size_bytes=2 << 30))
    assert resized.virtual_bytes == 2 << 30
    ack = await handlers.delete(VolumeRef(name="disk0"))
    assert ack.message == "deleted default/disk0"
    assert store.changes == [("resize", "default", "disk0"), ("delete", "default", "disk0")]
    assert [kind for kind, _ in agent.events] == ["volume.resized", "volume.deleted"]


async def test_storage_volumes_name_the_vm_that_has_them() -> None:
    handlers, _, _ = _handlers([_vm("shutoff")])
    info = await handlers.info(VolumeQuery(name="disk0", sha256=True))
    assert (info.attached_to, info.attached_state, info.sha256) == ("web", "shutoff", "0" * 64)
    listed = await handlers.volumes(ListVolumes(pool="default"))
    assert [(v.name, v.attached_to) for v in listed.volumes] == [("disk0", "web")]


async def test_storage_an_unreadable_kv_refuses_changes_and_says_try_again() -> None:
    handlers, store, _ = _handlers(ConnectionError("no responders"))
    with pytest.raises(Unavailable, match="cannot read KV 'vms'.*no responders.*try again"):
        await handlers.delete(VolumeRef(name="disk0"))
    assert store.changes == []


async def test_storage_send_checks_its_request_before_starting_a_job() -> None:
    handlers, _, _ = _handlers([])
    with pytest.raises(InvalidName, match="destination host"):
        await handlers.send(SendVolume(name="disk0", to_host="h2.evil"))
    with pytest.raises(InvalidName, match="destination name"):
        await handlers.send(SendVolume(name="disk0", to_host="h2", dst_name="../x"))
    with pytest.raises(BadRequest, match="negative; 0 means no limit"):
        await handlers.send(SendVolume(name="disk0", to_host="h2", bwlimit_bytes_s=-1))


@pytest.mark.parametrize("error", [
    InsufficientResources("storage: pool 'default' has 1 GiB free, create needs 8 GiB"),
    NotFound("no pool 'default'"),
    OSError(5, "Input/output error"),
])
async def test_storage_store_errors_reach_the_caller_unchanged(error: Exception) -> None:
    handlers, store, agent = _handlers([])
    store.fail = error
    requests: list[Callable[[], Awaitable[object]]] = [
        lambda: handlers.create(CreateVolume(name="disk1", size_bytes=8 << 30)),
        lambda: handlers.info(VolumeQuery(name="disk0")),
        lambda: handlers.volumes(ListVolumes(pool="default")),
        lambda: handlers.delete(VolumeRef(name="disk0")),
        lambda: handlers.resize(ResizeVolume(name="disk0", size_bytes=2 << 30)),
    ]
    for call in requests:
        with pytest.raises(type(error)) as raised:
            await call()
        assert raised.value is error
    assert agent.events == []


async def test_storage_clone_and_import_to_a_missing_pool_claim_nothing() -> None:
    handlers, store, _ = _handlers([])
    with pytest.raises(NotFound, match="no pool 'fast'"):
        await handlers.clone(CloneVolume(name="disk0", dst_pool="fast", dst_name="disk1"))
    with pytest.raises(NotFound, match="no pool 'fast'"):
        await handlers.import_file(ImportVolume(pool="fast", name="disk1", source="/in/x.raw"))
    assert store.changes == []
