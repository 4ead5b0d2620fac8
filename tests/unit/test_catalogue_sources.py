"""Pure logic of the catalogue: ids, source parsers, search, download choice, VM templates."""

from __future__ import annotations

import json

import pytest

from cli.images import source_rows
from services.catalogue.handlers import choose, matches, template
from services.catalogue.sources import (
    check_id,
    compression_of,
    normalize_arch,
    rewrite,
    safe_id,
    simplestreams,
)
from services.catalogue.sources import manifest as manifest_source
from shared.errors import BadRequest, InvalidName, NotFound
from shared.messages.catalogue import (
    CatalogueEntry,
    Download,
    ListRequest,
    LocalImage,
    Media,
    Requirements,
    Resources,
    SourceList,
    SourceSpec,
)

pytestmark = pytest.mark.unit
GiB = 1 << 30
SHA = "ab" * 32


@pytest.mark.parametrize("ident", ["debian11", "ubuntu22.04", "dragonflybsd1.0A",
                                   "centos-stream9", "a_b"])
def test_valid_ids(ident: str) -> None:
    assert check_id(ident) == ident


@pytest.mark.parametrize("ident", ["", "../x", "a/b", "a\\b", "..", "a..b", ".x", "-x",
                                   "a b", "a:b", "x" * 129, "a\x00b"])
def test_ids_that_could_escape_the_pool_are_refused(ident: str) -> None:
    with pytest.raises(InvalidName, match="no path separators"):
        check_id(ident)


def test_safe_id_from_free_text() -> None:
    assert safe_id("com.ubuntu.cloud:server:22.04:amd64") == "com.ubuntu.cloud-server-22.04-amd64"
    assert safe_id("../../etc") == "etc"


def test_arch_compression_and_mirror_helpers() -> None:
    assert [normalize_arch(a) for a in ("amd64", "arm64", "x86_64", "ppc64el")] == [
        "x86_64", "aarch64", "x86_64", "ppc64le"]
    assert compression_of("http://h/a.raw.xz?x=1") == "xz"
    assert compression_of("http://h/a.qcow2") == ""
    mirrors = {"https://a.org/": "http://m/a/", "https://a.org/deep/": "http://m/deep/"}
    assert rewrite("https://a.org/deep/x.raw", mirrors) == "http://m/deep/x.raw"
    assert rewrite("https://a.org/x.raw", mirrors) == "http://m/a/x.raw"
    assert rewrite("https://b.org/x.raw", mirrors) == "https://b.org/x.raw"


def manifest(*images: dict[str, object]) -> bytes:
    return json.dumps({"images": list(images)}).encode()


GOOD = {"id": "lab", "name": "Lab", "version": "2", "arch": "amd64", "url": "img/lab.raw.xz",
        "sha256": SHA.upper(), "size": 10, "format": "raw",
        "requirements": {"firmware": "efi", "secure_boot": True, "tpm": "2.0", "cpus": 2,
                         "memory": GiB, "disk": 8 * GiB}}


def test_manifest_entry() -> None:
    [e] = manifest_source.parse(manifest(GOOD), "http://h/lab/index.json", "lab")
    assert (e.id, e.source, e.archs) == ("lab", "lab", ["x86_64"])
    assert e.downloads == [Download(arch="x86_64", url="http://h/lab/img/lab.raw.xz",
                                    format="raw", sha256=SHA, size=10, compression="xz")]
    assert e.requirements == Requirements(minimum=Resources(cpus=2, ram=GiB, storage=8 * GiB),
                                          firmware="uefi", secure_boot=True, tpm="2.0")


@pytest.mark.parametrize("change, match", [
    ({"name": None}, "Expected `str`, got `null` - at `\\$.images\\[0\\].name`"),
    ({"size": -1}, "Expected `int` >= 0"),
    ({"requirements": {"tpm": "3"}}, "Invalid enum value '3'"),
    ({"requirements": {"memory": "1G"}}, "Expected `int`, got `str`"),
    ({"id": "a/b"}, "images\\[0\\]: image id 'a/b' is not valid"),
    ({"sha256": "z" * 64}, "sha256 must be 64 hex digits"),
])
def test_manifest_wrong_fields(change: dict[str, object], match: str) -> None:
    item = {**GOOD, **change}
    with pytest.raises(BadRequest, match=match):
        manifest_source.parse(manifest(item), "http://h/m.json", "lab")


