"""ErrorCodes: extensions.code on every error a client sees; bugs masked as INTERNAL."""

from __future__ import annotations

import logging

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


class ErrorCodes(MaskErrors):
    """Passes coded errors, marks request errors INVALID_REQUEST and masks everything else."""

    def __init__(self) -> None:
        super().__init__(should_mask_error=self._should_mask, error_message=INTERNAL_MESSAGE)

    @staticmethod
    def _should_mask(error: GraphQLError) -> bool:
        if isinstance(error.original_error, CapsuleError) or _code_of(error) is not None:
            return False
        return not _is_request_error(error)

    def anonymise_error(self, error: GraphQLError) -> GraphQLError:
        masked = super().anonymise_error(error)
        masked.extensions = {"code": ErrorCode.INTERNAL.value}
        return masked

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
