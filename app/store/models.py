"""SQLModel tables: teams, API keys, hosts, capsules, process records and process events."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlmodel import JSON, Column, Field, SQLModel

from app.domain import (
    CapsuleInfo,
    CapsuleLimits,
    CapsuleRuntime,
    CapsuleStatus,
    ProcessEventKind,
    ProcessStatus,
    as_utc,
    utcnow,
)

# Named constraints, so later migrations can alter or drop them (SQLite's batch mode needs names).
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Stores UTC and always returns aware datetimes (SQLite drops the zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)


def _moment(*, nullable: bool = False, index: bool = False) -> Any:
    return Field(
        default_factory=None if nullable else utcnow,
        sa_column=Column(UTCDateTime(), nullable=nullable, index=index),
    )


class Team(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True, max_length=64)
    created_at: datetime = _moment()


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_key"

    id: int | None = Field(default=None, primary_key=True)
    team_id: int = Field(foreign_key="team.id", index=True)
    # sha256 of the whole key; the key itself is shown once and never stored.
    key_hash: str = Field(unique=True, index=True, max_length=64)
    # The key's first characters, not secret: what a listing shows, and what authentication looks up
    # before it compares the hash in constant time.
    prefix: str = Field(max_length=16, index=True)
    created_at: datetime = _moment()
    revoked_at: datetime | None = _moment(nullable=True)


class Host(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=64)
    address: str = Field(max_length=255)
    created_at: datetime = _moment()


class Capsule(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=64)
    team_id: int = Field(foreign_key="team.id", index=True)
    host_id: str = Field(max_length=64, index=True)
    status: CapsuleStatus = Field(
        sa_column=Column(sa.Enum(CapsuleStatus, native_enum=False, length=16), nullable=False)
    )
    timeout_sec: int = 300
    created_at: datetime = _moment()
    last_active_at: datetime = _moment(index=True)
    # What its host reported creating it with; null until the host has answered.
    runtime: CapsuleRuntime | None = Field(
        default=None, sa_column=Column(sa.Enum(CapsuleRuntime, native_enum=False, length=16), nullable=True)
    )
    # What it was created with: its host gets these again whenever it gives the capsule back.
    network: bool = Field(default=False, sa_column_kwargs={"server_default": sa.false()})
    max_processes: int = Field(default=256, sa_column_kwargs={"server_default": "256"})
    memory_mib: int | None = None
    cpus: float | None = None
    # The seq of its newest process event: each event takes the next one in the transaction that
    # writes it, under this row's lock, so seqs commit in order and leave no holes.
    last_event_seq: int = Field(default=0, sa_column_kwargs={"server_default": "0"})

    def to_info(self) -> CapsuleInfo:
        """The capsule as the domain value services hand out."""
        return capsule_info(self)


def capsule_info(row: Any) -> CapsuleInfo:
    """The domain value of a capsule's columns, from its model or straight from a row of them (a
    request's lookup builds no ORM object: that cost ten times the rest)."""
    return CapsuleInfo(
        id=row.id,
        team_id=row.team_id,
        host_id=row.host_id,
        status=row.status,
        timeout_sec=row.timeout_sec,
        created_at=as_utc(row.created_at),
        last_active_at=as_utc(row.last_active_at),
        # Until its host has said otherwise, a capsule claims no isolation: nothing runs in it yet.
        runtime=row.runtime or CapsuleRuntime.PLAIN,
        network=row.network,
        limits=CapsuleLimits(max_processes=row.max_processes, memory_mib=row.memory_mib, cpus=row.cpus),
    )


class ProcessRecord(SQLModel, table=True):
    __tablename__ = "process_record"
    __table_args__ = (
        sa.Index("ix_process_record_capsule_pid", "capsule_id", "pid"),
        sa.Index("ix_process_record_capsule_tag", "capsule_id", "tag"),
    )

    id: int | None = Field(default=None, primary_key=True)
    team_id: int = Field(foreign_key="team.id", index=True)
    capsule_id: str = Field(foreign_key="capsule.id", max_length=64)
    pid: int
    tag: str = Field(max_length=64)
    cmd: str
    args: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    cwd: str | None = None
    status: ProcessStatus = Field(
        sa_column=Column(sa.Enum(ProcessStatus, native_enum=False, length=16), nullable=False)
    )
    exit_code: int | None = None
    # The name of the signal that ended the process (SIGTERM), if one did.
    signal: str | None = Field(default=None, max_length=16)
    timed_out: bool = False
    started_at: datetime = _moment()
    ended_at: datetime | None = _moment(nullable=True)
    # Supervision: runs after the first that the restart policy started, readiness, the kernel's cause.
    restarts: int = 0
    ready: bool = False
    ready_at: datetime | None = _moment(nullable=True)
    oom_killed: bool = False
    # On a pseudo-terminal.
    terminal: bool = False
    # Final totals of the process and its children, once it has exited (null where not measured).
    cpu_sec: float | None = None
    memory_bytes: int | None = Field(default=None, sa_type=sa.BigInteger)
    memory_peak_bytes: int | None = Field(default=None, sa_type=sa.BigInteger)
    processes_alive: int | None = None


class ProcessEvent(SQLModel, table=True):
    """A lifecycle event, written in the transaction of the record change it reports."""

    __tablename__ = "process_event"

    capsule_id: str = Field(foreign_key="capsule.id", max_length=64, primary_key=True)
    # 1, 2, 3, ... per capsule, without holes (Capsule.last_event_seq).
    seq: int = Field(primary_key=True, sa_type=sa.BigInteger)
    team_id: int = Field(foreign_key="team.id")  # every read names the capsule too: no index of its own
    kind: ProcessEventKind = Field(
        sa_column=Column(sa.Enum(ProcessEventKind, native_enum=False, length=16), nullable=False)
    )
    at: datetime = _moment(index=True)
    # The process as it was then: what the event reports, whatever the record says later.
    process: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
