"""`phyllome hw report` on the fixture trees: the verdicts a VFIO expert gives.

The expected summaries live in tests/data/hw/expected/<fixture>.json; after a deliberate
change, rewrite them with ``PHYLLOME_REGENERATE=1`` and review the diff.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cli.hw import local_report
from services.hardware.inventory import Inventory, host_caps
from services.hardware.sysfs import Sysfs
from shared.codec import to_builtins
from shared.messages.hardware import HwReport
from tests.support.golden import regenerating
from tests.support.sysfs_tree import FIXTURES, build

REPO = Path(__file__).resolve().parents[2]
EXPECTED = REPO / "tests/data/hw/expected"
RECORDED = REPO / "tests/data/hw/trees"  # real machines, by `python -m tests.support.sysfs_tree`


def report_of(name: str, tmp_path: Path) -> HwReport:
    host = FIXTURES[name]()
    root = build(tmp_path / name, host).root
    fs = Sysfs(str(root), root_dev=host.root_dev)
    inv = Inventory(fs)
    inv.scan()
    return inv.report(host_caps(fs, None))


def summary(report: HwReport) -> dict[str, Any]:
    h = report.host
    return {
        "host": {"cpu_vendor": h.cpu_vendor, "virt_extension": h.virt_extension,
                 "nested": h.nested, "iommu": h.iommu, "iommu_hint": h.iommu_hint,
                 "kvm_usable": h.kvm_usable,
                 "sev": h.sev, "sev_es": h.sev_es, "sev_snp": h.sev_snp, "tdx": h.tdx,
                 "sgx": h.sgx},
        "devices": {d.address: {"kind": d.kind, "verdict": d.passthrough.verdict,
                                "companions": d.passthrough.companions,
                                "shares_with": d.passthrough.shares_with,
                                "host_loses": d.passthrough.host_loses}
                    for d in report.devices if d.passthrough is not None},
        "bridges": [d.address for d in report.devices if d.passthrough is None],
        "gpus": [{"address": g.address, "vendor": g.vendor, "boot_vga": g.boot_vga,
                  "only_gpu": g.only_gpu, "handoff": bool(g.handoff)} for g in report.gpus],
        "problems": report.problems,
    }


@pytest.mark.parametrize("name", sorted(FIXTURES) + sorted(p.name for p in RECORDED.iterdir()))
def test_fixture_verdicts(name: str, tmp_path: Path) -> None:
    if name in FIXTURES:
        report = report_of(name, tmp_path)
    else:
        inv = Inventory(Sysfs(str(RECORDED / name)))
        inv.scan()
        report = inv.report(host_caps(inv.fs, None))
    got = summary(report)
    path = EXPECTED / f"{name}.json"
    if regenerating():
        path.write_text(json.dumps(got, indent=1) + "\n")
    assert got == json.loads(path.read_text())


def test_confidential_hosts_have_their_caps(tmp_path: Path) -> None:
    """The EPYC reports SEV, SEV-ES and SEV-SNP, the Sapphire Rapids TDX; the AMD desktop's
    CPU flag alone (kvm_amd sev=N) is no SEV."""
    caps = {name: report_of(name, tmp_path).host
            for name in ("epyc-snp", "sapphire-rapids-tdx", "amd-desktop")}
    got = {name: (h.sev, h.sev_es, h.sev_snp, h.tdx) for name, h in caps.items()}
    assert got == {"epyc-snp": (True, True, True, False),
                   "sapphire-rapids-tdx": (False, False, False, True),
                   "amd-desktop": (False, False, False, False)}


def test_expert_verdicts_spelled_out(tmp_path: Path) -> None:
    """The cases the issue names, stated here so the golden files cannot drift silently."""
    intel = {d.address: d for d in report_of("intel-desktop", tmp_path).devices}
    gpu = intel["0000:01:00.0"].passthrough
    assert gpu is not None and gpu.verdict == "with-companions"
    assert gpu.companions == ["0000:01:00.1", "0000:01:00.2", "0000:01:00.3"]
    pch_audio = intel["0000:00:1f.3"].passthrough
    assert pch_audio is not None and pch_audio.verdict == "shared-group"
    assert "0000:00:1f.0" in pch_audio.shares_with and pch_audio.companions == []

    amd = {d.address: d for d in report_of("amd-desktop", tmp_path).devices}
    usb = amd["0000:02:00.0"].passthrough
    assert usb is not None and usb.verdict == "shared-group"
    assert usb.shares_with == ["0000:02:00.1", "0000:05:00.0"]
    assert any("only network controller" in x for x in usb.host_loses)

    single = report_of("single-gpu", tmp_path)
    assert [(g.vendor, g.only_gpu, g.boot_vga) for g in single.gpus] == [("nvidia", True, True)]

    sriov = {d.address: d for d in report_of("sriov-nic", tmp_path).devices}
    assert sriov["0000:03:00.0"].virtfns == ["0000:03:10.0", "0000:03:10.2"]
    assert sriov["0000:03:10.0"].physfn == "0000:03:00.0"
    assert (sriov["0000:03:00.0"].sriov_totalvfs, sriov["0000:03:00.0"].sriov_numvfs) == (63, 2)
    vf = sriov["0000:03:10.0"].passthrough
    assert vf is not None and vf.verdict == "isolated"

    gvt = {d.address: d for d in report_of("intel-gvtg", tmp_path).devices}
    types = {t.id: t for t in gvt["0000:00:02.0"].mdev_types}
    assert types["i915-GVTg_V5_4"].available_instances == 1
    assert types["i915-GVTg_V5_4"].instances == ["9f5c1a2e-5f7b-4c1e-8a5b-3a4f1e2d3c4b"]
    assert "resolution: 1920x1200" in types["i915-GVTg_V5_4"].description

    off = report_of("iommu-off", tmp_path)
    assert not off.host.iommu and "intel_iommu=on" in off.host.iommu_hint
    assert {d.passthrough.verdict for d in off.devices if d.passthrough} == {"no-iommu"}
    assert off.groups == []

    # IOMMU on, one device without a group: it cannot be passed through, so never isolated
    ungrouped = report_of("iommu-ungrouped", tmp_path)
    assert ungrouped.host.iommu and ungrouped.host.iommu_hint == ""
    by_addr = {d.address: d for d in ungrouped.devices}
    igpu = by_addr["0000:00:02.0"].passthrough
    assert igpu is not None and igpu.verdict == "no-iommu"
    assert "no IOMMU group although the IOMMU is on" in igpu.reasons[0]
    assert all("0000:00:02.0" not in g.devices for g in ungrouped.groups)
    dgpu = by_addr["0000:01:00.0"].passthrough
    assert dgpu is not None and dgpu.verdict == "with-companions"  # the others keep theirs


def test_usb_devices_listed_under_their_controller(tmp_path: Path) -> None:
    laptop = {d.address: d for d in report_of("laptop", tmp_path).devices}
    usb = laptop["0000:00:14.0"]
    assert [(u.port, u.vendor_id, u.kind) for u in usb.usb] == [("1-14", "8087", "bluetooth")]
    intel = {d.address: d for d in report_of("intel-desktop", tmp_path).devices}
    assert [u.kind for u in intel["0000:00:14.0"].usb] == ["bluetooth", "other"]


def test_missing_and_unreadable_attributes_are_reported_and_the_scan_goes_on(
        tmp_path: Path) -> None:
    root = build(tmp_path, FIXTURES["intel-desktop"]()).root
    dev = root / "bus/pci/devices"
    (dev / "0000:01:00.1/uevent").unlink()
    (dev / "0000:01:00.1/class").unlink()
    (dev / "0000:01:00.2/uevent").unlink()
    (dev / "0000:01:00.2/vendor").unlink()
    (dev / "0000:01:00.2/vendor").mkdir()  # EISDIR: unreadable even for root
    inv = Inventory(Sysfs(str(root)))
    inv.scan()
    report = inv.report(host_caps(inv.fs, None))
    by = {d.address: d for d in report.devices}
    assert "0000:01:00.1: uevent: missing" in report.problems
    assert "0000:01:00.1: class: missing" in report.problems
    assert any(p.startswith("0000:01:00.2: vendor: unreadable") for p in report.problems)
    assert by["0000:01:00.1"].vendor_id == "10de" and by["0000:01:00.1"].driver == "snd_hda_intel"
    assert by["0000:01:00.2"].device_id == "1ada"
    assert len(report.devices) == 15


def test_cli_report_json_shape(tmp_path: Path) -> None:
    root = build(tmp_path, FIXTURES["intel-desktop"]()).root
    out = subprocess.run([sys.executable, "-m", "cli.main", "hw", "report", "--sysfs-root",
                          str(root), "--json"], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=60)
    data = json.loads(out.stdout)
    assert set(data) >= {"host", "devices", "groups", "gpus"}
    gpu = next(d for d in data["devices"] if d["address"] == "0000:01:00.0")
    assert {k: gpu[k] for k in ("vendor_id", "device_id", "vendor", "name", "class", "driver",
                                "iommu_group", "boot_vga")} == {
        "vendor_id": "10de", "device_id": "1f02", "vendor": "NVIDIA Corporation",
        "name": "TU106 [GeForce RTX 2070]", "class": "VGA compatible controller",
        "driver": "nvidia", "iommu_group": 1, "boot_vga": False}
    assert gpu["passthrough"]["verdict"] == "with-companions"
    assert {"id": 1, "devices": ["0000:00:01.0", "0000:01:00.0", "0000:01:00.1", "0000:01:00.2",
                                 "0000:01:00.3"]} in [
        {k: g[k] for k in ("id", "devices")} for g in data["groups"]]
    bridge = next(d for d in data["devices"] if d["address"] == "0000:00:01.0")
    assert bridge["passthrough"] is None
    assert [(g["address"], g["vendor"], g["only_gpu"]) for g in data["gpus"]] == [
        ("0000:00:02.0", "intel", False), ("0000:01:00.0", "nvidia", False)]
    assert data["host"]["kvm_ioctl"] == "not-run"


def test_cli_report_on_a_directory_that_is_not_sysfs(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "cli.main", "hw", "report", "--sysfs-root",
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "not a sysfs tree" in out.stderr


def test_local_report_is_what_the_cli_prints(tmp_path: Path) -> None:
    root = build(tmp_path, FIXTURES["sriov-nic"]()).root
    report = to_builtins(local_report(str(root)))
    assert [d["address"] for d in report["devices"]][:2] == ["0000:00:00.0", "0000:00:02.0"]


def test_updates_keep_the_verdicts_a_full_scan_gives(tmp_path: Path) -> None:
    """Incremental verdicts after uevents equal those of a fresh scan of the same tree."""
    from tests.support.sysfs_tree import Pci

    host = FIXTURES["intel-desktop"]()
    builder = build(tmp_path, host)
    inv = Inventory(Sysfs(str(builder.root), root_dev=host.root_dev))
    inv.scan()

    def same_as_fresh() -> dict[str, str]:
        fresh = Inventory(Sysfs(str(builder.root), root_dev=host.root_dev))
        fresh.scan()
        assert inv.devices() == fresh.devices()
        return {d.address: d.passthrough.verdict for d in inv.devices() if d.passthrough}

    builder.unbind("0000:01:00.1")
    inv.update("0000:01:00.1")
    same_as_fresh()
    builder.add(Pci(addr="0000:01:00.4", vendor=0x1102, device=0x0012, cls=0x040300,
                    group=1, parent="0000:00:01.0"))  # an unrelated function joins group 1
    assert inv.update("0000:01:00.4")[0] == "added"
    assert same_as_fresh()["0000:01:00.0"] == "shared-group"
    builder.add(Pci(addr="0000:06:00.0", vendor=0x8086, device=0x1533, cls=0x020000,
                    driver="igb", group=9))  # a second NIC: 1f.6 is no longer the only one
    inv.update("0000:06:00.0")
    same_as_fresh()
    assert inv.device("0000:00:1f.3").passthrough.host_loses == []  # type: ignore[union-attr]
    builder.remove("0000:01:00.4")
    builder.remove("0000:06:00.0")
    assert inv.update("0000:01:00.4") == ("removed", None)
    inv.update("0000:06:00.0")
    assert same_as_fresh()["0000:01:00.0"] == "with-companions"
