"""Pure pieces of the storage agent: names, formats by magic, ranges, extent maps, digests."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.storage.config import Settings
from services.storage.transfer import (
    LEAF,
    MAX_EXTENTS,
    RangeSet,
    check_map,
    coalesce,
    leaf_digests,
    split,
    transfer_id,
    volume_digest,
)
from services.storage.volumes import check_name, check_size
from shared.config import load
from shared.errors import BadRequest, InvalidName
from shared.validate import conversion_hint, disk_format


@pytest.mark.parametrize("name", ["disk0", "web-1.raw", "a_b+c", "X" * 255, "_x"])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "a/b", "/abs", "..", "a..b", "-x", ".x", "a\x00", "é",
                                  "x" * 256, "a b", "a\nb"])
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidName):
        check_name(name)


def test_sizes() -> None:
    assert check_size(4096) == 4096
    with pytest.raises(BadRequest, match="use 1024"):
        check_size(1000)


@pytest.mark.parametrize("head, tail, fmt", [
    (b"QFI\xfb\x00\x00\x00\x03", b"", "qcow2"),
    (b"KDMV\x01", b"", "vmdk"),
    (b"# Disk DescriptorFile\n", b"", "vmdk"),
    (b"vhdxfile", b"", "vhdx"),
    (b"conectix", b"", "vpc"),
    (b"\x00" * 512, b"conectix" + b"\x00" * 504, "vpc"),  # fixed VHD: footer only
    (b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(0x40, b"\x00") + b"\x7f\x10\xda\xbe",
     b"", "vdi"),
    (b"QED\x00", b"", "qed"),
    (b"\xeb\x63\x90" + b"\x00" * 4093, b"\x55\xaa", None),  # an MBR: RAW
    (b"\x00" * 4096, b"\x00" * 512, None),
])
def test_detect_format(head: bytes, tail: bytes, fmt: str | None) -> None:
    assert disk_format(head, tail) == fmt


def test_conversion_hint() -> None:
    text = conversion_hint("qcow2", "/srv/in/deb.qcow2")
    assert "qemu-img convert -f qcow2 -O raw /srv/in/deb.qcow2 /srv/in/deb.raw" in text


def test_rangeset_merges_and_covers() -> None:
    r = RangeSet()
    for off, n in [(0, 10), (10, 5), (30, 10), (20, 5), (25, 5), (100, 1)]:
        r.add(off, n)
    assert r.ranges() == [(0, 15), (20, 20), (100, 1)]
    assert r.covers(0, 15) and r.covers(22, 18) and not r.covers(14, 2)
    assert r.total() == 36
    r.add(5, 200)
    assert r.ranges() == [(0, 205)]


@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 50)), max_size=40))
def test_rangeset_matches_a_set_of_bytes(adds: list[tuple[int, int]]) -> None:
    r = RangeSet()
    bytes_ = set()
    for off, n in adds:
        r.add(off, n)
        bytes_.update(range(off, off + n))
    assert r.total() == len(bytes_)
    for off, n in r.ranges():
        assert set(range(off, off + n)) <= bytes_
        assert off - 1 not in bytes_ and off + n not in bytes_


def test_split_cuts_at_absolute_multiples() -> None:
    assert split(100, 250, 100) == [(100, 100), (200, 100), (300, 50)]
    assert split(150, 100, 100) == [(150, 50), (200, 50)]
    assert split(0, 0, 100) == []


def test_coalesce_merges_smallest_holes_first() -> None:
    extents = [(0, 10), (12, 10), (100, 10), (1000, 10)]
    assert coalesce(extents, 4) == extents
    assert coalesce(extents, 3) == [(0, 22), (100, 10), (1000, 10)]
    assert coalesce(extents, 2) == [(0, 110), (1000, 10)]
    many = [(i * 100, 10) for i in range(MAX_EXTENTS * 2)]
    assert len(coalesce(many)) <= MAX_EXTENTS


def test_check_map() -> None:
    check_map([(0, 10), (20, 10)], 30)
    for bad in ([(0, 10), (5, 10)], [(20, 10), (0, 10)], [(0, 40)], [(0, 0)]):
        with pytest.raises(BadRequest):
            check_map(bad, 30)


def test_volume_digest_depends_on_place_and_content() -> None:
    data = bytes(range(256)) * 4096  # 1 MiB: two leaves
    leaves = dict(zip((o for o, _ in split(0, len(data), LEAF)),
                      ((n, d) for (_, n), d in zip(split(0, len(data), LEAF),
                                                   leaf_digests(data, 0, "blake2b-128"),
                                                   strict=True)), strict=True))
    base = volume_digest(10 << 20, leaves)
    assert volume_digest(11 << 20, leaves) != base
    moved = {o + LEAF: v for o, v in leaves.items()}
    assert volume_digest(10 << 20, moved) != base
    other = leaf_digests(b"x" + data[1:], 0, "blake2b-128")
    assert other[0] != leaves[0][1] and other[1] == leaves[LEAF][1]


def test_transfer_id_is_stable() -> None:
    a = transfer_id("h1", "default", "v", "1:2:3:4", "h2", "default", "v")
    assert a == transfer_id("h1", "default", "v", "1:2:3:4", "h2", "default", "v")
    assert a != transfer_id("h1", "default", "v", "1:2:3:5", "h2", "default", "v")


def test_settings() -> None:
    s = Settings.from_config(load("storage", env={"PHYLLOME_STATE_DIR": "/s",
                                                  "PHYLLOME_HOST": "h1"}))
    assert s.pools == {"default": "/s/pools/default"}
    assert s.import_dirs == ["/s/import", "/s/images/pool"]  # the catalogue's images too
