"""Restart policies and readiness checks, with real processes, in the runtime the tests run on."""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys
from typing import Any

import grpc
import pytest

from app import domain, wire
from app.agent.supervision import MAX_LINE_BYTES, Backoff, LineMatcher
from app.pb import agent_pb2 as pb
from tests.agent.helpers import (
    eventually,
    exec_sh,
    grpc_error,
    joined,
    read_output,
    ref,
    start_sh,
    wait_exited,
    wait_output,
)
from tests.system import free_port

Kind = domain.ProcessEventKind


def restart(policy: pb.RestartPolicy.Policy = pb.RestartPolicy.ON_FAILURE, **fields: Any) -> pb.RestartPolicy:
    """A fast restart policy: 0.05 s doubling up to 1 s unless fields say otherwise."""
    return pb.RestartPolicy(policy=policy, **({"backoff_sec": 0.05, "max_backoff_sec": 1.0} | fields))


def listener(port: int, after_sec: float = 0.3) -> str:
    """A Python one-liner that listens on port after a while, then says so and sleeps."""
    code = (
        "import socket,time;s=socket.socket();"
        "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
        f"time.sleep({after_sec});s.bind(('127.0.0.1',{port}));s.listen();"
        "print('listening',flush=True);time.sleep(60)"
    )
    return f'{sys.executable} -c "{code}"'


async def watch(stub: Any, capsule: str) -> Any:
    """A WatchProcesses stream, subscribed once this returns."""
    call = stub.WatchProcesses(pb.CapsuleRef(capsule_id=capsule))
    await call.initial_metadata()
    return call


async def events_until(call: Any, kind: domain.ProcessEventKind, within: float = 10.0) -> list[Any]:
    """The events of a watch up to and with the first of kind."""
    seen = []
    async with asyncio.timeout(within):
        async for message in call:
            seen.append(wire.process_event(message))
            if seen[-1].kind is kind:
                return seen
    raise AssertionError(f"the watch ended before a {kind.value} event")


