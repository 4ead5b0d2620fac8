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



def test_vm_tpm_state_belongs_to_swtpms_user_not_the_archives(tmp_path: Path) -> None:
    """swtpm runs as its own user: a migrated state it cannot write fails the VM's start
    ("TPM result for CMD_INIT: 0x9"), so every unpacked entry gets the owner asked for."""
    owner = (65534, 65534)  # nobody: not root, not the test's user
    target = tmp_path / "swtpm" / UUID
    guest_state.unpack_tpm(tpm_state({"tpm2/tpm2-00.permall": b"state"}), str(target), owner)
    for path in (target, target / "tpm2", target / "tpm2" / "tpm2-00.permall"):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == owner, path
