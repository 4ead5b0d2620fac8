"""Thumbnails of a VM's screen: what libvirt's ``screenshot`` gives (QEMU: a PPM; the test
driver and newer QEMUs: a PNG) made a small PNG, in pure Python (zlib and struct only).

The image is shrunk by a whole step (every k-th pixel of every k-th row) until it is no
wider than asked, then written as an 8-bit grey or RGB PNG with the "Up" filter (a screen's
rows repeat; zlib does the rest). Alpha is dropped, palettes are expanded after the shrink.
Anything else (16-bit, interlaced) is refused with a ``BackendError`` naming it::

    png, image, (screen_width, screen_height) = thumbnail(data, "image/x-portable-pixmap",
                                                          max_width=320)
    shot = await Screens(hypervisor).take(VmScreenshotRequest(vm="demo"))  # vm.screenshot
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
import zlib
from dataclasses import dataclass

from services.vm.hypervisor import Hypervisor
from services.vm.state import RUNNING
from shared.errors import BackendError, Conflict, InvalidMessage, Unavailable
from shared.messages.vm import SCREENSHOT_WIDTHS, VmScreenshot, VmScreenshotRequest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PIXELS = 64 << 20  # a screen larger than 8K x 8K is not a screen
MAX_PNG = 512 << 10  # a thumbnail larger than this is shrunk further


@dataclass(frozen=True)
class Image:
    """Pixels row after row, ``channels`` bytes each (1: grey, 3: RGB)."""

    width: int
    height: int
    channels: int
    pixels: bytes

    def __post_init__(self) -> None:
        if len(self.pixels) != self.width * self.height * self.channels:
            raise ValueError(f"{self.width}x{self.height}x{self.channels} image with "
                             f"{len(self.pixels)} bytes")


# -- reading ---------------------------------------------------------------------------------


def _size_ok(width: int, height: int, what: str) -> None:
    if width <= 0 or height <= 0 or width * height > MAX_PIXELS:
        raise BackendError(f"{what}: a {width}x{height} image is not a screen")


def read_ppm(data: bytes) -> Image:
    """A binary PPM (P6, RGB) or PGM (P5, grey) with 8-bit samples, as QEMU writes them."""
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:
        while pos < len(data) and data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":  # a comment, to the end of the line
            end = data.find(b"\n", pos)
            pos = len(data) if end < 0 else end + 1
            continue
        start = pos
        while pos < len(data) and not data[pos:pos + 1].isspace():
            pos += 1
        if start == pos:
            raise BackendError("the screenshot is a truncated PPM header")
        fields.append(data[start:pos])
    pos += 1  # the one whitespace byte before the samples
    magic, *numbers = fields
    if magic not in (b"P6", b"P5") or not all(n.isdigit() for n in numbers):
        raise BackendError(f"the screenshot is not a binary PPM/PGM (starts {data[:8]!r})")
    width, height, maxval = (int(n) for n in numbers)
    _size_ok(width, height, "the PPM screenshot")
    if not 0 < maxval < 256:
        raise BackendError(f"the PPM screenshot has {maxval}-level samples; 8-bit only")
    channels = 3 if magic == b"P6" else 1
    pixels = data[pos:pos + width * height * channels]
    if len(pixels) != width * height * channels:
        raise BackendError(f"the PPM screenshot is short: {len(pixels)} of "
                           f"{width * height * channels} bytes")
    return Image(width, height, channels, pixels)


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    if not data.startswith(PNG_SIGNATURE):
        raise BackendError(f"the screenshot is not a PNG (starts {data[:8]!r})")
    out, pos = [], len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        crc = data[pos + 8 + length:pos + 12 + length]
        if len(body) != length or len(crc) != 4:
            raise BackendError(f"the PNG screenshot's {kind!r} chunk is truncated")
        if struct.unpack(">I", crc)[0] != zlib.crc32(kind + body):
            raise BackendError(f"the PNG screenshot's {kind!r} chunk fails its CRC")
        out.append((kind, body))
        pos += 12 + length
        if kind == b"IEND":
            return out
    raise BackendError("the PNG screenshot has no IEND chunk")




def _add_rows(a: bytes, b: bytes) -> bytes:
    """Byte-wise (a + b) mod 256 of two equal rows, on Python's big integers (SWAR)."""
    n = len(a)
    high = int.from_bytes(b"\x80" * n, "big")
    x, y = int.from_bytes(a, "big"), int.from_bytes(b, "big")
    return (((x & ~high) + (y & ~high)) ^ ((x ^ y) & high)).to_bytes(n, "big")


