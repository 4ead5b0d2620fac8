"""The web gateway's pure parts: the route table, the OpenAPI document, the backoff, filters."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from services.web import handlers
from services.web.auth import Backoff, allowed, bearer
from services.web.config import load, parse_listen
from services.web.events import check_filter
from services.web.handlers import ROUTES
from services.web.openapi import document, text
from shared import security
from shared.errors import BadRequest, InvalidName, TooManyRequests
from shared.messages import EndpointSpec

pytestmark = pytest.mark.unit
DOC = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def test_docs_openapi_json_is_current_and_valid() -> None:
    assert DOC.read_text() == text(), (
        "docs/openapi.json is stale: run `python -m services.web.openapi > docs/openapi.json`")
    validate(document())


def test_the_validator_refuses_a_broken_document() -> None:
    broken = copy.deepcopy(document())
    broken["paths"]["/api/v1/vms"]["get"]["parameters"][0]["in"] = "body"  # OpenAPI 2
    with pytest.raises(OpenAPIValidationError):
        validate(broken)


def test_each_route_forwards_what_its_endpoint_takes() -> None:
    ids = [r.operation_id for r in ROUTES]
    assert len(ids) == len(set(ids))
    for route in ROUTES:
        if route.spec is not None:  # the path's fields are the request's own fields
            assert set(route.path_fields) <= set(route.spec.request.__struct_fields__), route
        if route.status == 202:
            assert route.response is handlers.JobStarted, route
    doc = document()
    stop = doc["paths"]["/api/v1/vms/{vm}/stop"]["post"]
    assert stop["x-phyllome-endpoint"] == "vm.shutdown"
    body = stop["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"timeout_s", "force"}  # vm comes from the path
    images = [p["name"] for p in doc["paths"]["/api/v1/images"]["get"]["parameters"]]
    assert images == ["search", "family", "arch", "downloadable", "source", "host"]


def test_mutating_routes_need_an_operator_and_hardware_an_admin() -> None:
    for route in ROUTES:
        if route.mutating and route.role is not None:
            assert allowed(route.role, "operator"), route.path
        if "/hw/" in route.path and route.mutating:
            assert route.role == "admin", route.path
    open_routes = sorted(r.path for r in ROUTES if r.role is None)
    assert open_routes == ["/api/v1/health", "/api/v1/login", "/api/v1/logout",
                           "/api/v1/openapi.json"]


def test_the_gateway_calls_no_endpoint_only_agents_may_call() -> None:
    specs = [v for v in vars(handlers).values() if isinstance(v, EndpointSpec)]
    specs += [r.spec for r in ROUTES if r.spec is not None]
    assert not {(s.service, s.verb) for s in specs} & {
        (s.service, s.verb) for s in security.AGENT_ONLY}


def test_backoff_doubles_the_wait_and_a_good_token_clears_it() -> None:
    now = [100.0]
    b = Backoff(free=2, base_s=1.0, max_s=5.0, clock=lambda: now[0])
    for _ in range(2):
        b.failed("a")
        b.check("a")  # free guesses: no wait
    waits = []
    for _ in range(5):
        b.failed("a")
        with pytest.raises(TooManyRequests) as e:
            b.check("a")
        waits.append(e.value.retry_after)
        now[0] += e.value.retry_after
        b.check("a")  # the wait is over
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]
    b.check("b")  # another address is not held up
    b.succeeded("a")
    b.failed("a")
    b.check("a")
    b.failed("a")
    now[0] += 601  # quiet for long enough: forgotten
    b.check("a")
    b.failed("a")
    b.check("a")


def test_the_token_comes_from_the_header_before_the_cookie() -> None:
    assert bearer({"authorization": "Bearer abc"}, {"phyllome_token": "xyz"}) == "abc"
    assert bearer({"authorization": "Basic abc"}, {"phyllome_token": "xyz"}) == "xyz"
    assert bearer({}, {}) == ""


@pytest.mark.parametrize("good", ["phy.evt.>", "phy.evt.h1.vm.>", "phy.evt.*.vm.state.*",
                                  "phy.evt.h1.web.audit"])
def test_event_filters_over_phy_evt_pass(good: str) -> None:
    assert check_filter(good) == good


@pytest.mark.parametrize("bad", ["foo.>", "phy.>", "phy.evt", "phy.evt.h1.>.x",
                                 "phy.evt.h 1.>", "phy.evt..>", "$KV.>"])
def test_other_event_filters_are_refused(bad: str) -> None:
    with pytest.raises(InvalidName, match="use phy.evt.>"):
        check_filter(bad)


def test_listen_addresses() -> None:
    assert parse_listen("0.0.0.0:443") == ("0.0.0.0", 443)
    assert parse_listen(":9700") == ("127.0.0.1", 9700)
    assert parse_listen("[::1]:9700") == ("::1", 9700)
    for bad in ("9700", "host:", "h:70000", "h:x"):
        with pytest.raises(BadRequest, match="PHYLLOME_WEB_LISTEN"):
            parse_listen(bad)
    with pytest.raises(BadRequest, match="both PHYLLOME_WEB_CERT and PHYLLOME_WEB_KEY"):
        load({"PHYLLOME_HOST": "h1", "PHYLLOME_WEB_CERT": "/c.pem"})
    assert load({"PHYLLOME_HOST": "h1", "PHYLLOME_WEB_CERT": "/c", "PHYLLOME_WEB_KEY": "/k"}
                ).scheme == "https"
    assert json.loads(DOC.read_text())["openapi"] == "3.1.0"


def test_docs_web_md_lists_every_route_with_its_role() -> None:
    doc = (DOC.parent / "web.md").read_text()
    missing = [f"{r.method} {r.path}" for r in ROUTES
               if f"| `{r.method} {r.path}` | {r.role or 'none'} | {r.status} |" not in doc]
    assert missing == []
