"""Repositories: team-scoped ones for capsules and process records, global ones for the rest.

Repositories flush; the service that opened the session commits (Database.transaction()).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import col, func, select, update
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import SelectOfScalar

from app.domain import (
    ACTIVE_CAPSULE_STATUSES,
    CapsuleInfo,
    CapsuleRuntime,
    CapsuleStatus,
    ProcessEventKind,
    ProcessStatus,
    as_utc,
    utcnow,
)
from app.store import models
from app.store.session import Database

M = TypeVar("M", models.Capsule, models.ProcessRecord, models.ProcessEvent)


async def _add(session: AsyncSession, row: Any) -> Any:
    session.add(row)
    await session.flush()
    return row


class TeamScoped(Generic[M]):
    """A repository that can only see one team's rows."""

    model: type[M]

    def __init__(self, session: AsyncSession, team_id: int) -> None:
        self._session, self._team_id = session, team_id

    def _select(self) -> SelectOfScalar[M]:
        # Every query of a subclass starts here, so no query can reach another team's rows.
        return select(self.model).where(col(self.model.team_id) == self._team_id)

    async def lock_team(self) -> None:
        """Holds the team's row until the transaction ends, so that count-then-add stays within a limit.

        A write that changes nothing: PostgreSQL locks the row, SQLite takes its one write lock.
        """
        team = models.Team
        await self._session.exec(update(team).where(col(team.id) == self._team_id).values(name=team.name))

    async def add(self, row: M) -> M:
        """Adds a row of this team (its team_id must be this team's) and flushes."""
        if row.team_id != self._team_id:
            raise ValueError(f"row of team {row.team_id} added through team {self._team_id}'s repository")
        added: M = await _add(self._session, row)
        return added


# Built once: every request looks its capsule up, and building the statement cost more than running it.
_CAPSULE_OF_TEAM = select(models.Capsule).where(
    col(models.Capsule.team_id) == sa.bindparam("team_id"),
    col(models.Capsule.id) == sa.bindparam("capsule_id"),
)
_CAPSULE_ROW_OF_TEAM = sa.select(*models.Capsule.__table__.columns).where(  # type: ignore[attr-defined]
    col(models.Capsule.team_id) == sa.bindparam("team_id"),
    col(models.Capsule.id) == sa.bindparam("capsule_id"),
)


async def capsule_of_team(db: Database, team_id: int, capsule_id: str) -> CapsuleInfo | None:
    """The team's capsule as it is in the store now, read outside any session: a request's lookup."""
    row = await db.point_read(_CAPSULE_ROW_OF_TEAM, {"team_id": team_id, "capsule_id": capsule_id})
    return None if row is None else models.capsule_info(row)


_EVENT = models.ProcessEvent
# Built once, as the capsule lookup: each replica's feed runs it on every piece of news.
_EVENTS_AFTER = (
    sa.select(*_EVENT.__table__.columns)  # type: ignore[attr-defined]
    .where(
        col(_EVENT.team_id) == sa.bindparam("team_id"),
        col(_EVENT.capsule_id) == sa.bindparam("capsule_id"),
        col(_EVENT.seq) > sa.bindparam("seq"),
    )
    .order_by(col(_EVENT.seq))
    .limit(sa.bindparam("limit"))
)


async def events_after(db: Database, team_id: int, capsule_id: str, seq: int, *, limit: int) -> Sequence[Any]:
    """The team's capsule's events past seq, oldest first, at most limit of them, read outside any
    session (rows with the event's columns): a feed's read."""
    params = {"team_id": team_id, "capsule_id": capsule_id, "seq": seq, "limit": limit}
    return await db.short_read(_EVENTS_AFTER, params)


