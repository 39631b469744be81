"""Bearer keys over HTTP and connection_init, TeamRequired, and field helpers that apply it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import strawberry
from strawberry.permission import BasePermission

from app.api.context import MISSING_KEY, Context, Info
from app.domain import Team
from app.errors import ErrorCode

F = TypeVar("F", bound=Callable[..., Any])


def bearer_key(value: object) -> str | None:
    """The key of an 'Authorization: Bearer <key>' value, or None."""
    if not isinstance(value, str):
        return None
    scheme, _, key = value.strip().partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


def key_from_params(params: Mapping[str, Any] | None) -> str | None:
    """The key a WebSocket client sent in its connection_init payload."""
    if not params:
        return None
    for name, value in params.items():
        if name.lower() == "authorization":
            return bearer_key(value)
    return None


async def authenticate(context: Context, key: str | None) -> Team | None:
    """Sets and returns the team a key belongs to; None for no key or a bad one."""
    if key is None:
        return None
    context.team = await context.platform.keys.authenticate(key)
    return context.team


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
