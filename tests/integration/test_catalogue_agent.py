"""The catalogue agent over a real nats-server, pulling from a real loopback HTTP server."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.catalogue import signature
from shared import contracts, subjects
from shared.agent import Agent
from shared.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    InsufficientResources,
    InvalidName,
    NotFound,
    Unavailable,
)
from shared.messages import Empty
from shared.messages import catalogue as catalogue_api
from shared.messages.catalogue import (
    ImageRef,
    ListRequest,
    PullRequest,
    SourceAdd,
    SourceRef,
)
from shared.messages.jobs import JobRef
from shared.natsserver import NatsServer
from tests.support.agents import agent_in_process
from tests.support.gpg import Signer
from tests.support.httpserver import FileServer, make_sparse_raw
from tests.support.require import require
from tests.support.wait import until

pytestmark = pytest.mark.integration
MiB = 1 << 20


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
async def agent(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Agent]:
    extra = {"osinfo_dir": "", "probe_interval_s": 0, "retries": 2,
             "builtin_dir": str(tmp_path / "builtin")}
    async with agent_in_process("catalogue", nats_server.url, tmp_path / "state",
                                extra=extra) as a:
        yield a


def write_manifest(srv: FileServer, images: list[dict[str, Any]], name: str = "m.json") -> str:
    (srv.root / name).write_text(json.dumps({"images": images}))
    return srv.url(name)


def image(srv: FileServer, ident: str, path: Path, fmt: str = "raw", **kw: Any) -> dict[str, Any]:
    return {"id": ident, "name": ident.title(), "version": "1", "arch": "x86_64",
            "url": path.name, "sha256": sha(path), "size": path.stat().st_size,
            "format": fmt, "requirements": {"firmware": "efi", "memory": 512 * MiB,
                                            "disk": 2 << 30}, **kw}


async def pull(agent: Agent, ident: str, **kw: Any) -> Any:
    accepted = await agent.bus.call(agent.host, catalogue_api.PULL, PullRequest(id=ident, **kw))
    return await agent.jobs.wait(accepted.job_id)


async def test_manifest_source_list_info_pull_remove(agent: Agent, srv: FileServer,
                                                    tmp_path: Path) -> None:
    raw = make_sparse_raw(srv.root / "tiny.raw", 4 * MiB)
    src = make_sparse_raw(tmp_path / "src.raw", 8 * MiB)
    qcow = srv.root / "cloud.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(src), str(qcow)], check=True)
    url = write_manifest(srv, [image(srv, "tiny", raw),
                               image(srv, "cloud", qcow, fmt="qcow2", family="linux")])
    bus = agent.bus
    spec = await bus.call("h1", catalogue_api.SOURCE_ADD, SourceAdd(name="lab", url=url))
    assert spec.kind == "manifest"
    listed = await bus.call("h1", catalogue_api.LIST, ListRequest(source="lab"))
    assert [i.id for i in listed.images] == ["cloud", "tiny"]
    found = await bus.call("h1", catalogue_api.LIST, ListRequest(family="linux", source="lab"))
    assert [i.id for i in found.images] == ["cloud"]

    info = await bus.call("h1", catalogue_api.INFO, ImageRef(id="cloud"))
    assert (info.template.firmware, info.template.memory) == ("uefi", 512 * MiB)
    assert info.path == "" and info.local is None

    status = await pull(agent, "cloud")
    assert status.state == "succeeded", status.message
    again = await pull(agent, "cloud")  # already there: no second download
    assert again.state == "succeeded" and again.message == "already pulled"
    assert len(srv.gets("cloud.qcow2")) == 1
    info = await bus.call("h1", catalogue_api.INFO, ImageRef(id="cloud"))
    assert info.sha256 == sha(src) and Path(info.path).read_bytes() == src.read_bytes()
    assert info.local.source_format == "qcow2"
    kv = await bus.kv("images")
    assert json.loads((await kv.get("local.h1.cloud")).value or b"")["sha256"] == sha(src)
    listed = await bus.call("h1", catalogue_api.LIST, ListRequest(search="cloud"))
    assert listed.images[0].local == "ready"

    await bus.call("h1", catalogue_api.REMOVE, ImageRef(id="cloud"))
    assert not Path(info.path).exists()
    with pytest.raises(NotFound):
        await bus.call("h1", catalogue_api.REMOVE, ImageRef(id="cloud"))

    await bus.call("h1", catalogue_api.SOURCE_REMOVE, SourceRef(name="lab"))
    with pytest.raises(NotFound, match="no image 'tiny'"):
        await bus.call("h1", catalogue_api.INFO, ImageRef(id="tiny"))


async def test_simplestreams_tree(agent: Agent, srv: FileServer, tmp_path: Path) -> None:
    src = make_sparse_raw(tmp_path / "src.raw", 4 * MiB)
    disk = srv.root / "images/debian/bookworm/amd64/cloud/20240101/disk.qcow2"
    disk.parent.mkdir(parents=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(src), str(disk)], check=True)
    streams = srv.root / "streams/v1"
    streams.mkdir(parents=True)
    (streams / "index.json").write_text(json.dumps({"format": "index:1.0", "index": {
        "images": {"datatype": "image-downloads", "path": "streams/v1/images.json",
                   "products": ["debian:bookworm:amd64:cloud"]}}}))
    rel = str(disk.relative_to(srv.root))
    (streams / "images.json").write_text(json.dumps({"format": "products:1.0", "products": {
        "debian:bookworm:amd64:cloud": {
            "arch": "amd64", "os": "debian", "release": "bookworm", "variant": "cloud",
            "release_title": "12", "versions": {
                "20231201": {"items": {"root.tar.xz": {"ftype": "root.tar.xz",
                                                       "path": "x.tar.xz", "size": 1}}},
                "20240101": {"items": {
                    "lxd.tar.xz": {"ftype": "lxd.tar.xz", "path": "y", "size": 1},
                    "disk.qcow2": {"ftype": "disk-kvm.img", "path": rel, "sha256": sha(disk),
                                   "size": disk.stat().st_size}}}}},
        "debian:bookworm:amd64:container": {"arch": "amd64", "os": "debian", "versions": {
            "1": {"items": {"r": {"ftype": "squashfs", "path": "z", "size": 1}}}}}}}))
    bus = agent.bus
    await bus.call("h1", catalogue_api.SOURCE_ADD,
                   SourceAdd(name="ss", url=srv.url(""), kind="simplestreams"))
    listed = await bus.call("h1", catalogue_api.LIST, ListRequest(source="ss"))
    assert [i.id for i in listed.images] == ["debian-bookworm-amd64-cloud"]
    assert listed.images[0].archs == ["x86_64"]
    status = await pull(agent, "debian-bookworm-amd64-cloud")
    assert status.state == "succeeded", status.message
    assert status.result["sha256"] == sha(src)


# -- signed simplestreams (.sjson, gpgv) -------------------------------------------------------


def streams(srv: FileServer, *products: str) -> list[Path]:
    """An index and one product file listing ``products`` (each with a VM disk item)."""
    v1 = srv.root / "streams/v1"
    v1.mkdir(parents=True, exist_ok=True)
    (v1 / "index.json").write_text(json.dumps({"format": "index:1.0", "index": {
        "images": {"datatype": "image-downloads", "path": "streams/v1/images.json"}}}))
    (v1 / "images.json").write_text(json.dumps({"format": "products:1.0", "products": {
        f"lab:{name}:amd64:cloud": {
            "arch": "amd64", "os": "lab", "release": name, "variant": "cloud", "versions": {
                "20240101": {"items": {"disk": {"ftype": "disk-kvm.img", "size": 1,
                                                "path": f"{name}.qcow2", "sha256": "a" * 64}}}}}
        for name in products}}))
    return [v1 / "index.json", v1 / "images.json"]


@pytest.fixture
def signer(tmp_path: Path) -> Iterator[Signer]:
    with Signer(tmp_path / "gpg", "Lab images") as s:
        yield s


def signed_source(url: str, keyring: Path | str) -> SourceAdd:
    return SourceAdd(name="signed", url=url, kind="simplestreams", keyring=str(keyring))


async def test_signed_simplestreams_is_read_from_its_verified_sjson(
        agent: Agent, srv: FileServer, signer: Signer) -> None:
    for f in streams(srv, "bookworm"):
        signer.clearsign(f)
    streams(srv, "bookworm", "evil")  # the unsigned .json files say something else
    spec = await agent.bus.call("h1", catalogue_api.SOURCE_ADD,
                                signed_source(srv.url(""), signer.keyring))
    assert spec.keyring == str(signer.keyring)
    listed = await agent.bus.call("h1", catalogue_api.LIST, ListRequest(source="signed"))
    assert [i.id for i in listed.images] == ["lab-bookworm-amd64-cloud"]
    assert srv.gets("streams/v1/index.sjson") and srv.gets("streams/v1/images.sjson")
    assert not srv.gets("streams/v1/index.json") and not srv.gets("streams/v1/images.json")
    sources = await agent.bus.call("h1", catalogue_api.SOURCES, Empty())
    assert {s.name: s.keyring for s in sources.sources}["signed"] == str(signer.keyring)


async def test_a_tampered_signed_index_is_refused(agent: Agent, srv: FileServer,
                                                  signer: Signer) -> None:
    _, products = streams(srv, "bookworm")
    signer.clearsign(products.with_name("index.json"))
    signed = signer.clearsign(products)
    signed.write_text(signed.read_text().replace("a" * 64, "b" * 64))  # another image's sha
    with pytest.raises(Forbidden, match=r"the signature of http://.*/streams/v1/images.sjson "
                                        r"does not verify against keyring .*trusted.gpg "
                                        r"\(.*BAD signature.*\): the file was changed after it "
                                        r"was signed"):
        await agent.bus.call("h1", catalogue_api.SOURCE_ADD,
                             signed_source(srv.url(""), signer.keyring))
    sources = await agent.bus.call("h1", catalogue_api.SOURCES, Empty())
    assert "signed" not in [s.name for s in sources.sources]
    listed = await agent.bus.call("h1", catalogue_api.LIST, ListRequest(search="bookworm"))
    assert [i.id for i in listed.images if i.source != "builtin"] == []


async def test_an_index_signed_by_another_key_is_refused(agent: Agent, srv: FileServer,
                                                         signer: Signer, tmp_path: Path) -> None:
    with Signer(tmp_path / "other", "Someone else") as other:
        for f in streams(srv, "bookworm"):
            other.clearsign(f)
    with pytest.raises(Forbidden, match=r"index.sjson does not verify .*No public key\): "
                                        r"it is signed by a key that is not in the keyring"):
        await agent.bus.call("h1", catalogue_api.SOURCE_ADD,
                             signed_source(srv.url(""), signer.keyring))


async def test_a_server_that_does_not_sign_is_refused(agent: Agent, srv: FileServer,
                                                      signer: Signer) -> None:
    index, _ = streams(srv, "bookworm")
    index.with_suffix(".sjson").write_bytes(index.read_bytes())
    with pytest.raises(Forbidden, match=r"index.sjson is not clear-signed"):
        await agent.bus.call("h1", catalogue_api.SOURCE_ADD,
                             signed_source(srv.url(""), signer.keyring))
    with pytest.raises(BadRequest, match=r"index.sjson is a signed index: name the keyring"):
        await agent.bus.call("h1", catalogue_api.SOURCE_ADD, SourceAdd(
            name="s", url=srv.url("streams/v1/index.sjson"), kind="simplestreams"))


@pytest.mark.parametrize("keyring, match", [
    ("/nonexistent/lab.gpg", r"keyring /nonexistent/lab.gpg does not exist on this host; "
                             r"export the key the source signs with: gpg --export"),
    ("lab.gpg", "keyring 'lab.gpg' is not an absolute path"),
])
async def test_a_missing_keyring_is_a_clear_error(agent: Agent, srv: FileServer, keyring: str,
                                                  match: str) -> None:
    streams(srv, "bookworm")
    with pytest.raises(BadRequest, match=match):
        await agent.bus.call("h1", catalogue_api.SOURCE_ADD, signed_source(srv.url(""), keyring))
    assert srv.requests == []  # told before anything is downloaded


async def test_a_keyring_is_for_simplestreams_only(agent: Agent, srv: FileServer,
                                                   signer: Signer) -> None:
    with pytest.raises(BadRequest, match="a keyring checks simplestreams indexes only"):
        await agent.bus.call("h1", catalogue_api.SOURCE_ADD, SourceAdd(
            name="m", url=write_manifest(srv, []), keyring=str(signer.keyring)))


async def test_a_signature_broken_later_fails_the_refresh_and_says_why(
        agent: Agent, srv: FileServer, signer: Signer) -> None:
    files = streams(srv, "bookworm")
    for f in files:
        signer.clearsign(f)
    await agent.bus.call("h1", catalogue_api.SOURCE_ADD, signed_source(srv.url(""),
                                                                       signer.keyring))
    signed = files[1].with_suffix(".sjson")
    signed.write_text(signed.read_text().replace("bookworm", "trixie"))
    result = await agent.bus.call("h1", catalogue_api.REFRESH, Empty())
    [count] = [c for c in result.sources if c.name == "signed"]
    assert "BAD signature" in count.error and count.entries == 1  # the verified ones stay
    listed = await agent.bus.call("h1", catalogue_api.LIST, ListRequest(source="signed"))
    assert [i.id for i in listed.images] == ["lab-bookworm-amd64-cloud"]
    refreshed = [json.loads(data) async for _, _, data in
                 agent.bus.events("phy.evt.h1.catalogue.refreshed")]
    assert "BAD signature" in {s["name"]: s["error"]
                               for s in refreshed[-1]["sources"]}["signed"]


def test_without_gpgv_a_signed_source_is_unavailable(monkeypatch: pytest.MonkeyPatch,
                                                     signer: Signer, tmp_path: Path) -> None:
    monkeypatch.setattr(signature, "GPGV", "gpgv-not-installed")
    data = tmp_path / "x.json"
    data.write_text("{}")
    with pytest.raises(Unavailable, match=r"gpgv is not installed.*apt-get install gpgv"):
        signature.verify_clearsigned(signer.clearsign(data).read_bytes(), str(signer.keyring),
                                     "http://h/x.sjson", 30)


@pytest.mark.parametrize("images, match", [
    ([{"id": "a", "name": "A", "arch": "x86_64", "format": "raw"}], "missing required field `url`"),
    ([{"id": "a", "name": "A", "arch": "x86_64", "url": "a", "format": "raw", "size": "big"}],
     r"Expected `int`, got `str` - at `\$.images\[0\].size`"),
    ([{"id": "a/../../etc", "name": "A", "arch": "x86_64", "url": "a", "format": "raw"}],
     "no path separators"),
    ([{"id": "a", "name": "A", "arch": "x86_64", "url": "a", "format": "iso"}],
     r"Invalid enum value .iso. - at `\$.images\[0\].format`"),
    ([{"id": "a", "name": "A", "arch": "x86_64", "url": "a", "format": "raw",
       "sha256": "abc"}], "sha256 must be 64 hex digits"),
    ([{"id": "a", "name": "A", "arch": "x86_64", "url": "a", "format": "raw",
       "sha265": "0" * 64}], "unknown field `sha265`"),
])
async def test_bad_manifest_is_refused_with_a_clear_error(
        agent: Agent, srv: FileServer, images: list[dict[str, Any]], match: str) -> None:
    url = write_manifest(srv, images)
    with pytest.raises(BadRequest, match=match):
        await agent.bus.call("h1", catalogue_api.SOURCE_ADD, SourceAdd(name="bad", url=url))
    sources = await agent.bus.call("h1", catalogue_api.SOURCES, Empty())
    assert "bad" not in [s.name for s in sources.sources]


async def test_toml_manifest(agent: Agent, srv: FileServer) -> None:
    raw = make_sparse_raw(srv.root / "t.raw", MiB)
    (srv.root / "m.toml").write_text(
        f'[[images]]\nid = "t"\nname = "T"\narch = "amd64"\nurl = "t.raw"\nformat = "raw"\n'
        f'sha256 = "{sha(raw)}"\nsize = {raw.stat().st_size}\n'
        '[images.requirements]\nsecure_boot = true\ntpm = "2.0"\n')
    await agent.bus.call("h1", catalogue_api.SOURCE_ADD,
                         SourceAdd(name="toml", url=srv.url("m.toml")))
    info = await agent.bus.call("h1", catalogue_api.INFO, ImageRef(id="t"))
    assert (info.template.secure_boot, info.template.tpm) == (True, "2.0")


@pytest.mark.parametrize("url", ["file:///etc/", "ftp://example.org/m.json", "javascript:x"])
async def test_source_with_non_http_url_is_refused(agent: Agent, url: str) -> None:
    with pytest.raises(Forbidden, match="refusing"):
        await agent.bus.call("h1", catalogue_api.SOURCE_ADD, SourceAdd(name="x", url=url))


async def test_duplicate_and_configured_sources(agent: Agent, srv: FileServer) -> None:
    url = write_manifest(srv, [])
    await agent.bus.call("h1", catalogue_api.SOURCE_ADD, SourceAdd(name="a", url=url))
    with pytest.raises(Conflict):
        await agent.bus.call("h1", catalogue_api.SOURCE_ADD, SourceAdd(name="a", url=url))
    with pytest.raises(Forbidden, match="configuration"):
        await agent.bus.call("h1", catalogue_api.SOURCE_REMOVE, SourceRef(name="builtin"))
    with pytest.raises(InvalidName):
        await agent.bus.call("h1", catalogue_api.SOURCE_ADD, SourceAdd(name="a/b", url=url))


@pytest.mark.parametrize("ident", ["../etc/passwd", "a/b", "..", ".hidden", "a\\b", ""])
async def test_ids_with_path_separators_are_refused(agent: Agent, ident: str) -> None:
    for verb, req in (("info", ImageRef(id=ident)), ("remove", ImageRef(id=ident)),
                      ("pull", PullRequest(id=ident)), ("source_remove", SourceRef(name=ident))):
        with pytest.raises(InvalidName, match="no path separators"):
            await agent.bus.call("h1", contracts.spec("catalogue", verb), req)


async def test_unverified_pull_refused_then_allowed(agent: Agent, srv: FileServer) -> None:
    raw = make_sparse_raw(srv.root / "u.raw", MiB)
    img = image(srv, "u", raw)
    del img["sha256"]
    await agent.bus.call("h1", catalogue_api.SOURCE_ADD,
                         SourceAdd(name="m", url=write_manifest(srv, [img])))
    with pytest.raises(Forbidden, match="--allow-unverified"):
        await agent.bus.call("h1", catalogue_api.PULL, PullRequest(id="u"))
    status = await pull(agent, "u", allow_unverified=True)
    assert status.state == "succeeded" and status.result["state"] == "unverified"


async def test_image_bigger_than_the_pool_is_refused_at_once(agent: Agent,
                                                             srv: FileServer) -> None:
    raw = make_sparse_raw(srv.root / "huge.raw", MiB)
    img = {**image(srv, "huge", raw), "size": 1 << 55}
    await agent.bus.call("h1", catalogue_api.SOURCE_ADD,
                         SourceAdd(name="m", url=write_manifest(srv, [img])))
    with pytest.raises(InsufficientResources, match="bytes free"):
        await agent.bus.call("h1", catalogue_api.PULL, PullRequest(id="huge"))
    assert srv.gets("huge.raw") == []
    assert agent.registry.get_sample_value("phyllome_catalogue_pulls_total",
                                           {"outcome": "refused"}) == 1


async def test_tampered_pull_fails_and_leaves_no_file(agent: Agent, srv: FileServer) -> None:
    raw = make_sparse_raw(srv.root / "t.raw", MiB)
    img = image(srv, "t", raw)
    await agent.bus.call("h1", catalogue_api.SOURCE_ADD,
                         SourceAdd(name="m", url=write_manifest(srv, [img])))
    raw.write_bytes(b"\x01" + raw.read_bytes()[1:])  # the mirror now serves other bytes
    status = await pull(agent, "t")
    assert status.state == "failed" and status.error_kind == "forbidden"
    assert "tampered" in status.message
    pool = Path(agent.cfg.state_dir) / "images/pool"
    assert [p for p in pool.rglob("*") if p.is_file()] == []


async def test_two_pulls_share_one_download_and_cancel(agent: Agent, srv: FileServer) -> None:
    raw = make_sparse_raw(srv.root / "slow.raw", 32 * MiB)
    await agent.bus.call("h1", catalogue_api.SOURCE_ADD,
                         SourceAdd(name="m", url=write_manifest(srv, [image(srv, "slow", raw)])))
    srv.rate = 4 * MiB
    first = await agent.bus.call("h1", catalogue_api.PULL, PullRequest(id="slow"))
    second = await agent.bus.call("h1", catalogue_api.PULL, PullRequest(id="slow"))
    assert first.job_id == second.job_id
    info = await agent.bus.call("h1", catalogue_api.INFO, ImageRef(id="slow"))
    assert (info.path, info.pulling) == ("", first.job_id)  # a vm create waits on it
    job = agent.jobs.get(first.job_id)
    await until("bytes to flow", lambda: job.done > 0, timeout=30)
    status = await agent.bus.call("h1", catalogue_api.CANCEL, JobRef(job_id=first.job_id))
    assert status.state == "cancelled"
    assert len(srv.gets("slow.raw")) == 1
    pool = Path(agent.cfg.state_dir) / "images/pool"
    assert [p for p in pool.rglob("*") if p.is_file()] == []


async def test_link_rot_probe_publishes_an_event(agent: Agent, srv: FileServer) -> None:
    raw = make_sparse_raw(srv.root / "l.raw", MiB)
    await agent.bus.call("h1", catalogue_api.SOURCE_ADD,
                         SourceAdd(name="m", url=write_manifest(srv, [image(srv, "l", raw)])))
    handlers = agent.handlers
    await handlers.probe_all()
    assert handlers.links == {srv.url("l.raw"): True}
    raw.unlink()
    await handlers.probe_all()
    assert handlers.links == {srv.url("l.raw"): False}
    events = [json.loads(data) async for subject, _, data in
              agent.bus.events("phy.evt.h1.catalogue.link.>")]
    assert events[-1]["ok"] is False and "404" in events[-1]["reason"]
    text = agent.registry.get_sample_value("phyllome_catalogue_links_broken", {"source": "m"})
    assert text == 1.0


async def test_pull_of_builtin_tiny_offline(nats_server: NatsServer, tmp_path: Path) -> None:
    built = tmp_path / "builtin"
    (built / "phyllome-tiny").mkdir(parents=True)
    disk = make_sparse_raw(built / "phyllome-tiny/disk.raw", 8 * MiB)
    (built / "phyllome-tiny/manifest.json").write_text(json.dumps({
        "name": "phyllome-tiny", "files": {
            "disk.raw": {"sha256": sha(disk), "size": disk.stat().st_size}}}))
    extra = {"osinfo_dir": "", "probe_interval_s": 0, "builtin_dir": str(built)}
    async with agent_in_process("catalogue", nats_server.url, tmp_path / "state",
                                extra=extra) as agent:
        [auto] = [j for j in (await agent.jobs.jobs(Empty())).jobs if j.kind == "pull"]
        status = await agent.jobs.wait(auto.job_id)  # pulled at start, no one asked
        assert status.state == "succeeded", status.message
        status = await pull(agent, "phyllome-tiny")
        assert status.state == "succeeded", status.message
        info = await agent.bus.call("h1", catalogue_api.INFO, ImageRef(id="phyllome-tiny"))
        assert info.sha256 == sha(disk) and info.local.state == "ready"
        assert (info.template.firmware, info.template.secure_boot, info.template.tpm) == (
            "uefi", True, "2.0")


def _tiny_build(folder: Path, size: int, arch: str | None) -> Path:
    folder.mkdir(parents=True)
    disk = make_sparse_raw(folder / "disk.raw", size)
    manifest: dict[str, Any] = {"name": "phyllome-tiny", "files": {
        "disk.raw": {"sha256": sha(disk), "size": disk.stat().st_size}}}
    if arch:
        manifest["arch"] = arch
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return disk


async def test_builtin_tiny_has_an_image_per_arch_pulled_side_by_side(
        nats_server: NatsServer, tmp_path: Path) -> None:
    built = tmp_path / "builtin"
    x86 = _tiny_build(built / "phyllome-tiny", 8 * MiB, None)
    arm = _tiny_build(built / "phyllome-tiny" / "aarch64", 4 * MiB, "aarch64")
    extra = {"osinfo_dir": "", "probe_interval_s": 0, "builtin_dir": str(built),
             "arch": "x86_64"}
    async with agent_in_process("catalogue", nats_server.url, tmp_path / "state",
                                extra=extra) as agent:
        bus = agent.bus
        [auto] = [j for j in (await agent.jobs.jobs(Empty())).jobs if j.kind == "pull"]
        assert (await agent.jobs.wait(auto.job_id)).state == "succeeded"  # the host's arch
        arm_ref = ImageRef(id="phyllome-tiny", arch="aarch64")
        assert (await bus.call("h1", catalogue_api.INFO, arm_ref)).local is None
        status = await pull(agent, "phyllome-tiny", arch="arm64")  # Debian's spelling too
        assert status.state == "succeeded", status.message

        mine = await bus.call("h1", catalogue_api.INFO, ImageRef(id="phyllome-tiny"))
        theirs = await bus.call("h1", catalogue_api.INFO, arm_ref)
        assert (mine.sha256, mine.local.arch, mine.arch) == (sha(x86), "x86_64", "x86_64")
        assert (theirs.sha256, theirs.local.arch, theirs.arch) == (sha(arm), "aarch64",
                                                                    "aarch64")
        assert theirs.local.id == "phyllome-tiny_aarch64" and mine.path != theirs.path
        assert mine.entry.archs == ["aarch64", "x86_64"]
        listed = await bus.call("h1", catalogue_api.LIST, ListRequest(arch="aarch64"))
        assert [i.id for i in listed.images] == ["phyllome-tiny"]
        with pytest.raises(NotFound, match="no disk image for riscv64"):
            await bus.call("h1", catalogue_api.PULL, PullRequest(id="phyllome-tiny",
                                                                 arch="riscv64"))

        for bad in ("../../etc", "aarch64/x", "A" * 40):  # never a path out of the pool
            with pytest.raises(InvalidName, match="not an architecture name"):
                await bus.call("h1", catalogue_api.REMOVE, ImageRef(id="phyllome-tiny",
                                                                    arch=bad))
        await bus.call("h1", catalogue_api.REMOVE, arm_ref)
        assert not Path(theirs.path).exists() and Path(mine.path).exists()
        with pytest.raises(NotFound):
            await bus.call("h1", catalogue_api.REMOVE, arm_ref)


async def test_real_osinfo_catalogue_over_the_bus(nats_server: NatsServer,
                                                  tmp_path: Path) -> None:
    extra = {"probe_interval_s": 0, "builtin_dir": str(tmp_path / "b")}
    async with agent_in_process("catalogue", nats_server.url, tmp_path / "state",
                                extra=extra) as agent:
        listed = await agent.bus.call("h1", catalogue_api.LIST,
                                      ListRequest(downloadable=True, source="osinfo"))
        assert len(listed.images) >= 30
        assert {"fedora37", "debian11", "ubuntu22.04"} <= {i.id for i in listed.images}
        win = await agent.bus.call("h1", catalogue_api.INFO, ImageRef(id="win11"))
        assert (win.template.firmware, win.template.secure_boot, win.template.tpm) == (
            "uefi", True, "2.0")
        assert win.template.memory == 4 << 30
        with pytest.raises(Forbidden, match="no published sha256"):
            await agent.bus.call("h1", catalogue_api.PULL, PullRequest(id="fedora37"))
        with pytest.raises(NotFound, match="no disk image for x86_64.*install media"):
            await agent.bus.call("h1", catalogue_api.PULL, PullRequest(id="win11"))


async def test_every_host_sees_the_same_catalogue(nats_server: NatsServer, srv: FileServer,
                                                  tmp_path: Path) -> None:
    raw = make_sparse_raw(srv.root / "s.raw", MiB)
    extra = {"osinfo_dir": "", "probe_interval_s": 0}
    async with agent_in_process("catalogue", nats_server.url, tmp_path / "h1", host="h1",
                                extra={**extra, "builtin_dir": str(tmp_path / "b1")}) as h1, \
            agent_in_process("catalogue", nats_server.url, tmp_path / "h2", host="h2",
                             extra={**extra, "builtin_dir": str(tmp_path / "b2")}) as h2:
        await h1.bus.call("h1", catalogue_api.SOURCE_ADD,
                          SourceAdd(name="m", url=write_manifest(srv, [image(srv, "s", raw)])))
        await until("h2's KV watcher to bring s", lambda: "s" in h2.handlers.entries,
                    timeout=10, interval=0.02)
        listed = await h2.bus.call("h2", catalogue_api.LIST, ListRequest(source="m"))
        assert [i.id for i in listed.images] == ["s"]
        status = await pull(h2, "s")
        assert status.state == "succeeded" and status.result["host"] == "h2"
        await h2.bus.call("h2", catalogue_api.REFRESH, Empty())  # h2 also reads source m
        await h1.bus.call("h1", catalogue_api.SOURCE_REMOVE, SourceRef(name="m"))
        await until("s to leave h2's catalogue", lambda: "s" not in h2.handlers.entries,
                    timeout=10, interval=0.02)


async def test_pull_interrupted_resumes_where_it_stopped(nats_server: NatsServer,
                                                         srv: FileServer, tmp_path: Path) -> None:
    raw = make_sparse_raw(srv.root / "r.raw", 8 * MiB)
    extra = {"osinfo_dir": "", "probe_interval_s": 0, "retries": 0,
             "builtin_dir": str(tmp_path / "b"),
             "mirrors": {"https://images.example.org/": srv.url("")}}
    async with agent_in_process("catalogue", nats_server.url, tmp_path / "state",
                                extra=extra) as agent:
        img = {**image(srv, "r", raw), "url": "https://images.example.org/r.raw"}
        await agent.bus.call("h1", catalogue_api.SOURCE_ADD,
                             SourceAdd(name="m", url=write_manifest(srv, [img])))
        srv.drop_after = 5 * MiB
        status = await pull(agent, "r")
        assert status.state == "failed" and status.error_kind == "unavailable"
        assert "pull again to resume" in status.message
        status = await pull(agent, "r")
        assert status.state == "succeeded", status.message
        assert srv.gets("r.raw") == ["", f"bytes={5 * MiB}-"]
        assert status.result["sha256"] == sha(raw)
        assert status.result["url"] == srv.url("r.raw")  # through the mirror
        value = agent.registry.get_sample_value
        assert value("phyllome_catalogue_pulls_total", {"outcome": "succeeded"}) == 1
        assert value("phyllome_catalogue_pulls_total", {"outcome": "failed"}) == 1
        assert value("phyllome_catalogue_downloaded_bytes_total") == 8 * MiB
        assert value("phyllome_catalogue_images", {"source": "m", "state": "pulled"}) == 1
        assert value("phyllome_catalogue_source_up", {"source": "m"}) == 1


async def test_metrics_pass_promtool(agent: Agent, tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    promtool = shutil.which("promtool")
    require(promtool is not None, "promtool (Debian package prometheus)")
    assert promtool is not None
    proc = subprocess.run([promtool, "check", "metrics"], input=generate_latest(agent.registry),
                          capture_output=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def test_restart_reads_the_index_back_and_rewrites_nothing(nats_server: NatsServer,
                                                                 tmp_path: Path) -> None:
    extra = {"probe_interval_s": 0, "builtin_dir": str(tmp_path / "b")}
    async with agent_in_process("catalogue", nats_server.url, tmp_path / "state",
                                extra=extra) as agent:
        kv = await agent.bus.kv("images")
        first = (await kv.status()).values
        assert first >= 500  # osinfo-db entries
    async with agent_in_process("catalogue", nats_server.url, tmp_path / "state",
                                extra=extra) as agent:
        kv = await agent.bus.kv("images")
        assert (await kv.status()).values == first
        assert len(agent.handlers.entries) == first


async def test_an_image_id_with_dots_is_pulled_listed_and_removed_with_its_events(
        agent: Agent, srv: FileServer) -> None:
    """Ids like ``ubuntu-24.04`` are valid image ids; a '.' is a subject separator in NATS,
    so the events' subjects carry it escaped (subjects.id_token) and the KV keys stay whole."""
    raw = make_sparse_raw(srv.root / "d.raw", 4 * MiB)
    url = write_manifest(srv, [image(srv, "ubuntu-24.04", raw)])
    bus = agent.bus
    await bus.call("h1", catalogue_api.SOURCE_ADD, SourceAdd(name="lab", url=url))
    seen: list[str] = []

    async def got(msg: Any) -> None:
        seen.append(msg.subject)
    sub = await bus.nc.subscribe("phy.evt.h1.catalogue.image.>", cb=got)
    try:
        status = await pull(agent, "ubuntu-24.04")
        assert status.state == "succeeded", status.message
        listed = await bus.call("h1", catalogue_api.LIST, ListRequest(search="ubuntu"))
        assert [(i.id, i.local) for i in listed.images] == [("ubuntu-24.04", "ready")]
        await bus.call("h1", catalogue_api.REMOVE, ImageRef(id="ubuntu-24.04"))
        await until("image events", lambda: len(seen) >= 2, timeout=10)
    finally:
        await sub.unsubscribe()
    pulled = subjects.event("h1", "catalogue", "image.pulled", "ubuntu-24.04")
    assert seen == [pulled, pulled.replace("pulled", "removed")]
    assert pulled.endswith(".ubuntu-24%2E04")
    assert subjects.id_of(pulled.rsplit(".", 1)[1]) == "ubuntu-24.04"
