"""``phyllome net``: the host's virtual networks (the vm agent's libvirt networks).

    phyllome net list                              # networks, and the host's bridges
    phyllome net create lab --nat 10.77.0.0/24     # DHCP + DNS, NAT to the outside
    phyllome net create lab2 --isolated 10.78.0.0/24
    phyllome net create lan --bridge br0           # guests join the host's bridge br0
    phyllome net delete lab

Every host has the NAT network ``phyllome``, where `phyllome vm create` puts a VM's NIC
unless ``--nic`` says otherwise. A subnet that overlaps a host route or another network is
refused.
"""

from __future__ import annotations

import argparse

from cli import common
from shared.messages import Empty
from shared.messages import net as net_api
from shared.messages.net import NetCreate, NetRef, NetworkSpec

COLUMNS = [("name", "NAME"), ("mode", "MODE"), ("subnet", "SUBNET"), ("bridge", "BRIDGE"),
           ("active", "ACTIVE"), ("autostart", "AUTOSTART")]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    net = sub.add_parser("net", help="virtual networks: list, create, delete")
    cmds = net.add_subparsers(dest="net_command", metavar="COMMAND")

    p = cmds.add_parser("list", help="the host's networks and bridges")
    common.add_common(p)
    p.set_defaults(func=cmd_list)

    p = cmds.add_parser("create", help="a NAT, isolated or bridged network")
    common.add_common(p)
    p.add_argument("name")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--nat", metavar="SUBNET", help="NAT to the outside, e.g. 10.77.0.0/24")
    mode.add_argument("--isolated", metavar="SUBNET", help="guests and host only")
    mode.add_argument("--bridge", metavar="BRIDGE", help="an existing host bridge, e.g. br0")
    p.set_defaults(func=cmd_create)

    p = cmds.add_parser("delete", help="stop and remove a network no VM uses")
    common.add_common(p)
    p.add_argument("name")
    p.set_defaults(func=cmd_delete)


def cmd_list(args: argparse.Namespace) -> None:
    reply = common.request(args, net_api.NET_LIST, Empty())
    if args.json:
        common.print_json(reply)
        return
    common.print_table([{k: getattr(n, k) for k, _ in COLUMNS} for n in reply.networks],
                       COLUMNS)
    if reply.bridges:
        common.console.print(f"host bridges: {', '.join(reply.bridges)}", highlight=False)


def cmd_create(args: argparse.Namespace) -> None:
    if args.bridge:
        spec = NetworkSpec(name=args.name, mode="bridge", bridge=args.bridge)
    else:
        spec = NetworkSpec(name=args.name, mode="nat" if args.nat else "isolated",
                           subnet=args.nat or args.isolated)
    common.show(args, common.request(args, net_api.NET_CREATE, NetCreate(spec=spec)))


def cmd_delete(args: argparse.Namespace) -> None:
    ack = common.request(args, net_api.NET_DELETE, NetRef(name=args.name))
    if args.json:
        common.print_json(ack)
    else:
        common.console.print(ack.message, highlight=False)