class CapsuleRepository(TeamScoped[models.Capsule]):
    """One team's capsules."""

    model = models.Capsule

    async def get(self, capsule_id: str) -> models.Capsule | None:
        """The team's capsule, or None (another team's capsule is None too)."""
        params = {"team_id": self._team_id, "capsule_id": capsule_id}
        return (await self._session.exec(_CAPSULE_OF_TEAM, params=params)).one_or_none()

    async def list(self) -> Sequence[models.Capsule]:
        """The team's capsules, newest first."""
        statement = self._select().order_by(
            col(models.Capsule.created_at).desc(), col(models.Capsule.id).desc()
        )
        return (await self._session.exec(statement)).all()

    async def count_active(self) -> int:
        """How many of the team's capsules are starting or running."""
        statement = self._select().where(col(models.Capsule.status).in_(ACTIVE_CAPSULE_STATUSES))
        count = select(func.count()).select_from(statement.subquery())
        return int((await self._session.exec(count)).one())

    async def set_status(
        self,
        capsule_id: str,
        status: CapsuleStatus,
        *,
        only_from: Collection[CapsuleStatus] | None = None,
        runtime: CapsuleRuntime | None = None,
    ) -> models.Capsule | None:
        """Sets the status (only from one of only_from, when given) and the runtime its host reported
        (when given); the row, or None if unchanged."""
        capsule = models.Capsule
        statement = update(capsule).where(
            col(capsule.team_id) == self._team_id, col(capsule.id) == capsule_id
        )
        if only_from is not None:
            statement = statement.where(col(capsule.status).in_(only_from))
        values: dict[str, Any] = {"status": status}
        if runtime is not None:
            values["runtime"] = runtime
        result = await self._session.exec(
            statement.values(**values).returning(capsule), execution_options={"populate_existing": True}
        )
        changed: models.Capsule | None = result.scalars().one_or_none()
        return changed

    async def touch(self, capsule_id: str, now: datetime) -> bool:
        """Moves the capsule's last_active_at forward to now (never back); True when it moved."""
        capsule = models.Capsule
        statement = (
            update(capsule)
            .where(
                col(capsule.team_id) == self._team_id,
                col(capsule.id) == capsule_id,
                col(capsule.last_active_at) < now,
            )
            .values(last_active_at=now)
        )
        return bool((await self._session.exec(statement)).rowcount)


class ProcessRecordRepository(TeamScoped[models.ProcessRecord]):
    """One team's process records."""

    model = models.ProcessRecord

    async def record_exit(self, exit: ProcessExitRecord) -> models.ProcessRecord | None:
        """Marks the team's RUNNING record EXITED; the record for the caller that changed it, else None."""
        return await _mark_exited(self._session, exit, self._team_id)

    async def running(self, capsule_id: str) -> Sequence[models.ProcessRecord]:
        """The capsule's RUNNING records, oldest first."""
        statement = self._select().where(
            col(models.ProcessRecord.capsule_id) == capsule_id,
            col(models.ProcessRecord.status) == ProcessStatus.RUNNING,
        )
        return (await self._session.exec(statement.order_by(col(models.ProcessRecord.id)))).all()

    def _newest_first(self, capsule_id: str) -> SelectOfScalar[models.ProcessRecord]:
        return (
            self._select()
            .where(col(models.ProcessRecord.capsule_id) == capsule_id)
            .order_by(col(models.ProcessRecord.started_at).desc(), col(models.ProcessRecord.id).desc())
        )

    async def list(
        self, capsule_id: str, status: ProcessStatus | None = None
    ) -> Sequence[models.ProcessRecord]:
        """The capsule's records: RUNNING ones first, then newest first; only `status` when given."""
        running_first = sa.case((col(models.ProcessRecord.status) == ProcessStatus.RUNNING, 0), else_=1)
        statement = self._newest_first(capsule_id)
        if status is not None:
            statement = statement.where(col(models.ProcessRecord.status) == status)
        # order_by appends, so put the RUNNING key in front of the newest-first keys.
        statement = statement.order_by(None).order_by(
            running_first, col(models.ProcessRecord.started_at).desc(), col(models.ProcessRecord.id).desc()
        )
        return (await self._session.exec(statement)).all()

    async def get_by_pid(self, capsule_id: str, pid: int) -> models.ProcessRecord | None:
        """The newest record of this PID in the capsule (PIDs are reused), or None."""
        statement = self._newest_first(capsule_id).where(col(models.ProcessRecord.pid) == pid).limit(1)
        return (await self._session.exec(statement)).first()

    async def get_by_tag(self, capsule_id: str, tag: str) -> models.ProcessRecord | None:
        """The newest record with this tag in the capsule, or None."""
        statement = self._newest_first(capsule_id).where(col(models.ProcessRecord.tag) == tag).limit(1)
        return (await self._session.exec(statement)).first()


_RECORDS_TABLE: sa.Table = models.ProcessRecord.__table__  # type: ignore[attr-defined]
_INSERT_RECORD = _RECORDS_TABLE.insert()
_RECORD_COLUMNS = tuple(column.name for column in _RECORDS_TABLE.columns if column.name != "id")

_POSTGRESQL: sa.Dialect = postgresql.dialect()  # type: ignore[no-untyped-call]


def _array_of(column: sa.Column[Any]) -> str:
    """The PostgreSQL array type of a column's values."""
    return f"{column.type.compile(dialect=_POSTGRESQL)}[]"


