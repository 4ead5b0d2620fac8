"""Guests' IP addresses: read now and then from every running VM with a NIC, published as
``VmAddressesChanged`` on ``phy.evt.<host>.vm.addresses.<uuid>`` when they change.

The QEMU guest agent answers first (every address of every interface); without one the
network's DHCP leases do (IPv4 of NICs on libvirt NAT or isolated networks). A guest that
stops, or loses its addresses, gets one last event with none.

A VM seen running with no address yet is read every ``fast_s`` (1 s) for up to
``FAST_FOR_S`` after the pass that first saw it so: its first address (a DHCP lease as soon
as dnsmasq hands it out, then the guest agent's) is published within a second rather than
within ``interval_s``, which is what a user waiting to log in sees. Once every such VM has
an address, or has had its window, the slow interval applies again::

    watch = AddressWatch(agent, hypervisor)
    agent.spawn(watch.run(5.0), "addresses")
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.vm.hypervisor import Hypervisor
from services.vm.state import RUNNING
from shared.agent import Agent
from shared.errors import PhyError
from shared.messages.vm import AddressSource, GuestAddress, VmAddressesChanged

log = logging.getLogger("phyllome.vm.addresses")

Seen = tuple[AddressSource, list[GuestAddress]]
NONE: Seen = ("", [])
FAST_S = 1.0
FAST_FOR_S = 300.0  # a boot under TCG on a loaded host takes 1-3 minutes to its first lease


class AddressWatch:
    """The last addresses seen per VM, and the loop that publishes their changes."""

    def __init__(self, agent: Agent, hypervisor: Hypervisor) -> None:
        self.agent = agent
        self.hv = hypervisor
        self.seen: dict[str, tuple[str, Seen]] = {}  # uuid -> (name, addresses), none empty
        # uuid -> when a pass first saw it running with no address (monotonic)
        self.waiting: dict[str, float] = {}

    def fast(self) -> bool:
        """Whether a running VM is still waiting for its first address, within its window."""
        now = time.monotonic()
        return any(now - since < FAST_FOR_S for since in self.waiting.values())

    async def run(self, interval_s: float, fast_s: float = FAST_S) -> None:
        while True:
            try:
                await self.check()
            except PhyError as e:
                log.debug("addresses not read: %s", e.message)
            await asyncio.sleep(min(fast_s, interval_s) if self.fast() else interval_s)

    async def check(self) -> None:
        """One pass over the domains; publishes what changed since the last pass."""
        if not self.hv.connected:
            return
        current: dict[str, tuple[str, Seen]] = {}
        running: list[str] = []
        for dom in await self.hv.domains():
            if dom.spec is None or not dom.spec.nics or dom.state not in RUNNING:
                continue
            running.append(dom.uuid)
            try:
                current[dom.uuid] = (dom.name, await self.hv.addresses(dom.uuid))
            except PhyError as e:  # stopped or undefined meanwhile: next pass
                log.debug("addresses of %s not read: %s", dom.name, e.message)
        now = time.monotonic()
        self.waiting = {uuid: self.waiting.get(uuid, now) for uuid in running
                        if not current.get(uuid, ("", NONE))[1][1]}
        for uuid in set(self.seen) - set(current):
            current[uuid] = (self.seen[uuid][0], NONE)
        for uuid, (name, seen) in current.items():
            if self.seen.get(uuid, (name, NONE))[1] == seen:
                continue
            if seen[1]:
                self.seen[uuid] = (name, seen)
            else:
                self.seen.pop(uuid, None)
            await self.agent.publish("addresses", VmAddressesChanged(
                host=self.agent.host, uuid=uuid, name=name, addresses=seen[1], source=seen[0]),
                uuid)
