"""VIRTIO 1.2 devices and confidential guests: what a spec may ask for, and what is read back.

The XML itself is pinned by the golden files of tests/unit/test_vm_domain_xml.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.vm import domain_xml, hostfs
from services.vm import spec as spec_rules
from shared.errors import BadRequest, Conflict
from shared.messages.vm import Share, UsbHostdev, VmSpec

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("changes", "error", "match"), [
    ({"shares": [Share(source="data", tag="d")]}, BadRequest, "must be absolute"),
    ({"shares": [Share(source="/srv", tag="a b")]}, BadRequest, "share tag 'a b' is not valid"),
    ({"shares": [Share(source="/srv", tag="x" * 37)]}, BadRequest, "1-36 letters"),
    ({"shares": [Share(source="/a", tag="d"), Share(source="/b", tag="d")]}, Conflict,
     "already has a share tagged 'd'"),
    ({"shares": [Share(source="/srv", tag="d", readonly=True)]}, BadRequest,
     "cannot export read-only; drop --readonly and share a read-only bind mount"),
    ({"confidential": "sev", "firmware": "bios"}, BadRequest, "use --firmware uefi"),
    ({"confidential": "sev-es", "secure_boot": True}, BadRequest, "drop --secure-boot"),
    ({"confidential": "tdx", "secure_boot": True}, BadRequest, "drop --secure-boot"),
    ({"confidential": "sev-snp", "accelerator": "tcg"}, BadRequest, "under KVM"),
    ({"confidential": "sev", "hostdevs": ["0000:01:00.0"]}, BadRequest, "drop --hostdev"),
    ({"confidential": "tdx", "usb_hostdevs": [UsbHostdev(bus=1, device=2)]}, BadRequest,
     "USB passthrough"),
    ({"confidential": "sev-snp", "nested": True}, BadRequest, "drop --nested"),
])
def test_bad_device_specs_are_refused(changes: dict[str, Any], error: type[Exception],
                                      match: str) -> None:
    with pytest.raises(error, match=match):
        spec_rules.check_spec(VmSpec(name="x", **changes))


def test_sev_keeps_secure_boot_and_good_shares_pass() -> None:
    spec_rules.check_spec(VmSpec(name="x", confidential="sev", secure_boot=True,
                                 shares=[Share(source="/srv/a", tag="a.1_b-2")]))


def test_virtio_input_replaces_the_usb_tablet() -> None:
    xml = domain_xml.build(VmSpec(name="x", input="virtio"), accelerator="tcg",
                           serial_log="/l")
    assert 'bus="usb"' not in xml and 'qemu-xhci' in xml  # the controller stays for USB
    assert '<input type="keyboard" bus="virtio" />' in xml


def test_shares_get_shared_memory_and_own_root_ports() -> None:
    plain = domain_xml.build(VmSpec(name="x"), accelerator="tcg", serial_log="/l")
    shared = domain_xml.build(VmSpec(name="x", vsock=True, shares=[
        Share(source="/a", tag="a"), Share(source="/b", tag="b")]), accelerator="tcg",
        serial_log="/l")
    assert "memoryBacking" not in plain and '<access mode="shared" />' in shared
    assert shared.count("pcie-root-port") == plain.count("pcie-root-port") + 3


@pytest.mark.parametrize(("xml", "cid"), [
    ("<domain><devices><vsock model='virtio'><cid auto='yes' address='42'/></vsock>"
     "</devices></domain>", 42),
    ("<domain><devices><vsock model='virtio'><cid auto='yes'/></vsock></devices></domain>", 0),
    ("<domain><devices/></domain>", 0),
])
def test_the_guest_cid_is_read_from_the_live_xml(xml: str, cid: int) -> None:
    assert domain_xml.vsock_cid_of(xml) == cid


def test_firmware_features_come_from_the_descriptors(tmp_path: Path) -> None:
    (tmp_path / "60-edk2.json").write_text(json.dumps({"features": ["amd-sev", "acpi-s3"]}))
    (tmp_path / "70-amdsev.json").write_text(json.dumps({"features": ["amd-sev-snp"]}))
    (tmp_path / "broken.json").write_text("{")
    got = hostfs.firmware_features((str(tmp_path), str(tmp_path / "absent")))
    assert got == {"amd-sev", "acpi-s3", "amd-sev-snp"}


def test_vsock_needs_the_hosts_vhost_device(tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="modprobe vhost_vsock"):
        hostfs.check_vsock(str(tmp_path / "vhost-vsock"))
    (tmp_path / "vhost-vsock").touch()
    hostfs.check_vsock(str(tmp_path / "vhost-vsock"))
