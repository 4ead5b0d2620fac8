"""The OpenAPI 3.1 document of ``/api/v1``, generated from the route table and the msgspec
contracts the bus uses, so the HTTP API and the bus cannot drift apart.

Served at ``/api/v1/openapi.json`` and kept in ``docs/openapi.json``; a test fails when that
file is stale (``python -m services.web.openapi > docs/openapi.json`` rewrites it) or when
``openapi-spec-validator`` refuses it.

A route that forwards to an agent endpoint takes that endpoint's request type: its path
fields from the path, the rest from the JSON body (POST) or the query string (GET). Tagged
messages carry ``type``; a request may leave it out.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from typing import Any

import msgspec

from services.web.handlers import ROUTES, HostQuery, Route
from shared import __version__
from shared.errors import ErrorReply

REF = "#/components/schemas/{name}"
ERRORS = {
    "400": "Bad input: malformed JSON, a wrong type, an invalid name.",
    "401": "No token, or an unknown or revoked one.",
    "403": "The token's role does not allow this.",
    "404": "No such VM, image, device, job or route.",
    "409": "The thing is in the wrong state, or exists already.",
    "413": "The body is too large.",
    "429": "Too many bad tokens from this address: wait (Retry-After).",
    "503": "An agent or NATS does not answer.",
}


def _struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _any(tp: type) -> dict[str, Any]:
    if tp is object:
        return {"description": "any JSON value"}
    raise NotImplementedError


def _schemas(types: list[Any]) -> dict[str, Any]:
    """The JSON schemas of ``types`` and of every type they hold, by name."""
    return msgspec.json.schema_components(types, schema_hook=_any, ref_template=REF)[1]


def _query(route: Route) -> Any:
    """The type of a route's query string, if any."""
    if route.query is not None:
        return route.query
    return route.spec.request if route.spec is not None and route.method == "GET" else None


def _body(route: Route) -> Any:
    if route.method != "POST":
        return None
    return route.body if route.body is not None else (
        route.spec.request if route.spec is not None else None)


def _fields(schema: dict[str, Any], drop: list[str]) -> tuple[dict[str, Any], list[str]]:
    """A struct's properties and required names, less the tag and ``drop``."""
    props = {k: v for k, v in schema.get("properties", {}).items()
             if k != "type" and k not in drop}
    return props, [r for r in schema.get("required", []) if r in props]


def _operation(route: Route, components: dict[str, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": route.operation_id, "summary": route.summary,
                          "tags": [route.path.split("/")[3]]}
    params: list[dict[str, Any]] = []
    request = route.request
    own = components.get(request.__name__, {}) if _struct(request) else {}
    for name in route.path_fields:
        schema = own.get("properties", {}).get(name, {"type": "string"})
        params.append({"name": name, "in": "path", "required": True, "schema": schema})
    query = _query(route)
    if query is not None:
        props, required = _fields(components[query.__name__], route.path_fields)
        for name, schema in props.items():
            params.append({"name": name, "in": "query", "required": name in required,
                           "schema": schema})
    if route.spec is not None or route.where == "vm":
        if not any(p["name"] == "host" for p in params):
            params.append({"name": "host", "in": "query", "required": False,
                           "schema": components[HostQuery.__name__]["properties"]["host"],
                           "description": "the agent's host (default: the gateway's; for a "
                                          "VM: its host in KV vms)"})
    if route.stream:
        params.append({"name": "Last-Event-ID", "in": "header", "required": False,
                       "schema": {"type": "integer"},
                       "description": "resume after this event (EventSource sends it)"})
    if params:
        op["parameters"] = params
    body = _body(route)
    if body is not None:
        props, required = _fields(copy.deepcopy(components[body.__name__]), route.path_fields)
        if props:
            inline: dict[str, Any] = {"type": "object", "properties": props}
            if required:
                inline["required"] = required
            op["requestBody"] = {"required": bool(required), "content": {
                "application/json": {"schema": inline}}}
    if route.stream:
        content = {"text/event-stream": {"schema": {"type": "string"}}}
    elif route.media_type != "application/json":
        content = {route.media_type: {"schema": {"type": "string",
                                                 "contentMediaType": route.media_type}}}
    elif _struct(route.response):
        content = {"application/json": {"schema": {"$ref": REF.format(
            name=route.response.__name__)}}}
    else:
        content = {"application/json": {"schema": {"type": "object"}}}
    responses: dict[str, Any] = {str(route.status): {"description": "OK", "content": content}}
    if route.media_type != "application/json":
        responses["304"] = {"description": "Not modified: the If-None-Match ETag is current."}
    codes = ["400", "404", "409", "503"]
    if route.role is not None:
        codes += ["401", "403", "429"]
        op["security"] = [{"bearer": []}, {"cookie": []}]
        op["x-phyllome-role"] = route.role
    else:
        op["security"] = []
    if route.method == "POST":
        codes.append("413")
    for code in sorted(codes):
        responses[code] = {"$ref": f"#/components/responses/E{code}"}
    op["responses"] = responses
    if route.spec is not None:
        op["x-phyllome-endpoint"] = f"{route.spec.service}.{route.spec.verb}"
    return op


@cache
def document() -> dict[str, Any]:
    types: list[Any] = []
    for route in ROUTES:
        for tp in (route.response, route.request, _query(route)):
            if _struct(tp) and tp not in types:
                types.append(tp)
    components = _schemas([*types, ErrorReply])
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, components)
    used = json.dumps(paths)
    # Query and body types are inlined above; keep the components something refers to.
    keep = {name for name in components if REF.format(name=name) in used}
    while True:
        more = {name for name in components if name not in keep
                and any(REF.format(name=name) in json.dumps(components[k]) for k in keep)}
        if not more:
            break
        keep |= more
    keep.add(ErrorReply.__name__)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Phyllome", "version": __version__,
                 "description": "The HTTP API of a Phyllome web gateway: VMs, hosts, storage, "
                                "images, hardware, jobs and events of the whole cluster. "
                                "Tokens: `phyllome web token create NAME --role viewer`."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": {k: components[k] for k in sorted(keep)},
            "responses": {f"E{code}": {"description": text, "content": {"application/json": {
                "schema": {"$ref": REF.format(name=ErrorReply.__name__)}}}}
                for code, text in ERRORS.items()},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "a token from `phyllome web token create`"},
                "cookie": {"type": "apiKey", "in": "cookie", "name": "phyllome_token",
                           "description": "set by POST /api/v1/login"}},
        },
    }


def text() -> str:
    return json.dumps(document(), indent=1, sort_keys=False) + "\n"


if __name__ == "__main__":
    print(text(), end="")
