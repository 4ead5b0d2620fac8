"""The one module that imports libvirt: domains of one host, its lifecycle events, reconnects.

Specs become domain XML here (``domain_xml``) and facts are read back from it here; the
rest of the agent sees only the ``Hypervisor`` Protocol.

libvirt's event loop is ``libvirtaio`` on a private asyncio loop in a daemon thread, and
every libvirt call runs on that thread too (libvirtaio is not thread-safe, libvirt accepts one
event implementation per process, and an agent's loop may come and go, as in tests); the
agent's coroutines await those calls' futures. Lifecycle events and "the
connection came back" land in ``news``, on the agent's loop. When libvirtd goes away the
close callback starts a reconnect with backoff::

    hv = LibvirtHypervisor("qemu:///system")
    await hv.connect()
    dom = await hv.define(spec, accelerator="tcg", console_log="/var/log/phyllome/demo.log")
    await hv.start(dom.uuid)
    news = await hv.news.get()      # DomainEvent(event="started", reason="booted", ...)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeVar

import libvirt
import libvirtaio

from services.vm import domain_xml, guest_state, health
from services.vm.accel import Accel
from services.vm.hypervisor import (
    Device,
    Domain,
    DomainEvent,
    DomainStats,
    HypervisorNews,
    Reconnected,
)
from services.vm.spec import check_name, check_ref, check_uuid
from shared.errors import BackendError, Conflict, Forbidden, NotFound, PhyError, Unavailable
from shared.messages.hosts import Problem
from shared.messages.net import Network, NetworkSpec
from shared.messages.vm import AddressSource, ConsoleEndpoint, GuestAddress, VmSpec, VmState

log = logging.getLogger("phyllome.vm.libvirt")
T = TypeVar("T")

_STATES: dict[int, VmState] = {
    libvirt.VIR_DOMAIN_NOSTATE: "unknown",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting-down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}
# virDomain*Reason, per state, in libvirt's order.
_REASONS: dict[VmState, tuple[str, ...]] = {
    "running": ("unknown", "booted", "migrated", "restored", "from-snapshot", "unpaused",
                "migration-canceled", "save-canceled", "wakeup", "crashed", "postcopy"),
    "paused": ("unknown", "user", "migration", "save", "dump", "ioerror", "watchdog",
               "from-snapshot", "shutting-down", "snapshot", "crashed", "starting-up",
               "postcopy", "postcopy-failed"),
    "shutoff": ("unknown", "shutdown", "destroyed", "crashed", "migrated", "saved", "failed",
                "from-snapshot", "daemon"),
}
# virDomainEventType and its details, in libvirt's order.
_EVENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("defined", ("added", "updated", "renamed", "from-snapshot")),
    ("undefined", ("removed", "renamed")),
    ("started", ("booted", "migrated", "restored", "from-snapshot", "wakeup")),
    ("suspended", ("paused", "migrated", "ioerror", "watchdog", "restored", "from-snapshot",
                   "api-error", "postcopy", "postcopy-failed")),
    ("resumed", ("unpaused", "migrated", "from-snapshot", "postcopy", "postcopy-failed")),
    ("stopped", ("shutdown", "destroyed", "crashed", "migrated", "saved", "failed",
                 "from-snapshot")),
    ("shutdown", ("finished", "guest", "host")),
    ("pmsuspended", ("memory", "disk")),
    ("crashed", ("panicked", "crashloaded")),
)
_CONFLICT_CODES = {libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_OPERATION_FAILED,
                   libvirt.VIR_ERR_DOM_EXIST}
_GONE_CODES = {libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_ERR_RPC,
               libvirt.VIR_ERR_SYSTEM_ERROR}
_BULK_STATS = (libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
               | libvirt.VIR_DOMAIN_STATS_BALLOON | libvirt.VIR_DOMAIN_STATS_BLOCK
               | libvirt.VIR_DOMAIN_STATS_INTERFACE)
_NOT_FOUND_CODES = {libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_NO_NETWORK}
_LIVE_AND_CONFIG = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
_ADDRESS_SOURCES: tuple[tuple[int, AddressSource], ...] = (
    (libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT, "agent"),
    (libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, "lease"),
)
RECONNECT_MAX_DELAY_S = 5.0
BULK_STATS_TIMEOUT_S = 10.0
SCREENSHOT_LIMIT = 256 << 20  # an 8K RGB screen is 100 MiB as a PPM
LIBVIRT_DIR = "/var/lib/libvirt"  # NVRAM files in qemu/nvram, swtpm state in swtpm/<uuid>
QEMU_CONF = "/etc/libvirt/qemu.conf"


def event_words(event: int, detail: int) -> tuple[str, str]:
    """libvirt's lifecycle (event, detail) numbers as words."""
    if 0 <= event < len(_EVENTS):
        name, details = _EVENTS[event]
        return name, details[detail] if 0 <= detail < len(details) else str(detail)
    return str(event), str(detail)


