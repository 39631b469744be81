"""GraphQL over HTTP: which media type a request's Accept asks for, and the status of a request error.

`application/json` is the answer for a client that asks for it, for one that sends no Accept (or
only wildcards), and for anything else: every GraphQL result is then HTTP 200, as it always was.
A client that names `application/graphql-response+json` (with a q no lower than application/json's)
gets that media type, and then a request the server never executed (a document that does not parse
or validate, variables that do not coerce, an operation it cannot run over HTTP) answers with an
error status and no `data` entry, as the GraphQL-over-HTTP spec asks.
"""

from __future__ import annotations

from strawberry.types import ExecutionResult

from app.errors import ErrorCode

GRAPHQL_RESPONSE_JSON = "application/graphql-response+json"
JSON = "application/json"

# The status of a request error by its code; any other code answers 400.
_REQUEST_ERROR_STATUS = {
    ErrorCode.INTERNAL.value: 500,
    ErrorCode.UNAVAILABLE.value: 503,
    ErrorCode.HOST_UNAVAILABLE.value: 503,
    ErrorCode.RATE_LIMITED.value: 429,
    ErrorCode.UNAUTHENTICATED.value: 401,
}


def _accepted(accept: str) -> dict[str, float]:
    """The q of each media range an Accept value names (the highest one where a range repeats)."""
    ranges: dict[str, float] = {}
    for part in accept.split(","):
        media_range, *params = (piece.strip() for piece in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(max(float(value.strip()), 0.0), 1.0)
                except ValueError:
                    q = 0.0
        media_range = media_range.lower()
        if media_range:
            ranges[media_range] = max(q, ranges.get(media_range, 0.0))
    return ranges


def _quality(ranges: dict[str, float], media_type: str) -> float:
    """The q a media type gets from its most specific matching range (RFC 9110 §12.5.1)."""
    for candidate in (media_type, media_type.partition("/")[0] + "/*", "*/*"):
        if candidate in ranges:
            return ranges[candidate]
    return 0.0


def wants_graphql_response(accept: str | None) -> bool:
    """True when an Accept value names application/graphql-response+json at least as highly as JSON."""
    if not accept or "graphql-response" not in accept.lower():
        return False
    ranges = _accepted(accept)
    preference = ranges.get(GRAPHQL_RESPONSE_JSON, 0.0)
    return preference > 0.0 and preference >= _quality(ranges, JSON)


def request_error_status(result: ExecutionResult) -> int | None:
    """The HTTP status of a result that is a request error, or None for an executed one (200).

    A request error has no data and no error with a path: graphql-core answers a document that
    does not parse or validate, and variables that do not coerce, with such errors and runs no
    resolver; a field's error always has a path, even one that nulls the whole result.
    """
    if result.data is not None or not result.errors:
        return None
    if any(error.path for error in result.errors):
        return None
    codes = [str((error.extensions or {}).get("code")) for error in result.errors]
    return max(_REQUEST_ERROR_STATUS.get(code, 400) for code in codes)
