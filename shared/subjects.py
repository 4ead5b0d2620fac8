"""Every NATS subject, KV bucket and stream name; no other module spells one.

    >>> command("h1", "vm", "start")
    'phy.h1.vm.start'
    >>> event("h1", "vm", "state", "4f0c")
    'phy.evt.h1.vm.state.4f0c'
"""

from __future__ import annotations

import re

from shared.errors import InvalidName

SERVICES = ("hardware", "vm", "storage", "catalogue")
STREAM = "PHY_EVENTS"
EVENTS_ALL = "phy.evt.>"
KV_HOSTS = "hosts"
KV_VMS = "vms"
KV_IMAGES = "images"
KV_IDEMPOTENCY = "idempotency"
KV_WEB_TOKENS = "web_tokens"
# the host watch's leases (services/hardware/hostwatch.py): key = slot, value = the holder
KV_WATCHERS = "watchers"
KV_BUCKETS = (KV_HOSTS, KV_VMS, KV_IMAGES, KV_IDEMPOTENCY, KV_WEB_TOKENS, KV_WATCHERS)
# The web gateway: an edge beside the agents (it serves no endpoint), whose events are its
# audit trail ``phy.evt.<host>.web.audit``.
WEB = "web"

_TOKEN = re.compile(r"^[A-Za-z0-9_\-:]{1,128}$")


def token(value: str, what: str = "token") -> str:
    """The value if it is a safe subject token (no ``.``, ``*``, ``>``, spaces)."""
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise InvalidName(
            f"{what} {value!r} is not valid: use 1-128 letters, digits, '-', '_' or ':' "
            "(no '.', '*', '>' or spaces)"
        )
    return value


_IDENT = re.compile(r"^[A-Za-z0-9_\-:.]{1,128}$")


def id_token(value: str) -> str:
    """The subject token of an event's id: ``value`` with each '.' written ``%2E``.

    Ids of things (images such as ``ubuntu-24.04``) may hold dots, which NATS reads as
    token separators; ``id_of`` gives the id back. Other characters are refused as
    ``token`` refuses them."""
    if not isinstance(value, str) or not _IDENT.match(value):
        raise InvalidName(
            f"id {value!r} is not valid: use 1-128 letters, digits, '.', '-', '_' or ':' "
            "(no '*', '>' or spaces)")
    return value.replace(".", "%2E")


def id_of(tok: str) -> str:
    """The id that ``id_token`` made ``tok`` from."""
    return tok.replace("%2E", ".")


def service(name: str) -> str:
    if name not in SERVICES:
        raise InvalidName(f"unknown service {name!r}; one of {', '.join(SERVICES)}")
    return name


def command(host: str, svc: str, verb: str) -> str:
    """Subject of a request to one agent: ``phy.<host>.<service>.<verb>``."""
    return f"phy.{token(host, 'host')}.{service(svc)}.{token(verb, 'verb')}"


def event(host: str, svc: str, kind: str, ident: str | None = None) -> str:
    """Subject of an event: ``phy.evt.<host>.<service>.<kind>[.<id>]``; kind may be dotted,
    the id is escaped by ``id_token``."""
    parts = [token(p, "event kind") for p in kind.split(".")]
    subject = f"phy.evt.{token(host, 'host')}.{service(svc)}.{'.'.join(parts)}"
    return f"{subject}.{id_token(ident)}" if ident is not None else subject


def web_event(host: str, kind: str) -> str:
    """Subject of an event of a host's web gateway: ``phy.evt.<host>.web.<kind>``."""
    return f"phy.evt.{token(host, 'host')}.{WEB}.{token(kind, 'event kind')}"


def console(host: str, session: str, towards: str) -> str:
    """Subject of one direction of a console session (``shared/console.py``):
    ``phy.con.<host>.<session>.vm`` carries bytes to the VM, ``...client`` to the client."""
    if towards not in ("vm", "client"):
        raise InvalidName(f"console direction {towards!r}: vm or client")
    return f"phy.con.{token(host, 'host')}.{token(session, 'session')}.{towards}"


def events_filter(host: str = "*", svc: str = "*", kind: str = ">") -> str:
    """A subscription filter over events; ``*`` / ``>`` wildcards allowed here only."""
    h = host if host == "*" else token(host, "host")
    s = svc if svc == "*" else service(svc)
    return f"phy.evt.{h}.{s}.{kind}"


def micro_name(svc: str) -> str:
    """The NATS micro service name of an agent kind (same on every host)."""
    return f"phyllome-{service(svc)}"


def heartbeat_key(host: str, svc: str) -> str:
    return f"{token(host, 'host')}.{service(svc)}"


def idempotency_key(host: str, svc: str, verb: str, key: str) -> str:
    """KV key of a keyed request's reply: ``<host>.<service>.<verb>.<sha256 of the key>`` (the
    caller's key may hold any character; a KV key may not)."""
    import hashlib  # here: every CLI command imports this module, few need a digest

    digest = hashlib.sha256(key.encode()).hexdigest()
    return f"{token(host, 'host')}.{service(svc)}.{token(verb, 'verb')}.{digest}"
