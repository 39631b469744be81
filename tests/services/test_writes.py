"""Record writes that arrive together share one store transaction (group commit), on SQLite and
PostgreSQL: each event still lands with its record change, once, in its capsule's order without holes;
a write that fails fails alone; two replicas racing for the same exits each record every one once.

The capsules are the store's alone (on a host nothing follows), as in test_records.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import sqlalchemy

from app.domain import (
    CapsuleInfo,
    CapsuleStatus,
    EventRetention,
    ProcessEventKind,
    ProcessInfo,
    ProcessStatus,
    utcnow,
)
from app.services.events import EventLog
from app.services.records import ProcessRecords
from app.services.writes import Batch, RecordWriter
from app.store import models
from app.store.session import Database
from tests.services.conftest import MISSING, Teams

pytestmark = pytest.mark.asyncio(loop_scope="module")

STARTED, EXITED = ProcessEventKind.STARTED, ProcessEventKind.EXITED
# How PostgreSQL's statement that inserts new records with their events begins.
WITH_RECORDS = "WITH INSERTED AS (INSERT INTO PROCESS_RECORD"


def running(capsule: CapsuleInfo, pid: int) -> ProcessInfo:
    return ProcessInfo(
        capsule_id=capsule.id,
        pid=pid,
        tag=f"proc-{secrets.token_hex(4)}",
        cmd="true",
        args=(),
        cwd="",
        status=ProcessStatus.RUNNING,
        started_at=utcnow(),
    )


def ended(info: ProcessInfo, exit_code: int = 0) -> ProcessInfo:
    return replace(info, status=ProcessStatus.EXITED, exit_code=exit_code, ended_at=utcnow())


@contextlib.contextmanager
def statements_seen(platform: Any, seen: Callable[..., None]) -> Iterator[None]:
    """Calls seen(conn, cursor, statement, params, context, executemany) for every statement the
    store's writing engines run within the block."""
    for engine in platform.db.writing_engines:
        sqlalchemy.event.listen(engine, "before_cursor_execute", seen)
    try:
        yield
    finally:
        for engine in platform.db.writing_engines:
            sqlalchemy.event.remove(engine, "before_cursor_execute", seen)


class _Counting(RecordWriter):
    """A writer that remembers the size of each batch it committed (or tried to)."""

    def __init__(self, *, db: Database, events: EventLog) -> None:
        super().__init__(db=db, events=events)
        self.batches: list[int] = []

    async def _apply(self, batch: Any) -> Any:
        self.batches.append(len(batch))
        return await super()._apply(batch)


async def test_starts_and_exits_at_once_share_transactions(teams: Teams) -> None:
    platform = teams.state.platform
    records = ProcessRecords(db=platform.db, bus=platform.bus)
    counting = _Counting(db=platform.db, events=EventLog(bus=platform.bus, retention=EventRetention()))
    records._writer = counting
    capsule = await teams.stored_capsule(CapsuleStatus.RUNNING)
    infos = [running(capsule, pid) for pid in range(1000, 1050)]
    async with teams.events(capsule.id) as events:
        await asyncio.gather(*(records.record_start(teams.ours.team.id, info) for info in infos))
        won = await asyncio.gather(*(records.record_exit(ended(info), team_id=None) for info in infos))
        seen = await events.settled()  # in order, without a hole
    assert all(won)
    assert sorted((e.kind.value, e.process.tag) for e in seen) == sorted(
        (kind.value, info.tag) for info in infos for kind in (STARTED, EXITED)
    )
    # The first write of a quiet moment goes alone; what came meanwhile shares the next transaction.
    assert len(counting.batches) < len(infos), counting.batches
    assert sum(counting.batches) == 2 * len(infos)
    for info in infos:
        record = await teams.record(capsule.id, info.tag)
        assert record is not None and record.status is ProcessStatus.EXITED


