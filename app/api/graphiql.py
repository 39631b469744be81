"""GraphiQL from the package itself: its page and the route for the bundle frontend/graphiql builds.

The bundle (React, GraphiQL, Monaco's workers, graphql-ws) is committed under app/api/static/graphiql/,
so the IDE works offline and behind firewalls: the page loads nothing from anywhere but this server.
"""

from __future__ import annotations

import os
from os import PathLike
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).parent / "static"
STATIC_ROUTE = "static"

# The entry reads the GraphQL address from the page's own URL; `data:,` as the icon spares the
# browser a request for /favicon.ico.
PAGE = """<!doctype html>
<html lang="en">
  <head>
    <meta charset="utf-8">
    <meta name="viewport" content="width=device-width, initial-scale=1">
    <title>capsule · GraphiQL</title>
    <link rel="icon" href="data:,">
    <link rel="stylesheet" href="{assets}/graphiql.css">
    <style>body {{ margin: 0; }} #graphiql {{ height: 100vh; }}</style>
    <script type="module" src="{assets}/graphiql.js"></script>
  </head>
  <body>
    <div id="graphiql">Loading GraphiQL…</div>
    <noscript>GraphiQL needs JavaScript.</noscript>
  </body>
</html>
"""


class _RevalidatedFiles(StaticFiles):
    """Static files a browser revalidates on every use.

    The bundle keeps the same file names from one build to the next (the page names them), so
    a cache that went by Last-Modified alone could pair an old script with a new worker after an
    upgrade; an unchanged file still costs only a 304.
    """

    def file_response(
        self,
        full_path: PathLike[str] | str,
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["Cache-Control"] = "no-cache"
        return response


def static_route() -> Mount:
    """Serves app/api/static/ at /static; GraphiQL's bundle is under /static/graphiql/."""
    return Mount("/static", app=_RevalidatedFiles(directory=STATIC_DIR), name=STATIC_ROUTE)


def graphiql_page(request: Request) -> HTMLResponse:
    """The GraphiQL page, its assets addressed through the app's own static route."""
    assets = request.url_for(STATIC_ROUTE, path="graphiql").path
    return HTMLResponse(PAGE.format(assets=assets))
