"""Transfers between two storage agents (hosts h1 and h2 on one nats-server) under faults:
a chunk corrupted in flight, chunks forged by another publisher, the receiver killed and
restarted, the NATS server restarted. Each must end with the same volume on h2 (sha256),
the source untouched, and no restart from zero where the receiver kept its progress."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.msg import Msg

from services.storage.transfer import (
    H_AUTH,
    H_DIGEST,
    H_OFFSET,
    H_TRANSFER,
    PREFERRED_CHECKSUM,
    chunk_mac,
    chunk_subject,
    leaf_digests,
)
from shared import subjects
from shared.bus import Bus
from shared.contracts import event_decoder
from shared.jobs import wait_job
from shared.messages import Empty
from shared.messages import storage as storage_api
from shared.messages.jobs import JobFinished, JobRef
from shared.messages.storage import (
    CreateVolume,
    IncomingList,
    SendVolume,
    TransferCompleted,
    TransferFailed,
    TransferResumed,
    VolumeQuery,
)
from tests.support.agents import AgentProcess, agent_in_process
from tests.support.loopfs import (
    make_sparse,
    same_sparse_content,
    scatter,
)
from tests.support.wait import until

SIZE = 2 << 30
DATA = scatter(SIZE, 96, 1 << 20)  # 96 MiB of data in 2 GiB


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


async def source(bus: Bus) -> tuple[Path, os.stat_result]:
    info = await bus.call("h1", storage_api.CREATE, CreateVolume(name="vm1", size_bytes=SIZE))
    path = Path(info.path)
    make_sparse(path, SIZE, DATA)
    return path, path.stat()


async def job_done(bus: Bus, job_id: str, timeout: float = 90.0) -> JobFinished:
    return await wait_job(bus, "h1", "storage", job_id, timeout=timeout)


async def transfer_events(bus: Bus) -> list[Any]:
    out = []
    async for _s, _t, data in bus.events(subjects.events_filter("h1", "storage", "transfer.>")):
        out.append(event_decoder().decode(data))
    return out


async def incoming_on_h2(bus: Bus) -> IncomingList:
    return await bus.call("h2", storage_api.INCOMING, Empty(), timeout=2)


async def committed_on_h2(bus: Bus) -> int:
    try:
        inc: IncomingList = await bus.call("h2", storage_api.INCOMING, Empty(), timeout=2)
    except Exception:
        return 0
    return sum(t.committed_bytes for t in inc.transfers)


async def check_result(bus_h2: Bus, src: Path, st: os.stat_result) -> None:
    got = await bus_h2.call("h2", storage_api.INFO, VolumeQuery(name="vm1"))
    assert same_sparse_content(src, Path(got.path))
    assert got.allocated_bytes == st.st_blocks * 512
    after = src.stat()
    assert (after.st_mtime_ns, after.st_size) == (st.st_mtime_ns, st.st_size)  # untouched


class CorruptOnce:
    """The real NATS client, except that the first chunk at ``offset`` leaves with a flipped
    byte (or, with ``signature``, a flipped ``Phy-Auth`` header): the receiver must drop it
    and the sender send it again."""

    def __init__(self, nc: Any, offset: int, signature: bool = False) -> None:
        self.nc, self.offset, self.signature, self.corrupted = nc, offset, signature, 0

    async def request(self, subject: str, payload: bytes = b"", timeout: float = 0.5,
                      old_style: bool = False, headers: dict[str, Any] | None = None) -> Msg:
        if headers and headers.get(H_OFFSET) == str(self.offset) and not self.corrupted:
            self.corrupted += 1
            if self.signature:
                mac = headers[H_AUTH]
                headers = {**headers, H_AUTH: ("0" if mac[0] != "0" else "1") + mac[1:]}
            else:
                payload = bytes([payload[0] ^ 0xFF]) + payload[1:]
        return await self.nc.request(subject, payload, timeout=timeout, headers=headers)


def dropped(metrics: str, reason: str) -> float:
    """``phyllome_storage_chunks_dropped_total{reason=...}`` in a scrape (0 if absent)."""
    prefix = f'phyllome_storage_chunks_dropped_total{{reason="{reason}"}} '
    found = [line for line in metrics.splitlines() if line.startswith(prefix)]
    return float(found[0].removeprefix(prefix)) if found else 0.0


async def scrape(url: str) -> str:
    return await asyncio.to_thread(_scrape, url)


async def rollbacks(bus: Bus, host: str) -> list[TransferFailed]:
    return [e async for e in _events(bus, host) if e.error_kind == "rolled_back"]


async def test_corrupted_chunk_is_detected_and_sent_again(nats_server, tmp_path: Path) -> None:
    async with agent_in_process("storage", nats_server.url, tmp_path / "h1", "h1") as a, \
            agent_in_process("storage", nats_server.url, tmp_path / "h2", "h2") as b:
        src, st = await source(a.bus)
        channel = CorruptOnce(a.bus.nc, DATA[10][0])
        a.handlers.sender.channel = channel
        acc = await a.bus.call("h1", storage_api.SEND, SendVolume(name="vm1", to_host="h2"))
        result = await job_done(a.bus, acc.job_id)
        assert result.state == "succeeded", result.message
        assert channel.corrupted == 1
        assert result.result["corrupt_chunks"] == 1
        await check_result(b.bus, src, st)
        text = await scrape(b.metrics_url)
        assert 'phyllome_storage_transfers_total{direction="receive",outcome="completed"} 1.0' \
            in text
        assert dropped(text, "corrupt") == 1
        assert await rollbacks(b.bus, "h2") == []


async def test_chunk_with_a_damaged_signature_is_dropped_and_sent_again(
        nats_server, tmp_path: Path) -> None:
    async with agent_in_process("storage", nats_server.url, tmp_path / "h1", "h1",
                                extra={"chunk_timeout_s": 1.0}) as a, \
            agent_in_process("storage", nats_server.url, tmp_path / "h2", "h2") as b:
        src, st = await source(a.bus)
        channel = CorruptOnce(a.bus.nc, DATA[10][0], signature=True)
        a.handlers.sender.channel = channel
        acc = await a.bus.call("h1", storage_api.SEND, SendVolume(name="vm1", to_host="h2"))
        result = await job_done(a.bus, acc.job_id)
        assert result.state == "succeeded", result.message
        assert channel.corrupted == 1
        # unanswered, so the sender saw a cut, offered again and sent what h2 lacked
        assert result.result["attempts"] >= 2
        assert dropped(await scrape(b.metrics_url), "forged") == 1
        assert await rollbacks(b.bus, "h2") == []
        await check_result(b.bus, src, st)


async def test_forged_chunks_are_dropped_and_the_transfer_succeeds(
        nats_server, tmp_path: Path) -> None:
    async with agent_in_process("storage", nats_server.url, tmp_path / "h1", "h1") as a, \
            agent_in_process("storage", nats_server.url, tmp_path / "h2", "h2") as b:
        src, st = await source(a.bus)
        acc = await a.bus.call("h1", storage_api.SEND, SendVolume(
            name="vm1", to_host="h2", bwlimit_bytes_s=24 << 20))
        # h2 has written the first extents, so a forged chunk there would replace real data
        async def sixteen_mib() -> bool:
            return await committed_on_h2(a.bus) >= 16 << 20

        await until("h2 to commit 16 MiB", sixteen_mib)
        tid = (await incoming_on_h2(a.bus)).transfers[0].transfer_id
        off, length = DATA[0]
        garbage = os.urandom(length)
        digests = ",".join(leaf_digests(garbage, off, PREFERRED_CHECKSUM))
        hole = next(o for o in range(0, SIZE, length) if o not in {d for d, _ in DATA})
        forged = [
            {H_OFFSET: str(off), H_DIGEST: digests},  # no signature at all
            {H_OFFSET: str(off), H_DIGEST: digests,  # signed with a guessed key
             H_AUTH: chunk_mac(secrets.token_hex(32), tid, str(off), digests)},
            {H_OFFSET: str(hole), H_DIGEST: digests},  # outside the map: was a rollback
        ]
        # published by another client, as anyone allowed on phy.*.*.* could
        for headers in forged:
            await b.bus.nc.publish(chunk_subject("h2"), garbage,
                                   headers={H_TRANSFER: tid, **headers})
        await b.bus.nc.flush()

        async def all_dropped() -> bool:
            return dropped(await scrape(b.metrics_url), "forged") == len(forged)

        await until("h2 to drop the forged chunks", all_dropped)
        result = await job_done(a.bus, acc.job_id)
        assert result.state == "succeeded", result.message
        assert result.result["attempts"] == 1  # never rolled back, never restarted
        assert await rollbacks(b.bus, "h2") == []
        got = await a.bus.call("h2", storage_api.INFO, VolumeQuery(name="vm1", sha256=True),
                               timeout=100)
        assert got.sha256 == sha256_file(src)
        await check_result(b.bus, src, st)


def _scrape(url: str) -> str:
    import httpx

    return httpx.get(url, timeout=5).text


async def test_receiver_killed_and_restarted_resumes(nats_server, tmp_path: Path) -> None:
    receiver = AgentProcess("storage", nats_server.url, tmp_path / "h2", "h2")
    await receiver.start()
    try:
        async with agent_in_process("storage", nats_server.url, tmp_path / "h1", "h1") as a:
            src, st = await source(a.bus)
            acc = await a.bus.call("h1", storage_api.SEND, SendVolume(
                name="vm1", to_host="h2", bwlimit_bytes_s=24 << 20))
            await until("h2 to commit data", lambda: committed_on_h2(a.bus))
            receiver.kill()
            await receiver.start()
            result = await job_done(a.bus, acc.job_id)
            assert result.state == "succeeded", result.message + receiver.log()[-2000:]
            events = await transfer_events(a.bus)
            resumed = [e for e in events if isinstance(e, TransferResumed)]
            assert resumed and resumed[-1].committed_bytes > 0, events
            data = sum(n for _, n in DATA)
            # resumed, not restarted: what went after the resume is only what h2 lacked
            assert result.result["sent_bytes"] < data + resumed[-1].committed_bytes
            assert "waiting for the sender" in receiver.log()
            bus = a.bus
            got = await bus.call("h2", storage_api.INFO, VolumeQuery(name="vm1", sha256=True),
                                 timeout=100)
            assert got.sha256 == sha256_file(src)
            assert got.allocated_bytes == st.st_blocks * 512
            assert not [p for p in (tmp_path / "h2" / "pools" / "default").iterdir()
                        if p.name.startswith(".")]
    finally:
        await receiver.stop()


async def test_nats_restarted_mid_transfer(nats_server, tmp_path: Path) -> None:
    async with agent_in_process("storage", nats_server.url, tmp_path / "h1", "h1") as a, \
            agent_in_process("storage", nats_server.url, tmp_path / "h2", "h2") as b:
        src, st = await source(a.bus)
        acc = await a.bus.call("h1", storage_api.SEND, SendVolume(
            name="vm1", to_host="h2", bwlimit_bytes_s=24 << 20))
        await until("h2 to commit data", lambda: committed_on_h2(a.bus))
        await asyncio.to_thread(nats_server.restart)
        result = await job_done(a.bus, acc.job_id)
        assert result.state == "succeeded", result.message
        await check_result(b.bus, src, st)
        completed = [e for e in await transfer_events(a.bus) if isinstance(e, TransferCompleted)]
        assert completed and completed[-1].attempts >= 2
        assert msgspec.to_builtins(completed[-1])["sha256"] == result.result["sha256"]


def hidden(pool: Path) -> list[str]:
    return sorted(p.name for p in pool.iterdir() if p.name.startswith("."))


async def test_cancelled_send_is_rolled_back_on_the_receiver(nats_server, tmp_path: Path) -> None:
    async with agent_in_process("storage", nats_server.url, tmp_path / "h1", "h1") as a, \
            agent_in_process("storage", nats_server.url, tmp_path / "h2", "h2"):
        src, st = await source(a.bus)
        acc = await a.bus.call("h1", storage_api.SEND, SendVolume(
            name="vm1", to_host="h2", bwlimit_bytes_s=24 << 20))
        await until("h2 to commit data", lambda: committed_on_h2(a.bus))
        result = await a.bus.call("h1", storage_api.CANCEL, JobRef(job_id=acc.job_id))
        assert result.state == "cancelled"
        pool = tmp_path / "h2" / "pools" / "default"
        assert list(pool.iterdir()) == []
        assert (await a.bus.call("h2", storage_api.INCOMING, Empty())).transfers == []
        assert src.stat().st_mtime_ns == st.st_mtime_ns


async def test_sender_killed_receiver_rolls_back_when_idle(nats_server, tmp_path: Path) -> None:
    sender = AgentProcess("storage", nats_server.url, tmp_path / "h1", "h1")
    await sender.start()
    try:
        async with agent_in_process("storage", nats_server.url, tmp_path / "h2", "h2",
                                    extra={"stale_s": 1.5, "commit_interval_s": 0.2}) as b:
            await source(b.bus)
            await b.bus.call("h1", storage_api.SEND, SendVolume(
                name="vm1", to_host="h2", bwlimit_bytes_s=24 << 20))
            await until("h2 to commit data", lambda: committed_on_h2(b.bus))
            sender.kill()
            pool = tmp_path / "h2" / "pools" / "default"

            async def rolled_back() -> bool:
                return not list(pool.iterdir()) and not b.handlers.receiver.incoming

            await until("h2 to roll the transfer back", rolled_back, timeout=20)
            failed = [e async for e in _events(b.bus, "h2") if e.error_kind == "rolled_back"]
            assert failed and "no word from the sender" in failed[-1].message
    finally:
        sender.kill()


async def _events(bus: Bus, host: str) -> Any:
    async for _s, _t, data in bus.events(subjects.events_filter(host, "storage",
                                                                "transfer.failed.>")):
        yield event_decoder().decode(data)


async def test_receiver_pool_too_small(nats_server, tmp_path: Path, small_ext4: Path) -> None:
    async with agent_in_process("storage", nats_server.url, tmp_path / "h1", "h1") as a, \
            agent_in_process("storage", nats_server.url, tmp_path / "h2", "h2",
                             extra={"pools": {"default": str(small_ext4 / "pool")}}):
        await source(a.bus)  # 96 MiB of data; h2's pool has about 50 MiB free
        acc = await a.bus.call("h1", storage_api.SEND, SendVolume(name="vm1", to_host="h2"))
        result = await job_done(a.bus, acc.job_id)
        assert (result.state, result.error_kind) == ("failed", "insufficient_resources")
        assert "free, the incoming volume vm1 needs" in result.message
        assert list((small_ext4 / "pool").iterdir()) == []


async def test_bandwidth_limit(nats_server, tmp_path: Path) -> None:
    async with agent_in_process("storage", nats_server.url, tmp_path / "h1", "h1") as a, \
            agent_in_process("storage", nats_server.url, tmp_path / "h2", "h2"):
        await source(a.bus)
        acc = await a.bus.call("h1", storage_api.SEND, SendVolume(
            name="vm1", to_host="h2", bwlimit_bytes_s=64 << 20))
        result = await job_done(a.bus, acc.job_id)
        assert result.state == "succeeded"
        data = sum(n for _, n in DATA)
        assert result.result["seconds"] >= 0.9 * data / (64 << 20)
        events = await transfer_events(a.bus)
        completed = [e for e in events if isinstance(e, TransferCompleted)][-1]
        assert completed.rate_bytes_s <= 1.1 * (64 << 20)


async def test_sender_killed_and_send_again_resumes(nats_server, tmp_path: Path) -> None:
    sender = AgentProcess("storage", nats_server.url, tmp_path / "h1", "h1")
    await sender.start()
    try:
        async with agent_in_process("storage", nats_server.url, tmp_path / "h2", "h2") as b:
            src, st = await source(b.bus)
            await b.bus.call("h1", storage_api.SEND, SendVolume(
                name="vm1", to_host="h2", bwlimit_bytes_s=24 << 20))
            await until("h2 to commit data", lambda: committed_on_h2(b.bus))
            sender.kill()
            await sender.start()
            acc = await b.bus.call("h1", storage_api.SEND, SendVolume(name="vm1", to_host="h2"))
            result = await job_done(b.bus, acc.job_id)
            assert result.state == "succeeded", result.message + sender.log()[-2000:]
            resumed = [e for e in await transfer_events(b.bus) if isinstance(e, TransferResumed)]
            assert resumed and resumed[-1].committed_bytes > 0
            assert result.result["sent_bytes"] == sum(n for _, n in DATA) - \
                resumed[-1].committed_bytes
            await check_result(b.bus, src, st)
    finally:
        await sender.stop()