async def test_starts_of_one_batch_go_in_as_one_insert_before_the_next_statement(teams: Teams) -> None:
    """New records wait for the batch's next statement and go in together; a write that runs a
    statement of its own (a request's stop, which marks the exit) finds every record added before it."""
    platform = teams.state.platform
    records = ProcessRecords(db=platform.db, bus=platform.bus)
    capsule = await teams.stored_capsule(CapsuleStatus.RUNNING)
    team_id = teams.ours.team.id
    inserts: list[int] = []

    def count(_conn: Any, _cursor: Any, statement: str, params: Any, _context: Any, many: bool) -> None:
        text = statement.lstrip().upper()
        if text.startswith("INSERT INTO PROCESS_RECORD"):
            inserts.append(len(params) if many else 1)
        elif text.startswith(WITH_RECORDS):  # PostgreSQL's, with the events: one array per column
            inserts.append(len(params[0]))

    starts = [running(capsule, pid) for pid in range(2000, 2030)]
    stopped = [running(capsule, pid) for pid in range(3000, 3030)]
    with statements_seen(platform, count):
        async with teams.events(capsule.id) as events:
            await asyncio.gather(*(records.record_start(team_id, info) for info in starts))
            started_together = list(inserts)
            # Each start, then at once its request's exit: the exit's statement needs the record in.
            outcomes = await asyncio.gather(
                *(
                    write
                    for info in stopped
                    for write in (
                        records.record_start(team_id, info),
                        records.record_exit(ended(info, 3), team_id=team_id),
                    )
                )
            )
            seen = await events.settled()
    assert sum(started_together) == len(starts) and len(started_together) < len(starts), started_together
    assert [o for o in outcomes if o is not None] == [True] * len(stopped)  # every exit marked its record
    for info in stopped:
        assert [e.kind for e in seen if e.process.tag == info.tag] == [STARTED, EXITED]
        record = await teams.record(capsule.id, info.tag)
        assert record is not None and (record.status, record.exit_code) == (ProcessStatus.EXITED, 3)
    for info in starts:
        record = await teams.record(capsule.id, info.tag)
        assert record is not None and record.status is ProcessStatus.RUNNING


async def test_a_failing_write_fails_alone(teams: Teams) -> None:
    records = teams.state.platform.records
    capsule = await teams.stored_capsule(CapsuleStatus.RUNNING)
    good = [running(capsule, pid) for pid in (1, 2, 3)]
    # A capsule nobody has: its record cannot be written, and its event has no capsule to count on.
    bad = replace(running(capsule, 4), capsule_id=MISSING)
    async with teams.events(capsule.id) as events:
        outcomes = await asyncio.gather(
            *(records.record_start(teams.ours.team.id, info) for info in (good[0], bad, *good[1:])),
            return_exceptions=True,
        )
        seen = await events.settled()
    assert [isinstance(outcome, Exception) for outcome in outcomes] == [False, True, False, False]
    assert sorted(e.process.tag for e in seen) == sorted(info.tag for info in good)


async def test_an_undone_write_puts_back_what_it_took(teams: Teams) -> None:
    """A rolled-back batch runs its writes' undo steps (a start gives back the early exit it took)."""
    platform = teams.state.platform
    writer = RecordWriter(db=platform.db, events=EventLog(bus=platform.bus, retention=EventRetention()))
    taken: list[str] = ["early exit"]

    async def take_then_fail(batch: Batch) -> None:
        kept = taken.pop()
        batch.on_rollback(lambda: taken.append(kept))
        raise RuntimeError("the write failed")

    with pytest.raises(RuntimeError, match="the write failed"):
        await writer.run(take_then_fail, key=("cap", "tag"))
    assert taken == ["early exit"]


async def test_two_replicas_racing_for_every_exit_record_each_once(teams: Teams) -> None:
    platform = teams.state.platform
    first, second = platform.records, ProcessRecords(db=platform.db, bus=platform.bus)
    capsule = await teams.stored_capsule(CapsuleStatus.RUNNING)
    infos = [running(capsule, pid) for pid in range(2000, 2040)]
    await asyncio.gather(*(first.record_start(teams.ours.team.id, info) for info in infos))
    async with teams.events(capsule.id) as events:
        # Both exit recorders see every exit, in the same order, and queue them without waiting.
        won = await asyncio.gather(
            *(
                replica.record_exit(ended(info, exit_code=index), team_id=None)
                for info in infos
                for index, replica in enumerate((first, second))
            )
        )
        seen = await events.settled()
    assert sum(won) == len(infos)
    assert sorted(e.process.tag for e in seen) == sorted(info.tag for info in infos)
    assert all(e.kind is EXITED for e in seen)


