"""The development key, handed to a page opened on the machine that runs the embedded default.

`capsule serve` with no configuration (SQLite, the memory bus, its own agent) writes the `default`
team's key to <data dir>/dev-api-key and prints it. A page served to a browser on that same machine
may carry it, so whoever just started the server need not paste it. Anywhere else the page carries no
key and asks for one: a configured deployment, a request from another machine, or a Host header that
is not a loopback name (a DNS-rebinding page on a foreign name reaches 127.0.0.1 with its own name).
"""

from __future__ import annotations

import ipaddress

from starlette.requests import HTTPConnection

from app.config import Settings, bus_backend_kind
from app.services.team import Platform


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_local(connection: HTTPConnection) -> bool:
    """True when the client is on this machine and asked for this server by a loopback name."""
    client = connection.client
    return client is not None and _is_loopback(client.host) and _is_loopback(connection.url.hostname)


def runs_embedded_default(settings: Settings) -> bool:
    """True for the single-machine setup: SQLite, the memory bus and the server's own agent."""
    return (
        settings.embedded_agent
        and bus_backend_kind(settings.bus_url) == "memory"
        and settings.database_url.startswith("sqlite")
    )


async def dev_key_for(connection: HTTPConnection, platform: Platform) -> str | None:
    """The dev key for a page this connection loads, where the rule above allows it; else None."""
    if not (runs_embedded_default(platform.settings) and is_local(connection)):
        return None
    return await platform.keys.dev_key(platform.settings.data_dir)
