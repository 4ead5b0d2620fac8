"""A real guest's consoles through another host's web gateway: phyllome-tiny on the real
libvirtd and QEMU (TCG), its VNC display and serial port bridged by the vm agent of h1 over
NATS to the gateway of h0, a WebSocket client speaking RFB and typing on the serial line,
and Chromium showing both."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from shared import tokens
from shared.messages.vm import VmCreate, VmRef
from shared.natsserver import NatsServer
from tests.support import png
from tests.support.libvirt import wait_for_marker
from tests.support.tiny import TinyImage
from tests.support.web import bearer, gateway_in_process, make_token
from tests.system.test_vm_guests import BOOT_S, guests, unique
from tests.system.test_web_browser import CHROMIUM, DESK, DRIVER, shoot, size, wait

pytestmark = [pytest.mark.system, pytest.mark.timeout(240)]


class Stream:
    """A WebSocket's binary messages as one byte stream."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws, self.buf = ws, bytearray()

    async def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            message = await asyncio.wait_for(self.ws.recv(), 30)
            self.buf.extend(message if isinstance(message, bytes) else message.encode())
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def until(self, text: bytes) -> bytes:
        while text not in self.buf:
            message = await asyncio.wait_for(self.ws.recv(), 30)
            self.buf.extend(message if isinstance(message, bytes) else message.encode())
        return bytes(self.buf)


async def screen(stream: Stream) -> tuple[int, int, bytes]:
    """RFB 3.8 without a password: handshake, then one full frame in raw encoding."""
    assert await stream.exactly(12) == b"RFB 003.008\n"
    await stream.ws.send(b"RFB 003.008\n")
    count = (await stream.exactly(1))[0]
    assert 1 in await stream.exactly(count)  # "None": the VM has no console password
    await stream.ws.send(b"\x01")
    assert await stream.exactly(4) == b"\0\0\0\0"
    await stream.ws.send(b"\x01")  # ClientInit, shared
    width, height = struct.unpack(">HH", await stream.exactly(4))
    bpp = (await stream.exactly(16))[0] // 8
    (name_length,) = struct.unpack(">I", await stream.exactly(4))
    await stream.exactly(name_length)
    await stream.ws.send(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))
    assert (await stream.exactly(2))[0] == 0  # FramebufferUpdate
    (rects,) = struct.unpack(">H", await stream.exactly(2))
    pixels = b""
    for _ in range(rects):
        _x, _y, w, h, encoding = struct.unpack(">HHHHi", await stream.exactly(12))
        assert encoding == 0  # raw: we asked for no other
        pixels += await stream.exactly(w * h * bpp)
    return width, height, pixels


