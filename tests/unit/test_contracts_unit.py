"""Subjects, codec, errors and config: pure code."""

from __future__ import annotations

import msgspec
import pytest

from shared import subjects
from shared.codec import decode, encode
from shared.config import load
from shared.errors import (
    BadRequest,
    InvalidMessage,
    InvalidName,
    NotFound,
    PayloadTooLarge,
    error_from_reply,
    to_reply,
)
from shared.messages import Ack, Empty
from shared.messages.jobs import JobRef


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
    headers, body = to_reply(NotFound("vm: no VM named demo"))
    assert headers["Nats-Service-Error-Code"] == "404"
    err = error_from_reply(headers, body)
    assert isinstance(err, NotFound) and err.message == "vm: no VM named demo"
    assert error_from_reply(None, encode(Ack())) is None
    garbled = error_from_reply({"Nats-Service-Error-Code": "400",
                                "Nats-Service-Error": "bad"}, b"not json")
    assert isinstance(garbled, BadRequest)


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
