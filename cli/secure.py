"""``phyllome secure init``: NATS identities and TLS certificates for a cluster.

    phyllome secure init --dir /etc/phyllome/secure --hosts h1,h2,h3 --names 10.0.0.1,...

Copy the folder to every host (it holds private keys: mode 700), point each host's
nats-server at ``nats-auth.conf`` (``include``), and give each agent its ``<host>-<agent>.env``
(the systemd units read it as an EnvironmentFile). ``phyllome up --secure`` does the same for
one host by itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from shared import security, subjects


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("secure", help="NATS identities and TLS for a host or cluster")
    s = p.add_subparsers(dest="secure_command", metavar="COMMAND", required=True)
    init = s.add_parser("init", help="create (or extend) identities and certificates")
    init.add_argument("--dir", required=True, type=Path, help="where to write them")
    init.add_argument("--hosts", required=True,
                      help="comma-separated host names (PHYLLOME_HOST of each host)")
    init.add_argument("--names", default="",
                      help="extra DNS names or IPs the servers are reached by (certificate)")
    init.set_defaults(func=cmd_init)


def cmd_init(args: argparse.Namespace) -> None:
    hosts = [subjects.token(h.strip(), "host") for h in args.hosts.split(",") if h.strip()]
    names = [n.strip() for n in args.names.split(",") if n.strip()]
    known = args.dir / "hosts.json"
    if known.exists():
        import json

        hosts = sorted(set(hosts) | set(json.loads(known.read_text())))
    users = security.generate(args.dir, hosts, names)
    (args.dir / "nats-auth.conf").write_text(security.server_conf(args.dir))
    print(f"{len(users)} identities and TLS certificates in {args.dir}:")
    print(f"  nats-server: include {args.dir / 'nats-auth.conf'}")
    print(f"  agents:      {args.dir}/<host>-<agent>.env   CLI: {args.dir}/operator.env")
    print(f"  monitoring:  {args.dir}/monitor.env (read-only)")
