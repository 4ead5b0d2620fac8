"""Messages and endpoints of the vm agent (filled in by the vm issue)."""

from __future__ import annotations

from shared.messages import EndpointSpec

ENDPOINTS: tuple[EndpointSpec, ...] = ()
