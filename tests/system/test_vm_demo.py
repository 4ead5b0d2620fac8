"""The demo of the issue's "Done when", as a user types it, on the real libvirtd:

    phyllome vm create demo --image phyllome-tiny --secure-boot --tpm --display both
    phyllome vm start demo
    phyllome vm info demo --json     # VNC and SPICE endpoints; the XML passes virt-xml-validate
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shared.natsserver import NatsServer
from tests.support.agents import REPO, agent_in_process
from tests.support.libvirt import wait_for_marker
from tests.support.tiny import TinyImage

pytestmark = [pytest.mark.system, pytest.mark.timeout(240)]


async def phyllome(url: str, *argv: str) -> tuple[int, str, str]:
    env = {**os.environ, "PHYLLOME_HOST": "h1", "PHYLLOME_NATS_URL": url, "COLUMNS": "200"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "vm", *argv, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_vm_demo_from_the_tiny_image_with_secure_boot_tpm_and_both_consoles(
        nats_server: NatsServer, guest_dir: Path, libvirtd: str,
        tiny_image: TinyImage) -> None:
    state = guest_dir  # QEMU must reach the storage pool under it
    builtin = state / "images" / "builtin" / "phyllome-tiny"
    builtin.mkdir(parents=True)
    for f in (tiny_image.disk, tiny_image.kernel, tiny_image.initrd,
              tiny_image.disk.with_name("manifest.json")):
        subprocess.run(["cp", "--sparse=always", str(f), str(builtin / f.name)], check=True)
    url = nats_server.url
    async with agent_in_process("catalogue", url, state, extra={"osinfo_dir": "",
                                                                "probe_interval_s": 0}), \
            agent_in_process("storage", url, state,
                             extra={"import_dirs": [str(state / "images" / "pool")]}), \
            agent_in_process("vm", url, state, libvirt_uri=libvirtd, accelerator="tcg",
                             extra={"reconcile_s": 3600}):
        rc, out, err = await phyllome(url, "create", "phy-demo", "--image", "phyllome-tiny",
                                      "--secure-boot", "--tpm", "--display", "both")
        assert rc == 0, err
        try:
            rc, out, err = await phyllome(url, "start", "phy-demo")
            assert rc == 0, err
            rc, out, err = await phyllome(url, "info", "phy-demo", "--json")
            assert rc == 0, err
            info = json.loads(out)
            assert (info["name"], info["host"], info["state"], info["accelerator"]) == \
                ("phy-demo", "h1", "running", "tcg")
            for kind in ("vnc", "spice"):
                assert info[kind]["host"] == "127.0.0.1" and info[kind]["port"] > 0
            rc, out, _ = await phyllome(url, "console", "phy-demo", "--graphics")
            assert rc == 0 and out.startswith("vnc://127.0.0.1:")
            assert "remote-viewer spice://127.0.0.1:" in out
            assert "/#/console/phy-demo/vnc    in a browser" in out  # the web gateway's page

            xml = subprocess.run(["virsh", "-c", libvirtd, "dumpxml", "phy-demo"],
                                 check=True, capture_output=True, text=True).stdout
            (state / "demo.xml").write_text(xml)
            tool = shutil.which("virt-xml-validate")
            assert tool is not None
            done = subprocess.run([tool, str(state / "demo.xml"), "domain"],
                                  capture_output=True, text=True)
            assert done.returncode == 0, done.stderr

            seen = await wait_for_marker(state / "vm" / "consoles" / f"{info['uuid']}.log",
                                         "ready", 120)
            assert (seen["firmware"], seen["secureboot"], seen["tpm"]) == \
                ("uefi", "enabled", "present")
        finally:
            rc, out, err = await phyllome(url, "delete", "phy-demo", "--force",
                                          "--delete-disks")
        assert rc == 0, err
