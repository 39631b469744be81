"""The log viewer at /viewer: its page, which loads the bundle frontend/viewer builds.

The bundle (Preact, graphql-ws, ansi_up) is committed under app/api/static/viewer/, so the viewer
works offline: the page loads nothing from anywhere but this server, and talks only to its /graphql.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import HTMLResponse

from app.api.dev_key import dev_key_for
from app.api.graphiql import STATIC_ROUTE
from app.services.team import Platform

# The output shown is a process's, so the page allows no script but the bundle's: a line of output
# that slipped past the escaping would still run nothing. ansi_up colours with inline styles.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    # The page may carry the dev key: never kept by a cache.
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}

PAGE = """<!doctype html>
<html lang="en">
  <head>
    <meta charset="utf-8">
    <meta name="viewport" content="width=device-width, initial-scale=1">
    <meta name="color-scheme" content="dark light">
    <title>capsule · logs</title>
    <link rel="icon" href="data:,">
    <link rel="stylesheet" href="{assets}/viewer.css">
    <script type="module" src="{assets}/viewer.js"></script>
  </head>
  <body>
    <script id="viewer-config" type="application/json">{config}</script>
    <div id="viewer"></div>
    <noscript>The log viewer needs JavaScript.</noscript>
  </body>
</html>
"""


def _script_json(value: object) -> str:
    """JSON that cannot end the <script> element it sits in."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class ViewerPage:
    """Serves the viewer's page; the app's lifespan sets platform, as it does the GraphQL view's."""

    def __init__(self, *, graphql_path: str) -> None:
        self.graphql_path = graphql_path
        self.platform: Platform | None = None

    async def page(self, request: Request) -> HTMLResponse:
        """The page, with the GraphQL address and, on this machine's embedded default, the dev key."""
        assets = request.url_for(STATIC_ROUTE, path="viewer").path
        key = None if self.platform is None else await dev_key_for(request, self.platform)
        config = _script_json({"graphqlPath": self.graphql_path, "devKey": key})
        return HTMLResponse(PAGE.format(assets=assets, config=config), headers=SECURITY_HEADERS)
