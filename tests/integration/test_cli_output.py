"""Issue 19, output a person reads: tables at 80 columns, one line per event, humanized
results (raw with ``--json``), JSON errors, help that lists subcommands and has no source
markup, one ``[POOL/]NAME`` style, the vm agent's boot probe in ``hw report``, consoles.

Each test runs ``python -m cli.main`` as a user would, against one real stack (NATS and the
four agents of h1) shared by the module.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
from pathlib import Path

import pytest

from cli.main import parser
from tests.support.cli import Stack, cli_env, phyllome, stack
from tests.support.require import require

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]
__all__ = ["stack"]


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


async def test_images_list_at_80_columns_keeps_every_id_whole_for_this_arch(
        stack: Stack) -> None:
    done = await phyllome(stack.env, "images", "list", "--downloadable", "--json")
    entries = json.loads(done.out)["images"]
    here = platform.machine()
    assert entries and all(not e["archs"] or here in e["archs"] for e in entries)
    done = await phyllome(stack.env, "images", "list", "--downloadable", columns=80)
    assert done.rc == 0, done.err
    table = lines(done.out)
    assert len(table) == len(entries) + 1, "one line per entry: no value split over lines"
    assert all(len(line) <= 80 for line in table)
    assert [line.split()[0] for line in table[1:]] == [e["id"] for e in entries]
    assert "centos-stream9" in {e["id"] for e in entries}
    assert "ARCH" not in table[0]

    done = await phyllome(stack.env, "images", "list", "--all-arches", "--json")
    other = [e for e in json.loads(done.out)["images"] if e["archs"] and here not in e["archs"]]
    assert other, "osinfo-db has entries of other architectures only"
    done = await phyllome(stack.env, "images", "list", "--json")
    assert {e["id"] for e in other}.isdisjoint(e["id"] for e in json.loads(done.out)["images"])
    done = await phyllome(stack.env, "images", "list", "--all-arches", "--search", "debian11",
                          columns=80)
    assert "ARCH" in lines(done.out)[0] and "debian11" in done.out


async def test_hosts_at_80_columns_shortens_agents_and_capabilities(stack: Stack) -> None:
    done = await phyllome(stack.env, "hosts", columns=80)
    assert done.rc == 0, done.err
    header, row = lines(done.out)
    assert len(header) <= 80 and len(row) <= 80
    assert row.split()[:3] == ["h1", "up", "all"]
    assert re.search(r"uefi secure-boot \+\d", row), row
    assert "WHY DOWN" not in header, "no host is down"
    done = await phyllome(stack.env, "hosts", "--json")
    assert json.loads(done.out)[0]["agents"] == ["catalogue", "hardware", "storage", "vm"]


async def test_events_are_one_readable_line_each_progress_only_when_asked(
        stack: Stack) -> None:
    for argv in (["create", "ev-disk", "64M"], ["clone", "ev-disk", "ev-copy"]):
        done = await phyllome(stack.env, "storage", *argv)
        assert done.rc == 0, done.err
    done = await phyllome(stack.env, "events", "--since", "10m")
    assert done.rc == 0, done.err
    events = lines(done.out)
    clone = [e for e in events if "job.finished" in e and "kind=clone" in e]
    assert clone and "result=default/ev-copy (64.0 MiB) method=" in clone[-1], clone
    assert "storage.volume_changed" in done.out and "virtual_bytes=64.0 MiB" in done.out
    assert not [e for e in events if "progress" in e]
    assert not [e for e in events if re.search(r"\{'|=None|\d{9,}\.\d", e)], \
        "no Python reprs or raw unix times"
    assert max(len(e) for e in events) < 250

    done = await phyllome(stack.env, "events", "--since", "10m", "--progress")
    assert "job.progress" in done.out
    done = await phyllome(stack.env, "events", "--since", "10m", "--json")
    parsed = [json.loads(line) for line in lines(done.out)]
    assert {"job.progress.v1", "job.finished.v1"} <= {p["event"]["type"] for p in parsed}
    done = await phyllome(stack.env, "events", "--help")
    assert "JSON Lines" in done.out


async def test_results_are_humanized_in_text_and_raw_with_json(stack: Stack) -> None:
    assert (await phyllome(stack.env, "storage", "create", "hum", "4G")).rc == 0
    done = await phyllome(stack.env, "storage", "info", "hum")
    assert done.rc == 0, done.err
    fields = dict(line.split(None, 1) for line in lines(done.out)[1:])
    assert fields["virtual_bytes"] == "4.0 GiB"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", fields["modified"])
    raw = json.loads((await phyllome(stack.env, "storage", "info", "hum", "--json")).out)
    assert raw["virtual_bytes"] == 4 << 30 and isinstance(raw["modified"], float)

    done = await phyllome(stack.env, "storage", "clone", "hum", "hum2")
    assert done.rc == 0, done.err
    assert "default/hum2 (4.0 GiB)" in done.out and "{" not in done.out
    assert re.search(r"seconds\s+\d+(\.\d)? m?s", done.out), done.out


async def test_errors_with_json_are_json_on_stderr_with_the_same_exit_codes(
        stack: Stack) -> None:
    for argv, code, kind in ((["vm", "info", "nope"], 1, "not_found"),
                             (["storage", "info", "a/b/c"], 1, "invalid_name")):
        text = await phyllome(stack.env, *argv)
        done = await phyllome(stack.env, *argv, "--json")
        assert (text.rc, done.rc) == (code, code), done.err
        assert done.out == ""
        error = json.loads(done.err)["error"]
        assert error["kind"] == kind and error["message"] in text.err
    offline = cli_env("nats://127.0.0.1:1", PHYLLOME_CONNECT_WAIT="0.3")
    done = await phyllome(offline, "vm", "list", "--json")
    assert done.rc == 3
    assert json.loads(done.err) == {"error": {"kind": "unavailable", "message": (
        "cannot reach NATS at nats://127.0.0.1:1; is `phyllome up` running, or "
        "PHYLLOME_NATS_URL right?")}}


async def test_a_command_group_alone_lists_its_subcommands(stack: Stack) -> None:
    for group, some in ((["vm"], ("create", "console", "stop")),
                        (["images"], ("list", "pull", "sources")),
                        (["storage"], ("pools", "send")), (["hw"], ("report", "mdev")),
                        (["hw", "mdev"], ("types", "create"))):
        done = await phyllome(stack.env, *group)
        assert done.rc == 2, done
        assert all(re.search(rf"^\s+{word}\s", done.out, re.M) for word in some), done.out


def every_parser(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [p]
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += every_parser(sub)
    return found


async def test_help_has_no_source_markup(stack: Stack) -> None:
    helps = [p.format_help() for p in every_parser(parser([]))]
    assert len(helps) > 40
    assert [h.splitlines()[0] for h in helps if "``" in h] == []
    done = await phyllome(stack.env, "--help")
    assert done.rc == 0 and "``" not in done.out and "The phyllome command" in done.out


async def test_images_sources_list_works_as_the_help_says(stack: Stack) -> None:
    done = await phyllome(stack.env, "images", "sources", "list")
    assert done.rc == 0, done.err
    assert [line.split()[0] for line in lines(done.out)[1:]] == ["builtin", "osinfo"]
    assert (await phyllome(stack.env, "images", "sources")).out == done.out


async def test_storage_verbs_take_pool_slash_name(stack: Stack) -> None:
    for argv in (["create", "default/pn", "16M"], ["clone", "default/pn", "pn2"],
                 ["resize", "pn2", "32M"], ["info", "default/pn2"],
                 ["send", "default/pn2", "--to", "h1", "--detach"], ["delete", "default/pn2"]):
        done = await phyllome(stack.env, "storage", *argv)
        expected = 1 if argv[0] == "send" else 0  # to itself: refused, but parsed
        assert done.rc == expected, (argv, done.err)
    done = await phyllome(stack.env, "storage", "create", "nopool/x", "16M")
    assert done.rc == 1 and "no pool 'nopool'" in done.err
    done = await phyllome(stack.env, "storage", "create", "a/b/c", "16M")
    assert done.rc == 1 and "give POOL/NAME or NAME" in done.err
    for verb in ("create", "resize", "clone", "import", "delete", "info", "send"):
        usage = (await phyllome(stack.env, "storage", verb, "--help")).out
        assert "[POOL/]NAME" in usage, verb


async def test_hw_report_shows_the_vm_agents_boot_probe_verdict(stack: Stack) -> None:
    require(Path("/dev/kvm").exists(), "/dev/kvm (the boot probe is about KVM)")
    done = await phyllome(stack.env, "hw", "report", columns=200)
    assert done.rc == 0, done.err
    assert "boot probe failed: not proven usable" in done.out
    assert "boot probe (vm agent of h1): KVM unusable, VMs run under TCG" in done.out
    report = json.loads((await phyllome(stack.env, "hw", "report", "--json")).out)
    assert (report["host"]["kvm_boot_probe"], report["host"]["kvm_usable"]) == ("failed", False)
    offline = cli_env("nats://127.0.0.1:1")
    done = await phyllome(offline, "hw", "report", columns=200)
    assert done.rc == 0 and "boot probe: not known here (cannot reach NATS" in done.out


async def test_vm_console_attaches_here_or_says_where_and_graphics_lists_uris(
        stack: Stack) -> None:
    assert (await phyllome(stack.env, "storage", "create", "con-disk", "16M")).rc == 0
    done = await phyllome(stack.env, "vm", "create", "con", "--disk", "con-disk")
    assert done.rc == 0, done.err
    done = await phyllome(stack.env, "vm", "console", "con")
    assert done.rc == 1 and "VM con is shutoff: start it first" in done.err
    assert (await phyllome(stack.env, "vm", "start", "con")).rc == 0
    done = await phyllome(stack.env, "vm", "console", "con")  # stdin is not a terminal
    assert done.rc == 1 and "needs a terminal" in done.err
    elsewhere = {**stack.env, "PHYLLOME_HOST": "h9"}
    done = await phyllome(elsewhere, "vm", "console", "con", "--host", "h1")
    assert done.rc == 1, done.err
    assert "VM con runs on host h1: its serial console opens there " \
           "(`ssh h1 phyllome vm console con`)" in done.err
    done = await phyllome(stack.env, "vm", "console", "con", "--graphics")
    assert done.rc == 1 and "has no VNC or SPICE console open" in done.err  # test driver