def in_the_browser(url: str, token: str, name: str) -> None:
    """Headless Chromium: the guest's screen in noVNC's canvas (more than one colour), and a
    line typed into the serial terminal coming back from the guest."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    try:
        size(driver, DESK)
        driver.get(url + "/")
        wait(driver, "the login form", lambda d: d.find_element(By.ID, "token").is_displayed())
        driver.find_element(By.ID, "token").send_keys(token)
        driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
        wait(driver, "the machine grid", lambda d: d.find_elements(
            By.CSS_SELECTOR, f'.vm[data-name="{name}"] [data-verb=console]:enabled'))
        wait(driver, "the guest's thumbnail", lambda d: d.execute_script(
            "const i = document.querySelector(arguments[0]);"
            "return i && !i.hidden && i.complete && i.naturalWidth > 0;",
            f'.vm[data-name="{name}"] img.thumb'), timeout=30)
        driver.find_element(By.CSS_SELECTOR, f'.vm[data-name="{name}"] [data-verb=console]'
                            ).click()
        colours = wait(driver, "the guest's screen in the canvas", lambda d: d.execute_script(
            "const c = document.querySelector('#console-screen canvas');"
            "if (!c || !c.width) return 0;"
            "const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "const seen = new Set();"
            "for (let i = 0; i < px.length; i += 4 * 97)"
            "  seen.add(px[i] << 16 | px[i + 1] << 8 | px[i + 2]);"
            "return seen.size > 1 ? seen.size : 0;"), timeout=30)
        assert colours > 1
        assert "connected" in driver.find_element(By.ID, "console-status").text
        shoot(driver, "console")
        driver.find_element(By.ID, "console-serial-link").click()
        terminal = wait(driver, "the serial terminal", lambda d: d.find_element(
            By.ID, "console-serial") if "connected" in d.find_element(
                By.ID, "console-status").text else None)
        terminal.click()
        terminal.send_keys("typed in chromium" + Keys.ENTER)
        wait(driver, "the guest's answer", lambda d: "echo=typed in chromium" in d.find_element(
            By.ID, "console-serial").text, timeout=30)
        shoot(driver, "serial")
    finally:
        driver.quit()


async def test_a_real_guests_consoles_open_through_the_gateway(
        nats_server: NatsServer, tmp_path: Path, guest_dir: Path, libvirtd: str,
        tiny_image: TinyImage) -> None:
    # The gateway is another host's (h0): it finds the VM's host in KV and the bytes cross
    # NATS from h1's agent, as they would from another machine.
    async with guests(nats_server, tmp_path, guest_dir, tiny_image) as g, \
            gateway_in_process(nats_server.url, "h0") as gw:
        spec = g.direct(unique("con"), firmware="bios", display="vnc")
        info = await g.call("create", VmCreate(spec=spec))
        await g.call("start", VmRef(vm=info.uuid))
        await wait_for_marker(g.console(info.uuid), "ready", BOOT_S)
        token = await make_token(gw.bus, "op", "operator")
        base = gw.url.replace("http://", "ws://") + f"/api/v1/vms/{spec.name}/console"

        async with connect(f"{base}/vnc", additional_headers=bearer(token),
                           subprotocols=["binary"]) as vnc:  # type: ignore[list-item]
            assert vnc.subprotocol == "binary"
            width, height, pixels = await screen(Stream(vnc))
            assert width >= 640 and height >= 400 and len(pixels) > 0
            bpp = len(pixels) // (width * height)
            colours = {pixels[i:i + bpp] for i in range(0, len(pixels), bpp)}
            assert len(colours) > 1, "the guest's screen is one colour"

        # its screen as the grid's thumbnail: libvirt's screenshot of QEMU, shrunk to a PNG
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
            r = await http.get(f"/api/v1/vms/{spec.name}/screenshot", headers=bearer(token),
                               params={"max_width": 320})
            assert r.status_code == 200, r.text
            assert r.headers["content-type"] == "image/png"
            assert r.headers["x-screen-size"] == f"{width}x{height}"
            thumb_width, thumb_height, _bpp, _rows = png.decode(r.content)
            assert 160 < thumb_width <= 320 and thumb_height > 100
            assert png.distinct_pixels(r.content) > 1, "the guest's thumbnail is one colour"

        # the same through noVNC and the page's terminal (with CI set, a missing Chromium
        # fails this test; elsewhere only this part is left out)
        if Path(CHROMIUM).exists() or os.environ.get("CI"):
            await asyncio.to_thread(in_the_browser, gw.url, token, spec.name)

        async with connect(f"{base}/serial", additional_headers=bearer(token)) as serial:
            await serial.send(b"hello from the browser\r")
            said = await Stream(serial).until(b"echo=hello from the browser")
            assert b"PHYLLOME-TINY: echo=hello from the browser" in said
            await tokens.revoke(gw.bus, "op")
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(serial.recv(), 30)
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
                4401, "token 'op' was revoked")

        token = await make_token(gw.bus, "op2", "operator")
        async with connect(f"{base}/serial", additional_headers=bearer(token)) as serial:
            await serial.send(b"\r")
            await Stream(serial).until(b"echo=")
            await g.call("destroy", VmRef(vm=info.uuid))
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(serial.recv(), 30)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
            assert "the VM's console" in closed.value.rcvd.reason
        assert g.agent.handlers.consoles.open_sessions == 0
