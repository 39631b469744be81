"""The schema's document caches: each text parsed and validated once, every limit still applied."""

from __future__ import annotations

from graphql import GraphQLError

from app.api.documents import VALIDATED
from app.api.schema import schema

INNER = "ofType { " * 13 + "name" + " }" * 13
DEEP = f"query Deep {{ __schema {{ types {{ fields {{ type {{ {INNER} }} }} }} }} }}"
SYNTAX = "query { capsules { "


async def errors_of(query: str) -> list[GraphQLError]:
    result = await schema.execute(query)
    assert result.data is None
    return list(result.errors or [])


async def test_a_document_over_the_shape_limit_is_refused_each_time_from_one_validation() -> None:
    first = await errors_of(DEEP)
    validated = len(VALIDATED)
    second = await errors_of(DEEP)
    assert len(VALIDATED) == validated  # the second request did not validate again
    for errors in (first, second):
        assert [e.message for e in errors] == [
            "operation 'Deep' is 18 fields deep; at most 15 are allowed (introspection fields count too)"
        ]
        assert errors[0].extensions == {"code": "INVALID_REQUEST"}
    assert first is not second


async def test_a_syntax_error_is_invalid_request_each_time() -> None:
    for _ in range(2):
        errors = await errors_of(SYNTAX)
        assert len(errors) == 1 and errors[0].extensions == {"code": "INVALID_REQUEST"}
        assert "Syntax Error" in errors[0].message


async def test_too_many_tokens_are_refused_each_time() -> None:
    query = "{ " + "__typename " * 6000 + "}"
    for _ in range(2):
        errors = await errors_of(query)
        assert errors[0].extensions == {"code": "INVALID_REQUEST"}
        assert "token" in errors[0].message.lower()
