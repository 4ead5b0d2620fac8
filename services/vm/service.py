"""Wiring of the vm agent: settings, the libvirt backend, the accelerator, the handlers."""

from __future__ import annotations

from pathlib import Path

import msgspec

from services.vm import accel
from services.vm.config import Settings
from services.vm.handlers import Handlers
from services.vm.libvirt_backend import LibvirtHypervisor
from services.vm.metrics import VmMetrics
from shared.agent import Agent
from shared.messages.vm import ENDPOINTS

__all__ = ["ENDPOINTS", "setup"]


async def setup(agent: Agent) -> Handlers:
    settings = Settings.from_config(agent.cfg)
    decision = await accel.decide(agent.cfg.accelerator, Path(settings.tiny_dir),
                                  Path(settings.probe_dir),
                                  deadline_s=settings.kvm_probe_deadline_s)
    agent.details = msgspec.structs.replace(agent.details, accelerator=decision)
    hypervisor = LibvirtHypervisor(agent.cfg.libvirt_uri, state_dir=settings.libvirt_dir,
                                   kvm_device=settings.kvm_device)
    await hypervisor.connect()
    metrics = VmMetrics(agent.registry, hypervisor, lambda: handlers.states.started_at())
    handlers = Handlers(agent, hypervisor, settings, decision, metrics)
    await handlers.begin()

    async def measure() -> None:  # what placement counts as promised on this host
        agent.details = msgspec.structs.replace(
            agent.details, vm_memory_mib=await hypervisor.defined_memory_mib())
    agent.on_beat(measure)
    return handlers
