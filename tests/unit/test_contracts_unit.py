"""Subjects, codec, errors and config: pure code."""

from __future__ import annotations

import msgspec
import pytest

from shared import subjects
from shared.codec import decode, encode
from shared.config import load
from shared.errors import (
    BadRequest,
    Internal,
    InvalidMessage,
    InvalidName,
    NotFound,
    PayloadTooLarge,
    PhyError,
    error_from_reply,
    raise_for_reply,
    to_reply,
)
from shared.messages import LIFECYCLE, Ack, Empty, EndpointSpec
from shared.messages.jobs import JobRef
from tests.support.errors import error_classes


@pytest.mark.parametrize("bad", ["a.b", "a*", ">", "has space", "", "x" * 129, "tab\t"])
def test_token_rejects_wildcards_dots_spaces(bad: str) -> None:
    with pytest.raises(InvalidName, match="is not valid"):
        subjects.command(bad, "vm", "start")


def test_subjects_are_built_in_one_shape() -> None:
    assert subjects.command("h1", "vm", "start") == "phy.h1.vm.start"
    assert subjects.event("h1", "vm", "state", "u1") == "phy.evt.h1.vm.state.u1"
    assert subjects.event("h1", "hardware", "device.added") == "phy.evt.h1.hardware.device.added"
    with pytest.raises(InvalidName, match="unknown service"):
        subjects.command("h1", "nope", "start")


@pytest.mark.parametrize("ident", ["ubuntu-24.04", "a", "x.y.z", "debian-12_1:2", "."])
def test_an_event_id_with_dots_is_one_token_and_comes_back(ident: str) -> None:
    subject = subjects.event("h1", "catalogue", "image.pulled", ident)
    assert subject.count(".") == 6  # phy.evt.h1.catalogue.image.pulled.<id>
    assert subjects.id_of(subject.rsplit(".", 1)[1]) == ident


@pytest.mark.parametrize("bad", ["a*", ">", "has space", "", "x" * 129, "tab\t", "a%2Eb"])
def test_an_event_id_with_wildcards_or_spaces_is_refused(bad: str) -> None:
    with pytest.raises(InvalidName, match="is not valid"):
        subjects.event("h1", "catalogue", "image.pulled", bad)


def test_decode_empty_body_means_defaults() -> None:
    assert decode(b"", Empty) == Empty()
    assert decode(b"  ", Ack) == Ack(message="")


def test_decode_tolerates_unknown_fields_and_rejects_wrong_types() -> None:
    assert decode(b'{"message": "x", "future_field": [1]}', Ack) == Ack(message="x")
    with pytest.raises(InvalidMessage, match=r"Expected `str`, got `int` - at `\$.message`"):
        decode(b'{"message": 3}', Ack)


def test_decode_rejects_malformed_json_unknown_tag_missing_field_and_oversize() -> None:
    with pytest.raises(InvalidMessage, match="malformed JSON"):
        decode(b'{"message": ', Ack)
    with pytest.raises(InvalidMessage, match="Invalid value 'other.v9'"):
        decode(b'{"type": "other.v9"}', Ack)
    with pytest.raises(InvalidMessage, match="missing required field `job_id`"):
        decode(b"{}", JobRef)
    with pytest.raises(PayloadTooLarge, match="over the limit"):
        decode(b"{}" + b" " * 100, Ack, limit=50)


def test_error_round_trip_keeps_class_and_text() -> None:
    headers, body = to_reply(NotFound("no VM named demo", origin="h1/vm.info"))
    assert headers["Nats-Service-Error-Code"] == "404"
    err = error_from_reply(headers, body)
    assert isinstance(err, NotFound) and err.message == "no VM named demo"
    assert err.origin == "h1/vm.info" and str(err) == "vm on h1: no VM named demo"
    assert str(NotFound("no VM named demo")) == "no VM named demo"  # never crossed a bus
    assert error_from_reply(None, encode(Ack())) is None
    garbled = error_from_reply({"Nats-Service-Error-Code": "400",
                                "Nats-Service-Error": "bad"}, b"not json")
    assert isinstance(garbled, BadRequest)
    older = error_from_reply({"Nats-Service-Error-Code": "404"},
                             b'{"code":404,"kind":"not_found","message":"gone"}')
    assert isinstance(older, NotFound) and older.origin == "" and str(older) == "gone"