def state_words(state: int, reason: int) -> tuple[VmState, str]:
    words = _STATES.get(state, "unknown")
    reasons = _REASONS.get(words, ())
    return words, reasons[reason] if 0 <= reason < len(reasons) else ""


# -- the libvirt thread: one per process ---------------------------------------------------

_thread_loop: asyncio.AbstractEventLoop | None = None
_thread_lock = threading.Lock()


def _libvirt_loop() -> asyncio.AbstractEventLoop:
    """Start (once) the daemon thread whose asyncio loop runs libvirtaio and every call.

    libvirtaio is not thread-safe and libvirt takes one event implementation per process, so
    all libvirt work happens on this loop's thread; agents (on any loop) wait on its futures.
    """
    global _thread_loop
    with _thread_lock:
        if _thread_loop is None:
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # we raise instead
                asyncio.set_event_loop(loop)
                libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
                ready.set()
                loop.run_forever()

            threading.Thread(target=run, name="libvirt", daemon=True).start()
            ready.wait()
            _thread_loop = loop
        return _thread_loop


def _submit(fn: Callable[[], T]) -> concurrent.futures.Future[T]:
    async def call() -> T:
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), _libvirt_loop())


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """libvirtError -> the shared error tree, with what we were doing."""
    try:
        yield
    except libvirt.libvirtError as e:
        code = e.get_error_code()
        text = e.get_error_message() or str(e)
        if code in _NOT_FOUND_CODES:
            raise NotFound(f"{what}: {text}") from None
        if code in _CONFLICT_CODES:
            raise Conflict(f"{what}: {text}") from None
        if code in _GONE_CODES:
            raise Unavailable(f"{what}: libvirt is not reachable ({text})") from None
        raise BackendError(f"{what}: {text}") from None


