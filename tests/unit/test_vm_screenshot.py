"""Thumbnails of a VM's screen (services/vm/screenshot.py): the PNG writer checked by a reader
of its own (tests/support/png.py) and against a golden file, the PPM and PNG readers on every
filter and colour type, the shrink, and each malformed input refused with a typed error.

Regenerate the golden file after an intended change of the writer::

    PHYLLOME_REGENERATE=1 pytest tests/unit/test_vm_screenshot.py
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
import zlib
from pathlib import Path

import pytest

from services.vm import screenshot
from services.vm.hypervisor import Domain
from services.vm.screenshot import (
    Image,
    Screens,
    read_png,
    read_ppm,
    shrink,
    thumbnail,
    write_png,
)
from shared import security, subjects
from shared.errors import BackendError, Conflict, InvalidMessage, NotFound
from shared.messages import vm as vm_api
from shared.messages.vm import VmScreenshotRequest
from tests.support import png as reference
from tests.support.golden import regenerating
from tests.support.require import require

GOLDEN = Path(__file__).parents[1] / "data" / "vm" / "golden" / "screenshot-9x6-rgb.rows"
TEST_DRIVER_PNG = Path("/usr/share/libvirt/test-screenshot.png")  # what libvirt's test driver shows


def pattern(width: int, height: int, channels: int) -> Image:
    """Stripes, a gradient and a wrap-around: every filter's arithmetic has work."""
    return Image(width, height, channels, bytes(
        (x * 37 + y * 101 + c * 59 + (x * y) % 7 * 40) % 256
        for y in range(height) for x in range(width) for c in range(channels)))


def rows_of(image: Image) -> list[bytes]:
    stride = image.width * image.channels
    return [image.pixels[y * stride:(y + 1) * stride] for y in range(image.height)]


