"""The host's virtual networks: the NAT network ``phyllome`` kept at every start, and the
``net_*`` endpoints, with subnets that would collide with the host's routes or another
network refused before libvirt sees them::

    networks = Networks(hypervisor, nat_subnet="")
    problem = await networks.ensure_default()     # None, or why VMs have no NAT network
    await networks.create(NetCreate(spec=NetworkSpec(name="lab", subnet="10.77.0.0/24")))
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Iterable

from services.vm import hostfs
from services.vm.hypervisor import Hypervisor
from services.vm.spec import check_network
from shared.errors import Conflict, NotFound, PhyError
from shared.messages import Ack, Empty
from shared.messages.hosts import Problem
from shared.messages.net import (
    DEFAULT_NETWORK,
    NetCreate,
    NetList,
    NetRef,
    Network,
    NetworkSpec,
)

log = logging.getLogger("phyllome.vm.networks")

Routes = list[tuple[ipaddress.IPv4Network, str]]
AUTO_SUBNET = "10.89.{}.0/24"  # where the default network's subnet is looked for


def collision(net: ipaddress.IPv4Network, routes: Routes, networks: Iterable[Network]) -> str:
    """Why ``net`` cannot be a new network here ("" when it can)."""
    for other in networks:
        if other.subnet and net.overlaps(ipaddress.ip_network(other.subnet)):
            return (f"subnet {net} overlaps network {other.name} ({other.subnet}); choose "
                    "another subnet")
    for dst, dev in routes:
        if net.overlaps(dst):
            return (f"subnet {net} overlaps the host's route to {dst} (dev {dev}); choose "
                    "another subnet")
    return ""


def free_subnet(routes: Routes, networks: list[Network]) -> ipaddress.IPv4Network:
    for i in range(256):
        net = ipaddress.IPv4Network(AUTO_SUBNET.format(i))
        if not collision(net, routes, networks):
            return net
    raise Conflict(f"every subnet {AUTO_SUBNET.format('x')} is taken on this host: "
                   "set [vm] nat_subnet")


class Networks:
    """The network endpoints and the default network of one host's hypervisor."""

    def __init__(self, hypervisor: Hypervisor, *, nat_subnet: str = "") -> None:
        self.hv = hypervisor
        self.nat_subnet = nat_subnet

    async def ensure_default(self) -> Problem | None:
        """Define (once), autostart and start the NAT network ``phyllome``; what went wrong
        is returned as the host's problem rather than raised, since VMs without a NIC on it
        still work."""
        try:
            have = {n.name: n for n in await self.hv.networks()}
            net = have.get(DEFAULT_NETWORK)
            if net is None:
                subnet = self.nat_subnet or str(free_subnet(await hostfs.host_routes(),
                                                            list(have.values())))
                spec = NetworkSpec(name=DEFAULT_NETWORK, mode="nat", subnet=subnet)
                await self._check_free(spec)
                net = await self.hv.define_network(spec)
                log.info("defined the NAT network %s on %s", DEFAULT_NETWORK, subnet)
            if not net.active:
                await self.hv.start_network(DEFAULT_NETWORK)
        except PhyError as e:
            log.warning("network %s is not running: %s", DEFAULT_NETWORK, e.message)
            return Problem(kind="network", what=f"the NAT network {DEFAULT_NETWORK} is not "
                           f"running ({e.message}): VMs with a NIC on it do not start",
                           fix="install dnsmasq-base (deploy/setup.sh packages) and restart "
                               "the vm agent; or set [vm] nat_subnet to a free subnet")
        return None

    async def _check_free(self, spec: NetworkSpec) -> None:
        net = check_network(spec)
        existing = await self.hv.networks()
        if any(n.name == spec.name for n in existing):
            raise Conflict(f"network {spec.name} exists already; `phyllome net list` shows it")
        if net is None:
            if spec.bridge not in await asyncio.to_thread(hostfs.host_bridges):
                raise NotFound(f"no bridge {spec.bridge} on this host: create it first (ip "
                               f"link add {spec.bridge} type bridge) or give another")
            return
        why = collision(net, await hostfs.host_routes(), existing)
        if why:
            raise Conflict(why)

    async def net_list(self, req: Empty) -> NetList:
        networks = await self.hv.networks()
        bridges = await asyncio.to_thread(hostfs.host_bridges)
        return NetList(networks=sorted(networks, key=lambda n: n.name), bridges=bridges)

    async def net_create(self, req: NetCreate) -> Network:
        await self._check_free(req.spec)
        await self.hv.define_network(req.spec)
        try:
            await self.hv.start_network(req.spec.name)
        except PhyError as e:
            await self.hv.delete_network(req.spec.name)
            raise type(e)(f"network {req.spec.name} did not start, so it was removed again: "
                          f"{e.message}") from None
        return next(n for n in await self.hv.networks() if n.name == req.spec.name)

    async def net_delete(self, req: NetRef, users: list[str]) -> Ack:
        """``users``: the VMs of this host with a NIC on it (refused while there are any)."""
        if req.name not in {n.name for n in await self.hv.networks()}:
            raise NotFound(f"no network {req.name!r} on this host; `phyllome net list`")
        if users:
            raise Conflict(f"network {req.name} is used by {', '.join(sorted(users))}: detach "
                           "their NICs (`phyllome vm detach-nic`) or delete them first")
        await self.hv.delete_network(req.name)
        again = (" (the vm agent defines it again at its next start, on [vm] nat_subnet if "
                 "set)" if req.name == DEFAULT_NETWORK else "")
        return Ack(message=f"deleted network {req.name}{again}")
