"""Group commit of process records: the writes that arrive while one store transaction runs share
the next one, with their events.

Each write is a function of the batch it runs in: its own statements on the batch's session, the
events it reports through Batch.event, which are added together once every write of the batch ran
(per capsule: one statement on PostgreSQL, a seq update and an insert on SQLite), and the new
records it adds through Batch.add_record, which go in together before the next write that runs a
statement of its own (exits: before those about the same processes), or else with the events (on
PostgreSQL in their statement). Writes run one after another, in the order they came (stable-sorted by
process, so two replicas' batches lock the same records in the same order), so a write never sees
another's half done. Nothing waits to fill a batch: the first write of a quiet moment commits at
once, alone.

A batch that fails is tried again one write at a time, so that one bad write fails alone; the
undo callbacks of a rolled-back attempt restore what its writes changed outside the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlmodel.ext.asyncio.session import AsyncSession

from app.domain import ProcessEventKind, ProcessInfo
from app.errors import Unavailable
from app.services.events import EventLog
from app.store import models
from app.store.repositories import ProcessExitRecord, insert_records, mark_exited_many
from app.store.session import Database

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Writes one transaction holds at most.
MAX_BATCH = 256


class Batch:
    """One transaction's session, and what its writes report: events, new records, and how to undo
    side effects."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.events: list[tuple[int, ProcessEventKind, ProcessInfo]] = []
        self.undo: list[Callable[[], object]] = []
        self._records: list[models.ProcessRecord] = []

    def add_record(self, record: models.ProcessRecord) -> None:
        """Inserts a new process record before the batch's next statement that may read it, or with
        its events: those that several writes add one after another go in as one statement."""
        self._records.append(record)

    async def insert_records(self) -> None:
        """Inserts the records added since the last statement."""
        if self._records:
            await insert_records(self.session, self.take_records())

    async def insert_records_of(self, keys: Collection[tuple[str, str]]) -> None:
        """Inserts the records added since the last statement that are of these processes (capsule,
        tag); the others wait on."""
        of = [record for record in self._records if (record.capsule_id, record.tag) in keys]
        if of:
            self._records = [
                record for record in self._records if (record.capsule_id, record.tag) not in keys
            ]
            await insert_records(self.session, of)

    def take_records(self) -> list[models.ProcessRecord]:
        """The records added since the last statement, for a statement that inserts them."""
        records, self._records = self._records, []
        return records

    def event(self, team_id: int, kind: ProcessEventKind, process: ProcessInfo) -> None:
        """Adds the event to the batch's transaction, after the events reported before it."""
        self.events.append((team_id, kind, process))

    def on_rollback(self, undo: Callable[[], object]) -> None:
        """Runs undo if the transaction is rolled back (for what a write changed outside the store)."""
        self.undo.append(undo)


# What follows an exit's UPDATE: given the batch and the record it changed (None: none matched).
AfterExit = Callable[[Batch, models.ProcessRecord | None], Awaitable[T]]


@dataclass(eq=False)
class _Pending(Generic[T]):
    write: Callable[[Batch], Awaitable[T]]
    key: tuple[str, str]
    adds_only: bool  # runs no statement of its own: only Batch.add_record and Batch.event
    # An exit's write: its conditional UPDATE (with its team, or None), then `write`'s part, run by
    # _Exits with those of its neighbours.
    exit: tuple[ProcessExitRecord, int | None] | None = None
    after_exit: AfterExit[T] | None = None
    done: asyncio.Future[T] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


async def _no_write(_batch: Batch) -> Any:
    raise AssertionError("an exit's write runs through _Exits")


class _Exits:
    """The exit writes of a batch that run together: one UPDATE for all of them (see
    mark_exited_many), then each one's own part, in the batch's order. They run before any write
    that comes after them and runs a statement, or that writes about the same process."""

    def __init__(self, context: Batch, results: list[Any]) -> None:
        self._context, self._results = context, results
        self._waiting: list[tuple[int, _Pending[Any]]] = []

    def must_run_before(self, pending: _Pending[Any]) -> bool:
        if not self._waiting:
            return False
        if self._waiting[-1][1].key == pending.key:  # the same process (a batch is sorted by process)
            return True
        return pending.exit is None and not pending.adds_only

    def add(self, index: int, pending: _Pending[Any]) -> None:
        self._waiting.append((index, pending))

    async def run(self) -> None:
        if not self._waiting:
            return
        waiting, self._waiting = self._waiting, []
        exits = [pending.exit for _, pending in waiting if pending.exit is not None]
        # What the writes before them added of the same processes goes in first, for their UPDATE
        # (and what follows it); the rest later, with the events.
        await self._context.insert_records_of({(exit.capsule_id, exit.tag) for exit, _ in exits})
        records = await mark_exited_many(self._context.session, exits)
        for (index, pending), record in zip(waiting, records, strict=True):
            assert pending.after_exit is not None
            self._results[index] = await pending.after_exit(self._context, record)