async def insert_records(session: AsyncSession, records: Sequence[models.ProcessRecord]) -> None:
    """Inserts new process records as they are, in one table statement: the ORM's unit of work (a
    flush per record, an identity, a RETURNING of the id nobody reads) cost a start more than the
    insert itself. The records stay outside the session; their ids stay None."""
    rows = [{name: getattr(record, name) for name in _RECORD_COLUMNS} for record in records]
    await session.exec(_INSERT_RECORD, params=rows)


# The event log's statements on the tables themselves, built once: each batch of events runs them, and
# through the ORM (a model's update or insert) every run paid for its bulk-persistence machinery.
_CAPSULES_TABLE: sa.Table = models.Capsule.__table__  # type: ignore[attr-defined]
_EVENTS_TABLE: sa.Table = models.ProcessEvent.__table__  # type: ignore[attr-defined]
_INSERT_EVENTS = _EVENTS_TABLE.insert()
_COUNT_EVENTS = (
    sa.update(_CAPSULES_TABLE)
    .where(
        _CAPSULES_TABLE.c.team_id == sa.bindparam("of_team"),
        _CAPSULES_TABLE.c.id == sa.bindparam("of_capsule"),
    )
    .values(last_event_seq=_CAPSULES_TABLE.c.last_event_seq + sa.bindparam("count"))
    .returning(_CAPSULES_TABLE.c.last_event_seq)
)
_DROP_EVENTS = sa.delete(_EVENTS_TABLE).where(
    _EVENTS_TABLE.c.capsule_id == sa.bindparam("of_capsule"), _EVENTS_TABLE.c.seq <= sa.bindparam("through")
)

# On PostgreSQL, _COUNT_EVENTS and the insert of the events in one statement: the events come in as
# one array per column (their place among them, kind, moment, process as JSON text), and take the
# seqs that end at the counter's new value; the statement returns that value, as _COUNT_EVENTS does
# (no row: no such capsule of the team, and nothing is inserted).
_COUNT_AND_INSERT_EVENTS_SQL = (
    "counted AS (UPDATE capsule SET last_event_seq = last_event_seq + CAST(:count AS integer) "
    "WHERE team_id = CAST(:of_team AS integer) AND id = CAST(:of_capsule AS text) "
    "RETURNING last_event_seq), "
    "added AS (INSERT INTO process_event (capsule_id, seq, team_id, kind, at, process) "
    "SELECT CAST(:of_capsule AS text), counted.last_event_seq - CAST(:count AS integer) + x.n, "
    "CAST(:of_team AS integer), x.kind, x.at, "
    "CAST(x.process AS json) FROM counted, unnest(CAST(:x_n AS integer[]), CAST(:x_kind AS text[]), "
    "CAST(:x_at AS timestamptz[]), CAST(:x_process AS text[])) AS x(n, kind, at, process)) "
    "SELECT last_event_seq FROM counted"
)


def _insert_records_sql() -> str:
    """A data-modifying CTE that inserts process records given as one array per column (r_<column>,
    each of the column's type; JSON as text)."""
    columns = [_RECORDS_TABLE.c[name] for name in _RECORD_COLUMNS]
    as_json = {column.name for column in columns if isinstance(column.type, sa.JSON)}
    arrays = ", ".join(
        f"CAST(:r_{column.name} AS {'text[]' if column.name in as_json else _array_of(column)})"
        for column in columns
    )
    names = ", ".join(_RECORD_COLUMNS)
    values = ", ".join(
        f"CAST(r.{name} AS json)" if name in as_json else f"r.{name}" for name in _RECORD_COLUMNS
    )
    return (
        f"inserted AS (INSERT INTO {_RECORDS_TABLE.name} ({names}) "
        f"SELECT {values} FROM unnest({arrays}) AS r({names}))"
    )


_LAST_EVENT_SEQ = sa.column("last_event_seq", sa.BigInteger)
_COUNT_AND_INSERT_EVENTS: Any = sa.text(f"WITH {_COUNT_AND_INSERT_EVENTS_SQL}").columns(_LAST_EVENT_SEQ)
# The same, with the insert of new process records (which goes in whether or not the capsule is
# found: the caller's transaction is rolled back when it is not).
_INSERT_RECORDS_COUNT_AND_INSERT_EVENTS: Any = sa.text(
    f"WITH {_insert_records_sql()}, {_COUNT_AND_INSERT_EVENTS_SQL}"
).columns(_LAST_EVENT_SEQ)


