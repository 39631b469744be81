"""Readiness (/readyz) and the gauges /metrics reads from the store at each scrape."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from app import metrics
from app.bus.broadcast import Bus
from app.errors import CapsuleError
from app.hosts.pool import HostPool
from app.store import health as store_health
from app.store.session import Database

logger = logging.getLogger(__name__)

# Each part gets this long; all are checked at once, so /readyz answers within a second.
CHECK_TIMEOUT_SEC = 0.8


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether this replica can serve: each part's state ("ok" or why not)."""

    checks: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return all(state == "ok" for state in self.checks.values())

    @property
    def failed(self) -> list[str]:
        return [name for name, state in self.checks.items() if state != "ok"]


class Health:
    """Checks the store (reachable, migrations current), the bus and the host agents."""

    def __init__(self, *, db: Database, bus: Bus, pool: HostPool, timeout_sec: float = CHECK_TIMEOUT_SEC):
        self._db, self._bus, self._pool, self._timeout = db, bus, pool, timeout_sec
        self._heads: frozenset[str] | None = None

    async def readiness(self) -> Readiness:
        """Each part checked at once, each within the timeout."""
        parts: dict[str, Callable[[], Awaitable[str]]] = {
            "store": self._store,
            "bus": self._bus_state,
            "hosts": self._hosts,
        }
        states = await asyncio.gather(*(self._bounded(check) for check in parts.values()))
        checks = dict(zip(parts, states, strict=True))
        if checks["store"].startswith("migrations"):  # reachable, but not at the code's revision
            checks["migrations"], checks["store"] = checks["store"], "ok"
        else:
            checks["migrations"] = "ok" if checks["store"] == "ok" else "unknown: the store is unreachable"
        return Readiness(checks)

    async def _bounded(self, check: Callable[[], Awaitable[str]]) -> str:
        try:
            async with asyncio.timeout(self._timeout):
                return await check()
        except TimeoutError:
            return f"no answer within {self._timeout:g} s"
        except CapsuleError as exc:
            return str(exc)
        except Exception as exc:  # a readiness probe says what failed; it never fails itself
            logger.debug("readiness check failed", exc_info=True)
            return f"{type(exc).__name__}: {exc}"[:200]

    async def _store(self) -> str:
        current = await store_health.current_revisions(self._db)
        if self._heads is None:
            self._heads = await asyncio.to_thread(store_health.head_revisions)
        if current != self._heads:
            return (
                f"migrations not current: the store is at {sorted(current) or 'no revision'}, "
                f"the code at {sorted(self._heads)}: run `capsule migrate`"
            )
        return "ok"

    async def _bus_state(self) -> str:
        return "ok" if await self._bus.reachable(self._timeout) else "unreachable"

    async def _hosts(self) -> str:
        host_ids = self._pool.host_ids()
        if not host_ids:
            return "no host agent is registered"
        answers = await asyncio.gather(*(self._pool.client(h).answers(self._timeout) for h in host_ids))
        if any(answers):
            return "ok"
        return f"no host agent answers ({', '.join(sorted(host_ids))})"

    async def refresh_gauges(self) -> None:
        """Sets the capsule and process gauges from the store (left as they were when it is down)."""
        try:
            async with asyncio.timeout(self._timeout):
                capsules = await store_health.capsule_counts(self._db)
                processes = await store_health.running_process_counts(self._db)
        except (TimeoutError, CapsuleError):
            return
        metrics.CAPSULES.clear()
        for (host, status), count in capsules.items():
            metrics.CAPSULES.labels(host, status).set(count)
        metrics.PROCESSES_RUNNING.clear()
        for host, count in processes.items():
            metrics.PROCESSES_RUNNING.labels(host).set(count)
