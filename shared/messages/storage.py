"""Messages and endpoints of the storage agent (filled in by the storage issue)."""

from __future__ import annotations

from shared.messages import EndpointSpec

ENDPOINTS: tuple[EndpointSpec, ...] = ()
