"""Which Accept values get application/graphql-response+json, and the status of each request error."""

from __future__ import annotations

import pytest
from graphql import GraphQLError
from strawberry.types import ExecutionResult

from app.api.negotiation import request_error_status, wants_graphql_response


@pytest.mark.parametrize(
    "accept",
    [
        "application/graphql-response+json",
        "Application/GraphQL-Response+JSON; charset=utf-8",
        "application/graphql-response+json, application/json",
        "application/json, application/graphql-response+json",
        "application/graphql-response+json, application/json;q=0.9",
        "application/graphql-response+json;q=0.8, */*;q=0.5",
    ],
)
def test_graphql_response_json_where_it_is_named_at_least_as_highly_as_json(accept: str) -> None:
    assert wants_graphql_response(accept)


@pytest.mark.parametrize(
    "accept",
    [
        None,
        "",
        "*/*",
        "application/*",
        "application/json",
        "text/html",
        "application/graphql-response+json;q=0",
        "application/graphql-response+json;q=0.5, application/json",
        "application/graphql-response+json;q=0.5, application/*",
        "application/graphql-response+json;q=nonsense",
        "multipart/mixed;boundary=graphql;subscriptionSpec=1.0,application/json",
    ],
)
def test_json_otherwise(accept: str | None) -> None:
    assert not wants_graphql_response(accept)


def coded(code: str, path: list[str | int] | None = None) -> GraphQLError:
    return GraphQLError("x", path=path, extensions={"code": code})


def test_an_executed_result_is_no_request_error() -> None:
    assert request_error_status(ExecutionResult(data={"a": 1}, errors=None)) is None
    assert request_error_status(ExecutionResult(data={"a": None}, errors=[coded("NOT_FOUND", ["a"])])) is None
    # a non-null field's error nulls the whole result, but it has a path: it was executed
    assert request_error_status(ExecutionResult(data=None, errors=[coded("INTERNAL", ["a"])])) is None


def test_a_request_error_has_the_status_of_its_code() -> None:
    assert request_error_status(ExecutionResult(data=None, errors=[coded("INVALID_REQUEST")])) == 400
    assert request_error_status(ExecutionResult(data=None, errors=[GraphQLError("no code")])) == 400
    assert request_error_status(ExecutionResult(data=None, errors=[coded("RATE_LIMITED")])) == 429
    both = [coded("INVALID_REQUEST"), coded("INTERNAL")]
    assert request_error_status(ExecutionResult(data=None, errors=both)) == 500