@pytest.mark.parametrize("cls", error_classes(), ids=lambda c: c.__name__)
def test_every_error_class_round_trips_as_itself(cls: type[PhyError]) -> None:
    headers, body = to_reply(cls("what went wrong; what to do", origin="h2/storage.clone"))
    with pytest.raises(PhyError) as caught:
        raise_for_reply(headers, body)
    err = caught.value
    assert type(err) is cls, f"{cls.__name__} came back as {type(err).__name__}"
    assert (err.kind, err.code, err.message, err.origin) == (
        cls.kind, cls.code, "what went wrong; what to do", "h2/storage.clone")
    assert str(err) == "storage on h2: what went wrong; what to do"


def test_error_kinds_are_unique_and_unknown_kinds_are_internal() -> None:
    assert Internal in error_classes() and len({c.kind for c in error_classes()}) == len(
        error_classes())
    with pytest.raises(TypeError, match="error kind 'not_found' of Missing is taken by NotFound"):
        type("Missing", (PhyError,), {"kind": "not_found"})
    err = error_from_reply({"Nats-Service-Error-Code": "500"},
                           b'{"code":500,"kind":"from_the_future","message":"new"}')
    assert type(err) is Internal and err.message == "new"


@pytest.mark.parametrize("verb", sorted(LIFECYCLE))
def test_an_endpoint_cannot_take_a_lifecycle_name(verb: str) -> None:
    with pytest.raises(ValueError, match=f"endpoint verb '{verb}' of vm is the name of a "
                                         "lifecycle step"):
        EndpointSpec("vm", verb, Empty, Ack, "clashes with the handlers' lifecycle")


def test_every_agents_handlers_have_the_lifecycle_and_no_verb_shadows_it() -> None:
    import importlib
    import typing

    from shared.agent import Lifecycle

    for name in subjects.SERVICES:
        service = importlib.import_module(f"services.{name}.service")
        cls = typing.get_type_hints(service.setup)["return"]
        assert issubclass(cls, Lifecycle), f"the {name} handlers lack begin()/close()"
        assert not {s.verb for s in service.ENDPOINTS} & LIFECYCLE


def test_config_env_over_file_over_defaults(tmp_path) -> None:
    conf = tmp_path / "phy.toml"
    conf.write_text('host = "filehost"\nstate_dir = "/srv/phy"\n[vm]\nmetrics_port = 9900\n'
                    'pools = {fast = "/fast"}\n')
    cfg = load("vm", env={"PHYLLOME_CONFIG": str(conf), "PHYLLOME_HOST": "envhost"})
    assert (cfg.host, cfg.state_dir, cfg.metrics_port) == ("envhost", "/srv/phy", 9900)
    assert cfg.extra == {"pools": {"fast": "/fast"}}
    assert load("storage", env={"PHYLLOME_HOST": "h"}).metrics_port == 9703


def test_config_bad_values_are_clear(tmp_path) -> None:
    with pytest.raises(BadRequest, match="PHYLLOME_HOST"):
        load("vm", env={"PHYLLOME_HOST": "bad.host"})
    with pytest.raises(BadRequest, match="metrics_port"):
        load("vm", env={"PHYLLOME_HOST": "h", "PHYLLOME_VM_METRICS_PORT": "many"})
    broken = tmp_path / "broken.toml"
    broken.write_text("host = ")
    with pytest.raises(BadRequest, match="config file"):
        load("vm", env={"PHYLLOME_CONFIG": str(broken)})


def test_messages_are_frozen_and_tagged() -> None:
    ack = Ack(message="x")
    with pytest.raises(AttributeError):
        ack.message = "y"  # type: ignore[misc]
    assert msgspec.json.decode(encode(ack))["type"] == "ack.v1"
