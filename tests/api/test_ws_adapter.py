"""The documents that many WebSocket connections send alike are kept once."""

from __future__ import annotations

from app.api import ws_adapter
from app.api.ws_adapter import SHARED_DOCUMENT_CHARS, SHARED_DOCUMENTS, shared_document


def test_one_document_sent_by_many_is_kept_once() -> None:
    first = "".join(["subscription { processOutput", "(capsuleId: 1) { seq } }"])
    again = "".join(["subscription { processOutput", "(capsuleId: 1) { seq } }"])
    assert first == again and first is not again
    assert shared_document(first) is shared_document(again) is first


def test_long_documents_are_not_kept_and_the_table_stays_bounded() -> None:
    long = "{ " + "a " * SHARED_DOCUMENT_CHARS + "}"
    assert shared_document(long) is long and long not in ws_adapter._documents
    for n in range(SHARED_DOCUMENTS + 10):
        assert shared_document(f"{{ n{n} }}") == f"{{ n{n} }}"
    assert len(ws_adapter._documents) <= SHARED_DOCUMENTS