class LibvirtHypervisor:
    """Domains of the libvirt at ``uri``; see the module docstring.

    ``state_dir`` is where that libvirt keeps guests' NVRAM files and swtpm state
    (``LIBVIRT_DIR`` by default; none for the test driver, which keeps neither, unless given);
    ``kvm_device`` the node whose access by QEMU's user ``problems`` checks.
    """

    def __init__(self, uri: str, *, state_dir: str = "", kvm_device: str = "/dev/kvm") -> None:
        self.uri = uri
        # libvirt's test driver, in process (test:///file) or in a daemon (test+unix:///...):
        # no NVRAM, no TPM state unless a state_dir is given
        self._test_driver = uri.split(":", 1)[0].split("+", 1)[0] == "test"
        self.state_dir = state_dir or ("" if self._test_driver else LIBVIRT_DIR)
        self.kvm_device = kvm_device
        self._connections = 0
        self._timed: tuple[int, bool] | None = None  # (connection, KVM usable) of the timing
        self._reprobing: Problem | None = None
        self.news: asyncio.Queue[HypervisorNews] = asyncio.Queue()
        self.connected = False
        self._conn: libvirt.virConnect | None = None
        self._callbacks: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._closing = False

    # -- connection ---------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the connection; when libvirtd is down, keep trying in the background."""
        self._loop = asyncio.get_running_loop()
        try:
            await self._open()
        except PhyError as e:
            log.warning("libvirt at %s not reachable (%s); retrying", self.uri, e.message)
            self._schedule_reconnect()

    async def _open(self) -> None:
        def work() -> libvirt.virConnect:
            with translated(f"connecting to {self.uri}"):
                conn = libvirt.open(self.uri)
                for event_id, cb in ((libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle),
                                     (libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, self._on_reboot)):
                    self._callbacks.append(conn.domainEventRegisterAny(None, event_id, cb, None))
                if not self.uri.startswith("test:"):  # the test driver has no socket to lose
                    conn.registerCloseCallback(self._on_close, None)
                    conn.setKeepAlive(2, 3)
                return conn

        self._callbacks = []
        self._conn = await asyncio.wrap_future(_submit(work))
        self.connected = True
        self._connections += 1
        log.info("connected to libvirt at %s", self.uri)

    async def close(self) -> None:
        self._closing = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        conn, self._conn, self.connected = self._conn, None, False
        if conn is None:
            return

        def work() -> None:
            with contextlib.suppress(libvirt.libvirtError):
                for cb in self._callbacks:
                    conn.domainEventDeregisterAny(cb)
                if not self.uri.startswith("test:"):
                    conn.unregisterCloseCallback()
                conn.close()

        await asyncio.wrap_future(_submit(work))

    def _on_close(self, conn: libvirt.virConnect, reason: int, opaque: Any) -> None:
        """libvirt thread: the daemon went away (killed, restarted, keepalive lost)."""
        if self._loop is not None and not self._closing:
            self._loop.call_soon_threadsafe(self._lost, reason)

    def _lost(self, reason: int) -> None:
        if self._conn is None:
            return
        log.warning("connection to libvirt at %s lost (reason %d); reconnecting",
                    self.uri, reason)
        self._conn, self.connected = None, False
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.create_task(self._reconnect(), name="libvirt-reconnect")

    async def _reconnect(self) -> None:
        delay = 0.1
        while not self._closing:
            try:
                await self._open()
            except PhyError as e:
                log.debug("libvirt still down (%s); next try in %.1f s", e.message, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY_S)
                continue
            self.news.put_nowait(Reconnected())
            return

    # -- events (libvirt thread -> agent loop) --------------------------------------------

    def _post(self, news: HypervisorNews) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.news.put_nowait, news)

    def _on_lifecycle(self, conn: Any, dom: libvirt.virDomain, event: int, detail: int,
                      opaque: Any) -> None:
        name, reason = event_words(event, detail)
        self._post(DomainEvent(uuid=dom.UUIDString(), name=dom.name(), event=name,
                               reason=reason))

    def _on_reboot(self, conn: Any, dom: libvirt.virDomain, opaque: Any) -> None:
        self._post(DomainEvent(uuid=dom.UUIDString(), name=dom.name(), event="rebooted"))

    # -- calls --------------------------------------------------------------------------

    def _c(self) -> libvirt.virConnect:
        if self._conn is None:
            raise Unavailable(f"libvirt at {self.uri} is not connected; reconnecting")
        return self._conn

    async def _run(self, what: str, fn: Callable[[], T]) -> T:
        def work() -> T:
            with translated(what):
                return fn()

        return await asyncio.wrap_future(_submit(work))

    def _lookup(self, ref: str) -> libvirt.virDomain:
        check_ref(ref)
        conn = self._c()
        if len(ref) == 36 and ref.count("-") == 4:
            with contextlib.suppress(libvirt.libvirtError):
                return conn.lookupByUUIDString(ref)
        try:
            return conn.lookupByName(ref)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise NotFound(f"no VM {ref!r} on this host; see `phyllome vm list`") from None
            raise

    def _describe(self, dom: libvirt.virDomain) -> Domain:
        state, reason = dom.state()
        xml = dom.XMLDesc(0)
        words, why = state_words(state, reason)
        return Domain(uuid=dom.UUIDString(), name=dom.name(), state=words, reason=why,
                      spec=domain_xml.spec_of(xml), autostart=bool(dom.autostart()),
                      accelerator="kvm" if ET.fromstring(xml).get("type") == "kvm" else "tcg")

    async def host_memory_mib(self) -> int:
        return await self._run("reading host memory", lambda: int(self._c().getInfo()[1]))

    async def domains(self) -> list[Domain]:
        def work() -> list[Domain]:
            out = []
            for dom in self._c().listAllDomains(0):
                try:
                    out.append(self._describe(dom))
                except libvirt.libvirtError as e:  # undefined while we were listing
                    if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
            return out

        return await self._run("listing domains", work)

    async def defined_memory_mib(self) -> int:
        def work() -> int:
            kib = 0
            for dom in self._c().listAllDomains(0):
                try:
                    kib += dom.maxMemory()
                except libvirt.libvirtError as e:  # undefined while we were adding up
                    if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
            return kib // 1024

        return await self._run("adding up the domains' memory", work)

    async def domain(self, ref: str) -> Domain:
        return await self._run(f"looking up {ref}", lambda: self._describe(self._lookup(ref)))

    async def define(self, spec: VmSpec, *, accelerator: Accel, console_log: str) -> Domain:
        xml = domain_xml.build(spec, accelerator=accelerator, serial_log=console_log)
        return await self._run("defining the domain",
                               lambda: self._describe(self._c().defineXML(xml)))

    async def undefine(self, uuid: str) -> None:
        """Undefine with NVRAM and TPM state (the test driver has neither)."""
        flags = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                 | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        if not self._test_driver:
            flags |= libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_TPM
        await self._run(f"undefining {uuid}", lambda: self._lookup(uuid).undefineFlags(flags))

    async def start(self, uuid: str) -> None:
        await self._run(f"starting {uuid}", lambda: self._lookup(uuid).create())

    async def shutdown(self, uuid: str) -> None:
        await self._run(f"shutting down {uuid}", lambda: self._lookup(uuid).shutdown())

    async def destroy(self, uuid: str) -> None:
        await self._run(f"destroying {uuid}", lambda: self._lookup(uuid).destroy())

    async def reboot(self, uuid: str) -> None:
        await self._run(f"rebooting {uuid}", lambda: self._lookup(uuid).reboot(0))

    async def suspend(self, uuid: str) -> None:
        await self._run(f"suspending {uuid}", lambda: self._lookup(uuid).suspend())

    async def resume(self, uuid: str) -> None:
        await self._run(f"resuming {uuid}", lambda: self._lookup(uuid).resume())

    async def set_autostart(self, uuid: str, on: bool) -> None:
        await self._run(f"setting autostart of {uuid}",
                        lambda: self._lookup(uuid).setAutostart(int(on)))

    async def xml(self, uuid: str, *, inactive: bool = False) -> str:
        """The domain's XML with its secrets (live, or the next boot's when ``inactive``)."""
        flags = libvirt.VIR_DOMAIN_XML_SECURE
        if inactive:
            flags |= libvirt.VIR_DOMAIN_XML_INACTIVE
        return await self._run(f"reading the XML of {uuid}",
                               lambda: str(self._lookup(uuid).XMLDesc(flags)))

    async def spec(self, uuid: str) -> VmSpec | None:
        return domain_xml.spec_of(await self.xml(uuid, inactive=True))

    async def consoles(self, uuid: str) -> dict[str, ConsoleEndpoint]:
        return domain_xml.consoles_of(await self.xml(uuid))

    async def serial_pty(self, uuid: str) -> str:
        path = domain_xml.serial_pty_of(await self.xml(uuid))
        if not path:
            raise Conflict(f"domain {uuid} has no serial pty to open (is it running?)")
        return path

    async def vsock_cid(self, uuid: str) -> int:
        return domain_xml.vsock_cid_of(await self.xml(uuid))

    async def screenshot(self, uuid: str, *, limit: int = SCREENSHOT_LIMIT) -> tuple[str, bytes]:
        """libvirt's ``screenshot`` of a running domain's first screen, read from its stream
        (at most ``limit`` bytes): (MIME type, image)."""
        def work() -> tuple[str, bytes]:
            dom = self._lookup(uuid)
            stream = self._c().newStream(0)
            try:
                mime = dom.screenshot(stream, 0, 0) or ""
                parts: list[bytes] = []
                size = 0
                while True:
                    part = stream.recv(1 << 20)
                    if isinstance(part, int) or not part:  # -2 (would block) is not used
                        break
                    size += len(part)
                    if size > limit:
                        raise BackendError(f"the screenshot of {uuid} is over {limit} bytes")
                    parts.append(part)
                stream.finish()
            except BaseException:
                with contextlib.suppress(libvirt.libvirtError):
                    stream.abort()
                raise
            return str(mime), b"".join(parts)

        return await self._run(f"taking a screenshot of {uuid}", work)

    async def stats(self, uuid: str) -> DomainStats:
        def work() -> DomainStats:
            dom = self._lookup(uuid)
            found = self._c().domainListGetStats([dom], _BULK_STATS)
            return _stats(dom, found[0][1]) if found else _stats(dom, {})

        return await self._run(f"reading the statistics of {uuid}", work)

    async def addresses(self, uuid: str) -> tuple[AddressSource, list[GuestAddress]]:
        def work() -> tuple[AddressSource, list[GuestAddress]]:
            dom = self._lookup(uuid)
            if not dom.isActive():
                return "", []
            for source, word in _ADDRESS_SOURCES:
                try:
                    found = _addresses(dom.interfaceAddresses(source))
                except libvirt.libvirtError as e:  # no agent in the guest, no lease driver
                    log.debug("%s addresses of %s: %s", word, uuid, e.get_error_message())
                    continue
                if found:
                    return word, found
            return "", []

        return await self._run(f"reading the addresses of {uuid}", work)

    async def attach(self, uuid: str, spec: VmSpec, device: Device) -> None:
        """libvirt attaches live first and saves the definition only when that worked; the
        spec in the metadata follows, and a failure there takes the device out again."""
        def work() -> None:
            dom = self._lookup(uuid)
            xml = domain_xml.device(device, live_xml=dom.XMLDesc(0))
            dom.attachDeviceFlags(xml, _LIVE_AND_CONFIG)
            try:
                self._set_spec(dom, spec)
            except libvirt.libvirtError:
                with contextlib.suppress(libvirt.libvirtError):
                    dom.detachDeviceFlags(xml, _LIVE_AND_CONFIG)
                raise

        await self._run(f"attaching a device to {uuid}", work)

    async def detach(self, uuid: str, spec: VmSpec, device: Device) -> None:
        def work() -> None:
            dom = self._lookup(uuid)
            dom.detachDeviceFlags(domain_xml.device(device, live_xml=dom.XMLDesc(0)),
                                  _LIVE_AND_CONFIG)
            self._set_spec(dom, spec)

        await self._run(f"detaching a device from {uuid}", work)

    async def change_media(self, uuid: str, spec: VmSpec) -> None:
        def work() -> None:
            dom = self._lookup(uuid)
            dom.updateDeviceFlags(domain_xml.cdrom_device(spec), _LIVE_AND_CONFIG)
            self._set_spec(dom, spec)

        await self._run(f"changing the CD-ROM of {uuid}", work)

    @staticmethod
    def _set_spec(dom: libvirt.virDomain, spec: VmSpec) -> None:
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, domain_xml.metadata(spec),
                        "phyllome", domain_xml.METADATA_NS, _LIVE_AND_CONFIG)

    # -- networks -----------------------------------------------------------------------

    @staticmethod
    def _network(net: libvirt.virNetwork) -> Network:
        return domain_xml.network_of(net.XMLDesc(0), active=bool(net.isActive()),
                                     autostart=bool(net.autostart()))

    async def networks(self) -> list[Network]:
        return await self._run("listing networks", lambda: [
            self._network(n) for n in self._c().listAllNetworks(0)])

    async def define_network(self, spec: NetworkSpec) -> Network:
        def work() -> Network:
            net = self._c().networkDefineXML(domain_xml.network(spec))
            net.setAutostart(1)
            return self._network(net)

        return await self._run(f"defining network {spec.name}", work)

    async def start_network(self, name: str) -> None:
        """A network that cannot start is the host's fault (no dnsmasq, a bridge in use),
        not a lost connection, whatever libvirt's error code says."""
        def work() -> None:
            net = self._c().networkLookupByName(name)
            if net.isActive():
                return
            try:
                net.create()
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_SYSTEM_ERROR:
                    raise
                raise BackendError(f"starting network {name}: {e.get_error_message()}") \
                    from None

        await self._run(f"starting network {name}", work)

    async def delete_network(self, name: str) -> None:
        def work() -> None:
            net = self._c().networkLookupByName(name)
            if net.isActive():
                net.destroy()
            net.undefine()

        await self._run(f"deleting network {name}", work)

    async def copy_state(self, src_uuid: str, dst_uuid: str) -> None:
        """Copy the NVRAM file and the swtpm state directory."""
        if not self.state_dir:
            return
        copies = [(await self._nvram_path(src_uuid), await self._nvram_path(dst_uuid)),
                  (self._tpm_dir(src_uuid), self._tpm_dir(dst_uuid))]
        for a, b in copies:
            if not os.path.exists(a):
                continue
            proc = await asyncio.create_subprocess_exec(
                "cp", "-a", "--reflink=auto", a, b, stderr=asyncio.subprocess.PIPE)
            _, err = await proc.communicate()
            if proc.returncode != 0:
                raise BackendError(f"copying {a} to {b}: {err.decode(errors='replace')}")

    async def export_state(self, uuid: str) -> tuple[bytes, bytes]:
        if not self.state_dir:
            return b"", b""
        return await asyncio.to_thread(guest_state.read_state, await self._nvram_path(uuid),
                                       self._tpm_dir(uuid))

    async def import_state(self, uuid: str, nvram: bytes, tpm: bytes) -> None:
        """Checked by ``guest_state``: the bytes come from the bus."""
        if not self.state_dir:
            return
        if nvram:
            await asyncio.to_thread(guest_state.write_nvram, await self._nvram_path(uuid), nvram)
        if tpm:
            await asyncio.to_thread(guest_state.unpack_tpm, tpm, self._tpm_dir(uuid),
                                    health.swtpm_owner())

    async def drop_state(self, uuid: str) -> None:
        if not self.state_dir:
            return
        await asyncio.to_thread(guest_state.drop_state, await self._nvram_path(uuid),
                                self._tpm_dir(uuid))

    async def freeze(self, uuid: str) -> bool:
        """``virDomainFSFreeze``; a guest without a connected agent answers an error at once."""
        try:
            frozen = await self._run(f"freezing the filesystems of {uuid}",
                                     lambda: int(self._lookup(uuid).fsFreeze()))
        except PhyError as e:
            log.info("guest agent of %s did not freeze its filesystems (%s); pausing instead",
                     uuid, e.message)
            return False
        return frozen >= 0

    async def thaw(self, uuid: str) -> None:
        await self._run(f"thawing the filesystems of {uuid}",
                        lambda: self._lookup(uuid).fsThaw())

    async def _nvram_path(self, uuid: str) -> str:
        """Where libvirt keeps (or will keep) a UEFI domain's variables: its ``<nvram>``, else
        ``<name>_VARS.fd`` in its NVRAM folder. A path outside that folder is refused, so that
        no domain definition steers a write elsewhere."""
        folder = os.path.join(self.state_dir, "qemu", "nvram")
        dom = await self.domain(uuid)
        chosen = domain_xml.nvram_of(await self.xml(dom.uuid, inactive=True))
        path = os.path.normpath(chosen or os.path.join(
            folder, f"{check_name(dom.name)}_VARS.fd"))
        if os.path.dirname(path) != os.path.normpath(folder):
            raise Forbidden(f"VM {dom.name} keeps its NVRAM in {path}, outside libvirt's "
                            f"folder {folder}: refusing to touch it; set [vm] libvirt_dir if "
                            "this libvirt keeps its files elsewhere")
        return path

    def _tpm_dir(self, uuid: str) -> str:
        """The swtpm state directory of the domain ``uuid`` (as libvirt spells uuids)."""
        return os.path.join(self.state_dir, "swtpm", check_uuid(uuid))

    async def problems(self) -> list[Problem]:
        """/dev/kvm closed to QEMU's user (checked each time), and libvirt re-probing QEMU:
        timed once per connection and again when the node's verdict changes, since on such a
        host each timing holds the libvirt thread for two QEMU probes (seconds each)."""
        kvm = await asyncio.to_thread(health.kvm_access, self.kvm_device)
        when = (self._connections, kvm is None)
        if self.connected and when != self._timed:
            self._timed = when
            seconds = await self._requery_seconds()
            self._reprobing = None if seconds is None else health.reprobing(
                seconds, self.kvm_device)
        return [p for p in (kvm, self._reprobing) if p is not None]

    async def _requery_seconds(self) -> float | None:
        """Seconds libvirt took to answer the same QEMU capability query a second time;
        None when this libvirt has no such query (the test driver)."""
        def work() -> float:
            conn = self._c()
            conn.getDomainCapabilities()
            started = time.monotonic()
            conn.getDomainCapabilities()
            return time.monotonic() - started

        try:
            return await self._run("querying QEMU's capabilities", work)
        except PhyError as e:
            log.debug("QEMU capabilities not timed: %s", e.message)
            return None

    def bulk_stats(self) -> list[DomainStats]:
        conn = self._conn
        if conn is None:
            return []

        def work() -> list[DomainStats]:
            with translated("reading domain statistics"):
                return [_stats(dom, v) for dom, v in conn.getAllDomainStats(_BULK_STATS)]

        return _submit(work).result(timeout=BULK_STATS_TIMEOUT_S)