class TestRestarts:
    async def test_a_crashing_process_is_restarted_max_restarts_times_with_growing_delays(
        self, stub: Any, capsule: str
    ) -> None:
        call = await watch(stub, capsule)
        policy = restart(max_restarts=3, backoff_sec=0.2, max_backoff_sec=2.0)  # 0.2, 0.4, 0.8 s
        info = await start_sh(stub, capsule, "date +%s.%N; exit 3", restart=policy)
        events = await read_output(stub, capsule, info.tag)
        restarted = [e for e in events if isinstance(e, domain.ProcessRestarted)]
        exits = [e for e in events if isinstance(e, domain.ProcessExit)]
        assert [r.restarts for r in restarted] == [1, 2, 3]
        assert all((r.exit_code, r.signal) == (3, None) for r in restarted)
        assert len({info.pid, *(r.pid for r in restarted)}) == 4  # a new pid each run
        assert len(exits) == 1 and events[-1] is exits[0] and exits[0].exit_code == 3
        # One stream: each run's line, then the restart that follows it.
        kinds = [type(e).__name__ for e in events]
        assert kinds == ["OutputChunk", "ProcessRestarted"] * 3 + ["OutputChunk", "ProcessExit"]
        assert [e.seq for e in events] == sorted({e.seq for e in events})
        starts = [float(line) for line in joined(events).split()]
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        # Each gap is its delay (±10 % jitter) plus a run and a spawn, which a loaded machine stretches
        # but never shortens: lower bounds, and the last well above the first.
        delays = (0.2, 0.4, 0.8)
        assert all(gap >= 0.9 * delay for gap, delay in zip(gaps, delays, strict=True)), gaps
        assert gaps[2] > gaps[0], gaps
        final = await wait_exited(stub, capsule, info.tag)
        assert (final.restarts, final.pid, final.exit_code) == (3, restarted[-1].pid, 3)
        seen = await events_until(call, Kind.EXITED)
        assert [e.kind for e in seen] == [Kind.STARTED] + [Kind.RESTARTED] * 3 + [Kind.EXITED]
        assert [e.process.pid for e in seen[1:4]] == [r.pid for r in restarted]
        call.cancel()

    async def test_on_failure_leaves_a_clean_exit_alone(self, stub: Any, capsule: str) -> None:
        info = await start_sh(stub, capsule, "echo done", restart=restart())
        events = await read_output(stub, capsule, info.tag)
        assert not [e for e in events if isinstance(e, domain.ProcessRestarted)]
        final = await wait_exited(stub, capsule, info.tag)
        assert (final.restarts, final.exit_code, final.pid) == (0, 0, info.pid)

    async def test_on_failure_restarts_a_run_a_signal_ended(self, stub: Any, capsule: str) -> None:
        info = await start_sh(stub, capsule, "kill -KILL $$", restart=restart(max_restarts=1))
        events = await read_output(stub, capsule, info.tag)
        restarted = [e for e in events if isinstance(e, domain.ProcessRestarted)]
        assert [(r.exit_code, r.signal) for r in restarted] == [(None, signal.SIGKILL)]

    async def test_always_restarts_a_clean_exit(self, stub: Any, capsule: str) -> None:
        script = "echo run"
        info = await start_sh(stub, capsule, script, restart=restart(pb.RestartPolicy.ALWAYS, max_restarts=2))
        events = await read_output(stub, capsule, info.tag)
        assert joined(events) == b"run\n" * 3
        assert (await wait_exited(stub, capsule, info.tag)).restarts == 2

    async def test_a_stopped_always_process_stays_stopped(self, stub: Any, capsule: str) -> None:
        info = await start_sh(stub, capsule, "echo up; sleep 30", restart=restart(pb.RestartPolicy.ALWAYS))
        await wait_output(stub, capsule, info.tag, b"up")
        stopped = wire.process_info(
            await stub.StopProcess(pb.StopRequest(process=ref(capsule, info.tag), grace_sec=5))
        )
        assert (stopped.status, stopped.signal, stopped.restarts) == (
            domain.ProcessStatus.EXITED,
            signal.SIGTERM,
            0,
        )
        # The log is closed with its exit event: nothing can come after it, no restart either.
        events = await read_output(stub, capsule, info.tag)
        assert isinstance(events[-1], domain.ProcessExit)
        assert not [e for e in events if isinstance(e, domain.ProcessRestarted)]

    async def test_a_signal_ends_it_for_good_even_between_runs(self, stub: Any, capsule: str) -> None:
        script = "touch ran; exit 1"
        info = await start_sh(stub, capsule, script, restart=restart(backoff_sec=30, max_backoff_sec=30))

        async def ran() -> bool:
            return (await exec_sh(stub, capsule, "test -e ran")).exit_code == 0

        await eventually(ran, what="the first run")  # it ends a moment later, then waits 30 s
        request = pb.SignalRequest(process=ref(capsule, info.tag), signal=signal.SIGTERM)
        await stub.SignalProcess(request)
        final = await wait_exited(stub, capsule, info.tag, within=5)
        assert final.restarts == 0
        # How the last run ended: on its own (the signal came between runs), or by the signal.
        assert (final.exit_code, final.signal) in ((1, None), (None, signal.SIGTERM))

    async def test_the_lifetime_ends_it_for_good(self, stub: Any, capsule: str) -> None:
        info = await start_sh(
            stub, capsule, "sleep 0.05; exit 1", restart=restart(max_backoff_sec=0.1), timeout_sec=0.6
        )
        final = await wait_exited(stub, capsule, info.tag)
        assert final.timed_out and final.restarts >= 1

    async def test_a_restart_that_cannot_spawn_ends_it_with_the_reason_in_its_log(
        self, stub: Any, capsule: str
    ) -> None:
        await exec_sh(
            stub, capsule, "printf '#!/bin/sh\\nrm -f \"$0\"\\nexit 4\\n' > once.sh; chmod +x once.sh"
        )
        request = pb.StartRequest(capsule_id=capsule, cmd="./once.sh", restart=restart())
        info = wire.process_info(await stub.StartProcess(request))
        events = await read_output(stub, capsule, info.tag)
        assert not [e for e in events if isinstance(e, domain.ProcessRestarted)]
        assert b"could not be restarted" in joined(events, domain.Stream.STDERR)
        assert b"not found" in joined(events, domain.Stream.STDERR)
        final = await wait_exited(stub, capsule, info.tag)
        assert (final.exit_code, final.restarts) == (4, 0)


