"""libvirt for tests: a fresh test-driver host per test, the real libvirtd, guest serial logs.

    def test_fast(libvirt_test_uri):          # "test:///tmp/.../host.xml", empty, per test
        ...

    with libvirtd_with_test_driver() as uri:  # "test+unix:///default?socket=...": it
        ...                                   # outlives the agent using it (kill -9 tests)

    def test_real(libvirtd, guest_dir):       # qemu:///system answering; a dir QEMU can read
        ...
        await wait_for_marker(guest_dir / "serial.log", "ready", timeout=60)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from shared import subjects
from shared.agent import Agent
from shared.codec import decode
from shared.messages.vm import VmDeviceChanged, VmStateChanged
from tests.support.require import require

SYSTEM_URI = "qemu:///system"
LIBVIRTD_PID = Path("/run/libvirtd.pid")
MARKER_PREFIX = "PHYLLOME-TINY: "

# A host for libvirt's test driver: 2 CPUs, 8 GiB; no domains, the tests define them.
TEST_HOST_XML = """<node>
  <cpu>
    <nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads>
    <active>2</active><mhz>2000</mhz><model>x86_64</model>
  </cpu>
  <memory>8388608</memory>
</node>
"""


@pytest.fixture
def libvirt_test_uri(tmp_path: Path) -> str:
    """A libvirt test-driver URI of a host file of this test only (never test:///default)."""
    path = tmp_path / "libvirt-test-host.xml"
    path.write_text(TEST_HOST_XML)
    return f"test://{path}"


def _answers() -> bool:
    done = subprocess.run(["virsh", "-c", SYSTEM_URI, "uri"], capture_output=True, timeout=30)
    return done.returncode == 0


def ensure_libvirtd(timeout: float = 30.0) -> None:
    """Start virtlogd and libvirtd (no systemd here) unless qemu:///system already answers."""
    require(shutil.which("libvirtd") is not None and shutil.which("virsh") is not None,
            "libvirtd and virsh (package libvirt-daemon-system)")
    if _answers():
        return
    require(os.geteuid() == 0, "root, to start libvirtd")
    if subprocess.run(["pgrep", "-x", "virtlogd"], capture_output=True).returncode != 0:
        subprocess.run(["virtlogd", "-d"], check=True)
    if subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode != 0:
        subprocess.run(["libvirtd", "-d"], check=True)
    deadline = time.monotonic() + timeout
    while not _answers():
        if time.monotonic() > deadline:
            raise TimeoutError(f"libvirtd did not answer on {SYSTEM_URI} in {timeout} s")
        time.sleep(0.1)


@contextlib.contextmanager
def libvirtd_with_test_driver(timeout: float = 30.0) -> Iterator[str]:
    """A libvirtd of this test alone, serving libvirt's test driver; yields its URI.

    The domains a vm agent defines there outlive the agent, as they do on a real host, so
    an agent can be killed and restarted. The daemon runs as user nobody, so it is an
    unprivileged (session) daemon with its own sockets and directories in a fresh directory
    (pytest's tmp_path is mode 700, closed to nobody); this process holds a connection
    for the whole test, which keeps the test driver's host alive between agents.
    """
    import libvirt

    require(os.geteuid() == 0, "root, to run a libvirtd as user nobody")
    require(shutil.which("libvirtd") is not None and shutil.which("setpriv") is not None,
            "libvirtd and setpriv")
    home = Path(tempfile.mkdtemp(prefix="phyllome-libvirtd-"))
    run = home / "run"
    run.mkdir(mode=0o700)
    subprocess.run(["chown", "-R", "nobody:nogroup", str(home)], check=True)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home),
           "XDG_RUNTIME_DIR": str(run), "XDG_CONFIG_HOME": str(home / "config"),
           "XDG_CACHE_HOME": str(home / "cache"), "XDG_DATA_HOME": str(home / "data")}
    with open(home / "libvirtd.log", "wb") as log:
        proc = subprocess.Popen(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "libvirtd"],
            env=env, stdout=log, stderr=log, start_new_session=True)
    uri = f"test+unix:///default?socket={run / 'libvirt' / 'libvirt-sock'}"
    conn = None
    try:
        deadline = time.monotonic() + timeout
        while conn is None:
            try:
                conn = libvirt.open(uri)
            except libvirt.libvirtError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the test's libvirtd did not answer: "
                                       + (home / "libvirtd.log").read_text()[-2000:]) from None
                time.sleep(0.05)
        yield uri
    finally:
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def libvirtd() -> str:
    """The machine's real libvirtd, running; yields its URI."""
    ensure_libvirtd()
    return SYSTEM_URI