def _record_arrays(session: AsyncSession, records: Sequence[models.ProcessRecord]) -> dict[str, list[Any]]:
    """The records as _insert_records_sql's arrays: each column's values as SQLAlchemy binds them."""
    dialect = session.get_bind().dialect
    arrays: dict[str, list[Any]] = {}
    for name in _RECORD_COLUMNS:
        bind = _RECORDS_TABLE.c[name].type._cached_bind_processor(dialect)
        values = [getattr(record, name) for record in records]
        arrays[f"r_{name}"] = values if bind is None else [None if v is None else bind(v) for v in values]
    return arrays


class ProcessEventRepository(TeamScoped[models.ProcessEvent]):
    """One team's process events, each capsule's in the order of their seqs."""

    model = models.ProcessEvent

    async def append_many(
        self,
        capsule_id: str,
        events: Sequence[tuple[ProcessEventKind, datetime, dict[str, Any]]],
        *,
        keep: int,
        records: Sequence[models.ProcessRecord] = (),
    ) -> int:
        """Adds the capsule's next events, in order, and drops those more than keep behind the last;
        returns the last one's seq. New process records (of any capsule) go in first, on PostgreSQL
        in the same statement as the events.

        The seqs come from the capsule's row (one counter update for all of them), which stays locked
        until the transaction ends: events of one capsule commit in the order of their seqs, so a
        reader that has seen seq n has seen every seq below it (an autoincrement id would let a later
        commit land below a seen one).
        """
        params: dict[str, Any] = {"of_team": self._team_id, "of_capsule": capsule_id, "count": len(events)}
        if self._session.get_bind().dialect.name == "postgresql":
            # The counter's update and the inserts in one statement: a round trip or two less per batch.
            statement = _COUNT_AND_INSERT_EVENTS
            if records:
                statement = _INSERT_RECORDS_COUNT_AND_INSERT_EVENTS
                params.update(_record_arrays(self._session, records))
            params.update(
                x_n=list(range(1, len(events) + 1)),
                x_kind=[kind.name for kind, _, _ in events],
                x_at=[as_utc(at) for _, at, _ in events],
                x_process=[json.dumps(process) for _, _, process in events],
            )
            last = (await self._session.exec(statement, params=params)).scalar_one_or_none()
            if last is None:
                raise LookupError(f"no capsule {capsule_id} of team {self._team_id} for its events")
            await self._drop_past(capsule_id, int(last), keep)
            return int(last)
        if records:
            await insert_records(self._session, records)
        counted = await self._session.exec(_COUNT_EVENTS, params=params)
        last = counted.scalar_one_or_none()
        if last is None:
            raise LookupError(f"no capsule {capsule_id} of team {self._team_id} for its events")
        first = int(last) - len(events) + 1
        rows = [
            {
                "capsule_id": capsule_id,
                "seq": first + index,
                "team_id": self._team_id,
                "kind": kind,
                "at": at,
                "process": process,
            }
            for index, (kind, at, process) in enumerate(events)
        ]
        await self._session.exec(_INSERT_EVENTS, params=rows)
        await self._drop_past(capsule_id, int(last), keep)
        return int(last)

    async def _drop_past(self, capsule_id: str, last: int, keep: int) -> None:
        if last > keep:
            await self._session.exec(_DROP_EVENTS, params={"of_capsule": capsule_id, "through": last - keep})

    async def bounds(self, capsule_id: str) -> tuple[int, int | None]:
        """The capsule's newest seq (0 before its first event) and its oldest retained one (or None)."""
        capsule, event = models.Capsule, models.ProcessEvent
        oldest = (
            select(func.min(event.seq))
            .where(col(event.team_id) == self._team_id, col(event.capsule_id) == capsule_id)
            .scalar_subquery()
        )
        statement = select(capsule.last_event_seq, oldest).where(
            col(capsule.team_id) == self._team_id, col(capsule.id) == capsule_id
        )
        row = (await self._session.exec(statement)).one_or_none()
        if row is None:
            raise LookupError(f"no capsule {capsule_id} of team {self._team_id}")
        return int(row[0]), None if row[1] is None else int(row[1])


