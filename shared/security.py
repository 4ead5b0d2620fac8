"""Least-privilege NATS identities and TLS for a Phyllome host or cluster.

``generate(dir, hosts)`` writes a CA and a server certificate (openssl), one user per agent
and one for the web gateway of each host, an ``operator`` (the CLI) and a ``monitor``
(read-only), and ``admin`` (used
only by ``phyllome up --secure`` to create the stream and buckets); ``server_conf(dir)`` is
the nats-server ``authorization`` + ``tls`` block; each identity gets an env file::

    generate(Path("/var/lib/phyllome/secure"), ["h1", "h2"])
    # h1-vm.env: PHYLLOME_NATS_USER=h1-vm PHYLLOME_NATS_PASSWORD=... PHYLLOME_NATS_CA=.../ca.pem

Permissions (``permissions(role, host)``): an agent serves only ``phy.<host>.<agent>.*``,
calls only the peer endpoints ``PEER_CALLS`` names for it, publishes only its own events
``phy.evt.<host>.<agent>.>``, its own heartbeat key and its own kept replies
(``idempotency`` keys ``<host>.<agent>.>``), and reads only the KV buckets it needs; the
operator may request any endpoint but the ``AGENT_ONLY`` ones, and may not publish events or
write KV but the web tokens; the web gateway may request what the operator may, publish only
its audit events and read the tokens; the monitor may only read.

The permission layer is the only guard on who calls what: a NATS request carries no identity
its receiver can trust (headers are whatever the publisher wrote), so a handler cannot tell
the host's vm agent from anyone else.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path
from typing import Any, Literal

from shared import subjects
from shared.errors import BackendError
from shared.messages import EndpointSpec
from shared.messages import catalogue as catalogue_api
from shared.messages import hardware as hardware_api
from shared.messages import net as net_api
from shared.messages import storage as storage_api
from shared.messages import vm as vm_api

ROLES = (*subjects.SERVICES, subjects.WEB, "operator", "monitor", "admin")
# KV buckets each role may read (watch/get) and write (put).
KV_READ = {
    "hardware": [subjects.KV_HOSTS, subjects.KV_IDEMPOTENCY, subjects.KV_WATCHERS],
    "vm": [subjects.KV_HOSTS, subjects.KV_VMS, subjects.KV_IMAGES, subjects.KV_IDEMPOTENCY],
    "storage": [subjects.KV_HOSTS, subjects.KV_VMS, subjects.KV_IDEMPOTENCY],
    "catalogue": [subjects.KV_HOSTS, subjects.KV_IMAGES, subjects.KV_IDEMPOTENCY],
    subjects.WEB: [subjects.KV_HOSTS, subjects.KV_VMS, subjects.KV_IMAGES, subjects.KV_WEB_TOKENS],
    "operator": [subjects.KV_HOSTS, subjects.KV_VMS, subjects.KV_IMAGES, subjects.KV_WEB_TOKENS],
    "monitor": [subjects.KV_HOSTS, subjects.KV_VMS, subjects.KV_IMAGES],
}
# (a hardware agent may take any of the host watch's leases: whoever holds one watches)
KV_WRITE = {"vm": [subjects.KV_VMS], "catalogue": [subjects.KV_IMAGES],
            "hardware": [subjects.KV_WATCHERS]}

Reach = Literal["own", "any"]
# The peer endpoints each agent calls, and where: "own" = on its own host only
# (phy.<host>.<svc>.<verb>), "any" = on every host (phy.*.<svc>.<verb>; cold migration and
# disk transfers). Each entry is a publish permission of that agent's identity, and nothing
# else is; tests/unit/test_peer_calls.py checks the table against the code's bus.call()s both
# ways, so a new peer call fails there before it fails in a secure cluster.
PEER_CALLS: dict[str, dict[Reach, tuple[EndpointSpec[Any, Any], ...]]] = {
    "hardware": {},
    "vm": {
        # create and start: devices, nested, the boot probe, disks from volumes and images
        # (waiting out a pull of the image that runs already);
        # snapshots, backups and restores: the pools' copies and archives
        "own": (hardware_api.CAPS, hardware_api.DEVICE, hardware_api.LIST,
                hardware_api.BOOT_PROBE, storage_api.CLONE, storage_api.IMPORT_FILE,
                catalogue_api.INFO, catalogue_api.JOB, storage_api.SNAPSHOT, storage_api.SNAPSHOTS,
                storage_api.SNAPSHOT_READ, storage_api.SNAPSHOT_RESTORE,
                storage_api.SNAPSHOT_DELETE, storage_api.SNAPSHOT_EXPORT,
                storage_api.SNAPSHOT_IMPORT,
                # a blank disk to install onto (--disk-size)
                storage_api.CREATE,
                # a migration that stops its own disk stream
                storage_api.CANCEL),
        # cold migration: the VM, its disks and its NVRAM/TPM state on source and target,
        # the target's networks
        "any": (vm_api.INFO, vm_api.SHUTDOWN, vm_api.CREATE, vm_api.DELETE,
                vm_api.EXPORT_STATE, vm_api.IMPORT_STATE, net_api.NET_LIST,
                storage_api.INFO, storage_api.SEND,
                storage_api.DELETE, storage_api.JOB),
    },
    # a disk transfer, sender to receiver (its pools first: is it there, has it the pool)
    "storage": {"any": (storage_api.POOLS, storage_api.RECEIVE, storage_api.RECEIVE_COMMIT,
                        storage_api.RECEIVE_ABORT)},
    "catalogue": {},
}
# Subjects outside the endpoints an agent publishes to a peer of any host: the transfer chunks
# (services/storage/transfer.py's chunk_subject), as (service, verb) of phy.*.<svc>.<verb>.
PEER_SUBJECTS: dict[str, tuple[tuple[str, str], ...]] = {"storage": (("storage", "chunk"),)}
# Endpoints only agents call; the operator is refused them: the boot probe marks KVM usable,
# export_state/import_state read and write a VM's NVRAM and TPM state, receive* publish a
# transferred disk, the storage snapshot endpoints hold and write VMs' TPM state and disks
# (the operator goes through the vm agent's snapshot, backup and restore).
AGENT_ONLY: tuple[EndpointSpec[Any, Any], ...] = (
    hardware_api.BOOT_PROBE, vm_api.EXPORT_STATE, vm_api.IMPORT_STATE, storage_api.RECEIVE,
    storage_api.RECEIVE_COMMIT, storage_api.RECEIVE_ABORT, storage_api.SNAPSHOT,
    storage_api.SNAPSHOT_READ, storage_api.SNAPSHOT_RESTORE, storage_api.SNAPSHOT_DELETE,
    storage_api.SNAPSHOT_EXPORT, storage_api.SNAPSHOT_IMPORT)


def peer_subjects(role: str, host: str) -> list[str]:
    """The request subjects an agent of ``host`` may publish: its ``PEER_CALLS``."""
    calls = PEER_CALLS[role]
    anywhere = {(s.service, s.verb) for s in calls.get("any", ())}
    anywhere |= set(PEER_SUBJECTS.get(role, ()))
    own = {(s.service, s.verb) for s in calls.get("own", ())} - anywhere
    return ([subjects.command(host, svc, verb) for svc, verb in sorted(own)]
            + [f"phy.*.{svc}.{verb}" for svc, verb in sorted(anywhere)])


def _reads(buckets: list[str], stream_reads: bool) -> list[str]:
    """JetStream API subjects to read these KV buckets (and the event stream)."""
    out = ["$JS.API.INFO"]
    for b in buckets:
        out += [f"$JS.API.STREAM.INFO.KV_{b}", f"$JS.API.CONSUMER.CREATE.KV_{b}",
                f"$JS.API.CONSUMER.CREATE.KV_{b}.>", f"$JS.API.CONSUMER.DELETE.KV_{b}.>",
                f"$JS.API.CONSUMER.INFO.KV_{b}.>", f"$JS.API.DIRECT.GET.KV_{b}.>",
                f"$JS.API.STREAM.MSG.GET.KV_{b}", f"$JS.FC.KV_{b}.>",
                f"$JS.API.CONSUMER.MSG.NEXT.KV_{b}.>"]
    if stream_reads:
        s = subjects.STREAM
        out += [f"$JS.API.STREAM.INFO.{s}", f"$JS.API.CONSUMER.CREATE.{s}",
                f"$JS.API.CONSUMER.CREATE.{s}.>", f"$JS.API.CONSUMER.DELETE.{s}.>",
                f"$JS.API.CONSUMER.INFO.{s}.>", f"$JS.API.CONSUMER.MSG.NEXT.{s}.>",
                f"$JS.ACK.{s}.>", f"$JS.FC.{s}.>"]
    return out


def permissions(role: str, host: str = "") -> dict[str, Any]:
    """The nats-server permissions block of an identity."""
    if role == "admin":
        return {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    inbox = "_INBOX.>"
    if role in subjects.SERVICES:
        subjects.token(host, "host")
        own = f"{host}.{role}"
        publish = [
            *peer_subjects(role, host),
            f"phy.evt.{own}.>",  # its own events only
            f"$KV.{subjects.KV_HOSTS}.{own}",  # its own heartbeat only
            f"$KV.{subjects.KV_IDEMPOTENCY}.{own}.>",  # its own kept replies only
            *[f"$KV.{b}.>" for b in KV_WRITE.get(role, [])],
            *_reads(KV_READ[role], stream_reads=True),
            "$SRV.>",
        ]
        subscribe = [f"phy.{own}.*", "$SRV.>", inbox]
        if role == "vm":  # its consoles' sessions (shared/console.py): the VM's end
            publish.append(f"phy.con.{host}.*.client")
            subscribe.append(f"phy.con.{host}.*.vm")
        return {
            "publish": {"allow": publish, "deny": ["phy.evt.*.*"]},
            "subscribe": {"allow": subscribe},
            "allow_responses": True,
        }
    not_agents = [*(f"phy.*.{s.service}.{s.verb}" for s in AGENT_ONLY),
                  *(f"phy.*.{svc}.{verb}" for r in PEER_SUBJECTS.values() for svc, verb in r)]
    if role == "operator":
        # ``phyllome web token create`` writes the tokens' bucket; no other KV.
        tokens = subjects.KV_WEB_TOKENS
        return {
            "publish": {"allow": ["phy.*.*.*", "$SRV.>", f"$KV.{tokens}.>",
                                  *_reads(KV_READ[role], True)],
                        "deny": ["phy.evt.>", *(f"$KV.{b}.>" for b in subjects.KV_BUCKETS
                                                if b != tokens), *not_agents]},
            "subscribe": {"allow": [inbox]},
        }
    if role == subjects.WEB:
        # The gateway calls what the operator may (its tokens' roles narrow it further) and
        # publishes its own audit events; events have five tokens or more, so ``phy.*.*.*``
        # publishes none.
        subjects.token(host, "host")
        return {
            "publish": {"allow": ["phy.*.*.*", f"phy.evt.{host}.{subjects.WEB}.>", "$SRV.>",
                                  "phy.con.*.*.vm", *_reads(KV_READ[role], True)],
                        "deny": ["$KV.>", *not_agents]},
            "subscribe": {"allow": [inbox, "phy.con.*.*.client"]},  # the browser's end
        }
    if role == "monitor":
        return {
            "publish": {"allow": ["$SRV.>", *_reads(KV_READ[role], True)],
                        "deny": ["phy.>", "$KV.>"]},
            "subscribe": {"allow": [inbox, "phy.evt.>"]},
        }
    raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")


def identities(hosts: list[str]) -> list[tuple[str, str, str]]:
    """(user, role, host) of every identity of these hosts."""
    out = [(f"{h}-{a}", a, h) for h in hosts for a in (*subjects.SERVICES, subjects.WEB)]
    return out + [("operator", "operator", ""), ("monitor", "monitor", ""), ("admin", "admin", "")]


def _openssl(*args: str) -> None:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise BackendError(f"openssl {args[0]} failed: {done.stderr.strip()[-300:]}")


def make_certs(d: Path, names: list[str]) -> None:
    """A CA and a server certificate for ``names`` (DNS names or IPs), unless present."""
    if (d / "server.pem").exists():
        return
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-days", "3650", "-subj", "/CN=Phyllome CA", "-keyout",
             str(d / "ca-key.pem"), "-out", str(d / "ca.pem"))
    sans = ",".join(f"IP:{n}" if n.replace(".", "").isdigit() or ":" in n else f"DNS:{n}"
                    for n in ["localhost", "127.0.0.1", *names])
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-subj", "/CN=phyllome-nats", "-keyout", str(d / "server-key.pem"), "-out",
             str(d / "server.csr"))
    ext = d / "server.ext"
    ext.write_text(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"), "-CAkey",
             str(d / "ca-key.pem"), "-CAcreateserial", "-days", "3650", "-extfile", str(ext),
             "-out", str(d / "server.pem"))
    for key in ("ca-key.pem", "server-key.pem"):
        os.chmod(d / key, 0o600)


def generate(d: Path, hosts: list[str], names: list[str] | None = None) -> dict[str, str]:
    """Create (or extend) the identities and certificates; returns user -> password."""
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    make_certs(d, [*hosts, *(names or [])])
    users_file = d / "users.json"
    users: dict[str, str] = json.loads(users_file.read_text()) if users_file.exists() else {}
    for user, _role, _host in identities(hosts):
        users.setdefault(user, secrets.token_urlsafe(24))
    users_file.write_text(json.dumps(users, indent=2))
    os.chmod(users_file, 0o600)
    for user, _role, _host in identities(hosts):
        env = d / f"{user}.env"
        env.write_text(f"PHYLLOME_NATS_USER={user}\nPHYLLOME_NATS_PASSWORD={users[user]}\n"
                       f"PHYLLOME_NATS_CA={d / 'ca.pem'}\n")
        os.chmod(env, 0o600)
    (d / "hosts.json").write_text(json.dumps(sorted(set(hosts))))
    return users


def server_conf(d: Path) -> str:
    """The nats-server config block: users with permissions, TLS required for clients."""
    users: dict[str, str] = json.loads((d / "users.json").read_text())
    hosts: list[str] = json.loads((d / "hosts.json").read_text())
    entries = []
    for user, role, host in identities(hosts):
        entries.append({"user": user, "password": users[user],
                        "permissions": permissions(role, host)})
    return (
        f"authorization {{\n  users: {json.dumps(entries)}\n}}\n"
        f'tls {{\n  cert_file: "{d / "server.pem"}"\n  key_file: "{d / "server-key.pem"}"\n'
        f'  ca_file: "{d / "ca.pem"}"\n  timeout: 2\n}}\n'
    )


def read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition("=")
        if key:
            out[key] = value
    return out
