"""API tokens of the web gateway, kept in KV ``web_tokens`` as their sha256 only.

``phyllome web token create`` makes one (printed once, never stored), the gateway looks the
bearer's token up on each request, ``revoke`` deletes it::

    token, record = await create(bus, "ci", "viewer")    # "phy_..." and its TokenRecord
    assert (await lookup(bus, token)) == record
    await revoke(bus, "ci")

A token is 32 random bytes, so a plain sha256 is as hard to invert as the token is to guess;
a slow password hash would only slow every request down.
"""

from __future__ import annotations

import getpass
import hashlib
import secrets
import socket
import time

import msgspec
import nats.errors
import nats.js.errors

from shared import subjects
from shared.bus import Bus
from shared.errors import Conflict, InvalidName, NotFound, Unavailable
from shared.messages.web import ROLES, Role, TokenRecord

PREFIX = "phy_"
MAX_LENGTH = 200  # anything longer is no token of ours; not hashed, not looked up


def digest(token: str) -> str:
    """The KV key of ``token``: its sha256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def _name(name: str) -> str:
    if not 1 <= len(name) <= 64 or not name.replace("-", "").replace("_", "").isalnum():
        raise InvalidName(f"token name {name!r}: use 1-64 letters, digits, '-' or '_'")
    return name


async def records(bus: Bus) -> dict[str, TokenRecord]:
    """Every token's record by its KV key."""
    out: dict[str, TokenRecord] = {}
    for key, _rev, value in await bus.kv_entries(subjects.KV_WEB_TOKENS):
        try:
            out[key] = msgspec.json.decode(value, type=TokenRecord)
        except msgspec.MsgspecError:
            continue  # a newer schema's record: not ours to show
    return out


async def create(bus: Bus, name: str, role: Role) -> tuple[str, TokenRecord]:
    """A new token named ``name`` (unique) with ``role``; the token is returned, only its
    hash is kept."""
    if role not in ROLES:
        raise InvalidName(f"role {role!r}: one of {', '.join(ROLES)}")
    if any(r.name == _name(name) for r in (await records(bus)).values()):
        raise Conflict(f"a token named {name!r} exists; revoke it first or choose another name")
    token = PREFIX + secrets.token_urlsafe(32)
    record = TokenRecord(name=name, role=role, created=time.time(),
                         created_by=f"{getpass.getuser()}@{socket.gethostname()}")
    kv = await bus.kv(subjects.KV_WEB_TOKENS)
    await kv.create(digest(token), msgspec.json.encode(record))
    return token, record


async def revoke(bus: Bus, name: str) -> TokenRecord:
    """Delete the token named ``name``; a gateway refuses it from then on."""
    found = [(key, r) for key, r in (await records(bus)).items() if r.name == _name(name)]
    if not found:
        raise NotFound(f"no token named {name!r}; `phyllome web token list` shows them")
    kv = await bus.kv(subjects.KV_WEB_TOKENS)
    for key, _record in found:
        await kv.delete(key)
    return found[0][1]


async def lookup(bus: Bus, token: str) -> TokenRecord | None:
    """The record of ``token``, or None when it is no token (or a revoked one)."""
    if not token.startswith(PREFIX) or len(token) > MAX_LENGTH:
        return None
    try:
        kv = await bus.kv(subjects.KV_WEB_TOKENS)
        entry = await kv.get(digest(token))
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return None
    except (TimeoutError, nats.errors.Error) as e:
        raise Unavailable(f"cannot read the web tokens from KV: {e!r}") from None
    try:
        return msgspec.json.decode(entry.value or b"", type=TokenRecord)
    except msgspec.MsgspecError:
        return None
