"""ErrorCodes: extensions.code on every error a client sees; bugs masked as INTERNAL with an errorId."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from typing import Any

from graphql.error import GraphQLError
from strawberry.extensions import MaskErrors

from app.errors import CapsuleError, ErrorCode

logger = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error: it has been logged; retry, and report it if it persists"
NOT_UNICODE = (
    "a text argument holds a lone UTF-16 surrogate (such as \\ud800), which is not Unicode: "
    "send valid text, or the bytes as BASE64 where the field takes an encoding"
)


def is_not_unicode(error: GraphQLError) -> bool:
    """True for an error from text a client sent with a lone surrogate: JSON's \\ud800 escapes allow
    it, but nothing can encode it as UTF-8 (for gRPC, a process's stdin, the store)."""
    original = error.original_error
    return isinstance(original, UnicodeEncodeError) and original.reason == "surrogates not allowed"


def _code_of(error: GraphQLError) -> ErrorCode | None:
    code = (error.extensions or {}).get("code")
    try:
        return ErrorCode(code) if code else None
    except ValueError:
        return None


def _is_request_error(error: GraphQLError) -> bool:
    """Syntax, validation and variable errors: graphql-core's own, with no exception behind them."""
    original = error.original_error
    return original is None or isinstance(original, GraphQLError)


def is_bug(error: GraphQLError) -> bool:
    """True for an error no rule foresaw (an exception of ours or a library's), to be masked as INTERNAL."""
    if isinstance(error.original_error, CapsuleError) or _code_of(error) is not None:
        return False
    return not _is_request_error(error) and not is_not_unicode(error)


def internal_error(error: GraphQLError) -> GraphQLError:
    """What a client sees of a bug: INTERNAL and an opaque errorId, which the log has beside the traceback."""
    error_id = secrets.token_hex(8)
    path = ".".join(map(str, error.path or ())) or "-"
    logger.error("internal error %s at %s", error_id, path, exc_info=error.original_error)
    return GraphQLError(
        INTERNAL_MESSAGE,
        nodes=error.nodes,
        source=error.source,
        positions=error.positions,
        path=error.path,
        extensions={"code": ErrorCode.INTERNAL.value, "errorId": error_id},
    )


class ErrorCodes(MaskErrors):
    """Passes coded errors, marks request errors INVALID_REQUEST and masks everything else."""

    def __init__(self) -> None:
        super().__init__(should_mask_error=is_bug, error_message=INTERNAL_MESSAGE)

    def anonymise_error(self, error: GraphQLError) -> GraphQLError:
        return internal_error(error)

    def on_stream_result(self, result: Any) -> Iterator[None]:
        # Each event of each subscription passes here: a result with no errors (nearly all) skips
        # MaskErrors' checks against a runtime Protocol, which cost more than the rest of its way.
        self._stream_result_processed = True
        if (
            getattr(result, "errors", None)
            or getattr(result, "incremental", None)
            or getattr(result, "completed", None)
        ):
            self._process_stream_result(result)
        yield None

    def _process_errors(self, errors: list[GraphQLError]) -> list[GraphQLError]:
        errors = [
            GraphQLError(
                NOT_UNICODE,
                nodes=error.nodes,
                path=error.path,
                extensions={"code": ErrorCode.INVALID_REQUEST.value},
            )
            if is_not_unicode(error)
            else error
            for error in errors
        ]
        processed = super()._process_errors(errors)
        for error in processed:
            if _code_of(error) is None:
                error.extensions = {**(error.extensions or {}), "code": ErrorCode.INVALID_REQUEST.value}
        return processed
