"""Messages and endpoints of the catalogue agent (filled in by the catalogue issue)."""

from __future__ import annotations

from shared.messages import EndpointSpec

ENDPOINTS: tuple[EndpointSpec, ...] = ()