def png_of(width: int, height: int, colour: int, rows: list[bytes], filters: list[int],
           *, palette: bytes = b"", interlace: int = 0, depth: int = 8,
           raw: bytes | None = None) -> bytes:
    """A PNG whose rows use the given filters (cycled), written here the long way."""
    bpp = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    out, prev = b"", bytes(len(rows[0]))
    for y, row in enumerate(rows):
        kind = filters[y % len(filters)]
        enc = bytearray()
        for i, v in enumerate(row):
            a = row[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            predicted = [0, a, b, (a + b) // 2,
                         a if pa <= pb and pa <= pc else b if pb <= pc else c][kind]
            enc.append((v - predicted) % 256)
        out += bytes([kind]) + enc
        prev = row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    return (reference.SIGNATURE + chunk(b"IHDR", header)
            + (chunk(b"PLTE", palette) if palette else b"")
            + chunk(b"IDAT", zlib.compress(out if raw is None else raw))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [1, 3])
def test_the_writer_makes_a_png_another_reader_reads_back(channels: int) -> None:
    image = pattern(37, 23, channels)
    png = write_png(image)
    width, height, bpp, rows = reference.decode(png)
    assert (width, height, bpp) == (37, 23, channels)
    assert rows == rows_of(image)
    assert read_png(png) == (image, b"")


def test_the_writers_filtered_rows_match_the_golden_file() -> None:
    """The inflated IDAT stream (filter bytes and rows), not the deflated one: zlib's own
    choices are not ours to pin."""
    parts = reference.chunks(write_png(pattern(9, 6, 3)))
    got = zlib.decompress(b"".join(body for kind, body in parts if kind == b"IDAT")).hex()
    lines = "\n".join(got[i:i + 56] for i in range(0, len(got), 56)) + "\n"
    if regenerating():
        GOLDEN.write_text(lines)
    assert lines == GOLDEN.read_text()
    assert [k for k, _ in parts] == [b"IHDR", b"IDAT", b"IEND"]


@pytest.mark.parametrize(("colour", "channels"), [(0, 1), (2, 3), (4, 2), (6, 4)])
def test_every_filter_and_colour_type_is_read(colour: int, channels: int) -> None:
    image = pattern(19, 10, channels)
    png = png_of(19, 10, colour, rows_of(image), filters=[0, 1, 2, 3, 4])
    got, palette = read_png(png)
    assert palette == b""
    keep = 1 if channels <= 2 else 3  # alpha dropped
    assert (got.width, got.height, got.channels) == (19, 10, keep)
    assert rows_of(got) == [bytes(b for i, b in enumerate(row) if i % channels < keep)
                            for row in rows_of(image)]


def test_a_palette_png_is_expanded_after_the_shrink() -> None:
    palette = bytes([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    rows = [bytes((x + y) % 4 for x in range(8)) for y in range(4)]
    png, image, size = thumbnail(png_of(8, 4, 3, rows, [0, 2], palette=palette), "image/png",
                                 max_width=4)
    assert size == (8, 4) and (image.width, image.height, image.channels) == (4, 2, 3)
    _w, _h, _bpp, got = reference.decode(png)
    assert got[0][:6] == bytes([0, 0, 0, 0, 255, 0])  # row 0, pixels 0 and 2: green is 2


def test_a_ppm_with_comments_is_read_and_shrunk_to_the_width_asked() -> None:
    image = pattern(640, 400, 3)
    ppm = b"P6\n# QEMU screendump\n640 400\n# 8 bits\n255\n" + image.pixels
    assert read_ppm(ppm) == image
    png, small, size = thumbnail(ppm, "image/x-portable-pixmap", max_width=320)
    assert size == (640, 400) and (small.width, small.height) == (320, 200)
    width, height, bpp, rows = reference.decode(png)
    assert (width, height, bpp) == (320, 200, 3)
    assert rows[1][:6] == image.pixels[2 * 640 * 3:2 * 640 * 3 + 3] + \
        image.pixels[2 * 640 * 3 + 6:2 * 640 * 3 + 9]  # row 2, pixels 0 and 2
    assert read_ppm(b"P5 3 2 255\n" + bytes(range(6))) == Image(3, 2, 1, bytes(range(6)))


def test_shrink_takes_every_nth_pixel_and_rounds_up() -> None:
    image = Image(5, 3, 1, bytes(range(15)))
    assert shrink(image, 2) == Image(3, 2, 1, bytes([0, 2, 4, 10, 12, 14]))
    assert shrink(image, 1) is image


def test_a_thumbnail_too_large_is_shrunk_further() -> None:
    noise = Image(256, 160, 3, random.Random(13).randbytes(256 * 160 * 3))  # does not deflate
    ppm = b"P6 256 160 255\n" + noise.pixels
    png, small, _size = thumbnail(ppm, "", max_width=256, max_bytes=40_000)
    assert len(png) <= 40_000 and small.width < 256


def test_the_test_drivers_screenshot_makes_a_thumbnail_in_good_time() -> None:
    require(TEST_DRIVER_PNG.exists(), f"libvirt's test driver's picture {TEST_DRIVER_PNG}")
    started = time.perf_counter()
    png, small, size = thumbnail(TEST_DRIVER_PNG.read_bytes(), "image/png", max_width=320)
    took = time.perf_counter() - started
    assert size == (1120, 832) and (small.width, small.height) == (280, 208)
    assert reference.distinct_pixels(png) > 1
    assert took < 5, f"{took:.2f} s for a 1120x832 screen"


BAD: list[tuple[str, bytes, str]] = [
    ("not an image", b"GIF89a....", "neither a PPM nor a PNG"),
    ("empty", b"", "neither a PPM nor a PNG"),
    ("ppm, no size", b"P6\n", "truncated PPM header"),
    ("ppm, words", b"P6 a b 255\n", "not a binary PPM"),
    ("ppm, 16-bit", b"P6 1 1 65535\n" + bytes(6), "8-bit only"),
    ("ppm, short", b"P6 4 4 255\n" + bytes(10), "short: 10 of 48 bytes"),
    ("ppm, huge", b"P6 100000 100000 255\n", "is not a screen"),
    ("ppm, empty", b"P6 0 4 255\n", "is not a screen"),
    ("png, bad crc", png_of(2, 2, 0, [b"ab", b"cd"], [0])[:-5] + b"\0IEND\0\0\0\0",
     "fails its CRC"),
    ("png, truncated", png_of(2, 2, 0, [b"ab", b"cd"], [0])[:50], "truncated"),
    ("png, no iend", png_of(2, 2, 0, [b"ab", b"cd"], [0])[:-12], "no IEND"),
    ("png, interlaced", png_of(2, 2, 0, [b"ab", b"cd"], [0], interlace=1), "interlaced"),
    ("png, 16-bit", png_of(2, 2, 0, [b"abcd", b"cdef"], [0], depth=16), "8-bit"),
    ("png, palette without one", png_of(2, 2, 3, [b"\0\0", b"\0\0"], [0]), "no palette"),
    ("png, bad filter", png_of(2, 2, 0, [b"ab", b"cd"], [0], raw=b"\x07ab\0cd"),
     "row 0 has filter 7"),
    ("png, short pixels", png_of(2, 2, 0, [b"ab", b"cd"], [0], raw=b"\0ab"), "are short"),
    ("png, not zlib", png_of(2, 2, 0, [b"ab", b"cd"], [0]).replace(b"IDATx", b"IDATy"),
     "fails its CRC"),
]


@pytest.mark.parametrize(("what", "data", "says"), BAD, ids=[b[0] for b in BAD])
def test_malformed_screenshots_are_refused_with_a_typed_error(what: str, data: bytes,
                                                              says: str) -> None:
    with pytest.raises(BackendError) as refused:
        thumbnail(data, "image/x-test", max_width=320)
    assert says in refused.value.message, refused.value.message


def test_the_limits_are_what_the_contract_says() -> None:
    assert screenshot.MAX_PNG == 512 << 10
    with pytest.raises(ValueError):
        Image(2, 2, 3, b"short")
    with pytest.raises(ValueError):
        write_png(Image(1, 1, 2, b"ab"))


class ShotHypervisor:
    """A hypervisor with one domain, whose screenshot counts its calls."""

    def __init__(self, state: str = "running", fail: Exception | None = None) -> None:
        self.state, self.fail, self.calls = state, fail, 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def domain(self, ref: str) -> Domain:
        if ref != "demo":
            raise NotFound(f"no VM {ref!r} on this host")
        return Domain(uuid="00000000-0000-4000-8000-000000000001", name="demo",
                      state=self.state)  # type: ignore[arg-type]

    async def screenshot(self, uuid: str) -> tuple[str, bytes]:
        self.calls += 1
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return "image/x-portable-pixmap", b"P6 64 40 255\n" + pattern(64, 40, 3).pixels


async def test_the_endpoint_shares_one_screenshot_between_callers_and_refuses_bad_asks() -> None:
    hv = ShotHypervisor()
    screens = Screens(hv)  # type: ignore[arg-type]
    hv.gate.clear()
    first = asyncio.ensure_future(screens.take(VmScreenshotRequest(vm="demo", max_width=32)))
    second = asyncio.ensure_future(screens.take(VmScreenshotRequest(vm="demo", max_width=32)))
    await asyncio.sleep(0.05)
    hv.gate.set()
    a, b = await asyncio.gather(first, second)
    assert a == b and hv.calls == 1  # the second waited for the first's
    assert (a.width, a.height, a.screen_width, a.screen_height) == (32, 20, 64, 40)
    assert reference.decode(a.png)[:2] == (32, 20)
    await screens.take(VmScreenshotRequest(vm="demo", max_width=32))
    assert hv.calls == 1  # still fresh
    await screens.take(VmScreenshotRequest(vm="demo", max_width=64))
    assert hv.calls == 2  # another width is another picture

    with pytest.raises(InvalidMessage, match="16 to 1920 pixels"):
        await screens.take(VmScreenshotRequest(vm="demo", max_width=8))
    with pytest.raises(NotFound):
        await screens.take(VmScreenshotRequest(vm="ghost"))
    with pytest.raises(Conflict, match="is shutoff: start it to see its screen"):
        await Screens(ShotHypervisor("shutoff")).take(  # type: ignore[arg-type]
            VmScreenshotRequest(vm="demo"))
    broken = Screens(ShotHypervisor(fail=BackendError("screendump failed")))  # type: ignore[arg-type]
    for _ in range(2):  # a failure is not kept: the next caller asks libvirt again
        with pytest.raises(BackendError, match="screendump failed"):
            await broken.take(VmScreenshotRequest(vm="demo"))
    assert broken.hv.calls == 2  # type: ignore[attr-defined]


def nats_match(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` the rest."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or token not in ("*", s[i]):
            return False
    return len(p) == len(s)


def test_the_operator_and_the_web_gateway_may_ask_for_a_screenshot_and_no_agent_does() -> None:
    subject = subjects.command("h2", vm_api.SCREENSHOT.service, vm_api.SCREENSHOT.verb)
    assert vm_api.SCREENSHOT not in security.AGENT_ONLY
    for role, host in (("operator", ""), (subjects.WEB, "h1")):
        publish = security.permissions(role, host)["publish"]
        assert any(nats_match(p, subject) for p in publish["allow"]), role
        assert not any(nats_match(p, subject) for p in publish.get("deny", [])), role
    for agent in subjects.SERVICES:  # an agent's identity reaches only its PEER_CALLS
        allowed = security.permissions(agent, "h1")["publish"]["allow"]
        assert not any(nats_match(p, subject) for p in allowed), agent