def _stats(dom: libvirt.virDomain, v: dict[str, Any]) -> DomainStats:
    def total(prefix: str, count_key: str, key: str) -> int:
        return sum(int(v.get(f"{prefix}.{i}.{key}", 0)) for i in range(int(v.get(count_key, 0))))

    state, _ = state_words(int(v.get("state.state", 0)), int(v.get("state.reason", 0)))
    if int(v.get("state.state", 0)) in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_NOSTATE):
        # No QEMU process: libvirt 9 reports its own process's CPU time for such a domain.
        return DomainStats(uuid=dom.UUIDString(), name=dom.name(), state=state)
    return DomainStats(
        uuid=dom.UUIDString(), name=dom.name(), state=state,
        cpu_time_s=int(v.get("cpu.time", 0)) / 1e9,
        memory_bytes=int(v.get("balloon.current", 0)) * 1024,
        memory_rss_bytes=int(v.get("balloon.rss", 0)) * 1024,
        block_read_bytes=total("block", "block.count", "rd.bytes"),
        block_write_bytes=total("block", "block.count", "wr.bytes"),
        block_read_ops=total("block", "block.count", "rd.reqs"),
        block_write_ops=total("block", "block.count", "wr.reqs"),
        net_rx_bytes=total("net", "net.count", "rx.bytes"),
        net_tx_bytes=total("net", "net.count", "tx.bytes"),
        net_rx_packets=total("net", "net.count", "rx.pkts"),
        net_tx_packets=total("net", "net.count", "tx.pkts"),
    )


def _addresses(found: dict[str, Any]) -> list[GuestAddress]:
    """``interfaceAddresses``' answer, loopback left out, sorted by NIC then address."""
    out = []
    for nic, facts in found.items():
        for a in facts.get("addrs") or []:
            family: Literal["ipv4", "ipv6"] = (
                "ipv4" if a.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4 else "ipv6")
            address = str(a.get("addr", ""))
            if nic == "lo" or address in ("127.0.0.1", "::1"):
                continue
            out.append(GuestAddress(nic=nic, mac=str(facts.get("hwaddr") or ""), family=family,
                                    address=address, prefix=int(a.get("prefix", 0))))
    return sorted(out, key=lambda a: (a.nic, a.family, a.address))
