"""OutputService.follow on the real store and the embedded agent: a missing capsule or process, another
team's capsule, a bad fromSeq, output that is no longer retained, and valid (replay, then live)."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import replace
from pathlib import Path

import pytest

from app.domain import OutputChunk, OutputEvent, ProcessExit, ProcessSpec, ProcessStatus, Stream
from app.errors import ErrorCode, InvalidRequest, NotFound
from app.state import EMBEDDED_HOST_ID
from tests.services.conftest import (
    MISSING,
    Teams,
    closable,
    collect,
    first,
    new_teams,
    open_state,
    refused_as_missing,
    refused_when_not_running,
    service_settings,
    until,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

CAT = ProcessSpec(cmd="cat", stdin=True)


def data(events: list[OutputEvent], stream: Stream = Stream.STDOUT) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, OutputChunk) and e.stream is stream)


class TestFollow:
    async def test_not_existing_capsule_is_not_found(self, teams: Teams) -> None:
        with pytest.raises(NotFound, match=f"^no capsule {MISSING}$"):
            await first(teams.ours.output.follow(MISSING, "web", 0))

    async def test_other_teams_capsule_is_not_found(self, teams: Teams) -> None:
        await refused_as_missing(
            teams, lambda capsule_id: first(teams.ours.output.follow(capsule_id, "web", 0))
        )

    async def test_capsule_not_running_is_invalid_state(self, teams: Teams) -> None:
        await refused_when_not_running(
            teams, lambda capsule_id: first(teams.ours.output.follow(capsule_id, "web", 0))
        )

    async def test_negative_from_seq_is_invalid_request(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        info = await teams.ours.processes.start(capsule.id, CAT)
        with pytest.raises(InvalidRequest, match=r"^fromSeq .*: pass 0 for all retained output") as caught:
            await first(teams.ours.output.follow(capsule.id, info.tag, -1))
        assert caught.value.code is ErrorCode.INVALID_REQUEST

    async def test_not_existing_process_is_not_found(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        with pytest.raises(NotFound, match="no process web"):
            await first(teams.ours.output.follow(capsule.id, "web", 0))

    async def test_replay_of_an_exited_process_ends_after_its_exit(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        script = "printf 'one\\n'; printf 'warn\\n' >&2; printf 'two\\n'; exit 3"
        info = await teams.ours.processes.start(capsule.id, ProcessSpec(cmd="sh", args=("-c", script)))
        await teams.exited_record(capsule.id, info.tag)
        events = await collect(teams.ours.output.follow(capsule.id, info.tag, 0))
        assert (data(events), data(events, Stream.STDERR)) == (b"one\ntwo\n", b"warn\n")
        *chunks, end = events
        assert isinstance(end, ProcessExit) and end.exit_code == 3
        assert all(isinstance(c, OutputChunk) for c in chunks)
        seqs = [e.seq for e in events]
        assert seqs == sorted(set(seqs))
        # Past the exit there is nothing more: the follow ends at once.
        assert await collect(teams.ours.output.follow(capsule.id, str(info.pid), end.seq + 1)) == []

    async def test_live_then_from_a_later_seq(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        info = await teams.ours.processes.start(capsule.id, CAT)
        live: list[OutputEvent] = []

        async def follow() -> None:
            async with aclosing(closable(teams.ours.output.follow(capsule.id, info.tag, 0))) as events:
                async for event in events:
                    live.append(event)

        async def has(text: bytes) -> bool:
            return data(live).endswith(text)

        follower = asyncio.create_task(follow())
        try:
            await teams.ours.processes.send_input(capsule.id, info.tag, b"a\n")
            await until(lambda: has(b"a\n"), what="the first line, live")
            first_seq = live[-1].seq
            await teams.ours.processes.send_input(capsule.id, info.tag, b"b\n")
            await until(lambda: has(b"a\nb\n"), what="the second line, live")
            await teams.ours.processes.close_input(capsule.id, info.tag)
            async with asyncio.timeout(10):
                await follower  # ends by itself, after the exit event
        finally:
            follower.cancel()
        assert isinstance(live[-1], ProcessExit) and live[-1].exit_code == 0
        # Resuming after the first line gives the rest, with neither a duplicate nor a hole.
        rest = await collect(teams.ours.output.follow(capsule.id, info.tag, first_seq + 1))
        assert data(rest) == b"b\n"
        assert rest[-1] == live[-1]


async def test_output_no_longer_retained_says_when_it_exited(tmp_path: Path, database_url: str) -> None:
    config = replace(service_settings(tmp_path / "data", database_url), retention_sec=0.1)
    async with open_state(config) as state:
        teams = await new_teams(state)
        capsule = await teams.capsule()
        info = await teams.ours.processes.start(capsule.id, ProcessSpec(cmd="sh", args=("-c", "echo bye")))
        record = await teams.exited_record(capsule.id, info.tag)
        host = state.platform.pool.client(EMBEDDED_HOST_ID)

        async def dropped() -> bool:
            return all(p.tag != info.tag for p in await host.list_processes(capsule.id))

        await until(dropped, what="the agent to drop the exited process")
        for selector in (info.tag, str(info.pid)):
            with pytest.raises(NotFound) as caught:
                await first(teams.ours.output.follow(capsule.id, selector, 0))
            assert record.ended_at is not None
            assert str(caught.value) == (
                f"process {selector} exited at {record.ended_at.isoformat()} and its output is no longer "
                "retained; query process(...) for how it ended"
            )
        # The record still answers how it ended.
        found = await teams.ours.processes.get(capsule.id, info.tag)
        assert found is not None and (found.status, found.exit_code) == (ProcessStatus.EXITED, 0)
