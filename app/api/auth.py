"""Bearer keys over HTTP and connection_init, TeamRequired, and field helpers that apply it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import strawberry
from strawberry.permission import BasePermission

from app import metrics
from app.api.context import MISSING_KEY, Context, Info
from app.domain import Team
from app.errors import ErrorCode

F = TypeVar("F", bound=Callable[..., Any])
logger = logging.getLogger(__name__)


def bearer_key(value: object) -> str | None:
    """The key of an 'Authorization: Bearer <key>' value, or None."""
    if not isinstance(value, str):
        return None
    scheme, _, key = value.strip().partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


# Close reasons must fit a WebSocket close frame: 123 bytes at most.
NO_WS_KEY = 'no API key: send {"Authorization": "Bearer <key>"} as the connection_init payload'
NOT_BEARER = "the Authorization value in {where} is not 'Bearer <key>'"
WRONG_KEY = "the API key in {where} is wrong or revoked: make a new one with `capsule keys create`"


async def websocket_refusal(context: Context) -> str | None:
    """Why a WebSocket's key is refused, in words a person can act on; None once its team is set."""
    if context.team is not None:
        return None
    raw, where = _authorization(context.connection_params), "connection_init"
    if raw is None:
        raw, where = context.request.headers.get("authorization"), "the upgrade request's header"
    if raw is None:
        _refused(context, "no key on a WebSocket")
        return NO_WS_KEY
    key = bearer_key(raw)
    if key is None:
        _refused(context, f"an Authorization value that is not 'Bearer <key>' in {where}")
        return NOT_BEARER.format(where=where)
    if await authenticate(context, key) is None:
        return WRONG_KEY.format(where=where)
    return None


def _authorization(params: Mapping[str, object] | None) -> object | None:
    for name, value in (params or {}).items():
        if name.lower() == "authorization":
            return value
    return None


async def authenticate(context: Context, key: str | None) -> Team | None:
    """Sets and returns the team a key belongs to (and the key's id); None for no key or a bad one."""
    if key is None:
        return None
    credential = await context.platform.keys.credential(key)
    context.team = None if credential is None else credential.team
    context.key_id = None if credential is None else credential.key_id
    if credential is None:
        _refused(context, "wrong or revoked key")
    return context.team


def _refused(context: Context, why: str) -> None:
    """Counts and logs a refused key: where it came from, never the key."""
    metrics.AUTH_FAILURES.inc()
    client = context.request.client
    address = f"{client.host}:{client.port}" if client is not None else "-"
    logger.warning(
        "authentication failed from %s: %s", address, why, extra={"event": "auth.failed", "client": address}
    )


class TeamRequired(BasePermission):
    """Lets through only callers with a valid API key."""

    message = MISSING_KEY
    error_extensions = {"code": ErrorCode.UNAUTHENTICATED.value}

    def has_permission(self, source: Any, info: Info, **kwargs: Any) -> bool:
        return info.context.team is not None


def team_field(**kwargs: Any) -> Callable[[F], F]:
    """A query field for authenticated callers only."""
    return cast("Callable[[F], F]", strawberry.field(permission_classes=[TeamRequired], **kwargs))


def team_mutation(**kwargs: Any) -> Callable[[F], F]:
    """A mutation for authenticated callers only."""
    return cast("Callable[[F], F]", strawberry.mutation(permission_classes=[TeamRequired], **kwargs))


def team_subscription(**kwargs: Any) -> Callable[[F], F]:
    """A subscription for authenticated callers only."""
    return cast("Callable[[F], F]", strawberry.subscription(permission_classes=[TeamRequired], **kwargs))
