"""What the vm agent needs from a hypervisor: the ``Hypervisor`` Protocol and its data.

The Protocol speaks ``VmSpec`` and domain facts (state, uuid, name, counters, console
endpoints); each backend turns a spec into its own configuration and reads facts back from
it. ``libvirt_backend.LibvirtHypervisor`` is the implementation today (libvirt domain XML,
built by ``domain_xml``, never leaves it); a Cloud Hypervisor backend can implement the same
Protocol later. Handlers depend only on this module, so unit tests hand them a small fake::

    class FakeHypervisor:  # implements Hypervisor
        ...
    handlers = Handlers(agent, FakeHypervisor(), ...)
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import msgspec

from services.vm.accel import Accel
from shared.messages.hosts import Problem
from shared.messages.net import Network, NetworkSpec
from shared.messages.vm import (
    AddressSource,
    ConsoleEndpoint,
    Disk,
    GuestAddress,
    Nic,
    UsbHostdev,
    VmSpec,
    VmState,
)

Device = Disk | Nic | UsbHostdev


class Domain(msgspec.Struct, frozen=True, kw_only=True):
    """A domain as the hypervisor lists it; ``spec`` is None when the agent did not make it."""

    uuid: str
    name: str
    state: VmState
    reason: str = ""
    spec: VmSpec | None = None
    accelerator: Accel = "tcg"
    autostart: bool = False


class DomainStats(msgspec.Struct, frozen=True, kw_only=True):
    """Counters of one domain from the hypervisor's bulk statistics call."""

    uuid: str
    name: str
    state: VmState
    cpu_time_s: float = 0.0
    memory_bytes: int = 0  # what the guest has now (balloon)
    memory_rss_bytes: int = 0  # what the host process uses
    block_read_bytes: int = 0
    block_write_bytes: int = 0
    block_read_ops: int = 0
    block_write_ops: int = 0
    net_rx_bytes: int = 0
    net_tx_bytes: int = 0
    net_rx_packets: int = 0
    net_tx_packets: int = 0


class DomainEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A lifecycle event: ``event`` is libvirt's word for it (started, stopped, ...)."""

    uuid: str
    name: str
    event: str
    reason: str = ""


class Reconnected(msgspec.Struct, frozen=True, kw_only=True):
    """The hypervisor connection came back: events may have been missed, reconcile."""


HypervisorNews = DomainEvent | Reconnected


class Hypervisor(Protocol):
    """Domains of one host. Methods raise ``shared.errors`` (NotFound, Conflict, ...)."""

    news: asyncio.Queue[HypervisorNews]
    connected: bool

    async def connect(self) -> None: ...
    async def close(self) -> None: ...
    async def host_memory_mib(self) -> int: ...
    async def domains(self) -> list[Domain]: ...
    async def defined_memory_mib(self) -> int:
        """Memory of every domain defined here, running or not (each one's maximum)."""
        ...
    async def domain(self, ref: str) -> Domain: ...
    async def define(self, spec: VmSpec, *, accelerator: Accel, console_log: str) -> Domain:
        """Define (or redefine, same uuid) the domain of a checked spec; the serial console
        is logged to ``console_log``."""
        ...
    async def undefine(self, uuid: str) -> None: ...
    async def start(self, uuid: str) -> None: ...
    async def shutdown(self, uuid: str) -> None: ...
    async def destroy(self, uuid: str) -> None: ...
    async def reboot(self, uuid: str) -> None: ...
    async def suspend(self, uuid: str) -> None: ...
    async def resume(self, uuid: str) -> None: ...
    async def set_autostart(self, uuid: str, on: bool) -> None: ...
    async def spec(self, uuid: str) -> VmSpec | None:
        """The spec the domain was defined from, with the console password that only the
        hypervisor keeps; None for a domain the agent did not make."""
        ...
    async def consoles(self, uuid: str) -> dict[str, ConsoleEndpoint]:
        """The VNC and SPICE endpoints of a running domain, by kind (ports exist once it runs)."""
        ...
    async def serial_pty(self, uuid: str) -> str:
        """The host's end of a running domain's serial port (a pty path); Conflict if none."""
        ...

    async def vsock_cid(self, uuid: str) -> int:
        """The guest CID of a running domain's vsock device (0 without one)."""
        ...
    async def screenshot(self, uuid: str) -> tuple[str, bytes]:
        """A running domain's screen: (MIME type, image: PPM or PNG)."""
        ...
    async def stats(self, uuid: str) -> DomainStats: ...
    async def addresses(self, uuid: str) -> tuple[AddressSource, list[GuestAddress]]:
        """A running guest's IP addresses: from its guest agent when it answers, else from
        the DHCP leases of its networks; ("", []) when neither knows any."""
        ...
    async def attach(self, uuid: str, spec: VmSpec, device: Device) -> None:
        """Add ``device`` to a running domain, live and to its definition, whose spec becomes
        ``spec``; when the live attach fails, the definition is left as it was."""
        ...
    async def detach(self, uuid: str, spec: VmSpec, device: Device) -> None:
        """Remove ``device`` from a running domain, live and from its definition."""
        ...
    async def change_media(self, uuid: str, spec: VmSpec) -> None:
        """Give a running domain's CD-ROM drive the medium of ``spec.cdrom`` (none: eject),
        live and in its definition, whose spec becomes ``spec``."""
        ...
    async def networks(self) -> list[Network]: ...
    async def define_network(self, spec: NetworkSpec) -> Network:
        """Define a checked network, set to start with the host (not started)."""
        ...
    async def start_network(self, name: str) -> None: ...
    async def delete_network(self, name: str) -> None:
        """Stop (if active) and undefine a network."""
        ...
    async def copy_state(self, src_uuid: str, dst_uuid: str) -> None:
        """Give ``dst`` a copy of ``src``'s NVRAM (UEFI variables) and TPM state."""
        ...
    async def export_state(self, uuid: str) -> tuple[bytes, bytes]:
        """(NVRAM file, swtpm state dir as a gzipped tar) of a stopped domain; b"" if none."""
        ...
    async def import_state(self, uuid: str, nvram: bytes, tpm: bytes) -> None:
        """Install what ``export_state`` gave, for the domain of the same uuid here."""
        ...
    async def drop_state(self, uuid: str) -> None:
        """Remove a stopped domain's NVRAM file and TPM state: its next start makes fresh
        ones (a revert to a snapshot taken before the VM ever ran)."""
        ...
    async def freeze(self, uuid: str) -> bool:
        """Freeze the guest's filesystems through its guest agent; False (and nothing
        frozen) when no agent answers."""
        ...
    async def thaw(self, uuid: str) -> None: ...
    async def problems(self) -> list[Problem]:
        """What an operator should fix on this host for the hypervisor to work well (each with
        the fix); called now and then, so it must be cheap when all is well."""
        ...
    def bulk_stats(self) -> list[DomainStats]:
        """Every domain's counters in one call; called from the metrics scrape thread."""
        ...
