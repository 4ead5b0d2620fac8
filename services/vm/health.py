"""What the vm agent tells an operator to fix on its host: a libvirt that re-probes QEMU.

libvirt caches what QEMU can do and throws the cache away when KVM was usable at the probe
but QEMU's user cannot open ``/dev/kvm`` now. Where udevd never ran (a container, a minimal
VM) the node stays ``crw------- root root``, so every call finds the cache outdated and
probes QEMU again for seconds: a define takes 50-110 s. Two checks say so, each a
``Problem`` for the agent's heartbeat and ``phyllome status``:

- ``kvm_access``: can QEMU's user (``user``/``group`` of libvirt's qemu.conf, plus the user's
  primary and supplementary groups, as libvirt itself checks) open the node read-write?
  Mode bits only (no ACLs).
- ``reprobing``: a repeated capability query should be served from the cache in
  milliseconds; more than ``REPROBE_S`` means libvirt probed QEMU again::

    kvm_access("/dev/kvm", "/etc/libvirt/qemu.conf")
    # Problem(kind="kvm-access", what="QEMU's user libvirt-qemu cannot open /dev/kvm
    #         (crw------- root:root): ...", fix="run `chgrp kvm /dev/kvm && chmod 0660 ...")
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import stat

from shared.messages.hosts import Problem

QEMU_CONF = "/etc/libvirt/qemu.conf"
QEMU_USER = "libvirt-qemu"  # Debian's build default, for user and group alike
REPROBE_S = 2.0

_SETTING = re.compile(r'^\s*(user|group|swtpm_user|swtpm_group)\s*=\s*"([^"]*)"')
SWTPM_USER = "tss"  # libvirt's default swtpm_user/swtpm_group on Debian


def kvm_fix(kvm: str) -> str:
    return (f"run `chgrp kvm {kvm} && chmod 0660 {kvm}` (what Debian's udev rule does), "
            "or `make up`")


def can_open_rw(mode: int, owner: int, group: int, uid: int, gids: set[int]) -> bool:
    """Would a process of ``uid`` in ``gids`` be let to open a node read-write (root always)?"""
    if uid == 0:
        return True
    if owner == uid:
        bits = mode >> 6
    elif group in gids:
        bits = mode >> 3
    else:
        bits = mode
    return bits & 0o6 == 0o6


def qemu_identity(conf: str) -> tuple[str, int, set[int]] | None:
    """(user name, uid, gids) QEMU runs with under ``conf``; None if that user is unknown."""
    settings = _settings(conf, user=QEMU_USER, group=QEMU_USER)
    try:
        user = _user(settings["user"])
    except KeyError:
        return None
    gids = set(os.getgrouplist(user.pw_name, user.pw_gid))  # as libvirt's virGetGroupList
    with contextlib.suppress(KeyError):
        gids.add(_group(settings["group"]))
    return user.pw_name, user.pw_uid, gids


def swtpm_owner(conf: str = QEMU_CONF) -> tuple[int, int] | None:
    """(uid, gid) swtpm runs as under ``conf`` (``swtpm_user``/``swtpm_group``), whose files a
    migrated TPM state must belong to; None when that user does not exist here."""
    settings = _settings(conf, swtpm_user=SWTPM_USER, swtpm_group=SWTPM_USER)
    try:
        user = settings["swtpm_user"]  # "+N" is uid N, whether or not a user has it
        uid = int(user[1:]) if user.startswith("+") else _user(user).pw_uid
        return uid, _group(settings["swtpm_group"])
    except (KeyError, ValueError):
        return None


def _settings(conf: str, **defaults: str) -> dict[str, str]:
    """The user/group settings of libvirt's qemu.conf, over ``defaults``."""
    settings = dict(defaults)
    with contextlib.suppress(FileNotFoundError), open(conf) as f:
        for line in f:
            if m := _SETTING.match(line):
                settings[m.group(1)] = m.group(2)
    return settings


def _user(name: str) -> pwd.struct_passwd:
    """libvirt's spelling: ``+N`` is uid N, a name that is no user but a number is a uid."""
    if name.startswith("+"):
        return pwd.getpwuid(int(name[1:]))
    try:
        return pwd.getpwnam(name)
    except KeyError:
        if name.isdigit():
            return pwd.getpwuid(int(name))
        raise


def _group(name: str) -> int:
    if name.startswith("+"):
        return int(name[1:])
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise


def kvm_access(kvm: str = "/dev/kvm", conf: str = QEMU_CONF) -> Problem | None:
    """A problem when ``kvm`` exists and QEMU's user cannot open it read-write."""
    try:
        st = os.stat(kvm)
    except FileNotFoundError:
        return None  # no KVM here: libvirt's capabilities say so, and stay valid
    ident = qemu_identity(conf)
    if ident is None:
        return None  # no libvirt QEMU user on this host: nothing to judge
    name, uid, gids = ident
    if can_open_rw(st.st_mode, st.st_uid, st.st_gid, uid, gids):
        return None
    fix = kvm_fix(kvm)
    with contextlib.suppress(KeyError):
        kvm_gid = grp.getgrnam("kvm").gr_gid
        if kvm_gid not in gids:
            fix += f", and put QEMU's user in group kvm (`adduser {name} kvm`)"
    return Problem(
        kind="kvm-access",
        what=(f"QEMU's user {name} cannot open {kvm} ({stat.filemode(st.st_mode)} "
              f"{_owner(st.st_uid, st.st_gid)}): libvirt finds its QEMU capabilities outdated "
              "on every call and probes QEMU again, so every define or start takes up to "
              "minutes"),
        fix=fix)


def reprobing(second_s: float, kvm: str = "/dev/kvm") -> Problem | None:
    """A problem when a repeated capability query took ``second_s`` > REPROBE_S seconds."""
    if second_s <= REPROBE_S:
        return None
    return Problem(
        kind="libvirt-reprobes-qemu",
        what=(f"libvirt took {second_s:.1f} s to answer a repeated QEMU capability query "
              "(milliseconds from its cache): it probes QEMU again on every call, so every "
              "define or start takes that long or longer"),
        fix=(kvm_fix(kvm) + "; if the node is fine, libvirtd's log says why after "
             "`virt-admin daemon-log-filters 1:qemu.qemu_capabilities`"))


def _owner(uid: int, gid: int) -> str:
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return f"{user}:{group}"

