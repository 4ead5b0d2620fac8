"""Fuzz payloads for an endpoint: hypothesis strategies built from its msgspec request type,
plus arbitrary JSON and raw bytes; sending them, and counting the replies.

    payloads = fuzz_payloads(VolumeRef, 500)   # list[bytes], deterministic
    kind, reply = await send(nc, "h1", "storage", storage_api.INFO, payloads[0])
    tally.add("info", kind)                    # "ok", "not_found", "invalid_message", ...
"""

from __future__ import annotations

import json
import string
from collections import Counter
from typing import Any

import msgspec
import msgspec.inspect as mi
import nats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import subjects
from shared.codec import decode
from shared.errors import ErrorReply
from shared.messages import EndpointSpec

# Strings an attacker tries first: traversal, injection, wildcards, control characters.
NASTY = ["", ".", "..", "../../etc/passwd", "/etc/shadow", "a/b", "-rf", "*", ">", "a.b",
         "a b", "\x00", "'\"<>&", "<domain/>", "]]>", "${HOME}", "x" * 300, "\u202e", "😀",
         "file:///etc/passwd", "http://127.0.0.1:1/x", "0000:00:00.0", "default", "demo"]
LOOPBACK_URL = st.sampled_from(["http://127.0.0.1:1/x", "http://127.0.0.1:1/a.raw",
                                "https://127.0.0.1:1/", "file:///etc/passwd", "ftp://127.0.0.1/",
                                "gopher://127.0.0.1:1/", "http://[::1]:1/", "not a url"])
TEXT = st.one_of(st.sampled_from(NASTY), st.text(string.printable, max_size=40),
                 st.text(max_size=20))


def strategy(t: mi.Type, field: str = "") -> st.SearchStrategy[Any]:
    """JSON-ready values shaped like ``t`` (with wrong-typed values mixed in by the caller)."""
    if isinstance(t, mi.StrType):
        # Never let a fuzzer invent a routable address: URL fields get loopback or junk only.
        return LOOPBACK_URL if "url" in field.lower() else TEXT
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.IntType):
        return st.one_of(st.integers(-2, 1 << 12), st.integers(-(1 << 63), (1 << 63) - 1))
    if isinstance(t, mi.FloatType):
        return st.floats(allow_nan=False, allow_infinity=False, min_value=-1e9, max_value=1e9)
    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.LiteralType):
        return st.sampled_from(list(t.values))
    if isinstance(t, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
        return st.lists(strategy(t.item_type, field), max_size=4)
    if isinstance(t, mi.DictType):
        return st.dictionaries(st.text(max_size=8), strategy(t.value_type, field), max_size=3)
    if isinstance(t, mi.UnionType):
        return st.one_of(*(strategy(x, field) for x in t.types))
    if isinstance(t, mi.StructType):
        required = {f.encode_name: strategy(f.type, f.name) for f in t.fields if f.required}
        optional = {f.encode_name: strategy(f.type, f.name) for f in t.fields if not f.required}
        if t.tag is not None:
            required[t.tag_field] = st.just(t.tag)
        return st.fixed_dictionaries(required, optional=optional)
    return st.none()


def fuzz_payloads(tp: type, count: int, seed: int = 0) -> list[bytes]:
    """``count`` payloads for request type ``tp``: mostly well-shaped, some wrong-typed JSON,
    some random bytes. Deterministic for a seed."""
    shaped = strategy(mi.type_info(tp))
    anything = st.recursive(
        st.none() | st.booleans() | st.integers() | TEXT,
        lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT, c, max_size=3), max_leaves=8)
    payload = st.one_of(
        shaped.map(lambda v: json.dumps(v).encode()),
        shaped.map(lambda v: json.dumps(v).encode()),
        shaped.map(lambda v: json.dumps(v).encode()),
        anything.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=64),
    )
    out: list[bytes] = []

    @settings(max_examples=count, database=None, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(payload)
    def collect(p: bytes) -> None:
        out.append(p)

    collect()
    while len(out) < count:  # small input spaces run out of distinct examples
        out.append(msgspec.json.encode({"pad": len(out)}))
    return out[:count]


async def send(nc: nats.NATS, host: str, svc: str, spec: EndpointSpec[Any, Any],
               payload: bytes, timeout: float = 30) -> tuple[str, Any]:
    """One raw request: ("ok", the decoded result), (error kind, the ErrorReply), or
    ("no_reply", None). A result that does not decode as the response type raises."""
    try:
        msg = await nc.request(subjects.command(host, svc, spec.verb), payload,
                               timeout=timeout)
    except nats.errors.TimeoutError:
        return "no_reply", None
    if msg.headers and "Nats-Service-Error-Code" in msg.headers:
        reply = msgspec.json.decode(msg.data, type=ErrorReply)
        return reply.kind, reply
    return "ok", decode(msg.data, spec.response)


class Tally:
    """Replies per endpoint and kind: how deep the fuzz got (past the decoder to a handler's
    own refusal, or all the way to ``ok``). Seed replies are counted apart."""

    def __init__(self, verbs: list[str]) -> None:
        self.kinds: dict[str, Counter[str]] = {v: Counter() for v in verbs}
        self.seeded: Counter[str] = Counter()

    def add(self, verb: str, kind: str, *, seed: bool = False) -> None:
        if seed:
            self.seeded[verb] += kind == "ok"
        else:
            self.kinds[verb][kind] += 1

    def total(self, kind: str = "") -> int:
        return sum(c[kind] if kind else c.total() for c in self.kinds.values())

    def without_ok(self) -> list[str]:
        return [v for v, c in self.kinds.items() if not c["ok"] and not self.seeded[v]]

    def never_decoded(self) -> list[str]:
        """Endpoints whose fuzz replies were all refused by the decoder (none reached the
        handler)."""
        return [v for v, c in self.kinds.items() if set(c) <= {"invalid_message"}]

    def table(self) -> str:
        return "\n".join(
            f"  {verb:<15} seed ok {self.seeded[verb]}  fuzz "
            + " ".join(f"{k}={n}" for k, n in c.most_common()) for verb, c in self.kinds.items())
