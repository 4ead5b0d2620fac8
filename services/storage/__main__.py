"""Start the storage agent: `python -m services.storage` (configured by PHYLLOME_* variables)."""

from services.storage import service
from shared.runtime import run_agent

run_agent("storage", service.setup, service.ENDPOINTS)
