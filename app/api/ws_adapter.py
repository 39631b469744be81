"""The WebSocket adapter strawberry's protocol handlers read messages through, keeping less of each.

An open subscription mostly sits idle, and strawberry's reading loop holds the last message it read
(the raw text and the decoded object) until the next one comes: for a viewer, the subscribe message
with its whole document, some 3 KiB of every open WebSocket. Here the raw text is never held past
decoding, a message is emptied once its handler is done with it (what the operation needs, it took:
the document, the variables), and the documents many connections send alike are kept once.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from json import JSONDecodeError

from starlette.websockets import WebSocketDisconnect, WebSocketState
from strawberry.asgi import ASGIWebSocketAdapter
from strawberry.http.exceptions import NonJsonMessageReceived, NonTextMessageReceived

# Documents kept once for every connection that sends them: up to this many, of up to this length
# (at most 4 MiB in all; when full, it starts again).
SHARED_DOCUMENTS = 1024
SHARED_DOCUMENT_CHARS = 4096
_documents: dict[str, str] = {}


def shared_document(query: str) -> str:
    """The one copy of a document that connections share (the query itself if it is long)."""
    if len(query) > SHARED_DOCUMENT_CHARS:
        return query
    shared = _documents.get(query)
    if shared is None:
        if len(_documents) >= SHARED_DOCUMENTS:
            _documents.clear()
        shared = _documents[query] = query
    return shared


def _share_document(message: object) -> None:
    payload = message.get("payload") if isinstance(message, dict) else None
    if isinstance(payload, dict) and isinstance(payload.get("query"), str):
        payload["query"] = shared_document(payload["query"])


class LeanWebSocketAdapter(ASGIWebSocketAdapter):
    """strawberry's ASGI adapter, whose messages hold nothing once handled (see the module)."""

    async def iter_json(self, *, ignore_parsing_errors: bool = False) -> AsyncGenerator[object, None]:
        try:
            while self.ws.application_state != WebSocketState.DISCONNECTED:
                try:
                    message = self.view.decode_json(await self.ws.receive_text())
                except JSONDecodeError as e:
                    if not ignore_parsing_errors:
                        raise NonJsonMessageReceived from e
                    continue
                _share_document(message)
                yield message
                # Its handler is done with it: strawberry's loop keeps it until the next message.
                if isinstance(message, dict):
                    message.clear()
                del message
        except KeyError as e:
            raise NonTextMessageReceived from e
        except WebSocketDisconnect:
            pass
