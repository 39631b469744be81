"""Host agents: register them, merge in CAPSULE_HOSTS, choose where a new capsule goes."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from app import metrics
from app.domain import check_id
from app.errors import HostUnavailable, InvalidRequest
from app.store import models
from app.store.repositories import HostRepository
from app.store.session import Database

logger = logging.getLogger(__name__)

# HOST:PORT, where HOST is a name, an IPv4 address or a bracketed IPv6 address.
ADDRESS_RE = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})")


def check_address(address: str) -> str:
    """Returns a HOST:PORT address unchanged, or raises InvalidRequest."""
    match = ADDRESS_RE.fullmatch(address)
    if match is None or len(address) > 255 or not 1 <= int(match["port"]) <= 65535:
        raise InvalidRequest(f"host address {address[:80]!r} is not HOST:PORT (e.g. agent-1.internal:7070)")
    return address


def check_host_id(host_id: str) -> str:
    """Returns a host id unchanged, or raises InvalidRequest."""
    return check_id(host_id, what="host id")


class HostService:
    """The host agents a server may place capsules on: registered ones and configured ones."""

    def __init__(self, db: Database, configured: Mapping[str, str]) -> None:
        self._db = db
        self._configured = dict(configured)

    async def register(self, host_id: str, address: str) -> models.Host:
        """Registers a host agent, or moves a registered one to a new address."""
        check_host_id(host_id)
        check_address(address)
        async with self._db.transaction() as session:
            host = await HostRepository(session).upsert(host_id, address)
        logger.info("registered host %s at %s", host_id, address)
        return host

    async def hosts(self) -> dict[str, str]:
        """Every host id with its address: the store's, then CAPSULE_HOSTS over them."""
        async with self._db.session() as session:
            stored = await HostRepository(session).list()
        return {host.id: host.address for host in stored} | self._configured

    async def address(self, host_id: str) -> str | None:
        """The address of one host, or None when it is neither registered nor configured."""
        if host_id in self._configured:
            return self._configured[host_id]
        async with self._db.session() as session:
            host = await HostRepository(session).get(host_id)
        return None if host is None else host.address

    async def choose(self, hosts: Mapping[str, str] | None = None) -> str:
        """The host with the fewest active capsules (ties go to the lowest id), among hosts when given."""
        if hosts is None:
            hosts = await self.hosts()
        if not hosts:
            raise HostUnavailable("no host agent is registered")
        async with self._db.session() as session:
            counts = await HostRepository(session).active_capsule_counts()
        return min(sorted(hosts), key=lambda host_id: counts.get(host_id, 0))


class HostStates:
    """Whether each host agent is reachable, as the exit recorder's stream to it says: one log line
    when a host becomes unreachable and one when it is back, never one per retry."""

    def __init__(self) -> None:
        self._reachable: dict[str, bool] = {}

    def up(self, host_id: str) -> None:
        """The host's lifecycle stream is open."""
        before = self._reachable.get(host_id)
        self._reachable[host_id] = True
        metrics.HOSTS_REACHABLE.labels(host_id).set(1)
        if before is False:
            logger.info("host %s is back", host_id, extra={"event": "host.back", "host": host_id})

    def down(self, host_id: str, reason: object) -> None:
        """The host's lifecycle stream failed or could not be opened."""
        before = self._reachable.get(host_id)
        self._reachable[host_id] = False
        metrics.HOSTS_REACHABLE.labels(host_id).set(0)
        if before is not False:
            logger.warning(
                "host %s is unreachable: %s",
                host_id,
                reason,
                extra={"event": "host.unreachable", "host": host_id},
            )

    def reachable(self) -> set[str]:
        """The hosts whose stream is open now."""
        return {host_id for host_id, up in self._reachable.items() if up}
