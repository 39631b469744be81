"""Each capsule's lifecycle event history in the store: writing an event with the change it reports,
cursors, retention, and the news that tells every replica there is something new to read.

The store is the truth; the bus only says "there is news" (the new seq), so a bus message that is
lost delays an event and never drops it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlmodel.ext.asyncio.session import AsyncSession

from app.bus.broadcast import Bus
from app.bus.events import capsule_events_channel, process_info_from_dict, process_info_to_dict
from app.domain import CapsuleEvent, EventRetention, ProcessEventKind, ProcessInfo, utcnow
from app.errors import BusUnavailable, InvalidRequest
from app.store import models
from app.store.repositories import ProcessEventRepository, SystemRepository
from app.store.session import Database

logger = logging.getLogger(__name__)

NOT_A_CURSOR = "after is not a cursor of this capsule's events: pass the cursor of an event it delivered"
EXPIRED = (
    "the events since that cursor are no longer retained: list the processes for their state now, "
    "then subscribe again without after"
)
# How often each replica drops events past their age, and how many it drops in one statement.
PRUNE_INTERVAL_SEC = 60.0
PRUNE_BATCH = 5000


def encode_cursor(capsule_id: str, seq: int) -> str:
    """The opaque cursor that names one event of a capsule's history."""
    return base64.urlsafe_b64encode(f"{capsule_id}:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str, capsule_id: str) -> int:
    """The seq a cursor of this capsule names; INVALID_REQUEST for garbage or another capsule's."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        owner, _, number = text.rpartition(":")
        seq = int(number)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidRequest(NOT_A_CURSOR) from None
    # A cursor of another capsule is refused in the same words: it says nothing of that capsule.
    if owner != capsule_id or seq < 0 or not number.isdigit():
        raise InvalidRequest(NOT_A_CURSOR)
    return seq


def event_from_row(row: models.ProcessEvent | Any) -> CapsuleEvent:
    """A stored event (its model, or a row of its columns) as the value subscribers get."""
    return CapsuleEvent(
        seq=row.seq,
        kind=row.kind,
        process=process_info_from_dict(row.process),
        at=row.at,
        cursor=encode_cursor(row.capsule_id, row.seq),
    )


def _moment(kind: ProcessEventKind, process: ProcessInfo) -> datetime:
    """When the event happened: the process's own start or end where it is one, else now."""
    if kind is ProcessEventKind.STARTED:
        return process.started_at
    if kind is ProcessEventKind.EXITED and process.ended_at is not None:
        return process.ended_at
    return utcnow()


class EventLog:
    """Appends events to capsules' histories, and announces them once they are committed."""

    def __init__(self, *, bus: Bus, retention: EventRetention) -> None:
        self._bus, self._retention = bus, retention

    async def append(
        self, session: AsyncSession, *, team_id: int, kind: ProcessEventKind, process: ProcessInfo
    ) -> int:
        """Adds the event inside the caller's transaction (the one that writes the change); its seq."""
        return (await self.append_many(session, [(team_id, kind, process)]))[process.capsule_id]

    async def append_many(
        self,
        session: AsyncSession,
        events: Sequence[tuple[int, ProcessEventKind, ProcessInfo]],
        *,
        records: Sequence[models.ProcessRecord] = (),
    ) -> dict[str, int]:
        """Adds (team, kind, process) events inside the caller's transaction, each capsule's in the order
        given; each capsule's last seq. New process records go in first (on PostgreSQL in the same
        statement as the first capsule's events).

        The capsules' rows are locked in the order of their ids, so two transactions that write events
        of the same capsules never wait for each other in a cycle.
        """
        by_capsule: dict[tuple[str, int], list[tuple[ProcessEventKind, datetime, dict[str, Any]]]] = {}
        for team_id, kind, process in events:
            by_capsule.setdefault((process.capsule_id, team_id), []).append(
                (kind, _moment(kind, process), process_info_to_dict(process))
            )
        last: dict[str, int] = {}
        for (capsule_id, team_id), appended in sorted(by_capsule.items()):
            last[capsule_id] = await ProcessEventRepository(session, team_id).append_many(
                capsule_id, appended, keep=self._retention.max_per_capsule, records=records
            )
            records = ()
        return last

    async def announce(self, capsule_id: str, seq: int) -> None:
        """Tells every replica that the capsule's history has grown to seq (after the commit)."""
        try:
            await self._bus.publish(capsule_events_channel(capsule_id), str(seq))
        except BusUnavailable:
            # The event is in the store: subscribers read it on their next poll, or once the bus is back.
            logger.debug(
                "capsule %s: no news of event %s on the bus; subscribers poll for it", capsule_id, seq
            )


class EventPruner:
    """Drops events older than the retention, on every replica (dropping twice drops nothing more)."""

    def __init__(self, *, db: Database, retention: EventRetention) -> None:
        self._db, self._retention = db, retention

    async def run(self) -> None:
        """Prunes every PRUNE_INTERVAL_SEC until cancelled."""
        while True:
            try:
                await self.prune_once()
            except Exception:
                logger.exception("pruning old process events failed")
            await asyncio.sleep(PRUNE_INTERVAL_SEC)

    async def prune_once(self) -> int:
        """Drops every event past its age; how many it dropped."""
        before = utcnow() - timedelta(seconds=self._retention.max_age_sec)
        dropped = 0
        while True:
            async with self._db.transaction() as session:
                count = await SystemRepository(session).prune_events(before, limit=PRUNE_BATCH)
            dropped += count
            if count < PRUNE_BATCH:
                break
        if dropped:
            logger.info("dropped %d process events older than %ss", dropped, self._retention.max_age_sec)
        return dropped
