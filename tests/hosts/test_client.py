"""Each host client call against a real agent running real `sh` processes."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import replace

import pytest

from app import domain
from app.errors import Conflict, InvalidRequest, NotFound
from app.hosts.client import HostClient
from tests.hosts.helpers import DEADLINE, collect_output, next_batch, sh, stdout_of


class TestCapsules:
    async def test_create_list_destroy(self, client: HostClient) -> None:
        info = await client.create_capsule("cap-round-trip")
        assert info.capsule_id == "cap-round-trip"
        assert info.workspace and info.running_processes == 0
        assert "cap-round-trip" in {c.capsule_id for c in await client.list_capsules()}
        await client.destroy_capsule("cap-round-trip")
        assert "cap-round-trip" not in {c.capsule_id for c in await client.list_capsules()}

    async def test_unknown_capsule_is_not_found(self, client: HostClient) -> None:
        with pytest.raises(NotFound, match="no capsule cap-missing"):
            await client.list_processes("cap-missing")

    async def test_malformed_capsule_id_is_invalid(self, client: HostClient) -> None:
        with pytest.raises(InvalidRequest, match="malformed"):
            await client.create_capsule("../escape")


class TestExec:
    async def test_runs_to_completion(self, client: HostClient, capsule_id: str) -> None:
        spec = domain.ExecSpec(
            cmd="sh",
            args=("-c", 'read line; echo "out $line $GREETING"; echo err >&2; exit 3'),
            envs=(domain.EnvVar("GREETING", "hi"),),
            stdin=b"in\n",
        )
        result = await client.exec(capsule_id, spec)
        assert (result.stdout, result.stderr, result.exit_code) == (b"out in hi\n", b"err\n", 3)
        assert not result.timed_out and not result.truncated

    async def test_times_out(self, client: HostClient, capsule_id: str) -> None:
        result = await client.exec(capsule_id, domain.ExecSpec(cmd="sleep", args=("30",), timeout_sec=0.3))
        assert result.timed_out


class TestProcesses:
    async def test_start_get_list_by_pid_and_tag(self, client: HostClient, capsule_id: str) -> None:
        started = await client.start_process(capsule_id, sh("sleep 30", tag="sleeper"))
        assert (started.capsule_id, started.tag, started.status) == (
            capsule_id,
            "sleeper",
            domain.ProcessStatus.RUNNING,
        )
        assert started.args == ("-c", "sleep 30") and started.started_at.tzinfo is not None
        again = await client.get_process(capsule_id, "sleeper")  # usage is measured anew at each ask
        assert replace(again, usage=started.usage) == started
        assert (await client.get_process(capsule_id, str(started.pid))).tag == "sleeper"
        assert [p.tag for p in await client.list_processes(capsule_id)] == ["sleeper"]
        await client.stop_process(capsule_id, "sleeper", grace_sec=1.0)

    async def test_input_and_output(self, client: HostClient, capsule_id: str) -> None:
        await client.start_process(capsule_id, sh("cat; echo done", tag="reader", stdin=True))
        await client.send_input(capsule_id, "reader", b"hello\n")
        await client.close_input(capsule_id, "reader")
        events = await collect_output(client, capsule_id, "reader")
        assert stdout_of(events) == b"hello\ndone\n"
        end = events[-1]
        assert isinstance(end, domain.ProcessExit) and end.exit_code == 0
        assert (await client.get_process(capsule_id, "reader")).status is domain.ProcessStatus.EXITED

    async def test_output_replays_from_a_seq(self, client: HostClient, capsule_id: str) -> None:
        await client.start_process(capsule_id, sh("echo one; sleep 0.1; echo two >&2", tag="two-lines"))
        events = await collect_output(client, capsule_id, "two-lines")
        later = await collect_output(client, capsule_id, "two-lines", from_seq=events[1].seq)
        assert later == events[1:]

    async def test_signal(self, client: HostClient, capsule_id: str) -> None:
        await client.start_process(capsule_id, sh("sleep 30", tag="target"))
        await client.signal_process(
            capsule_id, "target", signal=signal.SIGTERM, scope=domain.SignalScope.GROUP
        )
        end = (await collect_output(client, capsule_id, "target"))[-1]
        assert isinstance(end, domain.ProcessExit) and end.signal is signal.SIGTERM
        info = await client.get_process(capsule_id, "target")
        assert info.signal is signal.SIGTERM and info.ended_at is not None

    async def test_stop(self, client: HostClient, capsule_id: str) -> None:
        await client.start_process(capsule_id, sh("sleep 30", tag="stopped"))
        info = await client.stop_process(capsule_id, "stopped", grace_sec=2.0)
        assert info.status is domain.ProcessStatus.EXITED and info.signal is signal.SIGTERM

    async def test_watch_sees_starts_and_exits(self, client: HostClient, capsule_id: str) -> None:
        events = client.watch_processes(capsule_id)
        seen: asyncio.Queue[domain.ProcessEvent] = asyncio.Queue()

        async def watch() -> None:
            async for event in events:
                seen.put_nowait(event)

        watcher = asyncio.create_task(watch())
        try:
            # The watch is live once it reports anything; until then, keep starting processes.
            async with asyncio.timeout(DEADLINE):
                while seen.empty():
                    await client.start_process(capsule_id, sh("true"))
                    await asyncio.sleep(0.05)
                while not seen.empty():
                    seen.get_nowait()
                started = await client.start_process(capsule_id, sh("exit 4", tag="watched"))
                kinds: dict[domain.ProcessEventKind, domain.ProcessInfo] = {}
                while len(kinds) < 2:
                    event = await seen.get()
                    if event.process.tag == "watched":
                        kinds[event.kind] = event.process
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        assert kinds[domain.ProcessEventKind.STARTED].pid == started.pid
        assert kinds[domain.ProcessEventKind.EXITED].exit_code == 4

    async def test_cancelling_a_stream_is_prompt(self, client: HostClient, capsule_id: str) -> None:
        await client.start_process(capsule_id, sh("echo ready; sleep 30", tag="long"))
        stream = client.stream_output(capsule_id, "long", 0)
        assert stdout_of(await next_batch(stream)) == b"ready\n"
        reader = asyncio.create_task(anext(stream))
        await asyncio.sleep(0)  # let it block on the next message
        reader.cancel()
        async with asyncio.timeout(DEADLINE):
            with pytest.raises(asyncio.CancelledError):
                await reader
            await stream.aclose()
        await client.stop_process(capsule_id, "long", grace_sec=1.0)


class TestErrors:
    async def test_unknown_process_is_not_found(self, client: HostClient, capsule_id: str) -> None:
        with pytest.raises(NotFound, match="no process nobody"):
            await client.get_process(capsule_id, "nobody")
        with pytest.raises(NotFound):
            await client.stop_process(capsule_id, "4194304", grace_sec=1.0)

    async def test_unknown_process_stream_is_not_found(self, client: HostClient, capsule_id: str) -> None:
        with pytest.raises(NotFound):
            await collect_output(client, capsule_id, "nobody")

    async def test_tag_in_use_is_a_conflict(self, client: HostClient, capsule_id: str) -> None:
        await client.start_process(capsule_id, sh("sleep 30", tag="dup"))
        with pytest.raises(Conflict, match="already used"):
            await client.start_process(capsule_id, sh("true", tag="dup"))
        await client.stop_process(capsule_id, "dup", grace_sec=1.0)

    @pytest.mark.parametrize(
        "spec",
        [sh("true", tag="123"), domain.ProcessSpec(cmd=" "), sh("true", tag="bad tag")],
        ids=["digits-tag", "empty-cmd", "space-in-tag"],
    )
    async def test_bad_input_is_invalid(
        self, client: HostClient, capsule_id: str, spec: domain.ProcessSpec
    ) -> None:
        with pytest.raises(InvalidRequest):
            await client.start_process(capsule_id, spec)