class TeamRepository:
    """Teams, for authentication and key management (not team-scoped)."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def get(self, team_id: int) -> models.Team | None:
        """The team with this id, or None."""
        return await self._session.get(models.Team, team_id)

    async def get_by_name(self, name: str) -> models.Team | None:
        """The team with this name, or None."""
        statement = select(models.Team).where(col(models.Team.name) == name)
        return (await self._session.exec(statement)).one_or_none()

    async def add(self, team: models.Team) -> models.Team:
        """Adds a team and flushes, which gives it its id (a duplicate name raises IntegrityError)."""
        added: models.Team = await _add(self._session, team)
        return added


class ApiKeyRepository:
    """API keys by id, prefix or hash (not team-scoped: the key is what finds the team)."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def get(self, key_id: int) -> models.ApiKey | None:
        """The key with this id, revoked or not, or None."""
        return await self._session.get(models.ApiKey, key_id)

    async def get_by_hash(self, key_hash: str) -> models.ApiKey | None:
        """The key with this sha256 hex digest, revoked or not, or None."""
        statement = select(models.ApiKey).where(col(models.ApiKey.key_hash) == key_hash)
        return (await self._session.exec(statement)).one_or_none()

    async def unrevoked_by_prefix(self, prefix: str) -> Sequence[tuple[models.ApiKey, models.Team]]:
        """The unrevoked keys with this prefix and their teams, in one indexed query.

        The caller compares each hash itself, in constant time: the query never sees a secret.
        """
        statement = (
            select(models.ApiKey, models.Team)
            .join(models.Team, col(models.ApiKey.team_id) == col(models.Team.id))
            .where(col(models.ApiKey.prefix) == prefix, col(models.ApiKey.revoked_at).is_(None))
        )
        return (await self._session.exec(statement)).all()

    async def list_for_team(self, team_id: int) -> Sequence[models.ApiKey]:
        """The team's keys, revoked ones too, oldest first."""
        statement = select(models.ApiKey).where(col(models.ApiKey.team_id) == team_id)
        return (await self._session.exec(statement.order_by(col(models.ApiKey.id)))).all()

    async def revoked_among(self, key_ids: Collection[int]) -> set[int]:
        """Which of these key ids are revoked, in one query on the primary key."""
        if not key_ids:
            return set()
        statement = select(models.ApiKey.id).where(
            col(models.ApiKey.id).in_(list(key_ids)), col(models.ApiKey.revoked_at).is_not(None)
        )
        return {key_id for key_id in (await self._session.exec(statement)).all() if key_id is not None}

    async def add(self, key: models.ApiKey) -> models.ApiKey:
        """Adds a key and flushes."""
        added: models.ApiKey = await _add(self._session, key)
        return added

    async def revoke(self, key_id: int, now: datetime) -> bool:
        """Revokes the key with this id; False when there is none or it was revoked already."""
        statement = (
            update(models.ApiKey)
            .where(col(models.ApiKey.id) == key_id, col(models.ApiKey.revoked_at).is_(None))
            .values(revoked_at=now)
        )
        return bool((await self._session.exec(statement)).rowcount)


class HostRepository:
    """Registered host agents (not team-scoped)."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def list(self) -> Sequence[models.Host]:
        """Every registered host, by id."""
        return (await self._session.exec(select(models.Host).order_by(col(models.Host.id)))).all()

    async def get(self, host_id: str) -> models.Host | None:
        """The host with this id, or None."""
        return await self._session.get(models.Host, host_id)

    async def upsert(self, host_id: str, address: str) -> models.Host:
        """Registers the host, or moves it to a new address; safe when two callers race."""
        insert = postgresql.insert if self._session.get_bind().dialect.name == "postgresql" else sqlite.insert
        statement = (
            insert(models.Host)
            .values(id=host_id, address=address, created_at=utcnow())
            .on_conflict_do_update(index_elements=["id"], set_={"address": address})
            .returning(models.Host)
        )
        result = await self._session.exec(statement, execution_options={"populate_existing": True})
        host: models.Host = result.scalar_one()
        return host

    async def active_capsule_counts(self) -> dict[str, int]:
        """How many STARTING or RUNNING capsules each host has (hosts with none are absent)."""
        statement = (
            select(models.Capsule.host_id, func.count())
            .where(col(models.Capsule.status).in_(ACTIVE_CAPSULE_STATUSES))
            .group_by(col(models.Capsule.host_id))
        )
        return dict((await self._session.exec(statement)).all())


def _idle_since(dialect: str, now: datetime) -> sa.ColumnElement[bool]:
    """last_active_at + timeout_sec < now, in the dialect's own date arithmetic."""
    moment = sa.literal(as_utc(now), models.UTCDateTime())
    last_active, timeout = col(models.Capsule.last_active_at), col(models.Capsule.timeout_sec)
    if dialect == "postgresql":
        return last_active + func.make_interval(0, 0, 0, 0, 0, 0, timeout) < moment
    # SQLite keeps datetimes as text; julianday() turns them into days.
    return func.julianday(last_active) + timeout / 86400.0 < func.julianday(moment)


