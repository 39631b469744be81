"""SizeLimits: refuses an HTTP body past its limit with 413, a WebSocket message past its with 1009.

Both are refused before anything parses them: a body by its Content-Length, or by counting it as it
arrives (chunked requests), a message as the server hands it over. The limit holds for the app under
any ASGI server; `capsule serve` also gives uvicorn the message limit, so that it stops reading an
oversized frame.
"""

from __future__ import annotations

import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ErrorCode

logger = logging.getLogger(__name__)

PAYLOAD_TOO_LARGE = 413
MESSAGE_TOO_BIG = 1009


def _text_size(text: str, limit: int) -> int:
    """The UTF-8 size of text where it could be past limit; its length in characters where it cannot."""
    if len(text) * 4 <= limit:  # a character takes 1 to 4 bytes
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def _message_size(message: Message, limit: int) -> int:
    text = message.get("text")
    if text is not None:
        return _text_size(text, limit)
    return len(message.get("bytes") or b"")


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class SizeLimits:
    """ASGI middleware: the body and message limits of every request the app serves."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_message_bytes: int) -> None:
        self._app = app
        self._max_body_bytes, self._max_message_bytes = max_body_bytes, max_message_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self._app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self._max_body_bytes
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            if declared <= 2 * limit:
                await _discard(receive, up_to=declared)
            reason = f"the request body has {declared} bytes; at most {limit} are allowed"
            await self._refuse_body(send, reason)
            return
        # Read here, up to the limit, so that a chunked body past it is refused before the app sees it.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self._app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                if message.get("more_body", False):
                    await _discard(receive, up_to=limit)
                await self._refuse_body(send, f"the request body is over {limit} bytes, the most allowed")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self._app(scope, _replay([body], receive), send)

    @staticmethod
    async def _refuse_body(send: Send, reason: str) -> None:
        logger.info("request refused: %s", reason)
        body = json.dumps(
            {"errors": [{"message": reason, "extensions": {"code": ErrorCode.INVALID_REQUEST.value}}]}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": PAYLOAD_TOO_LARGE,
                # The rest of the body is never read: the connection cannot carry another request.
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self._max_message_bytes
        closed = False

        async def checked_receive() -> Message:
            nonlocal closed
            message = await receive()
            if message["type"] == "websocket.receive" and (size := _message_size(message, limit)) > limit:
                reason = f"a message has {size} bytes; at most {limit} are allowed"
                logger.info("WebSocket closed: %s", reason)
                closed = True
                await send({"type": "websocket.close", "code": MESSAGE_TOO_BIG, "reason": reason})
                # The app sees the connection end, as it would had the server refused the frame itself.
                return {"type": "websocket.disconnect", "code": MESSAGE_TOO_BIG, "reason": reason}
            return message

        async def checked_send(message: Message) -> None:
            if not closed:  # past our close, what the app still sends goes nowhere
                await send(message)

        await self._app(scope, checked_receive, checked_send)


async def _discard(receive: Receive, *, up_to: int) -> None:
    """Reads and drops the rest of a refused body, up_to bytes of it.

    A connection closed while its client still sends is reset, and a reset client loses the answer
    it had not read yet: a body a little past the limit is taken whole, so that its client reads
    the 413. Past up_to the connection closes, and such a client may see only the reset.
    """
    size = 0
    while size <= up_to:
        message = await receive()
        size += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive that hands out messages first, then whatever the server sends next."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed
