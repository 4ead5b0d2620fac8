"""Issue 19, outcomes that tell the truth: what the CLI says and how it exits when a guest
ignores stop (see tests/system/test_vm_guests.py), a job is interrupted, disks stay behind,
a VM has nothing to boot, a transfer's host does not exist, a pull cannot connect.

Each test runs ``python -m cli.main`` as a user would, against one real stack (NATS and the
four agents of h1) shared by the module.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import socket
import time
from collections.abc import Iterator

import pytest
import pytest_asyncio

from shared import subjects
from shared.jobs import wait_job
from shared.messages import Empty
from shared.messages.jobs import JobRef, JobStatus, job_endpoints
from tests.support.cli import Stack, phyllome, stack, start_phyllome
from tests.support.httpserver import FileServer, make_sparse_raw
from tests.support.wait import until

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]
__all__ = ["stack"]
MiB = 1 << 20
JOBS, JOB, CANCEL = job_endpoints("catalogue")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    """An image server: slow images to interrupt, and entries whose server cannot be
    reached (a closed port, a name that does not resolve)."""
    root = tmp_path_factory.mktemp("www")
    with FileServer(root) as server:
        raw = make_sparse_raw(root / "slow.raw", 16 * MiB)
        digest = hashlib.sha256(raw.read_bytes()).hexdigest()
        with socket.socket() as s:  # a port nothing listens on once this closes
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]

        def entry(image_id: str, url: str) -> dict[str, object]:
            return {"id": image_id, "name": image_id, "arch": "x86_64", "url": url,
                    "format": "raw", "sha256": digest, "size": raw.stat().st_size}

        (root / "m.json").write_text(json.dumps({"images": [
            entry("slow1", server.url("slow.raw")), entry("slow2", server.url("slow.raw")),
            entry("closed", f"http://127.0.0.1:{closed}/x.raw"),
            entry("nowhere", "http://images.phyllome.invalid/x.raw")]}))
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(stack: Stack, srv: FileServer) -> Stack:
    done = await phyllome(stack.env, "images", "sources", "add", "lab", srv.url("m.json"))
    assert done.rc == 0, done.err
    return stack


async def test_vm_stop_waits_for_the_power_off_and_no_wait_returns_at_once(
        stack: Stack) -> None:
    assert (await phyllome(stack.env, "storage", "create", "stop-disk", "16M")).rc == 0
    for argv in (["create", "stopme", "--disk", "stop-disk"], ["start", "stopme"]):
        done = await phyllome(stack.env, "vm", *argv)
        assert done.rc == 0, done.err
    done = await phyllome(stack.env, "vm", "stop", "stopme", "--json")
    assert done.rc == 0, done.err
    assert json.loads(done.out)["state"] == "shutoff"  # the libvirt test driver: at once

    assert (await phyllome(stack.env, "vm", "start", "stopme")).rc == 0
    done = await phyllome(stack.env, "vm", "stop", "stopme", "--no-wait")
    assert done.rc == 0 and "shutoff" in done.out, done.err
    done = await phyllome(stack.env, "vm", "stop", "stopme", "--no-wait", "--force")
    assert done.rc == 2 and "cannot go with --no-wait" in done.err
    done = await phyllome(stack.env, "vm", "stop", "stopme")
    assert done.rc == 1 and "nothing to shut down" in done.err


async def test_vm_delete_names_the_disks_it_leaves_and_how_to_remove_them(stack: Stack) -> None:
    assert (await phyllome(stack.env, "storage", "create", "keep-disk", "16M")).rc == 0
    for argv in (["create", "keeper", "--disk", "keep-disk"], ["clone", "keeper", "kept2"]):
        done = await phyllome(stack.env, "vm", *argv)
        assert done.rc == 0, done.err
    done = await phyllome(stack.env, "vm", "info", "kept2", "--json")
    copy = json.loads(done.out)["spec"]["disks"][0]
    assert copy["owned"], "the clone's disk was made for it"

    done = await phyllome(stack.env, "vm", "delete", "kept2")
    assert done.rc == 0, done.err
    name = f"{copy['pool']}/{copy['volume']}"
    assert f"kept disk {name}: `phyllome storage delete {name}` removes it" in done.out
    assert "--delete-disks" in done.out
    done = await phyllome(stack.env, "storage", "delete", name)  # the command it gave works
    assert done.rc == 0, done.err

    done = await phyllome(stack.env, "vm", "delete", "keeper", "--delete-disks", "--json")
    assert done.rc == 0, done.err
    kept = json.loads(done.out)["kept_disks"]
    assert [(d["pool"], d["volume"]) for d in kept] == [("default", "keep-disk")], \
        "a disk the VM was given, not made for it, stays even with --delete-disks"


async def test_vm_create_with_nothing_to_boot_warns(stack: Stack) -> None:
    done = await phyllome(stack.env, "vm", "create", "empty")
    assert done.rc == 0, done.err
    assert "warning: VM empty has nothing to boot" in done.err and "--image" in done.err
    assert (await phyllome(stack.env, "vm", "delete", "empty")).rc == 0
    done = await phyllome(stack.env, "vm", "create", "empty", "--json")
    assert done.rc == 0 and json.loads(done.out)["name"] == "empty"
    assert json.loads(done.err)["warning"]["message"].startswith("VM empty has nothing to boot")
    assert (await phyllome(stack.env, "vm", "delete", "empty")).rc == 0
    assert (await phyllome(stack.env, "storage", "create", "boot-disk", "16M")).rc == 0
    done = await phyllome(stack.env, "vm", "create", "booter", "--disk", "boot-disk")
    assert done.rc == 0 and "nothing to boot" not in done.err


async def test_storage_send_to_a_host_that_does_not_exist_is_refused_before_any_event(
        stack: Stack) -> None:
    assert (await phyllome(stack.env, "storage", "create", "sendme", "16M")).rc == 0
    done = await phyllome(stack.env, "storage", "send", "sendme", "--to", "nohost")
    assert done.rc == 3, done.err
    assert "no storage agent of host 'nohost' answers" in done.err
    assert "`phyllome hosts`" in done.err
    done = await phyllome(stack.env, "storage", "send", "sendme", "--to", "h1",
                          "--to-pool", "nopool")
    assert done.rc == 1 and "the destination host is this host" in done.err

    bus = stack.agents["storage"].bus
    transfers = [s async for s, _, _ in bus.events(subjects.event("h1", "storage", "transfer")
                                                   + ".>")]
    assert transfers == [], "nothing was published for a send that could not start"
    jobs = await bus.call("h1", job_endpoints("storage")[0], Empty())
    assert [j.kind for j in jobs.jobs if j.kind == "send"] == []


@pytest.mark.parametrize(("image", "cause"), [
    ("closed", "refused the connection (nothing listens there)"),
    ("nowhere", "the host name images.phyllome.invalid does not resolve"),
])
async def test_a_pull_that_cannot_connect_names_the_cause(lab: Stack, image: str,
                                                          cause: str) -> None:
    started = time.monotonic()
    done = await phyllome(lab.env, "images", "pull", image)
    assert done.rc == 1, done.out
    assert cause in done.err
    assert "pull again once that is fixed" in done.err and "resume" not in done.err
    assert "broke" not in done.err and "times" not in done.err
    assert time.monotonic() - started < 30, "no retries for what retrying cannot mend"


async def running_pull(stack: Stack) -> JobStatus:
    """The pull job the CLI started (the tests of this module run one at a time)."""
    bus = stack.agents["catalogue"].bus

    async def running() -> JobStatus | None:
        jobs = (await bus.call("h1", JOBS, Empty())).jobs
        return next((j for j in jobs if j.kind == "pull" and j.state == "running"), None)

    return await until("the pull to run", running, timeout=20, interval=0.05)


async def test_ctrl_c_while_following_a_pull_says_the_job_goes_on(lab: Stack,
                                                                  srv: FileServer) -> None:
    srv.rate = 256 << 10  # 16 MiB at 256 KiB/s: a minute, long enough to interrupt
    try:
        proc = await start_phyllome(lab.env, "images", "pull", "slow1")
        job = await running_pull(lab)
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 130, err
        text = err.decode()
        assert f"the job goes on (pull job {job.job_id} on h1)" in text
        assert f"`phyllome jobs cancel {job.job_id}` stops it" in text
        bus = lab.agents["catalogue"].bus
        status = await bus.call("h1", JOB, JobRef(job_id=job.job_id))
        assert status.state == "running", "Ctrl-C stopped following, not the job"
        await bus.call("h1", CANCEL, JobRef(job_id=job.job_id))
        outcome = await wait_job(bus, "h1", "catalogue", job.job_id, timeout=120)
        assert outcome.state == "cancelled"
    finally:
        srv.rate = None


async def test_ctrl_c_with_cancel_on_interrupt_cancels_the_job(lab: Stack,
                                                               srv: FileServer) -> None:
    srv.rate = 256 << 10
    try:
        proc = await start_phyllome(lab.env, "images", "pull", "slow2", "--cancel-on-interrupt")
        job = await running_pull(lab)
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 40)
        assert proc.returncode == 130, err
        assert f"interrupted: pull job {job.job_id} cancelled" in err.decode()
        status = await lab.agents["catalogue"].bus.call("h1", JOB, JobRef(job_id=job.job_id))
        assert status.state == "cancelled"
    finally:
        srv.rate = None