async def test_a_start_whose_exit_came_first_gets_it(teams: Teams) -> None:
    """The exit recorder saw the exit before the start was written, and both are in flight at once."""
    records = teams.state.platform.records
    capsule = await teams.stored_capsule(CapsuleStatus.RUNNING)
    info = running(capsule, 77)
    async with teams.events(capsule.id) as events:
        early = asyncio.ensure_future(records.record_exit(ended(info, exit_code=5), team_id=None))
        await asyncio.sleep(0)  # queued first
        await records.record_start(teams.ours.team.id, info)
        await early
        seen = await events.settled()
    assert [(e.kind, e.process.tag) for e in seen] == [(STARTED, info.tag), (EXITED, info.tag)]
    record = await teams.record(capsule.id, info.tag)
    assert isinstance(record, models.ProcessRecord)
    assert (record.status, record.exit_code) == (ProcessStatus.EXITED, 5)


def _exit_updates() -> tuple[list[int], Callable[..., None]]:
    """How many exits each UPDATE of process records carries, and the listener that counts them
    (for statements_seen)."""
    updates: list[int] = []

    def count(_conn: Any, _cursor: Any, statement: str, params: Any, _context: Any, _many: bool) -> None:
        words = statement.split()
        if words[:2] == ["UPDATE", "process_record"]:
            arrays = [
                value
                for value in (params if isinstance(params, (list, tuple)) else ())
                if isinstance(value, list)
            ]
            updates.append(len(arrays[0]) if arrays else 1)

    return updates, count


async def test_exits_of_one_batch_mark_their_records_together(teams: Teams) -> None:
    """Exits that share a transaction mark their records in one statement on PostgreSQL (one each on
    SQLite, whose writer runs on the loop): each changes its own record once, and one that finds no
    record of its own (none, or another's) changes nothing, whatever its neighbours do."""
    platform = teams.state.platform
    records = ProcessRecords(db=platform.db, bus=platform.bus)
    capsule = await teams.stored_capsule(CapsuleStatus.RUNNING)
    infos = [running(capsule, pid) for pid in range(4000, 4030)]
    await asyncio.gather(*(records.record_start(teams.ours.team.id, info) for info in infos))
    stranger = running(capsule, 4999)  # never recorded
    others = teams.theirs.team.id  # a request of another team cannot mark this team's records
    updates, count = _exit_updates()
    with statements_seen(platform, count):
        async with teams.events(capsule.id) as events:
            won = await asyncio.gather(
                *(
                    records.record_exit(ended(info, exit_code=n), team_id=None)
                    for n, info in enumerate(infos)
                ),
                records.record_exit(ended(stranger), team_id=teams.ours.team.id),
                records.record_exit(ended(infos[0], exit_code=99), team_id=others),
            )
            seen = await events.settled()
    assert won == [True] * len(infos) + [False, False]
    assert sorted(e.process.tag for e in seen if e.kind is EXITED) == sorted(info.tag for info in infos)
    if platform.db.dialect == "postgresql":
        assert max(updates) > 1 and sum(updates) == len(infos) + 2, updates
    for n, info in enumerate(infos):
        record = await teams.record(capsule.id, info.tag)
        assert record is not None
        assert (record.status, record.exit_code, record.pid) == (ProcessStatus.EXITED, n, info.pid)
        assert record.ended_at is not None and record.ended_at.tzinfo is not None


async def test_two_exits_of_one_process_in_one_batch_mark_it_once(teams: Teams) -> None:
    """A request's stop and the host's exit of the same process, at once: one of them wins."""
    platform = teams.state.platform
    records = ProcessRecords(db=platform.db, bus=platform.bus)
    capsule = await teams.stored_capsule(CapsuleStatus.RUNNING)
    infos = [running(capsule, pid) for pid in range(5000, 5010)]
    await asyncio.gather(*(records.record_start(teams.ours.team.id, info) for info in infos))
    async with teams.events(capsule.id) as events:
        won = await asyncio.gather(
            *(
                write
                for info in infos
                for write in (
                    records.record_exit(ended(info, 1), team_id=teams.ours.team.id),
                    records.record_exit(ended(info, 2), team_id=None),
                )
            )
        )
        seen = await events.settled()
    assert [won[i] + won[i + 1] for i in range(0, len(won), 2)] == [1] * len(infos)
    assert sorted(e.process.tag for e in seen if e.kind is EXITED) == sorted(info.tag for info in infos)


