"""osinfo-db (``/usr/share/osinfo``): every OS libosinfo knows, as catalogue entries.

Read once at start and on refresh; parsing the ~800 XML files takes about a second. Values
an OS file does not state (resources, firmware) are inherited along ``derives-from``, as
libosinfo does. osinfo-db releases before 2023 (Debian 12 ships 20221203) say nothing of
Secure Boot or TPM, so ``KNOWN_NEEDS`` adds the vendor-published firmware needs of the OSes
that cannot install without them (Windows 11: UEFI, Secure Boot capable, TPM 2.0).

    >>> entries = load("/usr/share/osinfo")
    >>> win11 = next(e for e in entries if e.id == "win11")
    >>> (win11.requirements.tpm, win11.requirements.secure_boot)
    ('2.0', True)
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import msgspec

from services.catalogue.sources import compression_of
from shared.messages.catalogue import CatalogueEntry, Download, Media, Requirements, Resources

log = logging.getLogger("phyllome.catalogue.osinfo")

SOURCE = "osinfo"
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
PREFERRED_ARCHES = ("x86_64", "all")

# Firmware needs stated by the OS vendor but absent from older osinfo-db releases.
KNOWN_NEEDS: dict[str, dict[str, object]] = {
    # https://www.microsoft.com/windows/windows-11-specifications: UEFI, Secure Boot, TPM 2.0
    "http://microsoft.com/win/11": {"firmware": "uefi", "secure_boot": True, "tpm": "2.0"},
}


class _Raw(msgspec.Struct, kw_only=True):
    """One parsed <os> before inheritance is resolved."""

    entry: CatalogueEntry
    derives_from: str
    has_resources: bool
    has_firmware: bool


def load(root: str | Path) -> list[CatalogueEntry]:
    """Every OS under ``root/os`` with a short id; files that do not parse are logged."""
    raws: dict[str, _Raw] = {}
    for path in sorted(Path(root, "os").glob("*/*.xml")):
        try:
            tree = ET.parse(path)
        except (ET.ParseError, OSError) as e:
            log.warning("osinfo: skipping %s: %s", path, e)
            continue
        for node in tree.getroot().iter("os"):
            raw = _parse_os(node)
            if raw is not None:
                raws[raw.entry.upstream_id] = raw
    return sorted((_resolve(uri, raws) for uri in raws), key=lambda e: e.id)


def _text(node: ET.Element, tag: str) -> str:
    """The untranslated text of the first child ``tag`` (osinfo repeats names per language)."""
    for child in node.findall(tag):
        if XML_LANG not in child.attrib:
            return (child.text or "").strip()
    return ""


def _int(node: ET.Element | None, tag: str) -> int:
    if node is None:
        return 0
    text = node.findtext(tag, "").strip()
    try:
        return int(text) if text else 0
    except ValueError:
        return 0


def _variant(node: ET.Element) -> str:
    v = node.find("variant")
    return v.get("id", "") if v is not None else ""


def _resources(node: ET.Element) -> tuple[Resources, Resources] | None:
    by_arch = {r.get("arch", "all"): r for r in node.findall("resources")}
    chosen = next((by_arch[a] for a in PREFERRED_ARCHES if a in by_arch),
                  next(iter(by_arch.values()), None))
    if chosen is None:
        return None

    def res(kind: str) -> Resources:
        el = chosen.find(kind)
        return Resources(cpus=_int(el, "n-cpus"), ram=_int(el, "ram"),
                         storage=_int(el, "storage"))

    return res("minimum"), res("recommended")


def _firmware(node: ET.Element) -> dict[str, object] | None:
    """Firmware needs: a type marked unsupported means the other is required."""
    fw = node.findall("firmware")
    if not fw:
        return None
    needs: dict[str, object] = {}
    unsupported = {f.get("type") for f in fw if f.get("supported") == "false"}
    if "bios" in unsupported:
        needs["firmware"] = "uefi"
    elif "efi" in unsupported:
        needs["firmware"] = "bios"
    for f in fw:  # newer osinfo-db: <firmware type="efi"><feature name="secure-boot" .../>
        for feat in f.findall("feature"):
            if feat.get("name") == "secure-boot" and feat.get("supported", "true") == "true":
                needs["secure_boot"] = True
    for dev in node.findall("devices/device"):
        if "tpm" in dev.get("id", "").lower():
            needs["tpm"] = "2.0" if "2.0" in dev.get("id", "") else "1.2"
    return needs


def _parse_os(node: ET.Element) -> _Raw | None:
    short = node.findtext("short-id", "").strip()
    uri = node.get("id", "")
    if not short or not uri:
        return None
    downloads = []
    for img in node.findall("image"):
        url = img.findtext("url", "").strip()
        if not url:
            continue
        downloads.append(Download(
            arch=img.get("arch", "x86_64"), url=url, format=img.get("format", "raw"),
            compression=compression_of(url), cloud_init=img.get("cloud-init") == "true",
            variant=_variant(img)))
    media = [Media(arch=m.get("arch", "x86_64"), url=m.findtext("url", "").strip(),
                   variant=_variant(m), volume_id=m.findtext("iso/volume-id", "").strip())
             for m in node.findall("media")]
    resources = _resources(node)
    firmware = _firmware(node)
    minimum, recommended = resources or (Resources(), Resources())
    req = Requirements(minimum=minimum, recommended=recommended)
    if firmware:
        req = msgspec.structs.replace(req, **firmware)
    archs = sorted({d.arch for d in downloads} | {m.arch for m in media})
    derives = node.find("derives-from")
    entry = CatalogueEntry(
        id=short, name=_text(node, "name") or short, source=SOURCE,
        vendor=_text(node, "vendor"), family=node.findtext("family", "").strip(),
        distro=node.findtext("distro", "").strip(), version=node.findtext("version", "").strip(),
        codename=node.findtext("codename", "").strip(),
        release_date=node.findtext("release-date", "").strip(),
        eol_date=node.findtext("eol-date", "").strip(), archs=archs, downloads=downloads,
        media=media, requirements=req, upstream_id=uri)
    return _Raw(entry=entry, derives_from=derives.get("id", "") if derives is not None else "",
                has_resources=resources is not None, has_firmware=firmware is not None)


def _resolve(uri: str, raws: dict[str, _Raw]) -> CatalogueEntry:
    """The entry with resources/firmware inherited and ``KNOWN_NEEDS`` applied."""
    raw = raws[uri]
    req = raw.entry.requirements
    seen = {uri}
    parent = raws.get(raw.derives_from)
    need_res, need_fw = not raw.has_resources, not raw.has_firmware
    while parent is not None and (need_res or need_fw) and parent.entry.upstream_id not in seen:
        seen.add(parent.entry.upstream_id)
        p = parent.entry.requirements
        if need_res and parent.has_resources:
            req = msgspec.structs.replace(req, minimum=p.minimum, recommended=p.recommended)
            need_res = False
        if need_fw and parent.has_firmware:
            req = msgspec.structs.replace(req, firmware=p.firmware, secure_boot=p.secure_boot,
                                          tpm=p.tpm)
            need_fw = False
        parent = raws.get(parent.derives_from)
    known = KNOWN_NEEDS.get(uri)
    if known:
        stated = {k: v for k, v in known.items() if not getattr(req, k)}
        req = msgspec.structs.replace(req, **stated)
    return msgspec.structs.replace(raw.entry, requirements=req)
