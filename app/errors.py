"""Error codes callers see, the exception type that carries them, and their gRPC twins (by number:
this module, which a capsule's supervisor loads too, needs no grpc)."""

from __future__ import annotations

import enum
from typing import ClassVar


class ErrorCode(enum.Enum):
    """The codes of ARCHITECTURE.md; every error a client sees carries one."""

    UNAUTHENTICATED = "UNAUTHENTICATED"
    INVALID_REQUEST = "INVALID_REQUEST"
    NOT_FOUND = "NOT_FOUND"
    CONFLICT = "CONFLICT"
    INVALID_STATE = "INVALID_STATE"
    HOST_UNAVAILABLE = "HOST_UNAVAILABLE"
    UNAVAILABLE = "UNAVAILABLE"
    RATE_LIMITED = "RATE_LIMITED"
    INTERNAL = "INTERNAL"


class CapsuleError(Exception):
    """An error a caller may see; the subclass fixes its code."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL

    @property
    def extensions(self) -> dict[str, object]:
        # graphql-core copies an original error's `extensions` onto its GraphQLError.
        return {"code": self.code.value}


class Unauthenticated(CapsuleError):
    code = ErrorCode.UNAUTHENTICATED


class InvalidRequest(CapsuleError):
    code = ErrorCode.INVALID_REQUEST


class NotFound(CapsuleError):
    code = ErrorCode.NOT_FOUND


class Conflict(CapsuleError):
    code = ErrorCode.CONFLICT


class InvalidState(CapsuleError):
    code = ErrorCode.INVALID_STATE


class HostUnavailable(CapsuleError):
    code = ErrorCode.HOST_UNAVAILABLE


class Unavailable(CapsuleError):
    """A service the server itself depends on (the store, the bus) cannot be reached; retry."""

    code = ErrorCode.UNAVAILABLE


class BusUnavailable(Unavailable):
    """The bus backend cannot be reached, or its connection dropped under a subscriber."""

    def __init__(self, message: str = "the event bus cannot be reached; retry") -> None:
        super().__init__(message)


class RateLimited(CapsuleError):
    """A team is over one of its limits; retry_after_sec, where known, says when a retry may succeed."""

    code = ErrorCode.RATE_LIMITED

    def __init__(self, message: str, *, retry_after_sec: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_sec = retry_after_sec

    @property
    def extensions(self) -> dict[str, object]:
        if self.retry_after_sec is None:
            return super().extensions
        return {**super().extensions, "retryAfterSec": self.retry_after_sec}


class Internal(CapsuleError):
    code = ErrorCode.INTERNAL


ERROR_TYPES: dict[ErrorCode, type[CapsuleError]] = {
    cls.code: cls
    for cls in (
        Unauthenticated,
        InvalidRequest,
        NotFound,
        Conflict,
        InvalidState,
        HostUnavailable,
        Unavailable,
        RateLimited,
        Internal,
    )
}


class Status(enum.IntEnum):
    """gRPC's status codes, by the numbers its wire carries (grpc.StatusCode names the same ones)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# The one table between our codes and gRPC's; the host client reads it backwards.
GRPC_STATUS: dict[ErrorCode, Status] = {
    ErrorCode.UNAUTHENTICATED: Status.UNAUTHENTICATED,
    ErrorCode.INVALID_REQUEST: Status.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: Status.NOT_FOUND,
    ErrorCode.CONFLICT: Status.ALREADY_EXISTS,
    ErrorCode.INVALID_STATE: Status.FAILED_PRECONDITION,
    ErrorCode.HOST_UNAVAILABLE: Status.UNAVAILABLE,
    # Only an API server raises it; should an agent ever do, the caller sees the host as unavailable.
    ErrorCode.UNAVAILABLE: Status.UNAVAILABLE,
    ErrorCode.RATE_LIMITED: Status.RESOURCE_EXHAUSTED,
    ErrorCode.INTERNAL: Status.INTERNAL,
}

ERROR_CODE_OF_STATUS: dict[Status, ErrorCode] = {
    status: code for code, status in GRPC_STATUS.items() if code is not ErrorCode.UNAVAILABLE
}
ERROR_CODE_OF_STATUS[Status.DEADLINE_EXCEEDED] = ErrorCode.HOST_UNAVAILABLE


def error_from_status(status: int, message: str) -> CapsuleError:
    """Turns a failed gRPC call's status (its number) back into the error the agent raised."""
    try:
        code = ERROR_CODE_OF_STATUS.get(Status(status), ErrorCode.INTERNAL)
    except ValueError:  # a number gRPC does not define
        code = ErrorCode.INTERNAL
    if code is ErrorCode.HOST_UNAVAILABLE:
        return HostUnavailable(message or "the capsule's host agent cannot be reached")
    if code is ErrorCode.INTERNAL:
        return Internal("internal error")
    return ERROR_TYPES[code](message)
