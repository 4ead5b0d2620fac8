"""Start the hardware agent: `python -m services.hardware` (configured by PHYLLOME_* variables)."""

from services.hardware import service
from shared.runtime import run_agent

run_agent("hardware", service.setup, service.ENDPOINTS)
