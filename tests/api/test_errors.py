"""ErrorCodes: coded errors pass, request errors are INVALID_REQUEST, bugs are masked as INTERNAL."""

from __future__ import annotations

import logging
import re

import pytest
import strawberry

from app.api.errors import INTERNAL_MESSAGE, ErrorCodes
from app.errors import Conflict


@strawberry.type
class Query:
    @strawberry.field
    def bug(self) -> str:
        raise RuntimeError("secret table name: api_key")

    @strawberry.field
    def conflict(self) -> str:
        raise Conflict("tag web is in use in capsule c1")

    @strawberry.field
    def fine(self, n: int) -> int:
        return n


schema = strawberry.Schema(query=Query, extensions=[ErrorCodes])


async def test_a_bug_is_masked_as_internal_with_the_error_id_of_its_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="app.api.errors"):
        result = await schema.execute("{ bug }")
    assert result.errors is not None
    [error] = result.errors
    assert error.message == INTERNAL_MESSAGE and "secret" not in error.message
    assert error.extensions is not None and error.extensions.keys() == {"code", "errorId"}
    assert error.extensions["code"] == "INTERNAL" and re.fullmatch(
        r"[0-9a-f]{16}", error.extensions["errorId"]
    )
    [record] = [r for r in caplog.records if error.extensions["errorId"] in r.getMessage()]
    assert record.exc_info is not None and "secret table name" in str(record.exc_info[1])


async def test_a_coded_error_passes_with_its_code() -> None:
    result = await schema.execute("{ conflict }")
    assert result.errors is not None
    assert result.errors[0].message == "tag web is in use in capsule c1"
    assert result.errors[0].extensions == {"code": "CONFLICT"}


async def test_request_errors_are_invalid_request() -> None:
    for document in ('{ fine(n: "x") }', "{ nope }", "{ fine(n: 1) "):
        result = await schema.execute(document)
        assert result.errors, document
        assert all(e.extensions == {"code": "INVALID_REQUEST"} for e in result.errors), document