def kill_libvirtd() -> None:
    """SIGKILL libvirtd, as a crash would (its QEMU processes keep running)."""
    pid = int(LIBVIRTD_PID.read_text().strip())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    LIBVIRTD_PID.unlink(missing_ok=True)


@pytest.fixture
def guest_dir() -> Iterator[Path]:
    """A directory for guest files that QEMU (user libvirt-qemu) can traverse and read.

    pytest's tmp_path is mode 700 and QEMU could not open a disk under it.
    """
    path = Path(tempfile.mkdtemp(prefix="phyllome-vm-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def markers(log: Path) -> dict[str, str]:
    """The ``PHYLLOME-TINY: key=value`` markers a guest printed so far (last value wins)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    found: dict[str, str] = {}
    for m in re.finditer(rf"{re.escape(MARKER_PREFIX)}([a-z_]+)(?:=([^\r\n]*))?", text):
        found[m.group(1)] = (m.group(2) or "").strip()
    return found


async def wait_for_marker(log: Path, key: str, timeout: float = 60.0) -> dict[str, str]:
    """Poll a serial log until the guest printed marker ``key``; returns all markers then."""
    deadline = time.monotonic() + timeout
    while True:
        found = markers(log)
        if key in found:
            return found
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
            raise TimeoutError(f"no {MARKER_PREFIX}{key} in {log} after {timeout} s:\n{tail}")
        await asyncio.sleep(0.1)


class VmEvents:
    """``VmStateChanged`` events of one host's vm agent, as they arrive on the bus."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[VmStateChanged] = asyncio.Queue()

    async def next(self, uuid: str, *, event: str | None = None,
                   timeout: float = 10.0) -> VmStateChanged:
        """The next event of VM ``uuid`` (of kind ``event``), skipping others."""
        async with asyncio.timeout(timeout):
            while True:
                ev = await self.queue.get()
                if ev.uuid == uuid and (event is None or ev.event == event):
                    return ev


@contextlib.asynccontextmanager
async def _fed(agent: Agent, kind: str, cls: type[Any],
               queue: asyncio.Queue[Any]) -> AsyncIterator[None]:
    """While inside: the vm agent's events of ``kind``, decoded as ``cls``, into ``queue``."""
    async def got(msg: Any) -> None:
        queue.put_nowait(decode(msg.data, cls))

    sub = await agent.bus.nc.subscribe(subjects.event(agent.host, "vm", kind) + ".*", cb=got)
    try:
        yield
    finally:
        await sub.unsubscribe()


@contextlib.asynccontextmanager
async def vm_events(agent: Agent) -> AsyncIterator[VmEvents]:
    events = VmEvents()
    async with _fed(agent, "state", VmStateChanged, events.queue):
        yield events


@contextlib.asynccontextmanager
async def device_events(agent: Agent) -> AsyncIterator[asyncio.Queue[VmDeviceChanged]]:
    """``VmDeviceChanged`` events (attach, detach, eject, insert) of one host's vm agent."""
    queue: asyncio.Queue[VmDeviceChanged] = asyncio.Queue()
    async with _fed(agent, "device", VmDeviceChanged, queue):
        yield queue


@contextlib.asynccontextmanager
async def guest_vm_agent(nats_url: str, state: Path, uri: str, guest_dir: Path,
                         host: str = "h1") -> AsyncIterator[Agent]:
    """A vm agent (TCG) on the real libvirtd ``uri`` whose console logs
    (``guest_dir/consoles/<uuid>.log``) and disks live where QEMU can read them."""
    from tests.support.agents import agent_in_process

    async with agent_in_process(
            "vm", nats_url, state, host=host, libvirt_uri=uri, accelerator="tcg",
            extra={"reconcile_s": 3600, "console_dir": str(guest_dir / "consoles"),
                   "disk_dir": str(guest_dir / "disks")}) as agent:
        yield agent


async def vm_call(agent: Agent, verb: str, req: Any, timeout: float = 60.0) -> Any:
    """``verb`` of the agent's own vm endpoints."""
    from shared import contracts

    return await agent.bus.call(agent.host, contracts.spec("vm", verb), req, timeout=timeout)
