"""uvicorn's WebSocket protocol (websockets' sans-I/O one) with one ASGI extension for the
consoles, so a key press goes from the browser's socket onto the NATS socket in the one
callback that read it.

uvicorn puts every message it parses in a queue, stops reading the socket, and wakes the
app's task, whose ``receive`` takes the message and reads the socket again: a turn of the
event loop and two changes of what the loop watches for every key. Here a WebSocket scope
carries ``scope["extensions"][TAKE]``, a dict; an app that sets its ``"take"`` to a
function gets each binary message in the protocol's ``data_received``, as it is parsed,
when nothing waits in the queue before it. The function returns True when it passed the
bytes on; False (no credit now, say) and the message goes the usual way, through the queue
(``receive``), which then holds back what follows, in order. Text messages always go
through the queue (uvicorn checks their UTF-8).

Where uvicorn's insides are not as this was written against (another version), the scope
has no such extension and the app uses ``receive`` alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

log = logging.getLogger("phyllome.web")

TAKE = "phyllome.take"
_INSIDES = ("queue", "frames", "curr_msg_data_type", "close_sent")


class DirectWebSockets(WebSocketsSansIOProtocol):
    """``uvicorn.Config(ws=DirectWebSockets)``: see the module's text."""

    _slot: dict[str, Callable[[bytes], bool]] | None = None
    taken = 0  # binary messages the app took in the callback, of every connection
    declined = 0  # ... that it declined (they went through the queue)

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope: Any = getattr(self, "scope", None)  # none when the handshake was refused
        if isinstance(scope, dict) and isinstance(scope.get("extensions"), dict) and all(
                hasattr(self, name) for name in _INSIDES):
            self._slot = scope["extensions"][TAKE] = {}

    def send_receive_event_to_app(self) -> None:
        slot = self._slot
        take = slot.get("take") if slot else None
        if (take is not None and self.curr_msg_data_type == "bytes" and len(self.frames) == 1
                and not self.close_sent and self.queue.empty()):
            try:
                taken = take(self.frames[0])
            except Exception:  # never into uvicorn's data_received: the queue has it then
                log.exception("a console's message was not taken directly")
                taken = False
            if taken:
                DirectWebSockets.taken += 1
                self.frames = []
                return
            DirectWebSockets.declined += 1
        super().send_receive_event_to_app()