async def test_new_records_wait_for_the_events_past_exits_of_other_processes(teams: Teams) -> None:
    """A batch of starts and of exits of processes recorded before: the exits' UPDATE runs first,
    and the new records go in with the events (on PostgreSQL in one statement with them); a start
    and the exit of that same process in one batch still go in one after the other."""
    platform = teams.state.platform
    records = ProcessRecords(db=platform.db, bus=platform.bus)
    capsule = await teams.stored_capsule(CapsuleStatus.RUNNING)
    team_id = teams.ours.team.id
    earlier = [running(capsule, pid) for pid in range(6000, 6020)]
    await asyncio.gather(*(records.record_start(team_id, info) for info in earlier))
    starts = [running(capsule, pid) for pid in range(7000, 7020)]
    starts[0] = replace(starts[0], args=("-c", "echo 'a b' \"c\""), cwd="/work/sub dir")
    stopped = running(capsule, 7999)
    statements: list[str] = []

    def seen_statement(_c: Any, _k: Any, statement: str, _p: Any, _x: Any, _many: bool) -> None:
        statements.append(statement.lstrip().upper())

    with statements_seen(platform, seen_statement):
        async with teams.events(capsule.id) as events:
            won = await asyncio.gather(
                *(records.record_start(team_id, info) for info in starts),
                *(records.record_exit(ended(info, 4), team_id=team_id) for info in earlier),
                records.record_start(team_id, stopped),
                records.record_exit(ended(stopped, 6), team_id=team_id),
            )
            seen = await events.settled()
    assert won[len(starts) :] == [True] * len(earlier) + [None, True]
    for info in (*starts, *earlier, stopped):
        kinds = [e.kind for e in seen if e.process.tag == info.tag]
        assert kinds == ([STARTED] if info in starts else [EXITED] if info in earlier else [STARTED, EXITED])
    for info in starts:
        record = await teams.record(capsule.id, info.tag)
        assert record is not None and record.status is ProcessStatus.RUNNING
        assert (record.pid, record.args, record.cwd) == (info.pid, list(info.args), info.cwd or None)
        assert record.started_at == info.started_at and record.ended_at is None
    for info, code in [*((info, 4) for info in earlier), (stopped, 6)]:
        record = await teams.record(capsule.id, info.tag)
        assert record is not None and (record.status, record.exit_code) == (ProcessStatus.EXITED, code)
    if platform.db.dialect == "postgresql":
        # Records went in with the events, but the one an exit of its batch needed first.
        alone = [s for s in statements if s.startswith("INSERT INTO PROCESS_RECORD")]
        together = [s for s in statements if s.startswith(WITH_RECORDS)]
        assert together and len(alone) <= 1, "\n".join(s[:50] for s in statements)


async def test_starts_in_two_capsules_in_one_batch_each_get_their_record_and_events(teams: Teams) -> None:
    """The batch's new records go in with the first capsule's events (on PostgreSQL); the records of
    the other capsule are among them, and each capsule counts only its own events."""
    records = ProcessRecords(db=teams.state.platform.db, bus=teams.state.platform.bus)
    capsules = [await teams.stored_capsule(CapsuleStatus.RUNNING) for _ in range(2)]
    infos = {capsule.id: [running(capsule, pid) for pid in range(8000, 8010)] for capsule in capsules}
    async with teams.events(capsules[0].id) as first, teams.events(capsules[1].id) as second:
        await asyncio.gather(
            *(
                records.record_start(teams.ours.team.id, info)
                for started in zip(*infos.values(), strict=True)
                for info in started
            )
        )
        seen = {capsules[0].id: await first.settled(), capsules[1].id: await second.settled()}
    for capsule in capsules:
        # (a batch goes in sorted by process: events of starts that came together need not keep their order)
        assert sorted(e.process.tag for e in seen[capsule.id]) == sorted(
            info.tag for info in infos[capsule.id]
        )
        for info in infos[capsule.id]:
            record = await teams.record(capsule.id, info.tag)
            assert record is not None and (record.pid, record.status) == (info.pid, ProcessStatus.RUNNING)
