"""A PNG reader for tests, apart from the one the vm agent uses (services/vm/screenshot.py):
8-bit grey, RGB and RGBA, not interlaced, every filter; nothing but zlib and struct.

    width, height, channels, rows = decode(png)     # rows: a list of bytes, one per line
    assert distinct_pixels(png) > 1                 # a screen that is not one colour
"""

from __future__ import annotations

import struct
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    assert png.startswith(SIGNATURE), png[:16]
    out, pos = [], 8
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos:pos + 4])
        kind, body = png[pos + 4:pos + 8], png[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", png[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body), f"bad CRC in {kind!r}"
        out.append((kind, body))
        pos += 12 + length
    assert out[0][0] == b"IHDR" and out[-1][0] == b"IEND", [k for k, _ in out]
    return out


def decode(png: bytes) -> tuple[int, int, int, list[bytes]]:
    parts = chunks(png)
    width, height, depth, colour, _c, _f, interlace = struct.unpack(">IIBBBBB", parts[0][1])
    assert depth == 8 and interlace == 0 and colour in (0, 2, 4, 6), (depth, colour)
    bpp = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    raw = zlib.decompress(b"".join(body for kind, body in parts if kind == b"IDAT"))
    stride = width * bpp
    assert len(raw) == height * (stride + 1), (len(raw), width, height, bpp)
    rows: list[bytes] = []
    prev = [0] * stride
    for y in range(height):
        line = raw[y * (stride + 1):(y + 1) * (stride + 1)]
        kind, data = line[0], list(line[1:])
        for i in range(stride):
            a = data[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                data[i] = (data[i] + a) % 256
            elif kind == 2:
                data[i] = (data[i] + b) % 256
            elif kind == 3:
                data[i] = (data[i] + (a + b) // 2) % 256
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                data[i] = (data[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) % 256
            else:
                assert kind == 0, f"row {y}: filter {kind}"
        rows.append(bytes(data))
        prev = data
    return width, height, bpp, rows


def distinct_pixels(png: bytes) -> int:
    _w, _h, bpp, rows = decode(png)
    return len({row[i:i + bpp] for row in rows for i in range(0, len(row), bpp)})
