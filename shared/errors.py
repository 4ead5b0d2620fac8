"""One error tree for every agent, and its typed form on the bus.

An error crosses NATS as an ``ErrorReply`` body plus the micro-service headers
``Nats-Service-Error`` / ``Nats-Service-Error-Code``; ``raise_for_reply`` raises the same
class on the caller's side, so ``except NotFound`` works across processes. The bus that
turned the error into a reply records its ``origin`` (``<host>/<service>.<verb>``) once, so
messages need no hand-written "vm: " prefix and ``str(e)`` says where it came from::

    >>> raise_for_reply({"Nats-Service-Error-Code": "404"}, b'{"code":404,"kind":"not_found",'
    ...                 b'"message":"no VM named demo","origin":"h1/vm.info"}')
    Traceback (most recent call last):
    shared.errors.NotFound: vm on h1: no VM named demo

Every class below has its own ``kind`` (the wire name); a new class must pick a new one.
"""

from __future__ import annotations

import msgspec

ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"


class PhyError(Exception):
    """Root of every error an agent reports; ``message`` says what was wrong and what to do,
    ``origin`` (set by the bus of the agent that refused) where it happened."""

    code = 500
    kind = "internal"

    def __init__(self, message: str, *, origin: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.origin = origin

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        other = _BY_KIND.setdefault(cls.kind, cls)
        if other is not cls:
            raise TypeError(f"error kind {cls.kind!r} of {cls.__name__} is taken by "
                            f"{other.__name__}; give {cls.__name__} its own kind")

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.origin else self.message

    @property
    def where(self) -> str:
        """``origin`` for people: ``storage on h1`` (empty when the error never crossed a bus)."""
        host, _, endpoint = self.origin.partition("/")
        return f"{endpoint.partition('.')[0]} on {host}" if endpoint else self.origin


# Every concrete class by kind, filled as the classes below are defined (the root is not in
# it: an error of unknown kind decodes as ``Internal``).
_BY_KIND: dict[str, type[PhyError]] = {}


# -- the caller sent something wrong -------------------------------------------------------


class BadRequest(PhyError):
    """The request cannot be acted on as sent."""

    code = 400
    kind = "bad_request"


class InvalidMessage(BadRequest):
    """The body is not valid JSON of the endpoint's request type."""

    kind = "invalid_message"


class ArchMismatch(BadRequest):
    """An image of one architecture asked for a guest of another."""

    kind = "arch_mismatch"


class InvalidName(BadRequest):
    """A name, token, address or path component fails validation."""

    kind = "invalid_name"


class PayloadTooLarge(BadRequest):
    """The body is over the size an endpoint accepts."""

    code = 413
    kind = "payload_too_large"


class Unauthorized(PhyError):
    """No credentials, or credentials that name no one (the web gateway's tokens)."""

    code = 401
    kind = "unauthorized"


class TooManyRequests(PhyError):
    """Refused for a while after repeated failures (bad tokens); retry after the delay."""

    code = 429
    kind = "too_many_requests"

    def __init__(self, message: str, *, origin: str = "", retry_after: float = 0.0) -> None:
        super().__init__(message, origin=origin)
        self.retry_after = retry_after


class Forbidden(PhyError):
    """Refused by policy (a safety rule, a permission)."""

    code = 403
    kind = "forbidden"


# -- the world is not in the state the request needs ----------------------------------------


class NotFound(PhyError):
    """The named thing does not exist."""

    code = 404
    kind = "not_found"


class Conflict(PhyError):
    """It exists already, is busy, or is in the wrong state."""

    code = 409
    kind = "conflict"


class InsufficientResources(PhyError):
    """Not enough memory, disk or devices for the request."""

    code = 507
    kind = "insufficient_resources"


class ArchUnsupported(InsufficientResources):
    """The host has no QEMU or no firmware for the guest's architecture."""

    kind = "arch_unsupported"


class Cancelled(PhyError):
    """A job was cancelled before it finished."""

    code = 499
    kind = "cancelled"


# -- something we depend on failed ----------------------------------------------------------


class Unavailable(PhyError):
    """No agent answered, or a backend (NATS, libvirt, HTTP source) is down."""

    code = 503
    kind = "unavailable"


class Timeout(Unavailable):
    """The work or the reply did not come within the deadline."""

    code = 504
    kind = "timeout"


class NotAuthorized(Unavailable):
    """NATS turned this client away: no credentials, wrong ones, or an untrusted certificate."""

    code = 401
    kind = "not_authorized"


class BackendError(PhyError):
    """A lower layer (libvirt, the kernel, qemu-img, HTTP) reported an error."""

    code = 502
    kind = "backend"


class Internal(PhyError):
    """A bug: something raised that no adapter translated."""

    code = 500
    kind = "internal"


class ErrorReply(msgspec.Struct, frozen=True, kw_only=True, tag="error.v1"):
    """The body of a failed request; ``origin`` is ``<host>/<service>.<verb>`` of the
    endpoint that refused (the first one, when the error crossed several agents)."""

    code: int
    kind: str
    message: str
    origin: str = ""


def to_reply(err: PhyError) -> tuple[dict[str, str], bytes]:
    """Headers and body for a failed request."""
    body = msgspec.json.encode(ErrorReply(code=err.code, kind=err.kind, message=err.message,
                                          origin=err.origin))
    return {ERROR_HEADER: err.message[:200], ERROR_CODE_HEADER: str(err.code)}, body


def error_from_reply(headers: dict[str, str] | None, body: bytes) -> PhyError | None:
    """The error a reply carries, or None when it is a success."""
    if not headers or ERROR_CODE_HEADER not in headers:
        return None
    try:
        reply = msgspec.json.decode(body, type=ErrorReply)
    except msgspec.MsgspecError:
        code = int(headers.get(ERROR_CODE_HEADER, "500") or 500)
        text = headers.get(ERROR_HEADER, "unknown error")
        return Internal(text) if code >= 500 else BadRequest(text)
    cls = _BY_KIND.get(reply.kind, Internal)
    return cls(reply.message, origin=reply.origin)


def raise_for_reply(headers: dict[str, str] | None, body: bytes) -> None:
    err = error_from_reply(headers, body)
    if err is not None:
        raise err
