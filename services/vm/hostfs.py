"""The host files the vm agent touches itself: disk headers, local disk copies, log dirs,
and what the host's network has (routes, bridges) before a virtual network joins it, and
the migration journal.

Disk volumes normally come from the storage agent; ``copy_disk`` is the local fallback
when none answers (a reflink where the filesystem can, else a sparse copy)::

    check_raw("/var/lib/phyllome/pool/demo.raw")   # BadRequest for qcow2, vmdk, ...
    await copy_disk(src, dst)
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import stat
from pathlib import Path

from shared import fileops
from shared.errors import BackendError, BadRequest, Conflict, NotFound
from shared.validate import is_iso, read_format


def check_raw(path: str) -> None:
    """Refuse a disk that is missing, not a file/block device, or in a non-RAW format."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"disk {path} does not exist") from None
    except OSError as e:
        raise BadRequest(f"disk {path}: {e.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise BadRequest(f"disk {path} is not a file or block device")
    try:
        fmt = read_format(path)
    except OSError as e:
        raise BadRequest(f"disk {path}: {e.strerror}") from None
    if fmt is not None:
        raise BadRequest(
            f"disk {path} is {fmt}, not RAW: only RAW disks are supported; convert it with "
            f"`qemu-img convert -O raw {path} NEW.raw`"
        )


def check_iso(path: str) -> None:
    """Refuse install media that is missing or not an ISO9660 or UDF image (a disk image
    given to --cdrom boots nothing and says nothing)."""
    try:
        iso = is_iso(path)
    except FileNotFoundError:
        raise NotFound(f"ISO {path} does not exist") from None
    except OSError as e:
        raise BadRequest(f"ISO {path}: {e.strerror}") from None
    if not iso:
        raise BadRequest(f"{path} is not an ISO9660 or UDF image (no CD001/BEA01 volume "
                         "descriptor at 32 KiB): give an installer .iso; disks go to --disk")


def write_seed(path: str, data: bytes) -> None:
    """A cloud-init seed ISO, written whole (temp then rename), readable by QEMU (0644)."""
    write_atomically(Path(path), data, mode=0o644)


async def copy_disk(src: str, dst: str) -> None:
    """Reflink or sparse copy of ``src`` to a new file ``dst`` (mode 0644)."""
    if os.path.exists(dst):
        raise Conflict(f"disk {dst} exists already")
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        "cp", "--reflink=auto", "--sparse=always", "--no-preserve=all", src, dst,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await proc.communicate()
    except asyncio.CancelledError:
        proc.kill()
        await proc.wait()
        remove(dst)
        raise
    if proc.returncode != 0:
        remove(dst)
        raise BackendError(f"copying {src} to {dst}: {err.decode(errors='replace').strip()}")
    os.chmod(dst, 0o644)


def remove(path: str) -> None:
    """Remove a file if it exists."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise BackendError(f"removing {path}: {e.strerror}") from None


def ensure_dir(path: str) -> None:
    """A directory that virtlogd and QEMU can reach (0755)."""
    Path(path).mkdir(parents=True, exist_ok=True, mode=0o755)


async def host_routes() -> list[tuple[ipaddress.IPv4Network, str]]:
    """The host's IPv4 routes as (destination, device), from ``ip -j route``; the default
    route is left out (every subnet is inside it)."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "-j", "route", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise BackendError(f"reading the host's routes (ip -j route): "
                           f"{err.decode(errors='replace').strip()}")
    routes = []
    for r in json.loads(out or b"[]"):
        dst = r.get("dst", "")
        if dst and dst != "default":
            routes.append((ipaddress.IPv4Network(dst, strict=False), str(r.get("dev", ""))))
    return routes


def host_bridges(class_net: str = "/sys/class/net") -> list[str]:
    """Names of the host's bridges (interfaces with a ``bridge`` directory)."""
    try:
        names = os.listdir(class_net)
    except OSError:
        return []
    return sorted(n for n in names if os.path.isdir(os.path.join(class_net, n, "bridge")))


def write_atomically(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file whole
    (``shared.fileops.write_atomic``), making its folder first."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fileops.write_atomic(path, data, mode=mode)
    except OSError as e:
        raise BackendError(f"writing {path}: {e.strerror}") from None


def read_all(directory: Path, suffix: str) -> list[bytes]:
    """The content of every ``*<suffix>`` file of ``directory`` (none if it is missing)."""
    try:
        return [p.read_bytes() for p in sorted(directory.glob(f"*{suffix}"))]
    except OSError as e:
        raise BackendError(f"reading {directory}: {e.strerror}") from None


def check_share_dir(path: str) -> None:
    """Refuse a virtio-fs share whose host directory is missing or not a directory."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"share directory {path} does not exist on this host: create it "
                       "first") from None
    except OSError as e:
        raise BadRequest(f"share directory {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise BadRequest(f"share {path} is not a directory: share a directory")


VHOST_VSOCK = "/dev/vhost-vsock"


def check_vsock(device: str = VHOST_VSOCK) -> None:
    """Refuse a vsock device on a host whose kernel cannot back it (no vhost_vsock)."""
    if not os.path.exists(device):
        raise BadRequest(f"this host has no {device}: load the vhost_vsock kernel module "
                         "(modprobe vhost_vsock), or drop --vsock")


FIRMWARE_DIRS = ("/etc/qemu/firmware", "/usr/share/qemu/firmware")


def firmware_features(dirs: tuple[str, ...] = FIRMWARE_DIRS) -> set[str]:
    """Every feature the host's QEMU firmware descriptors offer (``amd-sev``,
    ``intel-tdx``, ...): libvirt picks a confidential guest's OVMF among them."""
    features: set[str] = set()
    for directory in dirs:
        for desc in sorted(Path(directory).glob("*.json")):
            try:
                features.update(json.loads(desc.read_text()).get("features", []))
            except (OSError, ValueError, AttributeError):
                continue
    return features