def _unfilter(raw: bytes, width: int, height: int, bpp: int) -> bytearray:
    """Undo PNG's per-row filters (RFC 2083 6.3): the rows without their filter bytes."""
    stride = width * bpp
    if len(raw) < (stride + 1) * height:
        raise BackendError(f"the PNG screenshot's pixels are short: {len(raw)} of "
                           f"{(stride + 1) * height} bytes")
    out = bytearray(stride * height)
    prev = bytes(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind = raw[start]
        row = bytearray(raw[start + 1:start + 1 + stride])
        if kind == 0:
            pass
        elif kind == 1:
            for i in range(bpp, stride):
                row[i] = (row[i] + row[i - bpp]) & 0xFF
        elif kind == 2:
            row = bytearray(_add_rows(bytes(row), prev))
        elif kind == 3:
            for i in range(stride):
                left = row[i - bpp] if i >= bpp else 0
                row[i] = (row[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif kind == 4:
            for i in range(stride):
                if i >= bpp:
                    a, c = row[i - bpp], prev[i - bpp]
                else:
                    a = c = 0
                b = prev[i]
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                row[i] = (row[i] + pred) & 0xFF
        else:
            raise BackendError(f"the PNG screenshot's row {y} has filter {kind}; 0-4 exist")
        out[y * stride:(y + 1) * stride] = row
        prev = bytes(row)
    return out


def read_png(data: bytes) -> tuple[Image, bytes]:
    """An 8-bit, non-interlaced PNG: its image (palette indices for colour type 3, grey for
    0 and 4, RGB for 2 and 6; alpha dropped) and its palette (b"" but for type 3)."""
    chunks = _chunks(data)
    if not chunks or chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        raise BackendError("the PNG screenshot does not start with its IHDR chunk")
    width, height, depth, colour, method, filtering, interlace = struct.unpack(
        ">IIBBBBB", chunks[0][1])
    _size_ok(width, height, "the PNG screenshot")
    samples = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour)
    if samples is None or depth != 8 or method or filtering:
        raise BackendError(f"the PNG screenshot is colour type {colour} at {depth} bits; "
                           "8-bit grey, RGB, palette or with alpha only")
    if interlace:
        raise BackendError("the PNG screenshot is interlaced; only plain PNGs are read")
    palette = b"".join(body for kind, body in chunks if kind == b"PLTE")
    if colour == 3 and (not palette or len(palette) % 3):
        raise BackendError("the PNG screenshot has a palette colour type and no palette")
    try:
        raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    except zlib.error as e:
        raise BackendError(f"the PNG screenshot's pixels do not inflate: {e}") from None
    rows = _unfilter(raw, width, height, samples)
    if samples in (2, 4):  # drop alpha: keep the first 1 or 3 of every 2 or 4 bytes
        keep = samples - 1
        out = bytearray(width * height * keep)
        for c in range(keep):
            out[c::keep] = rows[c::samples]
        rows = out
    return Image(width, height, 1 if samples <= 2 else 3, bytes(rows)), \
        palette if colour == 3 else b""


# -- shrinking and writing ---------------------------------------------------------------------


def shrink(image: Image, step: int) -> Image:
    """Every ``step``-th pixel of every ``step``-th row (nearest neighbour)."""
    if step <= 1:
        return image
    ch, stride = image.channels, image.width * image.channels
    width, height = math.ceil(image.width / step), math.ceil(image.height / step)
    out = bytearray(width * height * ch)
    out_stride = width * ch
    for oy, y in enumerate(range(0, image.height, step)):
        row = image.pixels[y * stride:(y + 1) * stride]
        line = bytearray(out_stride)
        for c in range(ch):
            line[c::ch] = row[c::step * ch]
        out[oy * out_stride:(oy + 1) * out_stride] = line
    return Image(width, height, ch, bytes(out))


def expand(image: Image, palette: bytes) -> Image:
    """Palette indices -> RGB (an index past the palette is black)."""
    table = [palette[i * 3:i * 3 + 3] for i in range(len(palette) // 3)]
    table += [b"\0\0\0"] * (256 - len(table))
    return Image(image.width, image.height, 3, b"".join(table[i] for i in image.pixels))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(
        ">I", zlib.crc32(kind + body))


def write_png(image: Image, *, level: int = 6) -> bytes:
    """An 8-bit grey (1 channel) or RGB (3) PNG, every row with the "Up" filter."""
    if image.channels not in (1, 3):
        raise ValueError(f"{image.channels} channels: 1 (grey) or 3 (RGB)")
    stride = image.width * image.channels
    high = int.from_bytes(b"\x80" * stride, "big")
    rows, prev = [], 0
    for y in range(image.height):
        row = image.pixels[y * stride:(y + 1) * stride]
        cur = int.from_bytes(row, "big")
        # byte-wise (cur - prev) mod 256: (cur | high) - (prev & ~high), high bits fixed up
        diff = ((cur | high) - (prev & ~high)) ^ ((cur ^ ~prev) & high)
        rows.append(b"\x02" + (diff & ((1 << (8 * stride)) - 1)).to_bytes(stride, "big"))
        prev = cur
    header = struct.pack(">IIBBBBB", image.width, image.height, 8,
                         0 if image.channels == 1 else 2, 0, 0, 0)
    return b"".join((PNG_SIGNATURE, _chunk(b"IHDR", header),
                     _chunk(b"IDAT", zlib.compress(b"".join(rows), level)),
                     _chunk(b"IEND", b"")))


def read(data: bytes, mime: str) -> tuple[Image, bytes]:
    """The screenshot by its content (libvirt's MIME type only names it in errors)."""
    if data.startswith(PNG_SIGNATURE):
        return read_png(data)
    if data[:2] in (b"P6", b"P5"):
        return read_ppm(data), b""
    raise BackendError(f"the screenshot ({mime or 'no type'}, {len(data)} bytes) is neither "
                       "a PPM nor a PNG")


def thumbnail(data: bytes, mime: str, *, max_width: int,
              max_bytes: int = MAX_PNG) -> tuple[bytes, Image, tuple[int, int]]:
    """A PNG at most ``max_width`` pixels wide (and ``max_bytes`` long) of the screenshot:
    (png, the image written, the screen's size)."""
    image, palette = read(data, mime)
    step = max(1, math.ceil(image.width / max(1, max_width)))
    while True:
        small = shrink(image, step)
        if palette:
            small = expand(small, palette)
        png = write_png(small)
        if len(png) <= max_bytes or small.width <= 16:
            return png, small, (image.width, image.height)
        step *= 2


# -- the endpoint ------------------------------------------------------------------------------


class Screens:
    """``vm.screenshot``: a running VM's thumbnail; one taken for a VM and width serves every
    caller within ``FRESH_S`` (a grid of browsers refreshing does not each cost a screendump),
    and callers that come while one is taken wait for it."""

    FRESH_S = 1.0

    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv
        self._taken: dict[tuple[str, int], asyncio.Future[VmScreenshot]] = {}

    async def take(self, req: VmScreenshotRequest) -> VmScreenshot:
        low, high = SCREENSHOT_WIDTHS
        if not low <= req.max_width <= high:
            raise InvalidMessage(f"max_width {req.max_width}: a thumbnail is {low} to {high} "
                                 "pixels wide")
        dom = await self.hv.domain(req.vm)
        if dom.state not in RUNNING:
            raise Conflict(f"VM {dom.name} is {dom.state}: start it to see its screen")
        key = (dom.uuid, req.max_width)
        known = self._taken.get(key)
        if known is not None and (not known.done() or (
                not known.exception() and time.time() - known.result().taken < self.FRESH_S)):
            return await asyncio.shield(known)
        future: asyncio.Future[VmScreenshot] = asyncio.get_running_loop().create_future()
        self._taken[key] = future
        try:
            mime, data = await self.hv.screenshot(dom.uuid)
            png, small, (width, height) = await asyncio.to_thread(
                thumbnail, data, mime, max_width=req.max_width)
            shot = VmScreenshot(uuid=dom.uuid, name=dom.name, width=small.width,
                                height=small.height, screen_width=width,
                                screen_height=height, png=png, taken=time.time())
        except BaseException as e:
            self._taken.pop(key, None)
            # the callers that waited get the error (a cancellation of this caller is not
            # theirs: they are told to ask again)
            future.set_exception(e if isinstance(e, Exception) else Unavailable(
                f"the screenshot of VM {dom.name} was interrupted; ask again"))
            future.exception()  # retrieved here, re-raised in each waiter
            raise
        future.set_result(shot)
        for old in [k for k, f in self._taken.items() if f.done() and not f.exception()
                    and time.time() - f.result().taken > self.FRESH_S]:
            del self._taken[old]
        return shot
