"""Start the vm agent: `python -m services.vm` (configured by PHYLLOME_* variables)."""

from services.vm import service
from shared.runtime import run_agent

run_agent("vm", service.setup, service.ENDPOINTS)
