"""A request and its reply as they cross NATS: headers, body, typed errors, KV records.

Both clients of the bus use these, so a request looks the same and its reply (or its error,
with its ``origin``) decodes the same whichever sent it: ``shared.bus.Bus`` on nats-py (the
agents, and every CLI command that follows jobs or events) and ``cli.syncbus`` (a blocking
client on a plain socket for the CLI's one-shot requests, which answers before nats-py and
asyncio would have been imported). Nothing here imports either client.

    headers, body = request_parts(VmRef(vm="demo"), idempotency_key=None)
    info = reply_value(reply_headers, reply_body, VmInfo)   # or raises NotFound, ...
"""

from __future__ import annotations

from typing import Any, TypeVar

from shared.codec import decode, encode
from shared.errors import Forbidden, Timeout, Unavailable, raise_for_reply

T = TypeVar("T")

IDEMPOTENCY_HEADER = "Phy-Idempotency-Key"
STATUS_HEADER = "Status"  # a NATS status line (``NATS/1.0 503``), as nats-py names it
NO_RESPONDERS = "503"
# The hint of a JetStream error that passes: a KV stream without a leader answers 503 (or not
# at all) for some seconds after one of its servers, or the link to it, went down.
ELECTING = ("if a server or a link just went down, its stream is electing a new leader: retry "
            "in a few seconds")


def request_parts(req: Any, idempotency_key: str | None = None
                  ) -> tuple[dict[str, str] | None, bytes]:
    """The headers (None when there are none) and body of a request."""
    headers = {IDEMPOTENCY_HEADER: idempotency_key} if idempotency_key else None
    return headers, b"" if req is None else encode(req)


def reply_value(headers: dict[str, str] | None, body: bytes, resp_type: type[T]) -> T:
    """The reply decoded as ``resp_type``, or the typed error it carries, raised."""
    raise_for_reply(headers, body)
    return decode(body, resp_type)


def no_responders(subject: str) -> Unavailable:
    parts = subject.split(".")
    host, svc = (parts[1], parts[2]) if len(parts) > 2 else ("?", subject)
    return Unavailable(f"no {svc} agent for host {host!r} answers ({subject}); "
                       "see `phyllome status`")


def timed_out(subject: str, timeout: float) -> Timeout:
    return Timeout(f"no reply on {subject} within {timeout} s")


def refused(subject: str, identity: str) -> Forbidden:
    """The server refused to let ``identity`` publish a request to ``subject``."""
    return Forbidden(f"{subject} is not allowed for identity {identity} "
                     "(its NATS permissions refuse it)")


def unreachable(url: str) -> Unavailable:
    return Unavailable(f"cannot reach NATS at {url}; is `phyllome up` running, or "
                       "PHYLLOME_NATS_URL right?")


def turned_away_because(cert_untrusted: bool, identity: str, ca: str) -> str:
    """Why the server turned a client away: an untrusted certificate, or its credentials."""
    if cert_untrusted:
        return ("its TLS certificate is not trusted" + ("" if ca else
                " (no CA given: the server wants TLS and credentials, and this client has "
                "none)"))
    who = f"user {identity!r}" if identity else "a client without credentials"
    return f"authorization failed for {who} (no credentials, or wrong ones)"


def identity_of(user: str, creds: str) -> str:
    """The NATS user a client connects as, named in refusals ("" when anonymous)."""
    return user or (creds.rsplit("/", 1)[-1].removesuffix(".creds") if creds else "")


def kv_deleted(headers: dict[str, str] | None) -> bool:
    """Whether a KV record (a stream message of ``KV_<bucket>``) is a delete or an expiry."""
    h = headers or {}
    return h.get("KV-Operation") in ("DEL", "PURGE") or "Nats-Marker-Reason" in h


def kv_read_failed(bucket: str, e: object) -> Unavailable:
    """A KV read that JetStream did not answer; it passes while a stream elects a leader."""
    return Unavailable(f"cannot read KV {bucket}: {e!r}; {ELECTING}")
