"""A stopped VM's UEFI variables (the NVRAM file) and TPM state (swtpm's directory), read
for the bus and written back from it with distrust.

Cold migration carries both from the source host's vm agent to the target's
(``vm.export_state`` -> ``vm.import_state``). The bytes come off the bus, where every agent
and the operator may publish, and the vm agent runs as root: so ``unpack_tpm`` takes only
plain files and directories that stay inside the target, within a size and a count cap,
unpacks them into a temporary directory beside the target and renames it into place, and
``write_nvram`` writes a temporary file and renames it. Anything else is refused with
``BadRequest`` (``PayloadTooLarge`` over a cap) and nothing is written::

    nvram, tpm = read_state(f"{nvram_dir}/demo_VARS.fd", f"{swtpm_dir}/{uuid}")
    write_nvram(f"{nvram_dir}/demo_VARS.fd", nvram)      # on the target host
    unpack_tpm(tpm, f"{swtpm_dir}/{uuid}")

Owners are not carried: the NVRAM file keeps the owner of the one it replaces (libvirt hands
it to QEMU's user at start), and the TPM state the owners of the tree it replaces, or, in a
new one, libvirt's swtpm user's below its root-owned top (libvirt hands that folder over only
when it makes it). swtpm's lock file is not carried (it is a running swtpm's).
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import zlib

from shared.errors import BackendError, BadRequest, PayloadTooLarge

# swtpm keeps a TPM 2.0 in one file of tens of KiB; OVMF's 4 MiB build has 528 KiB of
# variables. The caps leave room for growth and stay under the bus's 8 MiB payload.
MAX_NVRAM_BYTES = 4 << 20
MAX_TPM_BYTES = 4 << 20  # the unpacked tar stream: headers and contents
MAX_TPM_MEMBERS = 64
SWTPM_LOCK = ".lock"


def read_state(nvram_path: str, tpm_dir: str) -> tuple[bytes, bytes]:
    """(the NVRAM file, the swtpm state directory as a gzipped tar); b"" for what is absent."""
    nvram = b""
    if os.path.exists(nvram_path):
        with open(nvram_path, "rb") as f:
            nvram = f.read()
    tpm = b""
    if os.path.isdir(tpm_dir):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(tpm_dir, arcname=".", filter=_state_only)
        tpm = buf.getvalue()
    return nvram, tpm


def drop_state(nvram_path: str, tpm_dir: str) -> None:
    """Remove the NVRAM file and the swtpm state directory, where they exist."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(nvram_path)
    shutil.rmtree(tpm_dir, ignore_errors=True)


