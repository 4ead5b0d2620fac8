"""JSON encoding and decoding of messages, with decoders built once per type.

    >>> from shared.messages import Ack
    >>> decode(b'{"message": "hi", "extra": 1}', Ack)
    Ack(message='hi')
"""

from __future__ import annotations

from functools import cache
from typing import Any, TypeVar, cast

import msgspec

from shared.errors import InvalidMessage, PayloadTooLarge

T = TypeVar("T")

_encoder = msgspec.json.Encoder()


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


@cache
def decoder(tp: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(tp)


def decode(data: bytes, tp: type[T], *, limit: int | None = None) -> T:
    """Decode ``data`` as ``tp``; an empty body means the type's defaults."""
    if limit is not None and len(data) > limit:
        raise PayloadTooLarge(f"payload of {len(data)} bytes is over the limit of {limit} bytes")
    try:
        result: T = decoder(cast(Any, tp)).decode(data if data.strip() else b"{}")
    except msgspec.ValidationError as e:
        raise InvalidMessage(f"invalid {_name(tp)}: {e}") from None
    except msgspec.DecodeError as e:
        raise InvalidMessage(f"malformed JSON for {_name(tp)}: {e}") from None
    return result


def to_builtins(obj: Any) -> Any:
    """Plain dicts/lists for ``--json`` output and tables."""
    return msgspec.to_builtins(obj)


def _name(tp: Any) -> str:
    info = getattr(tp, "__struct_config__", None)
    tag = getattr(info, "tag", None)
    return str(tag) if tag else getattr(tp, "__name__", str(tp))