@dataclass(frozen=True, slots=True)
class ProcessExitRecord:
    """How one process ended, as a record stores it."""

    capsule_id: str
    pid: int
    tag: str
    exit_code: int | None
    signal: str | None
    timed_out: bool
    ended_at: datetime
    # The last run's: an exit of a restarted process names a pid its record may not have seen yet.
    restarts: int = 0
    ready: bool = True
    ready_at: datetime | None = None
    oom_killed: bool = False
    # Final totals of the process and its children; None where they were not measured.
    cpu_sec: float | None = None
    memory_bytes: int | None = None
    memory_peak_bytes: int | None = None
    processes_alive: int | None = None

    def columns(self) -> dict[str, Any]:
        """The record's columns the exit sets besides its status, by name (all but capsule_id and
        tag, which find the record)."""
        return {name: getattr(self, name) for name in _EXIT_FIELDS}


@dataclass(frozen=True, slots=True)
class ProcessRunRecord:
    """Where a process's runs stand (a READY or RESTARTED event), as a record stores it."""

    capsule_id: str
    tag: str
    pid: int  # the current run's
    restarts: int
    ready: bool
    ready_at: datetime | None


async def _advance_run(session: AsyncSession, run: ProcessRunRecord) -> models.ProcessRecord | None:
    """Moves the RUNNING record to a later run, or to ready in the same run; the record for the one
    caller that changed it, else None (a conditional UPDATE, as _mark_exited: once across replicas)."""
    record = models.ProcessRecord
    later = [col(record.restarts) < run.restarts]
    if run.ready:
        later.append(
            sa.and_(
                col(record.restarts) == run.restarts,
                col(record.pid) == run.pid,
                col(record.ready).is_(False),
            )
        )
    statement = (
        update(record)
        .where(
            col(record.capsule_id) == run.capsule_id,
            col(record.tag) == run.tag,
            col(record.status) == ProcessStatus.RUNNING,
            sa.or_(*later),
        )
        .values(pid=run.pid, restarts=run.restarts, ready=run.ready, ready_at=run.ready_at)
        .returning(record)
    )
    result = await session.exec(statement, execution_options={"populate_existing": True})
    changed: models.ProcessRecord | None = result.scalars().first()
    return changed


# What an exit writes into its record: ProcessExitRecord's fields but the two that find the record.
_EXIT_FIELDS = (
    "pid",
    "restarts",
    "ready",
    "ready_at",
    "exit_code",
    "signal",
    "timed_out",
    "oom_killed",
    "cpu_sec",
    "memory_bytes",
    "memory_peak_bytes",
    "processes_alive",
    "ended_at",
)


def _exit_statement(*, team_scoped: bool) -> Any:
    """The conditional UPDATE of _mark_exited, built once per scope: every exit runs it, and building
    it cost more than running it. Its parameters are the exit's fields, prefixed with x_. A table
    statement: through the ORM (an update of the model, returning the model) an exit's transaction
    cost 1.4 ms of CPU against 0.9 ms."""
    table = _RECORDS_TABLE
    scope = [table.c.team_id == sa.bindparam("x_team_id")] if team_scoped else []
    return (
        sa.update(table)
        .where(
            *scope,
            table.c.capsule_id == sa.bindparam("x_capsule_id"),
            sa.or_(table.c.pid == sa.bindparam("x_pid"), table.c.restarts < sa.bindparam("x_restarts")),
            table.c.tag == sa.bindparam("x_tag"),
            table.c.status == ProcessStatus.RUNNING,
        )
        .values(status=ProcessStatus.EXITED, **{name: sa.bindparam(f"x_{name}") for name in _EXIT_FIELDS})
        .returning(*table.columns)
    )


_EXIT_OF_TEAM = _exit_statement(team_scoped=True)
_EXIT_OF_ANY_TEAM = _exit_statement(team_scoped=False)


