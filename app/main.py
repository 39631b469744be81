"""create_app(settings): the Starlette app; its lifespan owns the AppState."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from app import metrics
from app.api.graphiql import static_route
from app.api.schema import schema
from app.api.size_limits import SizeLimits
from app.api.view import GraphQLView
from app.api.viewer import ViewerPage
from app.config import Settings
from app.state import AppState

# The collector's thresholds under `capsule serve` (CPython's default: 700, 10, 10). Thousands of
# WebSockets hold millions of tracked objects, each full pass over them a second or more on two cores;
# with the defaults a run of 5000 subscribers spent 10.7 s in 21 full passes. Young cycles (nearly
# all a server makes) are still collected young; a full pass waits for 100 passes of the middle
# generation and, by CPython's own rule, for a quarter of the old objects to be new since the last.
GC_THRESHOLDS = (50_000, 20, 100)
GRAPHQL_PATH = "/graphql"


class Api(Starlette):
    """Starlette's app with one shortcut: a WebSocket to /graphql goes straight to the view through
    SizeLimits, not through Starlette's error and exception middleware and its router. Each of those
    holds a coroutine frame or two for the whole life of every open WebSocket (some 2.5 KiB of each)
    and does nothing for one: the error middleware passes a WebSocket's exception on to uvicorn as
    it is, the exception middleware answers only the HTTP and WebSocket exceptions of Starlette,
    which the view does not raise, and the router only matches the path. Everything else, a
    WebSocket to another path included, takes Starlette's way."""

    graphql_websocket: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == GRAPHQL_PATH and self.graphql_websocket:
            scope["app"] = self  # as Starlette sets it: the view's WebSocket reads the app's state
            await self.graphql_websocket(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(settings: Settings, *, freeze_gc: bool = False) -> Api:
    """The API server for these settings; nothing connects until the lifespan starts.

    freeze_gc (for `capsule serve`, which has the process to itself): once started, the objects made
    so far (modules, the schema, the store's and gRPC's) are frozen out of the cyclic collector,
    whose every full pass over them would otherwise hold each stream for a hundred milliseconds,
    and the collector runs at GC_THRESHOLDS.
    """
    view = GraphQLView(
        allowed_origins=settings.ws_allowed_origins,
        connection_init_wait_timeout=timedelta(seconds=settings.ws_init_timeout_sec),
        # The view's handlers bound operations per connection themselves, with RATE_LIMITED.
        max_subscriptions_per_connection=None,
    )
    viewer = ViewerPage(graphql_path=GRAPHQL_PATH)
    if settings.otel_endpoint:  # else nothing of OpenTelemetry is imported
        from app import tracing

        extension = tracing.enable(settings.otel_endpoint)
        if extension not in schema.extensions:
            schema.extensions = (*schema.extensions, extension)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AppState.open(settings) as state:
            app.state.capsule = state
            view.platform = viewer.platform = state.platform
            if freeze_gc:
                gc.collect()
                gc.freeze()
                gc.set_threshold(*GC_THRESHOLDS)
            try:
                yield
            finally:
                view.platform = viewer.platform = None

    async def home(request: Request) -> Response:
        return RedirectResponse(url="/graphql")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        health = _state(request).health
        assert health is not None
        readiness = await health.readiness()
        body: dict[str, object] = {
            "status": "ready" if readiness.ready else "unready",
            "checks": readiness.checks,
        }
        if not readiness.ready:
            body["failed"] = readiness.failed
        return JSONResponse(body, status_code=200 if readiness.ready else 503)

    async def metrics_page(request: Request) -> Response:
        health = _state(request).health
        if health is not None:
            await health.refresh_gauges()
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    limits = {"max_body_bytes": settings.max_body_bytes, "max_message_bytes": settings.max_ws_message_bytes}
    app = Api(
        routes=[
            Route("/", home),
            Route("/healthz", health),
            Route("/readyz", ready),
            Route("/metrics", metrics_page),
            Route(GRAPHQL_PATH, view, methods=["GET", "POST"]),
            WebSocketRoute(GRAPHQL_PATH, view),
            Route("/viewer", viewer.page),
            static_route(),
        ],
        middleware=[Middleware(SizeLimits, **limits)],
        lifespan=lifespan,
    )
    app.graphql_websocket = SizeLimits(view, **limits)
    app.state.going_away = view.going_away  # for `capsule serve`'s shutdown: WebSockets close with 1001
    return app


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.capsule
    return state
