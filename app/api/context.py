"""The per-request context: who calls, and the services acting for them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket
from strawberry.types import Info as StrawberryInfo

from app.domain import Team
from app.errors import Unauthenticated
from app.services.team import Platform, TeamServices

MISSING_KEY = "missing or invalid API key: send the header 'Authorization: Bearer <key>'"


@dataclass
class Context:
    """Request, connection params (WebSockets), the caller's team and its services."""

    request: Request | WebSocket
    response: Response | WebSocket | None
    platform: Platform
    team: Team | None = None
    # The id of the key that authenticated the caller: a WebSocket ends when it is revoked.
    key_id: int | None = None
    connection_params: dict[str, Any] | None = None
    _services: TeamServices | None = None

    @property
    def services(self) -> TeamServices:
        """The caller's services; TeamRequired has checked there is a caller."""
        if self.team is None:
            raise Unauthenticated(MISSING_KEY)
        if self._services is None or self._services.team != self.team:
            self._services = self.platform.for_team(self.team)
        return self._services


Info: TypeAlias = StrawberryInfo[Context, None]