class RecordWriter:
    """Runs record writes in shared transactions, one transaction at a time, and announces their
    events once committed."""

    def __init__(self, *, db: Database, events: EventLog, max_batch: int = MAX_BATCH) -> None:
        self._db, self._events, self._max_batch = db, events, max_batch
        self._queue: list[_Pending[Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._announcing: set[asyncio.Task[None]] = set()

    async def run(
        self, write: Callable[[Batch], Awaitable[T]], *, key: tuple[str, str], adds_only: bool = False
    ) -> T:
        """Runs write in the next transaction; its result once that has committed and its events
        are announced. key names the process it writes about (capsule, tag); adds_only says that
        write runs no statement itself (what it adds then goes in with its neighbours')."""
        return await self._enqueue(_Pending(write, key, adds_only))

    async def run_exit(
        self,
        exit: ProcessExitRecord,
        *,
        team_id: int | None,
        then: AfterExit[T],
    ) -> T:
        """Marks the process's RUNNING record EXITED (of the team, when given) in the next
        transaction, with the other exits of that transaction in one statement, then runs
        then(batch, the record it changed or None) in the same transaction; then's result, once
        that has committed and its events are announced."""
        key = (exit.capsule_id, exit.tag)
        pending: _Pending[T] = _Pending(_no_write, key, False, exit=(exit, team_id), after_exit=then)
        return await self._enqueue(pending)

    async def _enqueue(self, pending: _Pending[T]) -> T:
        self._queue.append(pending)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="process-record-writes")
        # A caller that gives up leaves the write to finish: it may be what a host did already.
        return await asyncio.shield(pending.done)

    async def _drain(self) -> None:
        while self._queue:
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            batch.sort(key=lambda pending: pending.key)  # stable: one process's writes keep their order
            try:
                await self._commit(batch)
            except asyncio.CancelledError:  # at shutdown: nobody is left waiting forever
                for pending in batch + self._queue:
                    _settle(pending, exc=Unavailable("the server is shutting down; retry"))
                self._queue.clear()
                raise

    async def _commit(self, batch: list[_Pending[Any]]) -> None:
        try:
            results, last = await self._apply(batch)
        except Exception as exc:
            if len(batch) > 1 and not isinstance(exc, Unavailable):
                logger.info("a batch of %d record writes failed (%s): one by one now", len(batch), exc)
                for pending in batch:
                    await self._commit([pending])
                return
            for pending in batch:
                _settle(pending, exc=exc)
            return
        # The next transaction need not wait for the bus: it begins while this one's news goes out.
        task = asyncio.create_task(self._announce(batch, results, last), name="process-record-news")
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    async def _announce(self, batch: list[_Pending[Any]], results: list[Any], last: dict[str, int]) -> None:
        """Tells every replica of a committed batch's events, then gives each write its result."""
        try:
            await asyncio.gather(*(self._events.announce(capsule, seq) for capsule, seq in last.items()))
        except Exception:  # committed all the same: subscribers find the events on their next poll
            logger.exception("announcing %d capsules' events failed", len(last))
        finally:
            for pending, result in zip(batch, results, strict=True):
                _settle(pending, result=result)

    async def _apply(self, batch: list[_Pending[Any]]) -> tuple[list[Any], dict[str, int]]:
        undo: list[Callable[[], object]] = []
        try:
            async with self._db.write_transaction() as session:
                context = Batch(session)
                undo = context.undo
                results: list[Any] = [None] * len(batch)
                exits = _Exits(context, results)
                for index, pending in enumerate(batch):
                    if exits.must_run_before(pending):
                        await exits.run()
                    if pending.exit is not None:
                        exits.add(index, pending)
                        continue
                    if not pending.adds_only:  # what the writes before it added is in the store for it
                        await context.insert_records()
                    results[index] = await pending.write(context)
                await exits.run()
                last: dict[str, int] = {}
                if context.events:  # with the records still to go in (one statement on PostgreSQL)
                    records = context.take_records()
                    last = await self._events.append_many(session, context.events, records=records)
                await context.insert_records()
        except BaseException:
            for step in reversed(undo):
                step()
            raise
        return results, last


def _settle(pending: _Pending[Any], *, result: Any = None, exc: BaseException | None = None) -> None:
    if pending.done.done():
        return
    if exc is not None:
        pending.done.set_exception(exc)
    else:
        pending.done.set_result(result)
