"""``phyllome vm`` as a user runs it: a real CLI process against a real agent and NATS."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

from cli.vm import ensure_demo
from shared.agent import Agent
from shared.natsserver import NatsServer
from tests.support.agents import REPO, agent_in_process

pytestmark = pytest.mark.integration


async def phyllome(agent: Agent, *argv: str) -> tuple[int, str, str]:
    """``phyllome vm ARGV...``"""
    return await command(agent, "vm", *argv)


async def command(agent: Agent, *argv: str) -> tuple[int, str, str]:
    env = {**os.environ, "PHYLLOME_HOST": "h1", "PHYLLOME_NATS_URL": agent.cfg.nats_url,
           "COLUMNS": "200"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", *argv, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_vm_cli_create_start_info_console_stop_delete(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    disk = tmp_path / "demo.raw"
    disk.write_bytes(bytes(4096))
    async with agent_in_process("vm", nats_server.url, tmp_path, libvirt_uri=libvirt_test_uri,
                                accelerator="tcg", extra={"reconcile_s": 3600}) as agent:
        rc, out, err = await phyllome(agent, "create", "demo", "--disk", str(disk),
                                      "--memory", "256M", "--cpus", "1", "--secure-boot",
                                      "--tpm", "--display", "both", "--json")
        assert rc == 0, err
        created = json.loads(out)
        assert (created["state"], created["spec"]["tpm"]) == ("shutoff", "emulated-2.0")

        rc, out, err = await phyllome(agent, "start", "demo")
        assert rc == 0, err
        assert "running" in out

        rc, out, err = await phyllome(agent, "info", "demo", "--json")
        assert rc == 0, err
        info = json.loads(out)
        assert {k: info[k] for k in ("name", "host", "state", "accelerator")} == {
            "name": "demo", "host": "h1", "state": "running", "accelerator": "tcg"}
        assert info["uuid"] == created["uuid"]
        assert set(info) >= {"vnc", "spice"}

        rc, out, _ = await phyllome(agent, "list")
        assert rc == 0 and "demo" in out and "running" in out

        rc, _, err = await phyllome(agent, "start", "demo")
        assert rc == 1 and "running already" in err
        assert err.count("vm on h1: ") == 1, f"the error says once where it came from: {err}"
        rc, _, err = await phyllome(agent, "create", "bad name")
        assert rc == 1 and "not valid" in err
        rc, _, err = await phyllome(agent, "delete", "demo")
        assert rc == 1 and "--force" in err

        rc, out, err = await phyllome(agent, "destroy", "demo")
        assert rc == 0, err
        rc, out, err = await phyllome(agent, "clone", "demo", "demo2", "--json")
        assert rc == 0, err
        assert json.loads(out)["state"] == "succeeded"
        rc, out, err = await phyllome(agent, "list", "--json")
        assert sorted(v["spec"]["name"] for v in json.loads(out)["vms"]) == ["demo", "demo2"]
        for name in ("demo", "demo2"):
            rc, out, err = await phyllome(agent, "delete", name, "--delete-disks")
            assert rc == 0, err
        assert disk.exists()
        rc, _, err = await phyllome(agent, "info", "demo")
        assert rc == 1 and "no VM 'demo'" in err


async def test_vm_demo_is_made_once_on_a_host_without_vms(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    tiny = tmp_path / "builtin" / "phyllome-tiny"
    tiny.mkdir(parents=True)
    (tiny / "disk.raw").write_bytes(b"\xeb" + bytes((1 << 20) - 1))
    digest = hashlib.sha256((tiny / "disk.raw").read_bytes()).hexdigest()
    (tiny / "manifest.json").write_text(json.dumps({"files": {"disk.raw": {
        "sha256": digest, "size": 1 << 20}}}))
    pool = tmp_path / "catalogue" / "pool"
    async with agent_in_process(
            "catalogue", nats_server.url, tmp_path / "catalogue",
            extra={"osinfo_dir": "", "probe_interval_s": 0, "builtin_dir": str(tiny.parent),
                   "pool_dir": str(pool)}), \
            agent_in_process("storage", nats_server.url, tmp_path / "storage",
                             extra={"import_dirs": [str(pool)]}), \
            agent_in_process("vm", nats_server.url, tmp_path / "vm",
                             libvirt_uri=libvirt_test_uri, accelerator="tcg",
                             extra={"reconcile_s": 3600}) as agent:
        lines = await ensure_demo(agent.bus, "h1")
        assert lines[0].startswith("demo VM `demo` (phyllome-tiny: UEFI + Secure Boot, TPM 2.0)"
                                   " is running under TCG"), lines
        assert any("phyllome vm console demo" in line for line in lines)
        rc, out, err = await phyllome(agent, "info", "demo", "--json")
        info = json.loads(out)
        assert (info["state"], info["spec"]["secure_boot"], info["spec"]["display"]) == \
            ("running", True, "both")
        assert info["memory_mib"] >= 384
        assert await ensure_demo(agent.bus, "h1") == []  # the host has a VM now


async def test_vm_cli_networks_nics_cpu_and_devices(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    disk, data = tmp_path / "web.raw", tmp_path / "data.raw"
    disk.write_bytes(bytes(4096))
    data.write_bytes(bytes(4096))
    async with agent_in_process("vm", nats_server.url, tmp_path, libvirt_uri=libvirt_test_uri,
                                accelerator="tcg", extra={"reconcile_s": 3600}) as agent:
        rc, out, err = await command(agent, "net", "create", "lab", "--nat", "10.77.0.0/24")
        assert rc == 0, err
        rc, _, err = await command(agent, "net", "create", "lab2", "--isolated", "10.77.0.0/16")
        assert rc == 1 and "overlaps network lab (10.77.0.0/24)" in err
        rc, _, err = await command(agent, "net", "create", "lab2")
        assert rc == 2 and "one of the arguments --nat --isolated --bridge" in err
        rc, out, err = await command(agent, "net", "list")
        assert rc == 0 and "lab" in out and "10.77.0.0/24" in out and "phyllome" in out

        rc, out, err = await phyllome(agent, "create", "web", "--disk", str(disk), "--json")
        assert rc == 0, err
        web = json.loads(out)
        assert [n["source"] for n in web["spec"]["nics"]] == ["phyllome"]  # the default NIC
        for verb in ("start", "info", "destroy"):  # the test driver's guest agent answers
            rc, out, err = await phyllome(agent, verb, "web")
            assert rc == 0, err
            if verb == "info":
                assert "/24 (testnet0)" in out and "from the agent" in out, out
        rc, out, err = await phyllome(agent, "create", "quiet", "--nic", "none", "--cpu",
                                      "Nehalem", "--json")
        assert rc == 0, err
        quiet = json.loads(out)["spec"]
        assert (quiet["nics"], quiet["cpu"]) == ([], "Nehalem")
        rc, _, err = await phyllome(agent, "create", "odd", "--nic", "none", "--nic", "user")
        assert rc == 2 and "give it alone" in err
        rc, _, err = await phyllome(agent, "create", "odd", "--cpu", "host-passthrough")
        assert rc == 1 and "needs KVM" in err

        rc, out, err = await phyllome(agent, "attach-disk", "web", str(data), "--json")
        assert rc == 0, err
        assert [d["path"] for d in json.loads(out)["spec"]["disks"]] == [str(disk), str(data)]
        rc, out, err = await phyllome(agent, "attach-nic", "web", "network:lab", "--mac",
                                      "52:54:00:00:00:77", "--json")
        assert rc == 0, err
        assert json.loads(out)["spec"]["nics"][1] == {
            "kind": "network", "source": "lab", "mac": "52:54:00:00:00:77"}
        rc, _, err = await command(agent, "net", "delete", "lab")
        assert rc == 1 and "used by web" in err
        rc, _, err = await phyllome(agent, "attach-usb", "web", "logitech")
        assert rc == 2 and "give vendor:product" in err
        rc, out, err = await phyllome(agent, "attach-usb", "web", "3.7", "--json")
        assert rc == 0, err
        assert json.loads(out)["spec"]["usb_hostdevs"] == [
            {"vendor": "", "product": "", "bus": 3, "device": 7}]
        for argv in (("detach-usb", "web", "3.7"), ("detach-nic", "web", "52:54:00:00:00:77"),
                     ("detach-disk", "web", str(data))):
            rc, _, err = await phyllome(agent, *argv)
            assert rc == 0, err
        rc, out, err = await command(agent, "net", "delete", "lab", "--json")
        assert rc == 0 and json.loads(out)["message"] == "deleted network lab", err


async def test_vm_cli_cloud_init_and_install_media(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    from services.vm.cloudinit import seed_iso
    from shared.messages.vm import CloudInit

    iso = tmp_path / "installer.iso"
    iso.write_bytes(seed_iso(CloudInit(instance_id="any")))
    key = tmp_path / "id.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEOGl4aBk3sYxwlVUu7a8Eb4iG1c0VTgTxWV7k"
                   "qzW4yP ana@lap\n")
    user_data = tmp_path / "user-data"
    user_data.write_text("#cloud-config\npackages: [htop]\n")
    async with agent_in_process("vm", nats_server.url, tmp_path, libvirt_uri=libvirt_test_uri,
                                accelerator="tcg", extra={"reconcile_s": 3600}) as agent:
        rc, out, err = await phyllome(
            agent, "create", "web", "--nic", "none", "--user", "ana", "--ssh-key", str(key),
            "--hostname", "web", "--user-data", str(user_data), "--cdrom", str(iso), "--json")
        assert rc == 0, err
        spec = json.loads(out)["spec"]
        ci = spec["cloud_init"]
        assert (ci["user"], ci["hostname"], ci["ssh_keys"]) == (
            "ana", "web", [key.read_text().strip()])
        assert ci["instance_id"].startswith("iid-") and Path(spec["seed"]).is_file()
        assert spec["cdrom"] == {"path": str(iso)}
        rc, out, err = await phyllome(agent, "info", "web")
        assert rc == 0, err
        assert f"hostname web, user ana, 1 SSH key(s), user-data, {ci['instance_id']}" in out
        assert str(iso) in out, out
        rc, out, err = await phyllome(agent, "eject", "web", "--json")
        assert rc == 0 and json.loads(out)["spec"]["cdrom"] == {"path": ""}, err
        rc, out, err = await phyllome(agent, "insert", "web", str(iso), "--json")
        assert rc == 0 and json.loads(out)["spec"]["cdrom"] == {"path": str(iso)}, err

        rc, _, err = await phyllome(agent, "create", "bad", "--ssh-key", "ssh-rsa AAAA x")
        assert rc == 1 and "does not decode to a ssh-rsa key" in err
        rc, _, err = await phyllome(agent, "create", "bad", "--user-data", str(tmp_path / "no"))
        assert rc == 2 and "--user-data" in err and "No such file" in err
        rc, _, err = await phyllome(agent, "create", "bad", "--cdrom", str(key))
        assert rc == 1 and "not an ISO9660 or UDF image" in err
        rc, out, err = await phyllome(agent, "create", "win", "--nic", "none", "--profile",
                                      "windows", "--json")
        assert rc == 0, err
        spec = json.loads(out)["spec"]
        assert (spec["profile"], spec["secure_boot"], spec["tpm"]) == (
            "windows", True, "emulated-2.0")
