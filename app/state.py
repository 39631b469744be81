"""AppState: the server's shared parts, opened and closed by the app's lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import app.agent.metrics  # noqa: F401 (the embedded agent's series, on the API server's /metrics)
from app.agent.server import AgentHandle, start_agent
from app.bus.broadcast import Bus
from app.config import Settings, bus_backend_kind
from app.hosts.local import LocalAgent
from app.hosts.pool import HostPool
from app.services.events import EventPruner
from app.services.fanout import OutputFanout
from app.services.feeds import EventFeeds
from app.services.health import Health
from app.services.hosts import HostService
from app.services.keys import KeyService
from app.services.lifecycle import CapsuleLifecycle, ExitRecorder, IdleReaper, Reconciler
from app.services.limits import TeamLimits
from app.services.records import OTHERS_EXIT_DELAY_SEC, ProcessRecords
from app.services.revocations import KeyRevocations
from app.services.shutdown import end_embedded_host
from app.services.team import Platform
from app.store.session import Database

logger = logging.getLogger(__name__)

EMBEDDED_HOST_ID = "local"


@dataclass
class AppState:
    """Everything one API server holds: store, bus, host pool, its agent and background jobs."""

    settings: Settings
    platform: Platform
    agent: AgentHandle | None = None
    health: Health | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[AppState]:
        """Connects everything, starts the embedded agent where no host is configured, runs the jobs."""
        async with AsyncExitStack() as stack:
            db = Database(settings.database_url)
            stack.push_async_callback(db.dispose)
            bus = Bus(settings.bus_url)
            await bus.connect()
            stack.push_async_callback(bus.disconnect)
            configured = dict(settings.hosts)
            agent: AgentHandle | None = None
            if not await HostService(db, configured).hosts():
                # Called in this process alone: no socket, no port, nothing a capsule could reach.
                agent = await start_agent(None, settings)
                stack.push_async_callback(agent.stop)
                configured[EMBEDDED_HOST_ID] = agent.address
                logger.info("started the embedded host agent in this process")
            hosts = HostService(db, configured)
            pool = HostPool(settings)
            stack.push_async_callback(pool.close)
            pool.set_hosts(await hosts.hosts())
            if agent is not None:
                pool.set_local(
                    EMBEDDED_HOST_ID, LocalAgent(agent.servicer, agent.health, lambda: agent.stopped)
                )
            # On a shared bus, replicas may share the store: each leaves the others' exits to them.
            shared = bus_backend_kind(settings.bus_url) != "memory"
            records = ProcessRecords(
                db=db,
                bus=bus,
                retention=settings.event_retention,
                others_exit_delay_sec=OTHERS_EXIT_DELAY_SEC if shared else 0.0,
            )
            stack.push_async_callback(records.close)
            lifecycle = CapsuleLifecycle(db=db, pool=pool, records=records)
            keys = KeyService(db, bus=bus)
            revocations = KeyRevocations(keys=keys, bus=bus, interval_sec=settings.key_recheck_interval_sec)
            platform = Platform(
                settings=settings,
                db=db,
                bus=bus,
                pool=pool,
                hosts=hosts,
                keys=keys,
                revocations=revocations,
                records=records,
                lifecycle=lifecycle,
                fanout=OutputFanout(pool=pool, buffer_bytes=settings.fanout_buffer_bytes),
                feeds=EventFeeds(db=db, bus=bus, poll_sec=settings.events_poll_sec),
                limits=await stack.enter_async_context(TeamLimits.open(settings)),
            )
            stack.push_async_callback(platform.fanout.close)  # its pumps end before the pool closes
            stack.push_async_callback(platform.feeds.close)  # its readers end before the bus and store close
            state = cls(
                settings=settings, platform=platform, agent=agent, health=Health(db=db, bus=bus, pool=pool)
            )
            if agent is not None:  # capsules of a previous run get their place on the new agent back
                await lifecycle.reconcile_host(EMBEDDED_HOST_ID)
            jobs = (
                ExitRecorder(pool=pool, hosts=hosts, records=records, lifecycle=lifecycle),
                Reconciler(hosts=hosts, lifecycle=lifecycle, interval_sec=settings.reconcile_interval_sec),
                IdleReaper(db=db, lifecycle=lifecycle, interval_sec=settings.idle_check_interval_sec),
                EventPruner(db=db, retention=settings.event_retention),
                revocations,
            )
            state.tasks = [asyncio.create_task(job.run(), name=type(job).__name__) for job in jobs]
            stack.push_async_callback(state.stop_jobs)
            if agent is not None:  # first of all at shutdown: the exit recorder still records
                stack.push_async_callback(
                    end_embedded_host, db=db, records=records, host_id=EMBEDDED_HOST_ID, stop_agent=agent.stop
                )
            yield state

    async def stop_jobs(self) -> None:
        """Cancels the background jobs and waits for them to end."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