async def _mark_exited(
    session: AsyncSession, exit: ProcessExitRecord, team_id: int | None = None
) -> models.ProcessRecord | None:
    """Marks the RUNNING record EXITED (of the team, when given); the record for the one caller that
    changed it, else None. The record returned is a copy outside the session.

    A conditional UPDATE, so when several replicas see the same exit only one of them wins:
    PostgreSQL re-checks the WHERE after the first writer commits, SQLite has one writer at a time.
    """
    params: dict[str, Any] = {f"x_{name}": value for name, value in exit.columns().items()}
    params.update(x_capsule_id=exit.capsule_id, x_tag=exit.tag)
    statement = _EXIT_OF_ANY_TEAM
    if team_id is not None:
        params["x_team_id"] = team_id
        statement = _EXIT_OF_TEAM
    # A tag is unique among a capsule's running processes, so at most one row matches.
    row = (await session.exec(statement, params=params)).first()
    return None if row is None else models.ProcessRecord(**row._mapping)


_EXIT_KEYS = ("x_index", "x_team_id", "x_capsule_id", "x_tag")


def _exits_statement() -> Any:
    """_mark_exited's UPDATE for several exits at once, on PostgreSQL: the exits come in as one array
    per field (unnest makes them rows), so one prepared statement serves any number of them. Each
    returned record carries x_index, the position of the exit that changed it."""
    table = _RECORDS_TABLE
    names = (*_EXIT_KEYS, *_EXIT_FIELDS)
    # Each array of the type of the column it goes into; x_index, a position among the exits.
    columns = [table.c[name.removeprefix("x_")] for name in names[1:]]
    arrays = ("integer[]", *(_array_of(column) for column in columns))
    unnest = ", ".join(f"CAST(:{name} AS {array})" for name, array in zip(names, arrays, strict=True))
    sets = ", ".join(f"{name} = x.{name}" for name in _EXIT_FIELDS)
    returned = ", ".join(f"r.{column.name}" for column in table.columns)
    sql = (
        f"UPDATE {table.name} AS r SET status = :exited, {sets} "
        f"FROM unnest({unnest}) AS x({', '.join(names)}) "
        "WHERE r.capsule_id = x.x_capsule_id AND r.tag = x.x_tag "
        "AND (r.pid = x.pid OR r.restarts < x.restarts) AND r.status = :running "
        "AND (x.x_team_id IS NULL OR r.team_id = x.x_team_id) "
        f"RETURNING x.x_index, {returned}"
    )
    status = table.c.status.type
    return (
        sa.text(sql)
        .bindparams(sa.bindparam("exited", type_=status), sa.bindparam("running", type_=status))
        .columns(sa.column("x_index", sa.Integer), *table.columns)
    )


_EXITS_OF_MANY = _exits_statement()


async def mark_exited_many(
    session: AsyncSession, exits: Sequence[tuple[ProcessExitRecord, int | None]]
) -> list[models.ProcessRecord | None]:
    """_mark_exited for each (exit, team or None) in turn, in one statement on PostgreSQL: for each,
    the record it changed, else None. No two exits may name the same process (capsule and tag)."""
    if len(exits) < 2 or session.get_bind().dialect.name != "postgresql":
        return [await _mark_exited(session, exit, team_id) for exit, team_id in exits]
    params: dict[str, Any] = {
        "exited": ProcessStatus.EXITED,
        "running": ProcessStatus.RUNNING,
        "x_index": list(range(len(exits))),
        "x_team_id": [team_id for _, team_id in exits],
        "x_capsule_id": [exit.capsule_id for exit, _ in exits],
        "x_tag": [exit.tag for exit, _ in exits],
    }
    for name in _EXIT_FIELDS:
        values = [getattr(exit, name) for exit, _ in exits]
        params[name] = [as_utc(v) if isinstance(v, datetime) else v for v in values]
    found: list[models.ProcessRecord | None] = [None] * len(exits)
    for row in (await session.exec(_EXITS_OF_MANY, params=params)).all():
        columns = dict(row._mapping)
        found[columns.pop("x_index")] = models.ProcessRecord(**columns)
    return found


