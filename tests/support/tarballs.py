"""TPM state tarballs for ``vm.import_state`` tests: a good one, and one per way to attack it.

    good = tpm_state({"tpm2/tpm2-00.permall": b"state"})
    for name, (data, error, match) in hostile_tpm_states(target, outside).items():
        with pytest.raises(error, match=match): ...
    assert tree(outside) == before      # nothing landed outside the target
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

from services.vm.guest_state import MAX_TPM_BYTES, MAX_TPM_MEMBERS
from shared.errors import BadRequest, PayloadTooLarge

Hostile = tuple[bytes, type[Exception], str]


def tpm_state(files: dict[str, bytes]) -> bytes:
    """A gzipped tar laid out as ``vm.export_state`` makes it: ``.``, its folders, files."""
    folders = sorted({str(Path(name).parent) for name in files} - {"."})
    members: list[tuple[tarfile.TarInfo, bytes | None]] = [(_info(".", tarfile.DIRTYPE), None)]
    members += [(_info(f"./{d}", tarfile.DIRTYPE), None) for d in folders]
    members += [(_info(f"./{name}", tarfile.REGTYPE), data) for name, data in files.items()]
    return _targz(members)


def hostile_tpm_states(target: Path, outside: Path) -> dict[str, Hostile]:
    """Tarballs that try to write into ``outside`` (which holds a file ``victim``) when
    unpacked into ``target``; each with the error and message it must be refused with."""
    up = os.path.relpath(outside, target)
    victim = str(outside / "victim")
    file = tarfile.REGTYPE

    def one(name: str, kind: bytes = file, data: bytes | None = b"x", **attrs: object) -> bytes:
        return _targz([(_info(name, kind, **attrs), data)])

    many = [(_info(f"f{i}", file), b"") for i in range(MAX_TPM_MEMBERS + 1)]
    return {
        "absolute path": (one(str(outside / "abs")), BadRequest, "outside its directory"),
        "../ traversal": (one(f"{up}/climbed"), BadRequest, "outside its directory"),
        "symlink": (_targz([(_info("link", tarfile.SYMTYPE, linkname=str(outside)), None),
                            (_info("link/planted", file), b"x")]),
                    BadRequest, "symbolic link"),
        "hardlink": (one("hard", tarfile.LNKTYPE, None, linkname=victim), BadRequest,
                     "hard link"),
        "device node": (one("null", tarfile.CHRTYPE, None, devmajor=1, devminor=3),
                        BadRequest, "device node"),
        "fifo": (one("pipe", tarfile.FIFOTYPE, None), BadRequest, "fifo"),
        "oversized": (one("big", data=bytes(MAX_TPM_BYTES + 1)), PayloadTooLarge,
                      "more than"),
        "too many members": (_targz(many), PayloadTooLarge, f"more than {MAX_TPM_MEMBERS}"),
        "not gzip": (b"this is not a tarball", BadRequest, "not gzip data"),
        "gzip, not a tar": (gzip.compress(b"\x01" * 2048), BadRequest, "not a valid tar"),
        "cut short": (tpm_state({"tpm2/s": os.urandom(4096)})[:-20], BadRequest,
                      "not one complete gzip stream"),
    }


def tree(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every entry under ``root``: relative path -> (mode, content of files and links)."""
    out: dict[str, tuple[int, bytes]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        data = b""
        if path.is_symlink():
            data = os.readlink(path).encode()
        elif path.is_file():
            data = path.read_bytes()
        out[str(path.relative_to(root))] = (st.st_mode, data)
    return out


def _info(name: str, kind: bytes, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o700 if kind == tarfile.DIRTYPE else 0o600
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def _targz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            if data is None:
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
