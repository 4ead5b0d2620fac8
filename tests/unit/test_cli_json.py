"""``--json`` output: what ``json.dumps(..., indent=2)`` of the message's builtins writes."""

from __future__ import annotations

import json

import msgspec
import pytest

from cli import common
from shared.messages.vm import VmList, VmRecord, VmSpec

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("obj", [
    VmList(vms=[VmRecord(spec=VmSpec(name="demo", uuid="u1"), host="h1")]),
    {"nested": {"list": [1, 2.5, None, True], "empty": {}, "none": []}},
    {"name": "naïve ✓ 😀"},  # json.dumps escapes what is not ASCII
    {"raw": b"\x00\x01"},
    [],
])
def test_print_json_writes_what_json_dumps_writes(obj: object,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    common.print_json(obj)
    want = json.dumps(msgspec.to_builtins(obj), indent=2, default=str) + "\n"
    assert capsys.readouterr().out == want
