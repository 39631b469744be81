"""The embedded agent's part of a graceful shutdown: its processes end, and so do their records."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from app.services.records import ProcessRecords
from app.store.repositories import SystemRepository
from app.store.session import Database

logger = logging.getLogger(__name__)


async def end_embedded_host(
    *, db: Database, records: ProcessRecords, host_id: str, stop_agent: Callable[[], Awaitable[None]]
) -> None:
    """Stops the in-process agent (every process group killed), then records each process that was
    running on it as ended, so that nothing stays RUNNING in the store once the server has exited.

    Exits the agent published while it stopped were recorded as they happened, by the exit
    recorder (still running now); a process whose exit it did not get is recorded as killed by
    SIGKILL, which is how the agent ended it.
    """
    await stop_agent()
    async with db.session() as session:
        rows = await SystemRepository(session).capsules_to_reconcile(host_id, ())
    ended = 0
    for row in rows:
        capsule = row.to_info()
        running = await records.running(capsule)
        if running:
            await records.reconcile(capsule, running=running, live=(), killed=True)
            ended += len(running)
    logger.info(
        "the embedded agent stopped; %d process record(s) it had not reported ended were recorded as killed",
        ended,
    )
