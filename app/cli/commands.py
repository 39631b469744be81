"""What each `capsule` command does, composed from the app's parts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime

import uvicorn

from app import logs
from app.bus.broadcast import Bus
from app.cli.ws_protocol import uvicorn_protocols
from app.config import Settings, bus_backend_kind
from app.datadir import lock_data_dir
from app.errors import BusUnavailable
from app.main import create_app
from app.services.hosts import HostService
from app.services.keys import KeyInfo, KeyService
from app.store.migrate import upgrade, upgrade_in_child
from app.store.session import Database

logger = logging.getLogger(__name__)


def migrate(settings: Settings) -> int:
    """Applies the alembic migrations."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    print("database is up to date")
    return 0


async def create_key(settings: Settings, team: str) -> int:
    """Creates the team if needed and prints a new key."""
    await asyncio.to_thread(migrate_quietly, settings)
    db = Database(settings.database_url)
    try:
        _, key = await KeyService(db).create_key(team)
    finally:
        await db.dispose()
    print(key)
    return 0


async def list_keys(settings: Settings, team: str) -> int:
    """Prints a team's keys: id, prefix, when created, when revoked; never a key or its hash."""
    await asyncio.to_thread(migrate_quietly, settings)
    db = Database(settings.database_url)
    try:
        keys = await KeyService(db).list_keys(team)
    finally:
        await db.dispose()
    rows = [("ID", "PREFIX", "CREATED", "REVOKED")]
    rows += [(str(k.id), k.prefix, _moment(k.created_at), _moment(k.revoked_at)) for k in keys]
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


async def revoke_key(settings: Settings, key_id: int) -> int:
    """Revokes a key by id and tells every API replica over the bus, so its open connections end now."""
    await asyncio.to_thread(migrate_quietly, settings)
    db = Database(settings.database_url)
    bus = await _shared_bus(settings)
    try:
        info, changed = await KeyService(db, bus=bus).revoke_id(key_id)
    finally:
        if bus is not None:
            await bus.disconnect()
        await db.dispose()
    if changed:
        print(f"revoked API key {_described(info)}")
    else:
        print(f"API key {_described(info)} was revoked already, at {_moment(info.revoked_at)}")
    return 0


def _described(info: KeyInfo) -> str:
    return f"{info.id} ({info.prefix}...) of team {info.team}"


def _moment(value: datetime | None) -> str:
    return "-" if value is None else value.isoformat(timespec="seconds")


async def _shared_bus(settings: Settings) -> Bus | None:
    """The replicas' bus, connected; None for the memory bus, which no server process shares."""
    if bus_backend_kind(settings.bus_url) == "memory":
        return None
    bus = Bus(settings.bus_url)
    try:
        await bus.connect()
    except BusUnavailable:
        print(
            "capsule: the bus is unreachable; servers notice the revocation at their next key check",
            file=sys.stderr,
        )
        return None
    return bus


async def add_host(settings: Settings, host_id: str, address: str) -> int:
    """Registers a host agent."""
    await asyncio.to_thread(migrate_quietly, settings)
    db = Database(settings.database_url)
    try:
        await HostService(db, settings.hosts).register(host_id, address)
    finally:
        await db.dispose()
    print(f"host {host_id} registered at {address}")
    return 0


def migrate_quietly(settings: Settings) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)


def migrate_apart(settings: Settings) -> None:
    """migrate_quietly in a child process: a server that runs for days does not carry alembic."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_in_child(settings.database_url)


def serve(settings: Settings, *, host: str, port: int) -> int:
    """Locks the data directory, then migrates, makes sure a key exists and serves until Ctrl-C."""
    # Before anything else, so a second serve on this data migrates nothing and sweeps nothing.
    with lock_data_dir(settings):
        return _serve(settings, host=host, port=port)


def _serve(settings: Settings, *, host: str, port: int) -> int:
    migrate_apart(settings)
    key, created = asyncio.run(_dev_key(settings))
    url = f"http://{'localhost' if host in ('127.0.0.1', '0.0.0.0') else host}:{port}/graphql"
    print(f"GraphiQL: {url}", flush=True)
    print(f"Log viewer: {url.removesuffix('/graphql')}/viewer", flush=True)
    if key is not None:
        where = settings.data_dir / "dev-api-key"
        print(f"API key of team 'default' ({'written to' if created else 'read from'} {where}):", flush=True)
        print(f"  Authorization: Bearer {key}", flush=True)
        print('  (in GraphiQL, add it under Headers: {"Authorization": "Bearer <key>"})', flush=True)
    # uvicorn stops reading a frame past the message limit; the app refuses such a message on its own too.
    app = create_app(settings, freeze_gc=True)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=None,  # the levels of log_config, which follow --log-level
        log_config=logs.uvicorn_log_config(),  # its access log in the format of every other line
        lifespan="on",
        ws_max_size=settings.max_ws_message_bytes,
        ws_per_message_deflate=settings.ws_per_message_deflate,
        **uvicorn_protocols(),
    )
    server = GracefulServer(config, going_away=app.state.going_away)
    # uvicorn raises the signal it caught again once it has shut down: SIGTERM and Ctrl-C are a
    # clean exit here (0), once the shutdown has run.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if server.started else 3  # 3: it never started (uvicorn's own exit code for that)


class GracefulServer(uvicorn.Server):
    """uvicorn's server, whose shutdown (SIGTERM, Ctrl-C) closes WebSockets with 1001, not 1012.

    The order: stop accepting; close every WebSocket with 1001 (going away), so that clients
    reconnect and resume with fromSeq; let HTTP requests in flight (mutations) finish, as uvicorn
    does; then the lifespan's shutdown, which on the embedded default ends the agent's processes
    and records their exits.
    """

    def __init__(self, config: uvicorn.Config, *, going_away: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._going_away = going_away

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        try:
            await self._going_away()
        except Exception:  # the rest of the shutdown goes on whatever happened here
            logger.exception("closing the WebSockets failed")
        await super().shutdown(sockets)


async def _dev_key(settings: Settings) -> tuple[str | None, bool]:
    db = Database(settings.database_url)
    try:
        return await KeyService(db).ensure_dev_key(settings.data_dir)
    finally:
        await db.dispose()
