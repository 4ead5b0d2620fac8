"""cloud-init NoCloud seeds: what a ``CloudInit`` may hold, and the ``cidata`` ISO it becomes.

Pure code (no files): ``check`` refuses bad input with what to change, ``seed_files`` makes
the ``user-data`` / ``meta-data`` / ``network-config`` texts, ``seed_iso`` the ISO9660
volume (Joliet and Rock Ridge names, label ``cidata``) that cloud-init's NoCloud datasource
finds on a CD-ROM::

    >>> ci = CloudInit(instance_id="iid-1", hostname="web", user="ana")
    >>> print(seed_files(ci)["meta-data"], end="")
    instance-id: iid-1
    local-hostname: web
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import secrets
import struct

import msgspec
import yaml

from shared.errors import BadRequest, PayloadTooLarge
from shared.messages.vm import CloudInit

MAX_USER_DATA = 64 << 10  # what most clouds accept; a seed is not a file transfer
LABEL = "cidata"
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)"
                       r"(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$", re.IGNORECASE)
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
SSH_KEY_TYPES = (
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
)


def new_instance_id() -> str:
    return f"iid-{secrets.token_hex(8)}"


def check(ci: CloudInit) -> CloudInit:
    """Refuse a seed cloud-init would reject or misread, saying what to change."""
    if ci.hostname and not _HOSTNAME.match(ci.hostname):
        raise BadRequest(f"hostname {ci.hostname!r} is not an RFC 1123 host name: use letters, "
                         "digits and '-' in labels of at most 63 characters, separated by '.'")
    if ci.user and not _USER.match(ci.user):
        raise BadRequest(f"user name {ci.user!r} is not valid: use up to 32 lower-case "
                         "letters, digits, '_' or '-', starting with a letter or '_'")
    for key in ci.ssh_keys:
        check_ssh_key(key)
    for what, text in (("user-data", ci.user_data), ("network-config", ci.network_config)):
        if len(text.encode()) > MAX_USER_DATA:
            raise PayloadTooLarge(f"{what} is {len(text.encode())} bytes: at most "
                                  f"{MAX_USER_DATA} (64 KiB); fetch big files from the guest")
    if ci.user_data:
        if ci.user_data.startswith("#!"):
            if ci.user or ci.ssh_keys:
                raise BadRequest("a user-data script cannot take --user or --ssh-key: create "
                                 "the user in the script, or give #cloud-config user-data")
        elif ci.user_data.startswith("#cloud-config"):
            if not isinstance(_yaml(ci.user_data, "user-data"), dict | None):
                raise BadRequest("user-data: #cloud-config must be a YAML mapping (key: value)")
        else:
            raise BadRequest("user-data must start with '#cloud-config' (YAML) or '#!' "
                             "(a script)")
    if ci.network_config and not isinstance(_yaml(ci.network_config, "network-config"), dict):
        raise BadRequest("network-config must be a YAML mapping (version: 2, ethernets: ...)")
    if ci.instance_id and not re.match(r"^[A-Za-z0-9_.-]{1,64}$", ci.instance_id):
        raise BadRequest(f"instance-id {ci.instance_id!r}: use 1-64 letters, digits, '_.-'")
    return ci


def check_ssh_key(key: str) -> str:
    """``key`` if it is one OpenSSH public key line: a known type, then base64 whose blob
    names the same type (what ``ssh-keygen -l`` checks first)."""
    parts = key.strip().split()
    if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES or "\n" in key.strip():
        raise BadRequest(f"SSH key {key[:40]!r}... is not an OpenSSH public key line: give "
                         f"'TYPE BASE64 [comment]' with TYPE one of {', '.join(SSH_KEY_TYPES)} "
                         "(the content of a .pub file)")
    try:
        blob = base64.b64decode(parts[1], validate=True)
        (n,) = struct.unpack(">I", blob[:4])
        named = blob[4:4 + n].decode()
    except (binascii.Error, struct.error, UnicodeDecodeError):
        named = ""
    if named != parts[0]:
        raise BadRequest(f"SSH key of type {parts[0]}: its base64 part does not decode to a "
                         f"{parts[0]} key; copy the whole line of the .pub file")
    return key.strip()


def _yaml(text: str, what: str) -> object:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise BadRequest(f"{what} is not valid YAML: {e}".replace("\n", " ")) from None


def _dump(data: object) -> str:
    return yaml.safe_dump(data, default_flow_style=False, sort_keys=False)


def seed_files(ci: CloudInit) -> dict[str, str]:
    """The seed's files. The hostname goes to meta-data (scripts get it too); the user with
    its keys to the cloud-config (added to the given one), keys without a user to
    meta-data's ``public-keys`` (the image's default user)."""
    meta: dict[str, object] = {"instance-id": ci.instance_id}
    keys = [k.strip() for k in ci.ssh_keys]
    if ci.hostname:
        meta["local-hostname"] = ci.hostname
    if keys and not ci.user:
        meta["public-keys"] = keys
    user_data = ci.user_data
    if not user_data.startswith("#!"):
        config = (_yaml(user_data, "user-data") if user_data else None) or {}
        assert isinstance(config, dict)
        if ci.user:
            users = config.get("users") or ["default"]
            users.append({"name": ci.user, "ssh_authorized_keys": keys,
                          "sudo": "ALL=(ALL) NOPASSWD:ALL", "shell": "/bin/bash",
                          "lock_passwd": True})
            config["users"] = users
        if ci.hostname:
            config.setdefault("hostname", ci.hostname)
        user_data = "#cloud-config\n" + (_dump(config) if config else "")
    files = {"user-data": user_data, "meta-data": _dump(meta)}
    if ci.network_config:
        files["network-config"] = ci.network_config
    return files


def seed_iso(ci: CloudInit) -> bytes:
    """The NoCloud seed as an ISO9660 image labelled ``cidata``."""
    import pycdlib  # only the vm agent needs it, and only here

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=LABEL, joliet=3, rock_ridge="1.09")
    for name, text in seed_files(ci).items():
        data = text.encode()
        short = name.replace("-", "_").upper()[:8]
        iso.add_fp(io.BytesIO(data), len(data), f"/{short}.;1", rr_name=name,
                   joliet_path=f"/{name}")
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()


def replace_id(ci: CloudInit, instance_id: str = "") -> CloudInit:
    """``ci`` with a new instance-id (a clone: cloud-init runs again as a new machine)."""
    return msgspec.structs.replace(ci, instance_id=instance_id or new_instance_id())
