"""Messages and endpoints of the hardware agent (filled in by the hardware issue)."""

from __future__ import annotations

from shared.messages import EndpointSpec

ENDPOINTS: tuple[EndpointSpec, ...] = ()
