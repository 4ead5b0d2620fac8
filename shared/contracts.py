"""The registry of every endpoint and event type, for callers and for docs/contracts.md.

    >>> spec("vm", "jobs").response.__name__
    'JobList'
"""

from __future__ import annotations

import importlib
import typing
from functools import cache
from typing import Any

import msgspec

from shared import subjects
from shared.errors import InvalidName
from shared.messages import EndpointSpec, Event
from shared.messages.hosts import Heartbeat
from shared.messages.jobs import job_endpoints
from shared.messages.web import TokenRecord


def endpoints(svc: str) -> tuple[EndpointSpec[Any, Any], ...]:
    """Every endpoint an agent of kind ``svc`` answers: its own, then the job endpoints."""
    module = importlib.import_module(f"shared.messages.{subjects.service(svc)}")
    own: tuple[EndpointSpec[Any, Any], ...] = module.ENDPOINTS
    return own + job_endpoints(svc)


def spec(svc: str, verb: str) -> EndpointSpec[Any, Any]:
    """The spec of ``verb`` of the ``svc`` agent, for callers that hold names only (the CLI's
    generic job commands, the fuzzer); code that knows its peer uses the spec constant."""
    for s in endpoints(svc):
        if s.verb == verb:
            return s
    raise InvalidName(f"the {svc} agent has no endpoint {verb!r}")


def event_types() -> list[type[Event]]:
    """Every tagged Event subclass of every domain, in definition order."""
    modules = ["shared.messages", "shared.messages.jobs",
               *(f"shared.messages.{svc}" for svc in (*subjects.SERVICES, subjects.WEB))]
    for module in modules[2:]:
        importlib.import_module(module)
    found: list[type[Event]] = []

    def walk(cls: type[Event]) -> None:
        for sub in cls.__subclasses__():
            if sub.__struct_config__.tag is not None and sub not in found:
                found.append(sub)
            walk(sub)

    walk(Event)
    # Stable whatever the import order: the base module, jobs, the agents in order, the web.

    def rank(cls: type[Event]) -> tuple[int, str]:
        module = modules.index(cls.__module__) if cls.__module__ in modules else len(modules)
        return module, str(cls.__struct_config__.tag)

    return sorted(found, key=rank)


@cache
def event_decoder() -> msgspec.json.Decoder[Any]:
    """Decodes any event by its tag."""
    types = tuple(event_types())
    return msgspec.json.Decoder(_union(types))


def _union(types: tuple[type, ...]) -> Any:
    union: Any = types[0]
    for t in types[1:]:
        union = union | t
    return union


def _type_name(tp: Any) -> str:
    text = getattr(tp, "__name__", None) if isinstance(tp, type) else None
    text = text or repr(tp)
    for noise in ("typing.", "shared.messages.", "hardware.", "vm.", "storage.", "catalogue.",
                  "jobs.", "net.", "web.", "<class '", "'>"):
        text = text.replace(noise, "")
    return text


def _fields(tp: Any) -> str:
    if not isinstance(tp, type) or not hasattr(tp, "__struct_fields__"):
        return _type_name(tp)
    parts = []
    for f in msgspec.structs.fields(tp):
        required = f.required
        parts.append(f"`{f.name}`{'' if required else '?'}: {_type_name(f.type)}")
    return "; ".join(parts) or "(no fields)"


def _structs(tp: Any) -> list[type]:
    """``tp`` and every Struct type its fields hold, depth first, each once."""
    out: list[type] = []

    def walk(t: Any) -> None:
        if isinstance(t, type) and issubclass(t, msgspec.Struct):
            if t not in out:
                out.append(t)
                for f in msgspec.structs.fields(t):
                    walk(f.type)
        else:
            for arg in typing.get_args(t):
                walk(arg)

    walk(tp)
    return out


def _tag(tp: Any) -> str:
    cfg = getattr(tp, "__struct_config__", None)
    return str(getattr(cfg, "tag", None) or _type_name(tp))


def markdown() -> str:
    """The text of docs/contracts.md (``python -m shared.contracts > docs/contracts.md``)."""
    out = [
        "# Contracts",
        "",
        "Generated from the code by `python -m shared.contracts` (`make docs`); a test fails",
        "when this file is stale. Every message is JSON with a `type` tag; unknown fields are",
        "ignored, wrong types get an `invalid_message` error reply. `?` marks optional fields.",
        "",
        "## Names",
        "",
        "| what | name |",
        "|---|---|",
        "| command subject | `phy.<host>.<service>.<verb>` |",
        "| event subject | `phy.evt.<host>.<service>.<kind>[.<id>]`; a '.' in the id is "
        "written `%2E` (`ubuntu-24%2E04`) |",
        f"| event stream | `{subjects.STREAM}` on `{subjects.EVENTS_ALL}`, "
        "`Nats-Msg-Id` = event id |",
        f"| KV buckets | `{subjects.KV_HOSTS}` (heartbeats, key `<host>.<agent>`, TTL), "
        f"`{subjects.KV_VMS}`, `{subjects.KV_IMAGES}`, `{subjects.KV_IDEMPOTENCY}` (replies to "
        "keyed requests, key `<host>.<service>.<verb>.<sha256 of the key>`, TTL 24 h), "
        f"`{subjects.KV_WEB_TOKENS}` (the web gateway's tokens, key: the token's sha256), "
        f"`{subjects.KV_WATCHERS}` (the host watch's leases, key `0`-`2`, value the holding "
        "host, TTL as `hosts`) |",
        "| micro services | `phyllome-<service>` (`$SRV.PING/INFO/STATS`) |",
        "| idempotency | request header `Phy-Idempotency-Key`: acted on once per host, "
        "service and verb; a repeat gets the first reply, another body with the key a "
        "`conflict` |",
        "| errors | headers `Nats-Service-Error`, `Nats-Service-Error-Code`; body "
        "`error.v1` {code, kind, message, origin?} (origin `<host>/<service>.<verb>`) |",
        "",
    ]
    for svc in subjects.SERVICES:
        out += [f"## {svc} endpoints", "",
                "| subject | request | response | what |", "|---|---|---|---|"]
        for s in endpoints(svc):
            out.append(f"| `phy.<host>.{svc}.{s.verb}` | `{_tag(s.request)}` "
                       f"| `{_tag(s.response)}` | {s.doc} |")
        out.append("")
    out += ["## Messages", "", "| type | fields |", "|---|---|"]
    seen: set[str] = set()
    for svc in subjects.SERVICES:
        for s in endpoints(svc):
            for tp in (s.request, s.response):
                tag = _tag(tp)
                if tag not in seen:
                    seen.add(tag)
                    out.append(f"| `{tag}` | {_fields(tp)} |")
    out += ["", "## Events", "", "| type | fields |", "|---|---|"]
    for ev in event_types():
        out.append(f"| `{_tag(ev)}` | {_fields(ev)} |")
    out += ["", f"## KV `{subjects.KV_HOSTS}` records", "",
            "Each agent's heartbeat (key `<host>.<agent>`) with its part of the details: caps and",
            "resources from the hardware agent, pools from the storage agent, the accelerator",
            "from the vm agent, image counts from the catalogue agent.", "",
            "| type | fields |", "|---|---|"]
    for tp in _structs(Heartbeat):
        out.append(f"| `{_tag(tp)}` | {_fields(tp)} |")
    out += ["", f"## KV `{subjects.KV_WEB_TOKENS}` records", "",
            "A web API token (key: the sha256 of the token, hex); the token itself is never",
            "stored.", "", "| type | fields |", "|---|---|",
            f"| `{_tag(TokenRecord)}` | {_fields(TokenRecord)} |"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
