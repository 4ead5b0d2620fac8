"""Start the web gateway: `python -m services.web` (configured by PHYLLOME_* variables)."""

from services.web.service import run

run()