def write_nvram(path: str, data: bytes) -> None:
    """Replace the NVRAM file at ``path`` with ``data`` (mode and owner of the old one kept)."""
    if len(data) > MAX_NVRAM_BYTES:
        raise PayloadTooLarge(f"the NVRAM file has {len(data)} bytes, more than the "
                              f"{MAX_NVRAM_BYTES} a UEFI variable store may have")
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileNotFoundError):
            old = os.lstat(path)
            if stat.S_ISREG(old.st_mode):
                os.chmod(tmp, stat.S_IMODE(old.st_mode))
                os.chown(tmp, old.st_uid, old.st_gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def unpack_tpm(data: bytes, dest: str, owner: tuple[int, int] | None = None) -> None:
    """Replace the directory ``dest`` with the gzipped tar ``data`` (see the module docstring);
    owners and folder modes as ``_hand_over`` says (``owner``: libvirt's swtpm user and group,
    for a tree that replaces none).

    Refused: not a gzipped tar; more than MAX_TPM_BYTES unpacked or MAX_TPM_MEMBERS members;
    a member that is not a plain file or directory (links, devices, fifos, sparse files);
    an absolute name or one with ``..``. ``owner`` (uid, gid) is given every unpacked entry:
    swtpm runs as its own user and must be able to write its state (the archive's owners are
    not trusted).
    """
    tar_bytes = _gunzip(data)
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
            members = _checked(tar)
            parent = os.path.dirname(dest)
            os.makedirs(parent, mode=0o711, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(dest)}.import-")
            try:
                tar.extractall(tmp, members=members, filter="data")
                _hand_over(tmp, dest, owner)
                _swap_dir(tmp, dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except tarfile.TarError as e:
        raise BadRequest(f"the TPM state is not a valid tar archive ({e}); send what "
                         "vm.export_state gave") from None
    except OSError as e:
        raise BackendError(f"unpacking the TPM state into {dest}: {e.strerror}") from None


def _hand_over(new: str, old: str, owner: tuple[int, int] | None) -> None:
    """Owners and folder modes of the unpacked tree ``new``, as libvirt left ``old``.

    libvirt makes ``swtpm/<uuid>`` root's (0711) and hands what is below to its swtpm user once,
    when it makes the state; it does not again at start, and a swtpm that cannot write its
    folder does not start ("Could not open lockfile"). So the top keeps the old top's owner and
    mode, and each entry below takes the owner of the old entry at the same place, or, new
    there, its folder's; with no old tree, the top is root's (0711) and what is below goes to
    ``owner`` when given. Folders below the top are 0700.
    """
    def was(rel: str) -> os.stat_result | None:
        try:
            return os.lstat(os.path.join(old, rel))
        except (FileNotFoundError, NotADirectoryError):
            return None

    top = was(".")
    ids = {".": (top.st_uid, top.st_gid) if top else (0, 0)}
    os.chmod(new, stat.S_IMODE(top.st_mode) if top else 0o711)
    os.chown(new, *ids["."])
    for root, dirs, files in os.walk(new):
        here = os.path.normpath(os.path.relpath(root, new))
        for name in [*dirs, *files]:
            rel = os.path.normpath(os.path.join(here, name))
            path = os.path.join(root, name)
            st = was(rel) if top else None
            ids[rel] = (st.st_uid, st.st_gid) if st else (
                owner if top is None and owner else ids[here])
            if name in dirs:
                os.chmod(path, 0o700)
            os.lchown(path, *ids[rel])


def _gunzip(data: bytes) -> bytes:
    """``data`` un-gzipped, refusing more than MAX_TPM_BYTES before inflating any further."""
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflate.decompress(data, MAX_TPM_BYTES + 1)
    except zlib.error as e:
        raise BadRequest(f"the TPM state is not gzip data ({e}); send what vm.export_state "
                         "gave") from None
    if len(out) > MAX_TPM_BYTES:
        raise PayloadTooLarge(f"the TPM state unpacks to more than {MAX_TPM_BYTES} bytes; "
                              "swtpm's state is a few KiB")
    if not inflate.eof or inflate.unused_data:
        raise BadRequest("the TPM state is not one complete gzip stream; send what "
                         "vm.export_state gave")
    return out


def _checked(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members: list[tarfile.TarInfo] = []
    total = 0
    for m in tar:
        members.append(m)
        if len(members) > MAX_TPM_MEMBERS:
            raise PayloadTooLarge(f"the TPM state has more than {MAX_TPM_MEMBERS} entries; "
                                  "swtpm's state has a few files")
        name = m.name
        parts = posixpath.normpath(name).split("/")
        if name.startswith("/") or ".." in parts:
            raise BadRequest(f"the TPM state names {name!r}, outside its directory: refused")
        if not (m.isdir() or m.isreg()) or m.issparse():
            raise BadRequest(f"the TPM state entry {name!r} is a {_kind(m)}; only plain files "
                             "and directories are accepted")
        total += m.size
        if total > MAX_TPM_BYTES:
            raise PayloadTooLarge(f"the TPM state's files add up to more than {MAX_TPM_BYTES} "
                                  "bytes; swtpm's state is a few KiB")
    return [m for m in members if _state_only(m)]


def _state_only(m: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """Drop swtpm's lock file: it belongs to a running swtpm, and one written by root here
    keeps the next swtpm (libvirt runs it as its swtpm user) from starting ("Could not open
    lockfile: Permission denied"); swtpm makes a new one."""
    return None if posixpath.basename(m.name) == SWTPM_LOCK else m


def _kind(m: tarfile.TarInfo) -> str:
    if m.issym():
        return f"symbolic link to {m.linkname!r}"
    if m.islnk():
        return f"hard link to {m.linkname!r}"
    if m.ischr() or m.isblk():
        return "device node"
    if m.isfifo():
        return "fifo"
    if m.issparse():
        return "sparse file"
    return f"tar entry of type {m.type!r}"


def _swap_dir(new: str, dest: str) -> None:
    """Rename ``new`` to ``dest``, putting the old ``dest`` back if that fails."""
    old = ""
    if os.path.lexists(dest):
        old = f"{new}.old"
        os.rename(dest, old)
    try:
        os.rename(new, dest)
    except BaseException:
        if old:
            os.rename(old, dest)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)
