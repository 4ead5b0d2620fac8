"""Guests' IP addresses: read now and then from every running VM with a NIC, published as
``VmAddressesChanged`` on ``phy.evt.<host>.vm.addresses.<uuid>`` when they change.

The QEMU guest agent answers first (every address of every interface); without one the
network's DHCP leases do (IPv4 of NICs on libvirt NAT or isolated networks). A guest that
stops, or loses its addresses, gets one last event with none::

    watch = AddressWatch(agent, hypervisor)
    agent.spawn(watch.run(5.0), "addresses")
"""

from __future__ import annotations

import asyncio
import logging

from services.vm.hypervisor import Hypervisor
from services.vm.state import RUNNING
from shared.agent import Agent
from shared.errors import PhyError
from shared.messages.vm import AddressSource, GuestAddress, VmAddressesChanged

log = logging.getLogger("phyllome.vm.addresses")

Seen = tuple[AddressSource, list[GuestAddress]]
NONE: Seen = ("", [])


class AddressWatch:
    """The last addresses seen per VM, and the loop that publishes their changes."""

    def __init__(self, agent: Agent, hypervisor: Hypervisor) -> None:
        self.agent = agent
        self.hv = hypervisor
        self.seen: dict[str, tuple[str, Seen]] = {}  # uuid -> (name, addresses), none empty

    async def run(self, interval_s: float) -> None:
        while True:
            try:
                await self.check()
            except PhyError as e:
                log.debug("addresses not read: %s", e.message)
            await asyncio.sleep(interval_s)

    async def check(self) -> None:
        """One pass over the domains; publishes what changed since the last pass."""
        if not self.hv.connected:
            return
        current: dict[str, tuple[str, Seen]] = {}
        for dom in await self.hv.domains():
            if dom.spec is None or not dom.spec.nics or dom.state not in RUNNING:
                continue
            try:
                current[dom.uuid] = (dom.name, await self.hv.addresses(dom.uuid))
            except PhyError as e:  # stopped or undefined meanwhile: next pass
                log.debug("addresses of %s not read: %s", dom.name, e.message)
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
