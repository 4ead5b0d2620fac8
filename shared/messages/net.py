"""Messages and endpoints of the vm agent's virtual networks (``phyllome net``).

A network is a libvirt network of the host: ``nat`` (a bridge with DHCP and DNS from dnsmasq,
guests reach out through the host's NAT), ``isolated`` (the same without the way out), or
``bridge`` (guests join an existing host bridge; the LAN's DHCP serves them). The vm agent
of every host keeps a NAT network ``phyllome`` (``DEFAULT_NETWORK``), where new VMs get their
NIC unless told otherwise. The endpoints belong to the vm agent (``phy.<host>.vm.net_*``)::

    >>> from shared.codec import encode
    >>> encode(NetworkSpec(name="lab", mode="nat", subnet="10.77.0.0/24"))
    b'{"type":"net.spec.v1","name":"lab","mode":"nat","subnet":"10.77.0.0/24"}'
"""

from __future__ import annotations

from typing import Literal

import msgspec

from shared.messages import Ack, Empty, EndpointSpec

DEFAULT_NETWORK = "phyllome"
NetworkMode = Literal["nat", "isolated", "bridge"]


class NetworkSpec(msgspec.Struct, frozen=True, kw_only=True, tag="net.spec.v1"):
    """What a network should be: ``subnet`` (IPv4 CIDR) for nat/isolated, ``bridge`` (an
    existing host bridge) for bridge; the host takes the subnet's first address."""

    name: str
    mode: NetworkMode = "nat"
    subnet: str = ""
    bridge: str = ""


class Network(msgspec.Struct, frozen=True, kw_only=True, tag="net.network.v1"):
    """A network as the host has it; ``bridge`` is the host bridge guests' NICs join."""

    name: str
    mode: NetworkMode
    subnet: str = ""
    bridge: str = ""
    active: bool = False
    autostart: bool = False


class NetList(msgspec.Struct, frozen=True, kw_only=True, tag="net.list.v1"):
    """The host's libvirt networks, and its bridges (that ``bridge`` NICs can join)."""

    networks: list[Network]
    bridges: list[str] = []


class NetCreate(msgspec.Struct, frozen=True, kw_only=True, tag="net.create.v1"):
    """Define, start and autostart a network."""

    spec: NetworkSpec


class NetRef(msgspec.Struct, frozen=True, kw_only=True, tag="net.ref.v1"):
    name: str


NET_LIST = EndpointSpec("vm", "net_list", Empty, NetList, "The host's virtual networks.")
NET_CREATE = EndpointSpec(
    "vm", "net_create", NetCreate, Network,
    "Create a NAT, isolated or bridged network (subnets that collide are refused).")
NET_DELETE = EndpointSpec(
    "vm", "net_delete", NetRef, Ack, "Stop and remove a network no VM of the host uses.")

ENDPOINTS = (NET_LIST, NET_CREATE, NET_DELETE)
