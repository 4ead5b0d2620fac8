"""NVRAM and TPM state as the vm agent writes them from the bus: hostile input writes nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.vm import guest_state
from shared.errors import PayloadTooLarge
from tests.support.tarballs import hostile_tpm_states, tpm_state, tree

pytestmark = pytest.mark.unit

UUID = "3f1e0c6a-5a8d-4c1e-9d0b-1c2d3e4f5a6b"


def test_vm_tpm_state_round_trips_and_replaces_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "swtpm" / UUID
    (target / "tpm2").mkdir(parents=True)
    (target / "tpm2" / "stale").write_bytes(b"old")
    guest_state.unpack_tpm(tpm_state({"tpm2/tpm2-00.permall": b"state"}), str(target))
    assert {p: d for p, (_m, d) in tree(target).items()} == {
        "tpm2": b"", "tpm2/tpm2-00.permall": b"state"}
    assert (target / "tpm2").stat().st_mode & 0o777 == 0o700
    assert (target / "tpm2" / "tpm2-00.permall").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in (tmp_path / "swtpm").iterdir()] == [UUID]  # no temporary left

    _nvram, exported = guest_state.read_state(str(tmp_path / "none.fd"), str(target))
    again = tmp_path / "again"
    guest_state.unpack_tpm(exported, str(again))
    assert tree(again) == tree(target)


@pytest.mark.parametrize("case", list(hostile_tpm_states(Path("/t"), Path("/o"))))
def test_vm_hostile_tpm_state_is_refused_and_writes_nothing(tmp_path: Path, case: str) -> None:
    target, outside = tmp_path / "swtpm" / UUID, tmp_path / "outside"
    (target / "tpm2").mkdir(parents=True)
    (target / "tpm2" / "tpm2-00.permall").write_bytes(b"good")
    outside.mkdir()
    (outside / "victim").write_bytes(b"victim")
    before = tree(tmp_path)
    data, error, match = hostile_tpm_states(target, outside)[case]
    with pytest.raises(error, match=match):
        guest_state.unpack_tpm(data, str(target))
    assert tree(tmp_path) == before


def test_vm_nvram_is_replaced_whole_and_capped(tmp_path: Path) -> None:
    path = tmp_path / "nvram" / "demo_VARS.fd"
    guest_state.write_nvram(str(path), b"first")
    assert (path.read_bytes(), path.stat().st_mode & 0o777) == (b"first", 0o600)
    os.chmod(path, 0o640)
    guest_state.write_nvram(str(path), b"second")
    assert (path.read_bytes(), path.stat().st_mode & 0o777) == (b"second", 0o640)
    with pytest.raises(PayloadTooLarge, match="UEFI variable store"):
        guest_state.write_nvram(str(path), bytes(guest_state.MAX_NVRAM_BYTES + 1))
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["demo_VARS.fd"]



def test_vm_tpm_state_leaves_swtpm_lock_file_behind(tmp_path: Path) -> None:
    """A root-owned copy of a running swtpm's lock file kept the next swtpm from starting
    ("Could not open lockfile: Permission denied"): it is neither exported nor installed."""
    running = tmp_path / "running"
    (running / "tpm2").mkdir(parents=True)
    (running / "tpm2" / "tpm2-00.permall").write_bytes(b"state")
    (running / "tpm2" / ".lock").write_bytes(b"")
    _nvram, exported = guest_state.read_state(str(tmp_path / "none.fd"), str(running))
    target = tmp_path / "target"
    guest_state.unpack_tpm(exported, str(target))
    assert sorted(tree(target)) == ["tpm2", "tpm2/tpm2-00.permall"]
    old = tmp_path / "old"
    guest_state.unpack_tpm(tpm_state({"tpm2/tpm2-00.permall": b"s", "tpm2/.lock": b""}),
                           str(old))
    assert sorted(tree(old)) == ["tpm2", "tpm2/tpm2-00.permall"]


def test_vm_tpm_state_keeps_the_owners_libvirt_gave(tmp_path: Path) -> None:
    """libvirt hands swtpm/<uuid>/tpm2 to its swtpm user once, when it makes it; a root-owned
    replacement kept swtpm from starting, so owners and folder modes are kept (a new tree:
    the top root's, 0711, below it the swtpm user's)."""
    target = tmp_path / "swtpm" / UUID
    (target / "tpm2").mkdir(parents=True)
    (target / "tpm2" / "tpm2-00.permall").write_bytes(b"old")
    os.chmod(target, 0o711)
    for path in (target / "tpm2", target / "tpm2" / "tpm2-00.permall"):
        os.chown(path, 4242, 4343)
    state = tpm_state({"tpm2/tpm2-00.permall": b"new", "tpm2/extra": b"x"})
    guest_state.unpack_tpm(state, str(target), owner=(1, 1))

    def owners(root: Path) -> dict[str, tuple[int, int, int]]:
        return {str(p.relative_to(root)): (p.stat().st_uid, p.stat().st_gid,
                                           p.stat().st_mode & 0o777)
                for p in [root, *sorted(root.rglob("*"))]}

    assert owners(target) == {".": (0, 0, 0o711), "tpm2": (4242, 4343, 0o700),
                              "tpm2/tpm2-00.permall": (4242, 4343, 0o600),
                              "tpm2/extra": (4242, 4343, 0o600)}
    fresh = tmp_path / "swtpm" / "fresh"
    guest_state.unpack_tpm(state, str(fresh), owner=(4242, 4343))
    assert owners(fresh) == {".": (0, 0, 0o711), "tpm2": (4242, 4343, 0o700),
                             "tpm2/tpm2-00.permall": (4242, 4343, 0o600),
                             "tpm2/extra": (4242, 4343, 0o600)}


def test_vm_swtpm_owner_comes_from_qemu_conf(tmp_path: Path) -> None:
    from services.vm.health import swtpm_owner

    conf = tmp_path / "qemu.conf"
    conf.write_text('# swtpm_user = "nobody"\nswtpm_user = "+4242"\nswtpm_group = "+4343"\n')
    assert swtpm_owner(str(conf)) == (4242, 4343)
    conf.write_text('swtpm_user = "no-such-user-here"\n')
    assert swtpm_owner(str(conf)) is None
