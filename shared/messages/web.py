"""Messages of the web gateway: its API tokens (KV ``web_tokens``) and its audit events.

The gateway serves no bus endpoint; it calls the agents' endpoints for its HTTP API. A token
is kept only as its sha256 (the KV key), so a reader of the bucket learns the names and
roles of the tokens, never a token itself. Every mutating HTTP call publishes ``WebAudit``
on ``phy.evt.<host>.web.audit``, naming the token that made it::

    >>> ROLES.index("operator") > ROLES.index("viewer")
    True
"""

from __future__ import annotations

from typing import Literal

import msgspec

from shared.messages import Event

Role = Literal["viewer", "operator", "admin"]
# Ordered: a role may do what the roles before it may.
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")


class TokenRecord(msgspec.Struct, frozen=True, kw_only=True, tag="web.token.v1"):
    """A token in KV ``web_tokens``, keyed by the sha256 of the token (hex)."""

    name: str
    role: Role
    created: float
    created_by: str = ""  # who ran `phyllome web token create` (user@host)


class WebAudit(Event, frozen=True, kw_only=True, tag="web.audit.v1"):
    """A mutating HTTP call and its outcome: who (the token's name and role), what, from where."""

    token: str
    role: Role
    method: str
    path: str
    status: int
    remote: str = ""
    message: str = ""  # the error's message when it was refused
