"""Small async factories for rows the tests need, written through the real store."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import datetime

from app.domain import CapsuleStatus, ProcessStatus, new_tag, utcnow
from app.store import models
from app.store.session import Database


async def make_team(db: Database, name: str | None = None) -> models.Team:
    """A stored team (a random name unless given)."""
    team = models.Team(name=name or f"team-{secrets.token_hex(4)}")
    async with db.transaction() as session:
        session.add(team)
    return team


async def make_capsule(
    db: Database,
    team: models.Team,
    *,
    status: CapsuleStatus = CapsuleStatus.RUNNING,
    host_id: str = "h1",
    timeout_sec: int = 300,
    created_at: datetime | None = None,
    last_active_at: datetime | None = None,
) -> models.Capsule:
    """A stored capsule of the team."""
    assert team.id is not None
    now = utcnow()
    capsule = models.Capsule(
        id=f"cap-{secrets.token_hex(8)}",
        team_id=team.id,
        host_id=host_id,
        status=status,
        timeout_sec=timeout_sec,
        created_at=created_at or now,
        last_active_at=last_active_at or created_at or now,
    )
    async with db.transaction() as session:
        session.add(capsule)
    return capsule


async def make_process_record(
    db: Database,
    capsule: models.Capsule,
    *,
    pid: int = 100,
    tag: str | None = None,
    cmd: str = "sleep",
    args: Sequence[str] = ("30",),
    status: ProcessStatus = ProcessStatus.RUNNING,
    started_at: datetime | None = None,
    exit_code: int | None = None,
    ended_at: datetime | None = None,
) -> models.ProcessRecord:
    """A stored process record in the capsule (RUNNING unless told otherwise)."""
    record = models.ProcessRecord(
        team_id=capsule.team_id,
        capsule_id=capsule.id,
        pid=pid,
        tag=tag or new_tag(),
        cmd=cmd,
        args=list(args),
        cwd="/workspace",
        status=status,
        exit_code=exit_code,
        started_at=started_at or utcnow(),
        ended_at=ended_at,
    )
    async with db.transaction() as session:
        session.add(record)
    return record
