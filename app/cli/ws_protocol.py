"""uvicorn's WebSocket protocol (websockets, sans-I/O), less what it keeps of the handshake."""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


class LeanWebSocketsProtocol(WebSocketsSansIOProtocol):
    """Once a connection is accepted, lets go of the handshake's request and response: uvicorn
    keeps both for the connection's life (and websockets' parser the request), some 3 KiB of every
    open WebSocket that nothing reads again. What the app sees of the request is its ASGI scope,
    which stays."""

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept" and self.handshake_complete and self.request is not None:
            self.request.headers.clear()  # websockets' parser holds the request itself till the end
            self.request = self.response = None  # type: ignore[assignment]