class TestReadiness:
    async def test_ready_once_the_port_accepts_connections(self, stub: Any, capsule: str) -> None:
        port = free_port()
        call = await watch(stub, capsule)
        request = pb.StartRequest(
            capsule_id=capsule,
            cmd="sh",
            args=["-c", listener(port)],
            readiness=pb.Readiness(port=port, timeout_sec=10),
        )
        info = wire.process_info(await stub.StartProcess(request))
        assert not info.ready and info.ready_at is None
        seen = await events_until(call, Kind.READY)
        assert [e.kind for e in seen] == [Kind.STARTED, Kind.READY]
        ready = wire.process_info(await stub.GetProcess(ref(capsule, info.tag)))
        assert ready.ready and ready.ready_at is not None and ready.ready_at >= info.started_at
        assert ready.status is domain.ProcessStatus.RUNNING
        call.cancel()

    async def test_ready_once_a_line_matches(self, stub: Any, capsule: str) -> None:
        call = await watch(stub, capsule)
        script = "printf 'starting\\nlisten'; sleep 0.2; printf 'ing on 8080\\n'; sleep 30"
        request = pb.StartRequest(
            capsule_id=capsule,
            cmd="sh",
            args=["-c", script],
            readiness=pb.Readiness(output_pattern=r"^listening on \d+$", timeout_sec=10),
        )
        info = wire.process_info(await stub.StartProcess(request))
        seen = await events_until(call, Kind.READY)
        assert seen[-1].process.ready and seen[-1].process.pid == info.pid
        call.cancel()

    async def test_not_ready_in_time_kills_the_group_and_ends_not_ready(
        self, stub: Any, capsule: str
    ) -> None:
        request = pb.StartRequest(
            capsule_id=capsule,
            cmd="sh",
            args=["-c", "echo waiting; sleep 30"],
            readiness=pb.Readiness(output_pattern="never", timeout_sec=0.3),
            restart=restart(pb.RestartPolicy.ALWAYS),
        )
        info = wire.process_info(await stub.StartProcess(request))
        final = await wait_exited(stub, capsule, info.tag)
        assert (final.ready, final.signal, final.restarts) == (False, signal.SIGKILL, 0)
        events = await read_output(stub, capsule, info.tag)
        assert b"was not ready" in joined(events, domain.Stream.STDERR)

    async def test_each_run_becomes_ready_again(self, stub: Any, capsule: str) -> None:
        call = await watch(stub, capsule)
        request = pb.StartRequest(
            capsule_id=capsule,
            cmd="sh",
            args=["-c", "echo ready; sleep 0.2; exit 1"],
            readiness=pb.Readiness(output_pattern="ready", timeout_sec=10),
            restart=restart(max_restarts=1),
        )
        await stub.StartProcess(request)
        seen = await events_until(call, Kind.EXITED)
        assert [e.kind for e in seen] == [Kind.STARTED, Kind.READY, Kind.RESTARTED, Kind.READY, Kind.EXITED]
        assert not seen[2].process.ready  # a new run is not ready until it says so
        assert seen[1].process.pid != seen[3].process.pid == seen[2].process.pid
        call.cancel()

    async def test_a_process_without_a_check_is_ready_from_its_start(self, stub: Any, capsule: str) -> None:
        info = await start_sh(stub, capsule, "sleep 30")
        assert info.ready and info.ready_at == info.started_at


class TestBadInput:
    @pytest.mark.parametrize(
        ("fields", "words"),
        [
            ({"restart": restart(max_restarts=100_001)}, "restart.maxRestarts"),
            ({"restart": restart(backoff_sec=-1)}, "restart.backoffSec"),
            ({"restart": restart(backoff_sec=float("nan"))}, "restart.backoffSec is not a number"),
            ({"restart": restart(backoff_sec=2, max_backoff_sec=1)}, "restart.maxBackoffSec"),
            ({"readiness": pb.Readiness(port=0, timeout_sec=1)}, "readiness.port is 0"),
            ({"readiness": pb.Readiness(port=70000, timeout_sec=1)}, "readiness.port is 70000"),
            ({"readiness": pb.Readiness(output_pattern="(", timeout_sec=1)}, "readiness.outputPattern"),
            ({"readiness": pb.Readiness(output_pattern="a" * 1025, timeout_sec=1)}, "1025 characters"),
            ({"readiness": pb.Readiness(timeout_sec=1)}, "exactly one of port and outputPattern"),
            ({"readiness": pb.Readiness(port=80, timeout_sec=0)}, "readiness.timeoutSec"),
        ],
    )
    async def test_is_invalid_request_naming_the_field(
        self, stub: Any, capsule: str, fields: dict[str, Any], words: str
    ) -> None:
        request = pb.StartRequest(capsule_id=capsule, cmd="true", **fields)
        error = await grpc_error(stub.StartProcess(request))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert words in (error.details() or "")


class TestBackoff:
    def test_doubles_up_to_the_most_with_a_little_jitter_and_starts_over_after_a_long_run(self) -> None:
        backoff = Backoff(domain.RestartSpec(backoff_sec=1.0, max_backoff_sec=5.0))
        delays = [backoff.next_delay(run_sec=0.1) for _ in range(5)]
        for delay, base in zip(delays, [1, 2, 4, 5, 5], strict=True):
            assert base * 0.9 <= delay <= base * 1.1
        assert 0.9 <= backoff.next_delay(run_sec=6.0) <= 1.1  # it was up longer than the most delay


class TestLineMatcher:
    def test_matches_a_line_split_across_reads_once_and_again_after_rearm(self) -> None:
        passed: list[bytes] = []
        matches: list[int] = []
        matcher = LineMatcher(r"^ready on \d+$", lambda _stream, data: passed.append(data))
        matcher.on_match = lambda: matches.append(1)
        out = domain.Stream.STDOUT
        for data in (b"starting\nrea", b"dy on 80", b"80\r\n", b"ready on 1\n"):
            matcher.feed(out, data)
        assert matches == [1] and b"".join(passed) == b"starting\nready on 8080\r\nready on 1\n"
        matcher.rearm()
        matcher.feed(domain.Stream.STDERR, b"ready on 2\n")
        assert matches == [1, 1]

    def test_a_line_is_matched_on_its_first_bytes_only(self) -> None:
        matches: list[int] = []
        matcher = LineMatcher("tail", lambda _stream, _data: None)
        matcher.on_match = lambda: matches.append(1)
        matcher.feed(domain.Stream.STDOUT, b"x" * (MAX_LINE_BYTES + 10) + b"tail\n")
        assert matches == []
        matcher.feed(domain.Stream.STDOUT, b"tail\n")
        assert matches == [1]
