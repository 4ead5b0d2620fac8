"""Console passwords never appear in events, logs, metrics, KV or replies; libvirt keeps them."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest

from services.vm import domain_xml
from shared import subjects
from shared.bus import Bus
from shared.messages import vm as vm_api
from shared.messages.vm import VmCreate, VmInfo, VmListRequest, VmRef, VmSpec, VmUpdate
from shared.natsserver import NatsServer
from tests.support.agents import agent_in_process

SECRET = "s3cr3tpw"


def vnc_password(xml: str) -> str | None:
    """The ``passwd`` of the domain's VNC console (libvirt shows it with XML_SECURE only)."""
    graphics = ET.fromstring(xml).find("devices/graphics[@type='vnc']")
    return None if graphics is None else graphics.get("passwd")


async def test_vnc_password_stays_in_libvirt_only(nats_server: NatsServer, tmp_path: Path,
                                                  libvirt_test_uri: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with agent_in_process("vm", nats_server.url, tmp_path / "st", "h1",
                                libvirt_uri=libvirt_test_uri, accelerator="tcg") as agent:
        bus = await Bus.connect(nats_server.url, name="t", host="h1", give_up_after=5)
        spec = VmSpec(name="locked", firmware="bios", display="vnc", password=SECRET)
        created: VmInfo = await bus.call("h1", vm_api.CREATE, VmCreate(spec=spec))
        await bus.call("h1", vm_api.UPDATE, VmUpdate(vm="locked", memory_mib=512))
        replies = [created, await bus.call("h1", vm_api.INFO, VmRef(vm="locked")),
                   await bus.call("h1", vm_api.LIST, VmListRequest())]
        await bus.call("h1", vm_api.START, VmRef(vm="locked"))
        metrics = httpx.get(agent.metrics_url).text
        events = [d async for _s, _t, d in bus.events(subjects.EVENTS_ALL)]
        kv = {key: value for key, _rev, value in await bus.kv_entries(subjects.KV_VMS)}
        # libvirt still has it, in the running domain and in its stored definition
        dom = await agent.handlers.hv.domain("locked")
        kept = [vnc_password(await agent.handlers.hv.xml(dom.uuid, inactive=inactive))
                for inactive in (False, True)]
        await bus.close()
    assert events and kv
    for where, text in [("reply", repr(replies)), ("metrics", metrics),
                        ("events", b"".join(events).decode()),
                        ("KV vms", b"".join(kv.values()).decode()),
                        ("logs", caplog.text)]:
        assert SECRET not in text, f"the VNC password leaked into {where}"
    assert kept == [SECRET, SECRET], "libvirt lost the VNC password"


async def test_update_keeps_the_password_in_the_domain(nats_server: NatsServer, tmp_path: Path,
                                                       libvirt_test_uri: str) -> None:
    async with agent_in_process("vm", nats_server.url, tmp_path / "st", "h1",
                                libvirt_uri=libvirt_test_uri, accelerator="tcg") as agent:
        bus = await Bus.connect(nats_server.url, name="t", host="h1", give_up_after=5)
        spec = VmSpec(name="kept", firmware="bios", display="vnc", password=SECRET)
        await bus.call("h1", vm_api.CREATE, VmCreate(spec=spec))
        await bus.call("h1", vm_api.UPDATE, VmUpdate(vm="kept", vcpus=1))
        dom = await agent.handlers.hv.domain("kept")
        kept = domain_xml.spec_of(await agent.handlers.hv.xml(dom.uuid))
        await bus.close()
    assert kept is not None and kept.password == SECRET and kept.vcpus == 1
