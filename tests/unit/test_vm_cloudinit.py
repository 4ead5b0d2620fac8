"""cloud-init NoCloud seeds and install media: input refused with what to do, the seed's
files and its ISO (read back with pycdlib), and the ISO9660/UDF check of install media."""

from __future__ import annotations

import base64
import io
import struct
from pathlib import Path

import pycdlib
import pytest
import yaml

from services.vm import cloudinit, hostfs
from services.vm import spec as spec_rules
from shared.errors import BadRequest, NotFound, PayloadTooLarge
from shared.messages.vm import Cdrom, CloudInit, VmSpec

BLOB = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + bytes(32)
KEY = f"ssh-ed25519 {base64.b64encode(BLOB).decode()} ana@lap"


def _read_iso(data: bytes) -> tuple[str, dict[str, bytes]]:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    files = {}
    for child in iso.list_children(rr_path="/"):
        if child.is_dot() or child.is_dotdot():
            continue
        name = child.rock_ridge.name().decode()
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
        files[name] = out.getvalue()
    label = iso.pvd.volume_identifier.decode().strip()
    iso.close()
    return label, files


@pytest.mark.unit
def test_vm_seed_iso_is_labelled_cidata_and_holds_the_nocloud_files() -> None:
    ci = cloudinit.check(CloudInit(instance_id="iid-7", hostname="web.lab", user="ana",
                                   ssh_keys=[KEY + "\n"], network_config="version: 2\n"))
    label, files = _read_iso(cloudinit.seed_iso(ci))
    assert label == "cidata"
    assert sorted(files) == ["meta-data", "network-config", "user-data"]
    meta = yaml.safe_load(files["meta-data"])
    assert meta == {"instance-id": "iid-7", "local-hostname": "web.lab"}
    user_data = files["user-data"].decode()
    assert user_data.startswith("#cloud-config\n")
    config = yaml.safe_load(user_data)
    assert config["hostname"] == "web.lab"
    assert config["users"][0] == "default"
    assert config["users"][1]["name"] == "ana"
    assert config["users"][1]["ssh_authorized_keys"] == [KEY]


@pytest.mark.unit
def test_vm_seed_merges_given_cloud_config_and_keeps_scripts_whole() -> None:
    given = "#cloud-config\npackages: [htop]\nusers: [default, {name: bob}]\n"
    files = cloudinit.seed_files(CloudInit(instance_id="i", user="ana", ssh_keys=[KEY],
                                           user_data=given))
    config = yaml.safe_load(files["user-data"])
    assert config["packages"] == ["htop"]
    assert [u if isinstance(u, str) else u["name"] for u in config["users"]] == \
        ["default", "bob", "ana"]
    script = "#!/bin/sh\necho hi\n"
    files = cloudinit.seed_files(CloudInit(instance_id="i", hostname="h", user_data=script))
    assert files["user-data"] == script
    assert yaml.safe_load(files["meta-data"])["local-hostname"] == "h"
    keys_only = cloudinit.seed_files(CloudInit(instance_id="i", ssh_keys=[KEY]))
    assert yaml.safe_load(keys_only["meta-data"])["public-keys"] == [KEY]


@pytest.mark.unit
@pytest.mark.parametrize(("ci", "error", "match"), [
    (CloudInit(user_data="#cloud-config\n" + "a: b\n" * 20000), PayloadTooLarge, "64 KiB"),
    (CloudInit(hostname="web_1"), BadRequest, "RFC 1123"),
    (CloudInit(hostname="-web"), BadRequest, "RFC 1123"),
    (CloudInit(hostname="a" * 64), BadRequest, "RFC 1123"),
    (CloudInit(ssh_keys=["ssh-ed25519"]), BadRequest, "not an OpenSSH public key"),
    (CloudInit(ssh_keys=["ssh-dss AAAAB3NzaC1kc3M= x"]), BadRequest, "not an OpenSSH"),
    (CloudInit(ssh_keys=["ssh-rsa " + KEY.split()[1]]), BadRequest, "does not decode"),
    (CloudInit(ssh_keys=["ssh-ed25519 not-base64!"]), BadRequest, "does not decode"),
    (CloudInit(user_data="packages: [htop]\n"), BadRequest, "#cloud-config"),
    (CloudInit(user_data="#cloud-config\nusers: [a\n"), BadRequest, "not valid YAML"),
    (CloudInit(user_data="#cloud-config\n- a\n"), BadRequest, "YAML mapping"),
    (CloudInit(user_data="#!/bin/sh\n", user="ana"), BadRequest, "create the user"),
    (CloudInit(user="Ana Smith"), BadRequest, "user name"),
    (CloudInit(network_config="- eth0\n"), BadRequest, "network-config"),
])
def test_vm_bad_cloud_init_is_refused(ci: CloudInit, error: type[Exception],
                                      match: str) -> None:
    with pytest.raises(error, match=match):
        spec_rules.check_spec(VmSpec(name="vm", cloud_init=ci))


@pytest.mark.unit
def test_vm_a_clone_gets_a_new_instance_id() -> None:
    ci = CloudInit(instance_id="iid-1", hostname="h")
    assert cloudinit.replace_id(ci).instance_id not in ("iid-1", "")
    assert cloudinit.replace_id(ci).hostname == "h"


@pytest.mark.unit
def test_vm_install_media_must_be_iso9660_or_udf(tmp_path: Path) -> None:
    iso = tmp_path / "seed.iso"
    iso.write_bytes(cloudinit.seed_iso(CloudInit(instance_id="i")))
    hostfs.check_iso(str(iso))
    udf = tmp_path / "udf.iso"
    with udf.open("wb") as f:  # UDF: BEA01 then NSR02 descriptors from sector 16 on
        f.truncate(1 << 20)
        f.seek(0x8001)
        f.write(b"BEA01")
        f.seek(0x8801)
        f.write(b"NSR02")
    hostfs.check_iso(str(udf))
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(1 << 20))
    with pytest.raises(BadRequest, match="not an ISO9660 or UDF image"):
        hostfs.check_iso(str(raw))
    with pytest.raises(BadRequest, match="Is a directory"):
        hostfs.check_iso(str(tmp_path))
    with pytest.raises(NotFound, match="does not exist"):
        hostfs.check_iso(str(tmp_path / "missing.iso"))


@pytest.mark.unit
def test_vm_media_paths_must_be_absolute() -> None:
    with pytest.raises(BadRequest, match="absolute"):
        spec_rules.check_spec(VmSpec(name="vm", cdrom=Cdrom(path="debian.iso")))
