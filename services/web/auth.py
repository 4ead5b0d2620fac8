"""Who a request is: its token (bearer header or the login cookie), the token's role, and
the wait an address earns by sending bad tokens.

Roles are ordered (``viewer`` < ``operator`` < ``admin``); a route names the least one it
needs. Tokens live in KV ``web_tokens`` as their sha256 (``shared/tokens.py``); a token
looked up is trusted for ``token_cache_s`` before KV is asked again, so a revoked token is
refused within that time::

    auth = Auth(bus, cfg, metrics)
    who = await auth.identify(headers, cookies, remote="10.0.0.7")
    auth.require(who, "operator", "POST /api/v1/vms/{vm}/start")
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

from services.web.config import WebConfig
from services.web.metrics import WebMetrics
from shared import tokens
from shared.bus import Bus
from shared.errors import Forbidden, TooManyRequests, Unauthorized
from shared.messages.web import ROLES, Role, TokenRecord

COOKIE = "phyllome_token"
MAX_ADDRESSES = 10_000  # addresses whose bad tokens are remembered; the oldest go first
FORGET_AFTER_S = 600.0  # an address quiet this long starts afresh
NO_TOKEN = ("no token: send `Authorization: Bearer <token>` or log in; `phyllome web token "
            "create NAME --role viewer` makes one")


class Backoff:
    """Bad tokens per client address: ``free`` are answered at once, then each one more makes
    the address wait twice as long (``base_s``, 2 × ``base_s``, ... up to ``max_s``) before
    any token of it is looked at again; a good token clears it."""

    def __init__(self, *, free: int, base_s: float, max_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.free, self.base_s, self.max_s, self.clock = free, base_s, max_s, clock
        self._seen: OrderedDict[str, tuple[int, float, float]] = OrderedDict()  # n, until, last

    def check(self, address: str) -> None:
        """Refuse (429) while ``address`` has to wait."""
        entry = self._seen.get(address)
        if entry is None:
            return
        failures, until, last = entry
        now = self.clock()
        if now - last > FORGET_AFTER_S:
            del self._seen[address]
        elif now < until:
            raise TooManyRequests(
                f"too many bad tokens from {address}: wait {until - now:.0f} s before the "
                f"next try ({failures} so far)", retry_after=until - now)

    def failed(self, address: str) -> None:
        failures, _until, _last = self._seen.pop(address, (0, 0.0, 0.0))
        failures += 1
        now = self.clock()
        over = failures - self.free
        wait = min(self.base_s * 2 ** (over - 1), self.max_s) if over > 0 else 0.0
        self._seen[address] = (failures, now + wait, now)
        while len(self._seen) > MAX_ADDRESSES:
            self._seen.popitem(last=False)

    def succeeded(self, address: str) -> None:
        self._seen.pop(address, None)


def bearer(headers: Mapping[str, str], cookies: Mapping[str, str]) -> str:
    """The token a request carries: ``Authorization: Bearer`` first, else the login cookie."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return cookies.get(COOKIE, "")


def allowed(role: Role, needs: Role) -> bool:
    return ROLES.index(role) >= ROLES.index(needs)


class Auth:
    """Token lookup (cached briefly), role checks and the per-address backoff."""

    def __init__(self, bus: Bus, cfg: WebConfig, metrics: WebMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bus, self.metrics, self.clock = bus, metrics, clock
        self.cache_s = cfg.token_cache_s
        self.backoff = Backoff(free=cfg.backoff_free, base_s=cfg.backoff_base_s,
                               max_s=cfg.backoff_max_s, clock=clock)
        self._cache: dict[str, tuple[TokenRecord, float]] = {}

    async def lookup(self, token: str) -> TokenRecord | None:
        hit = self._cache.get(token)
        if hit is not None and self.clock() < hit[1]:
            return hit[0]
        record = await tokens.lookup(self.bus, token)
        if record is None:
            self._cache.pop(token, None)
        else:
            if len(self._cache) > 1000:
                self._cache.clear()
            self._cache[token] = (record, self.clock() + self.cache_s)
        return record

    async def login(self, token: str, remote: str) -> TokenRecord:
        """The record of ``token``, or 401 (429 while ``remote`` has to wait)."""
        self.backoff.check(remote)
        record = await self.lookup(token) if token else None
        if record is None:
            self.backoff.failed(remote)
            self.metrics.auth_failures.labels(reason="unknown").inc()
            raise Unauthorized(
                "unknown or revoked token; `phyllome web token list` shows the valid ones")
        self.backoff.succeeded(remote)
        return record

    async def identify(self, headers: Mapping[str, str], cookies: Mapping[str, str], *,
                       remote: str) -> TokenRecord:
        """Who sent the request: the record of its token, or 401 (429 while waiting)."""
        token = bearer(headers, cookies)
        if not token:  # no token is no guess: it counts toward nothing
            self.metrics.auth_failures.labels(reason="missing").inc()
            raise Unauthorized(NO_TOKEN)
        return await self.login(token, remote)

    def require(self, who: TokenRecord, needs: Role, what: str) -> None:
        """403 unless the role of ``who`` covers ``needs``."""
        if not allowed(who.role, needs):
            self.metrics.auth_failures.labels(reason="role").inc()
            raise Forbidden(f"token {who.name!r} is a {who.role}; {what} needs {needs}")
