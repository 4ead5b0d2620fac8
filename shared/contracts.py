"""The registry of every endpoint and event type, for callers and for docs/contracts.md.

    >>> spec("vm", "jobs").response.__name__
    'JobList'
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

import msgspec

from shared import subjects
from shared.errors import InvalidName
from shared.messages import EndpointSpec, Event
from shared.messages.jobs import JOB_ENDPOINTS


def endpoints(svc: str) -> tuple[EndpointSpec, ...]:
    """Every endpoint an agent of kind ``svc`` answers: its own, then the job endpoints."""
    module = importlib.import_module(f"shared.messages.{subjects.service(svc)}")
    own: tuple[EndpointSpec, ...] = module.ENDPOINTS
    return own + JOB_ENDPOINTS


def spec(svc: str, verb: str) -> EndpointSpec:
    for s in endpoints(svc):
        if s.verb == verb:
            return s
    raise InvalidName(f"the {svc} agent has no endpoint {verb!r}")


def event_types() -> list[type[Event]]:
    """Every tagged Event subclass of every domain, in definition order."""
    for svc in subjects.SERVICES:
        importlib.import_module(f"shared.messages.{svc}")
    found: list[type[Event]] = []

    def walk(cls: type[Event]) -> None:
        for sub in cls.__subclasses__():
            if sub.__struct_config__.tag is not None and sub not in found:
                found.append(sub)
            walk(sub)

    walk(Event)
    return found


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
