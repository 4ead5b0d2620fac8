"""Start the catalogue agent: `python -m services.catalogue` (configured by PHYLLOME_*)."""

from services.catalogue import service
from shared.runtime import run_agent

run_agent("catalogue", service.setup, service.ENDPOINTS)
