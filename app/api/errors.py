"""ErrorCodes: extensions.code on every error a client sees; bugs masked as INTERNAL."""

from __future__ import annotations

import logging

from graphql.error import GraphQLError
from strawberry.extensions import MaskErrors

from app.errors import CapsuleError, ErrorCode

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error: it has been logged; retry, and report it if it persists"


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
        processed = super()._process_errors(errors)
        for error in processed:
            if _code_of(error) is None:
                error.extensions = {**(error.extensions or {}), "code": ErrorCode.INVALID_REQUEST.value}
        return processed