class SystemRepository:
    """Across teams, for the server's own background work (exits, idle capsules, reconciling hosts).

    Never for a request: what a request writes goes through its team's repositories.
    """

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    @property
    def _dialect(self) -> str:
        return self._session.get_bind().dialect.name

    async def record_exit(self, exit: ProcessExitRecord) -> models.ProcessRecord | None:
        """Marks the RUNNING record EXITED, whichever team's; the record for the caller that changed it."""
        return await _mark_exited(self._session, exit)

    async def record_run(self, run: ProcessRunRecord) -> models.ProcessRecord | None:
        """Moves the RUNNING record to a later run or to ready, whichever team's; the record for the
        caller that changed it."""
        return await _advance_run(self._session, run)

    async def has_running(self, capsule_id: str, tag: str) -> bool:
        """True when a RUNNING record has this tag (a tag is unique among the running)."""
        record = models.ProcessRecord
        statement = select(record.id).where(
            col(record.capsule_id) == capsule_id,
            col(record.tag) == tag,
            col(record.status) == ProcessStatus.RUNNING,
        )
        return (await self._session.exec(statement.limit(1))).first() is not None

    async def exited(self, processes: Collection[tuple[str, str, int]]) -> set[tuple[str, str, int]]:
        """Of processes (capsule, tag, pid), those whose record is EXITED."""
        record = models.ProcessRecord
        found: set[tuple[str, str, int]] = set()
        wanted = list(dict.fromkeys(processes))
        for start in range(0, len(wanted), 300):  # a few hundred parameters a statement at most
            chunk = wanted[start : start + 300]
            statement = select(record.capsule_id, record.tag, record.pid).where(
                col(record.status) == ProcessStatus.EXITED,
                col(record.capsule_id).in_({capsule for capsule, _, _ in chunk}),
                col(record.tag).in_({tag for _, tag, _ in chunk}),
                col(record.pid).in_({pid for _, _, pid in chunk}),
            )
            rows = (await self._session.exec(statement)).all()
            found.update((str(c), str(t), int(p)) for c, t, p in rows)
        return found.intersection(wanted)

    async def has_record(self, capsule_id: str, pid: int, tag: str) -> bool:
        """True when a record of this process exists, in any status."""
        record = models.ProcessRecord
        statement = select(record.id).where(
            col(record.capsule_id) == capsule_id, col(record.pid) == pid, col(record.tag) == tag
        )
        return (await self._session.exec(statement.limit(1))).first() is not None

    async def capsules_to_reconcile(self, host_id: str, hosted: Collection[str]) -> Sequence[models.Capsule]:
        """The host's capsules whose state the host must confirm: every one not STOPPED, each STOPPED one
        that still has a RUNNING record, and each of `hosted` (the ids the host holds)."""
        has_running = (
            select(models.ProcessRecord.id)
            .where(
                col(models.ProcessRecord.capsule_id) == col(models.Capsule.id),
                col(models.ProcessRecord.status) == ProcessStatus.RUNNING,
            )
            .exists()
        )
        statement = (
            select(models.Capsule)
            .where(
                col(models.Capsule.host_id) == host_id,
                sa.or_(
                    col(models.Capsule.status) != CapsuleStatus.STOPPED,
                    has_running,
                    col(models.Capsule.id).in_(list(hosted)),
                ),
            )
            .order_by(col(models.Capsule.id))
        )
        return (await self._session.exec(statement)).all()

    async def idle_capsules(self, now: datetime) -> Sequence[models.Capsule]:
        """RUNNING capsules whose last_active_at + timeout_sec is before now."""
        statement = select(models.Capsule).where(
            col(models.Capsule.status) == CapsuleStatus.RUNNING, _idle_since(self._dialect, now)
        )
        return (await self._session.exec(statement.order_by(col(models.Capsule.id)))).all()

    async def claim_idle_capsules(self, now: datetime) -> Sequence[models.Capsule]:
        """Moves idle RUNNING capsules to STOPPING and returns them; each goes to one caller only."""
        statement = (
            update(models.Capsule)
            .where(col(models.Capsule.status) == CapsuleStatus.RUNNING, _idle_since(self._dialect, now))
            .values(status=CapsuleStatus.STOPPING)
            .returning(models.Capsule)
        )
        result = await self._session.exec(statement, execution_options={"populate_existing": True})
        return result.scalars().all()

    async def last_event_seqs(self, capsule_ids: Collection[str]) -> dict[str, int]:
        """Each capsule's newest event seq, in one query on the primary key."""
        if not capsule_ids:
            return {}
        statement = select(models.Capsule.id, models.Capsule.last_event_seq).where(
            col(models.Capsule.id).in_(list(capsule_ids))
        )
        return {capsule_id: int(seq) for capsule_id, seq in (await self._session.exec(statement)).all()}

    async def prune_events(self, before: datetime, *, limit: int) -> int:
        """Drops up to limit events, of any capsule, that happened before `before`; how many it dropped."""
        event = models.ProcessEvent
        oldest = (
            select(event.capsule_id, event.seq)
            .where(col(event.at) < sa.literal(as_utc(before), models.UTCDateTime()))
            .limit(limit)
        )
        statement = sa.delete(event).where(sa.tuple_(col(event.capsule_id), col(event.seq)).in_(oldest))
        return int((await self._session.exec(statement)).rowcount)
