"""Capsule event histories on the real store and bus: cursors, replay through a long history, one
feed per capsule shared by its subscribers, retention by count and by age."""

from __future__ import annotations

import asyncio
import secrets
from contextlib import aclosing

import pytest

from app.domain import (
    CapsuleEvent,
    CapsuleStatus,
    EventRetention,
    ProcessEventKind,
    ProcessInfo,
    ProcessStatus,
    utcnow,
)
from app.errors import InvalidRequest
from app.services.events import EXPIRED, NOT_A_CURSOR, EventPruner, decode_cursor, encode_cursor
from app.services.records import ProcessRecords
from tests.services.conftest import DEADLINE_SEC, Teams, closable, collect, until

pytestmark = pytest.mark.asyncio(loop_scope="module")


def made_up(capsule_id: str) -> ProcessInfo:
    return ProcessInfo(
        capsule_id=capsule_id,
        pid=100,
        tag=f"proc-{secrets.token_hex(4)}",
        cmd="sleep",
        args=(),
        cwd="",
        status=ProcessStatus.RUNNING,
        started_at=utcnow(),
    )


class TestCursors:
    async def test_a_cursor_names_its_capsule_and_seq(self) -> None:
        cursor = encode_cursor("cap-0123", 42)
        assert "cap-0123" not in cursor and "=" not in cursor
        assert decode_cursor(cursor, "cap-0123") == 42

    @pytest.mark.parametrize("cursor", ["", "x", "!!!!", encode_cursor("cap-a", -1), "Y2FwLWE6"])
    async def test_garbage_is_invalid_request(self, cursor: str) -> None:
        with pytest.raises(InvalidRequest, match=NOT_A_CURSOR):
            decode_cursor(cursor, "cap-a")

    async def test_another_capsules_cursor_is_invalid_request(self) -> None:
        with pytest.raises(InvalidRequest, match=NOT_A_CURSOR):
            decode_cursor(encode_cursor("cap-b", 3), "cap-a")


class TestFollow:
    async def test_replay_pages_through_a_long_history_then_follows(self, teams: Teams) -> None:
        capsule = await teams.stored_capsule(CapsuleStatus.RUNNING)
        records = teams.state.platform.records
        for _ in range(600):  # more than one store read holds
            await records.record_start(teams.ours.team.id, made_up(capsule.id))
        events = teams.ours.processes.events(capsule.id, encode_cursor(capsule.id, 0))
        replayed = await collect(events, count=600)
        assert [e.seq for e in replayed] == list(range(1, 601))
        assert all(e.kind is ProcessEventKind.STARTED for e in replayed)
        assert replayed[-1].cursor == encode_cursor(capsule.id, 600)
        # From the last cursor on: nothing again, then the next one.
        events = closable(teams.ours.processes.events(capsule.id, replayed[-1].cursor))
        async with aclosing(events):
            waiting = asyncio.ensure_future(anext(events))
            await records.record_start(teams.ours.team.id, made_up(capsule.id))
            async with asyncio.timeout(DEADLINE_SEC):
                assert (await waiting).seq == 601

    async def test_subscribers_of_a_capsule_share_one_feed(self, teams: Teams) -> None:
        capsule = await teams.stored_capsule(CapsuleStatus.RUNNING)
        feeds = teams.state.platform.feeds
        before = feeds.feeds
        after = encode_cursor(capsule.id, await teams.newest_seq(capsule.id))
        streams = [closable(teams.ours.processes.events(capsule.id, after)) for _ in range(200)]
        waiting = [asyncio.ensure_future(anext(s)) for s in streams]
        try:
            await until(lambda: _settled(feeds.feeds == before + 1), what="the capsule's one feed")
            info = made_up(capsule.id)
            await teams.state.platform.records.record_start(teams.ours.team.id, info)
            async with asyncio.timeout(DEADLINE_SEC):
                got: list[CapsuleEvent] = await asyncio.gather(*waiting)
            assert {(e.seq, e.process.tag) for e in got} == {(1, info.tag)}
        finally:
            for stream in streams:
                await stream.aclose()
        assert feeds.feeds == before

    async def test_past_the_count_retention_a_cursor_is_expired(self, teams: Teams) -> None:
        capsule = await teams.stored_capsule(CapsuleStatus.RUNNING)
        platform = teams.state.platform
        records = ProcessRecords(
            db=platform.db, bus=platform.bus, retention=EventRetention(max_per_capsule=5)
        )
        for _ in range(8):
            await records.record_start(teams.ours.team.id, made_up(capsule.id))
        with pytest.raises(InvalidRequest, match=EXPIRED):
            await collect(teams.ours.processes.events(capsule.id, encode_cursor(capsule.id, 2)))
        # Seq 3's successors are all retained (4 to 8): it still resumes.
        resumed = await collect(
            teams.ours.processes.events(capsule.id, encode_cursor(capsule.id, 3)), count=5
        )
        assert [e.seq for e in resumed] == [4, 5, 6, 7, 8]
        with pytest.raises(InvalidRequest, match=NOT_A_CURSOR):
            await collect(teams.ours.processes.events(capsule.id, encode_cursor(capsule.id, 9)))

    async def test_past_the_age_retention_a_cursor_is_expired(self, teams: Teams) -> None:
        capsule = await teams.stored_capsule(CapsuleStatus.RUNNING)
        await teams.state.platform.records.record_start(teams.ours.team.id, made_up(capsule.id))
        pruner = EventPruner(db=teams.state.platform.db, retention=EventRetention(max_age_sec=1e-6))
        assert await pruner.prune_once() >= 1
        with pytest.raises(InvalidRequest, match=EXPIRED):
            await collect(teams.ours.processes.events(capsule.id, encode_cursor(capsule.id, 0)))
        # The newest cursor names no lost event: it resumes.
        events = closable(teams.ours.processes.events(capsule.id, encode_cursor(capsule.id, 1)))
        async with aclosing(events):
            waiting = asyncio.ensure_future(anext(events))
            await teams.state.platform.records.record_start(teams.ours.team.id, made_up(capsule.id))
            async with asyncio.timeout(DEADLINE_SEC):
                assert (await waiting).seq == 2


async def _settled(value: bool) -> bool:
    return value
