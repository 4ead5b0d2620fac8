"""A /dev/kvm that QEMU's user cannot open (no udev): the vm agent says so, set-up fixes it.

Two tests close this machine's real /dev/kvm (root:root 0600, as a fresh host without udevd
has it) for the few milliseconds their check takes (``tests.support.kvm``); the timing of
libvirt's re-probes is a system test (``tests/system/test_vm_libvirt_reprobe.py``).
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from services.vm import health
from shared.natsserver import NatsServer
from tests.support.agents import REPO, agent_in_process
from tests.support.kvm import KVM, closed_kvm, require_qemu_in_kvm
from tests.support.wait import until

pytestmark = pytest.mark.integration

def test_vm_health_sees_a_kvm_node_closed_to_qemu() -> None:
    with closed_kvm():
        problem = health.kvm_access()
    assert problem is not None and problem.kind == "kvm-access"
    assert "cannot open /dev/kvm (crw------- root:root)" in problem.what
    assert "chgrp kvm /dev/kvm && chmod 0660 /dev/kvm" in problem.fix


def test_setup_kvm_step_opens_the_node_to_group_kvm() -> None:
    with closed_kvm():
        done = subprocess.run([str(REPO / "deploy" / "setup.sh"), "kvm"], capture_output=True,
                              text=True, timeout=60)
        st = KVM.stat()
        fixed = health.kvm_access()
    assert done.returncode == 0, done.stderr
    assert (stat.S_IMODE(st.st_mode), pwd.getpwuid(st.st_uid).pw_name,
            grp.getgrgid(st.st_gid).gr_name) == (0o660, "root", "kvm")
    assert fixed is None


async def test_vm_agent_shows_the_kvm_problem_in_phyllome_status(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    """Through the real agent, heartbeat and CLI: a KVM node like a fresh host's (a copy of
    /dev/kvm's device number in the test's folder, so the machine's own stays open)."""
    require_qemu_in_kvm()
    node = tmp_path / "kvm"
    os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(10, 232))
    async with agent_in_process("vm", nats_server.url, tmp_path / "vm",
                                libvirt_uri=libvirt_test_uri, accelerator="tcg",
                                extra={"kvm_device": str(node)}) as agent:
        await until("the vm agent to find the problem", lambda: agent.problems, timeout=10)
        await agent.beat()
        env = {**os.environ, "PHYLLOME_NATS_URL": nats_server.url, "COLUMNS": "200"}
        outputs = []
        for argv in (["status", "--json"], ["status"]):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cli.main", *argv, cwd=REPO, env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            outputs.append(out.decode())
    rows = {(r["host"], r["agent"]): r for r in json.loads(outputs[0])}
    problems = rows[("h1", "vm")]["problems"]
    assert [p["kind"] for p in problems] == ["kvm-access"]
    assert f"cannot open {node} (crw------- root:root)" in problems[0]["what"]
    assert rows[("h1", "vm")]["healthy"]  # working, only slow: healthy, with a problem
    assert "h1 vm: QEMU's user" in outputs[1]
    assert f"fix: run `chgrp kvm {node} && chmod 0660 {node}`" in outputs[1]