@pytest.mark.parametrize("data, match", [
    (b'{"image": []}', "unknown field `image`"),
    (b'{}', "missing required field `images`"),
    (b'{"images": {}}', "Expected `array`, got `object`"),
    (b'{"images": [', "neither JSON nor TOML|malformed|truncated"),
    (b'\xff\xfe', "neither JSON nor TOML"),
])
def test_manifest_wrong_shape(data: bytes, match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        manifest_source.parse(data, "http://h/m.json", "lab")


def test_manifest_duplicate_ids() -> None:
    with pytest.raises(BadRequest, match="appears twice"):
        manifest_source.parse(manifest(GOOD, GOOD), "http://h/m.json", "lab")


def test_simplestreams_index_and_products() -> None:
    index = json.dumps({"format": "index:1.0", "index": {
        "a": {"datatype": "image-downloads", "path": "streams/v1/a.json"},
        "b": {"datatype": "image-ids", "path": "streams/v1/b.json"}}}).encode()
    assert simplestreams.product_paths(index) == ["streams/v1/a.json"]
    assert simplestreams.index_url("http://h/ss") == "http://h/ss/streams/v1/index.json"
    assert simplestreams.root_url("http://h/ss/streams/v1/index.json") == "http://h/ss/"
    products = json.dumps({"format": "products:1.0", "products": {
        "com.ubuntu.cloud:server:22.04:arm64": {
            "arch": "arm64", "os": "ubuntu", "release": "jammy", "version": "22.04",
            "release_title": "22.04 LTS", "versions": {
                "20240101": {"items": {"disk1.img": {
                    "ftype": "disk1.img", "path": "server/jammy/new.img", "sha256": SHA,
                    "size": 5}}},
                "20230101": {"items": {"disk1.img": {
                    "ftype": "disk1.img", "path": "server/jammy/old.img", "size": 4}}}}}}})
    [e] = simplestreams.parse_products(products.encode(), "http://h/ss/", "ubuntu")
    assert (e.id, e.name, e.archs) == ("ubuntu-jammy-arm64", "Ubuntu 22.04 LTS", ["aarch64"])
    assert e.downloads[0].url == "http://h/ss/server/jammy/new.img"
    assert (e.downloads[0].format, e.downloads[0].sha256) == ("qcow2", SHA)


@pytest.mark.parametrize(("base", "url"), [
    ("http://h/ss", "http://h/ss/streams/v1/index.sjson"),
    ("http://h/ss/", "http://h/ss/streams/v1/index.sjson"),
    ("http://h/ss/streams/v1/index.json", "http://h/ss/streams/v1/index.sjson"),
    ("http://h/ss/streams/v1/index.sjson", "http://h/ss/streams/v1/index.sjson"),
])
def test_a_signed_source_reads_the_sjson_files(base: str, url: str) -> None:
    assert simplestreams.index_url(base, signed=True) == url
    assert simplestreams.root_url(url) == "http://h/ss/"
    assert simplestreams.signed_path("streams/v1/a.json") == "streams/v1/a.sjson"
    assert simplestreams.signed_path("streams/v1/a.sjson") == "streams/v1/a.sjson"


def test_a_signed_index_without_a_keyring_is_refused() -> None:
    with pytest.raises(BadRequest, match="is a signed index: name the keyring of its signer"):
        simplestreams.index_url("http://h/ss/streams/v1/index.sjson")


def test_sources_say_how_their_index_is_trusted() -> None:
    rows = source_rows(SourceList(sources=[
        SourceSpec(name="builtin", kind="builtin", url="/b", builtin=True),
        SourceSpec(name="lab", kind="manifest", url="http://h/m.json"),
        SourceSpec(name="ss", kind="simplestreams", url="http://h/ss"),
        SourceSpec(name="ubuntu", kind="simplestreams", url="http://h/u", keyring="/k.gpg")]))
    assert [r["signature"] for r in rows] == ["local files", "unsigned", "unsigned",
                                              "checked (/k.gpg)"]


def test_simplestreams_wrong_types_are_clear() -> None:
    with pytest.raises(BadRequest, match="simplestreams product file: Expected `object`"):
        simplestreams.parse_products(b'{"products": []}', "http://h/", "s")


def entry(**kw: object) -> CatalogueEntry:
    base: dict[str, object] = {"id": "deb", "name": "Debian 12", "source": "osinfo",
                               "family": "linux", "distro": "debian", "archs": ["x86_64"]}
    return CatalogueEntry(**{**base, **kw})  # type: ignore[arg-type]


def test_search_filters() -> None:
    dl = Download(arch="x86_64", url="http://h/d.qcow2", format="qcow2")
    e = entry(downloads=[dl])
    assert matches(e, ListRequest(search="debian 12", family="DEBIAN", arch="amd64",
                                  downloadable=True))
    assert not matches(e, ListRequest(arch="aarch64"))
    assert not matches(e, ListRequest(search="fedora"))
    assert not matches(entry(), ListRequest(downloadable=True))
    assert matches(entry(family="winnt", distro="win"), ListRequest(family="Windows"))
    container = Download(arch="x86_64", url="docker://q/x", format="containerdisk")
    assert not matches(entry(downloads=[container]), ListRequest(downloadable=True))


def test_choose_prefers_raw_then_cloud_init_and_says_what_exists() -> None:
    q = Download(arch="x86_64", url="http://h/a.qcow2", format="qcow2", cloud_init=True)
    v = Download(arch="x86_64", url="http://h/a.vmdk", format="vmdk", cloud_init=True)
    r = Download(arch="x86_64", url="http://h/a.raw", format="raw")
    a = Download(arch="aarch64", url="http://h/b.qcow2", format="qcow2")
    assert choose(entry(downloads=[v, q, r, a]), "x86_64") == r
    assert choose(entry(downloads=[v, q, a]), "x86_64") == q
    with pytest.raises(NotFound, match="no disk image for s390x .it has aarch64/qcow2"):
        choose(entry(downloads=[a]), "s390x")


def test_choose_gives_install_media_as_an_iso_when_there_is_no_disk_image() -> None:
    media = [Media(arch="aarch64", url="http://h/arm.iso"), Media(arch="x86_64", url=""),
             Media(arch="x86_64", url="http://h/x86.iso", variant="netinst")]
    assert choose(entry(media=media), "x86_64") == Download(
        arch="x86_64", url="http://h/x86.iso", format="iso", variant="netinst")
    r = Download(arch="x86_64", url="http://h/a.raw", format="raw")
    assert choose(entry(downloads=[r], media=media), "x86_64") == r


def test_windows_gets_its_profile_secure_boot_and_a_tpm_by_default() -> None:
    t = template(entry(family="winnt", distro="win"))
    assert (t.profile, t.firmware, t.secure_boot, t.tpm) == ("windows", "uefi", True, "2.0")
    t = template(entry(family="linux"))
    assert (t.profile, t.secure_boot, t.tpm) == ("generic", False, "")


def test_template_from_requirements() -> None:
    req = Requirements(minimum=Resources(cpus=2, ram=4 * GiB, storage=64 * GiB),
                       firmware="uefi", secure_boot=True, tpm="2.0")
    t = template(entry(requirements=req))
    assert (t.firmware, t.secure_boot, t.tpm, t.vcpus, t.memory, t.disk, t.machine) == (
        "uefi", True, "2.0", 2, 4 * GiB, 64 * GiB, "q35")
    plain = template(entry())
    assert (plain.firmware, plain.memory, plain.vcpus, plain.disk) == ("uefi", GiB, 1, 10 * GiB)
    local = LocalImage(id="deb", host="h1", path="/p/deb.raw", sha256=SHA, size=80 * GiB,
                       state="ready", source="osinfo", url="http://h/d")
    assert template(entry(requirements=req), local).disk == 80 * GiB
