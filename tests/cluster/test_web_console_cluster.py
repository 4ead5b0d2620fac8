"""The console of a VM on host B opens through host A's web gateway, in a three-host cluster.

Each host runs ``phyllome up`` (agents and web gateway, its own namespace); b runs its own
libvirtd and QEMU under TCG, a and c the test driver (c keeps the NATS cluster at three
servers). A VM with a VNC display and no disk starts on b and sits in its BIOS — the cheapest
real QEMU there is. A client on host a, with a token made by ``phyllome web token create``
on a, opens ``/api/v1/vms/far/console/vnc`` on a's gateway (127.0.0.1:9700 of host a): the
RFB handshake and a full frame come from b's QEMU (its desktop name is the VM's), across
NATS, though b's VNC port listens on b's loopback only. a's gateway also serves the VM's
screenshot, and when the VM is powered off on b, the console on a closes with code 1000.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.netns import Cluster, Hosts

pytestmark = pytest.mark.cluster

START_ON_B = """
from shared.messages.vm import VmCreate, VmRef, VmSpec
async def main(bus):
    info = await bus.call("b", vm_api.CREATE, VmCreate(spec=VmSpec(
        name="far", memory_mib=128, vcpus=1, firmware="bios", display="vnc")), timeout=60)
    await bus.call("b", vm_api.START, VmRef(vm="far"), timeout=60)
    vnc = (await bus.call("b", vm_api.INFO, VmRef(vm="far"))).vnc
    return {"uuid": info.uuid, "vnc_host": vnc.host if vnc else "", "state": "running"}
"""

# Runs inside host a: a's gateway, a's NATS server (routed to b's).
CLIENT_ON_A = """
import struct
import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from shared.messages.vm import VmRef
from tests.support import png
GATEWAY = "127.0.0.1:9700"
HEADERS = {"authorization": "Bearer TOKEN"}

async def main(bus):
    out = {}
    async with httpx.AsyncClient(base_url=f"http://{GATEWAY}", timeout=30) as http:
        listed = (await http.get("/api/v1/vms", headers=HEADERS)).json()["vms"]
        out["listed"] = sorted((v["name"], v["host"], v["state"]) for v in listed)
        r = await http.get("/api/v1/vms/far/screenshot", headers=HEADERS)
        out["screenshot"] = [r.status_code, r.headers.get("content-type")]
        if r.status_code == 200:
            out["screenshot"].append(list(png.decode(r.content)[:2]))
    async with connect(f"ws://{GATEWAY}/api/v1/vms/far/console/vnc", additional_headers=HEADERS,
                       subprotocols=["binary"]) as ws:
        buf = bytearray()

        async def exactly(n):
            while len(buf) < n:
                message = await asyncio.wait_for(ws.recv(), 30)
                buf.extend(message)
            data = bytes(buf[:n])
            del buf[:n]
            return data

        out["version"] = (await exactly(12)).decode()
        await ws.send(b"RFB 003.008\\n")
        count = (await exactly(1))[0]
        out["security"] = list(await exactly(count))
        await ws.send(b"\\x01")  # None: the VM has no console password
        out["security_result"] = (await exactly(4)).hex()
        await ws.send(b"\\x01")  # ClientInit, shared
        width, height = struct.unpack(">HH", await exactly(4))
        bpp = (await exactly(16))[0] // 8
        (length,) = struct.unpack(">I", await exactly(4))
        out["desktop"] = (await exactly(length)).decode()
        await ws.send(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))
        assert (await exactly(2))[0] == 0  # FramebufferUpdate
        (rects,) = struct.unpack(">H", await exactly(2))
        pixels = 0
        for _ in range(rects):
            _x, _y, w, h, encoding = struct.unpack(">HHHHi", await exactly(12))
            assert encoding == 0, encoding  # raw: the only encoding asked for
            pixels += len(await exactly(w * h * bpp))
        out["frame"] = [width, height, bpp, pixels]
        await bus.call("b", vm_api.DESTROY, VmRef(vm="far"), timeout=30)
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 30)
        except ConnectionClosed as closed:
            out["closed"] = [closed.rcvd.code, closed.rcvd.reason] if closed.rcvd else None
    return out
"""


@pytest.mark.timeout(240)
def test_the_console_of_a_vm_on_b_opens_through_as_gateway(tmp_path: Path) -> None:
    with Hosts(tmp_path / "ns", ("a", "b", "c")) as hosts:
        uri = hosts["b"].start_libvirtd()
        cluster = Cluster(hosts, tmp_path, libvirt={"b": uri},
                          agents={"a": "vm", "c": "hardware,storage"})
        cluster.wait_up()
        made = cluster.py("b", START_ON_B, timeout=120)
        assert made["vnc_host"] in ("127.0.0.1", "::1"), made  # b's loopback only

        created = cluster.cli("a", "web", "token", "create", "op", "--role", "operator",
                              "--json")
        assert created.returncode == 0, created.stderr
        token = json.loads(created.stdout)["token"]
        seen = cluster.py("a", CLIENT_ON_A.replace("TOKEN", token), timeout=120)

        assert ("far", "b", "running") in [tuple(v) for v in seen["listed"]], seen
        status, kind, *size = seen["screenshot"]
        assert (status, kind) == (200, "image/png"), (seen["screenshot"], cluster.logs("a"))
        assert 0 < size[0][0] <= 320
        assert seen["version"] == "RFB 003.008\n"
        assert 1 in seen["security"] and seen["security_result"] == "00000000"
        assert seen["desktop"] == "QEMU (far)"  # QEMU names its display after the VM
        width, height, bpp, pixels = seen["frame"]
        assert width >= 640 and height >= 400 and pixels == width * height * bpp
        code, reason = seen["closed"]
        assert code == 1000 and "the VM's console" in reason, seen["closed"]
