"""Processes on a pseudo-terminal: the tty they see, its size and SIGWINCH, typed keys, one output stream."""

from __future__ import annotations

import asyncio
import re
import signal
from typing import Any

import grpc

from app import domain, wire
from app.agent import child
from app.pb import agent_pb2 as pb
from tests.agent.helpers import eventually, grpc_error, joined, read_output, ref, start_sh, wait_output

# A shell that reports its terminal's size on each SIGWINCH, and "int" on SIGINT before it exits 3.
# sh runs a trap once its foreground command is done: the sleeps are short.
WATCHER = (
    "trap 'echo winch $(stty size)' WINCH; trap 'echo int; exit 3' INT; "
    "echo ready $(stty size); while :; do sleep 0.05; done"
)


def terminal(cols: int = 80, rows: int = 24) -> pb.TerminalSize:
    return pb.TerminalSize(cols=cols, rows=rows)


async def start_on_terminal(stub: Any, capsule: str, script: str, **size: int) -> domain.ProcessInfo:
    return await start_sh(stub, capsule, script, terminal=terminal(**size))


async def resize(stub: Any, capsule: str, selector: str | int, cols: int, rows: int) -> None:
    await stub.ResizeTerminal(pb.ResizeRequest(process=ref(capsule, selector), size=terminal(cols, rows)))


async def send(stub: Any, capsule: str, selector: str | int, data: bytes) -> None:
    await stub.SendInput(pb.InputRequest(process=ref(capsule, selector), data=data))


async def test_tty_is_a_dev_pts_device_of_the_start_size(stub: Any, capsule: str) -> None:
    info = await start_on_terminal(stub, capsule, "tty; stty size", cols=132, rows=43)
    assert info.terminal and info.stdin
    events = await read_output(stub, capsule, info.pid)
    out = joined(events)
    assert re.search(rb"^/dev/pts/\d+\r\n43 132\r\n$", out), out
    assert not joined(events, domain.Stream.STDERR)  # one stream: stderr is the terminal too
    exit_event = events[-1]
    assert isinstance(exit_event, domain.ProcessExit) and exit_event.exit_code == 0


async def test_stdin_and_stdout_are_ttys_only_on_a_terminal(stub: Any, capsule: str) -> None:
    script = "for fd in 0 1 2; do if [ -t $fd ]; then echo $fd:tty; else echo $fd:no; fi; done"
    on_terminal = await start_on_terminal(stub, capsule, script)
    assert joined(await read_output(stub, capsule, on_terminal.pid)) == b"0:tty\r\n1:tty\r\n2:tty\r\n"
    piped = await start_sh(stub, capsule, script, stdin=True)
    assert not piped.terminal
    assert joined(await read_output(stub, capsule, piped.pid)) == b"0:no\n1:no\n2:no\n"


async def test_resize_sets_the_size_and_sends_sigwinch(stub: Any, capsule: str) -> None:
    info = await start_on_terminal(stub, capsule, WATCHER, cols=80, rows=24)
    await wait_output(stub, capsule, info.pid, b"ready 24 80\r\n")
    await resize(stub, capsule, info.pid, 120, 40)
    await wait_output(stub, capsule, info.pid, b"winch 40 120\r\n")
    await resize(stub, capsule, info.tag, 1, 1000)
    await wait_output(stub, capsule, info.pid, b"winch 1000 1\r\n")


async def test_ctrl_c_is_sigint_of_the_foreground_job(stub: Any, capsule: str) -> None:
    info = await start_on_terminal(stub, capsule, WATCHER)
    await wait_output(stub, capsule, info.pid, b"ready")
    await send(stub, capsule, info.pid, b"\x03")
    events = await read_output(stub, capsule, info.pid)
    assert b"int\r\n" in joined(events)
    exit_event = events[-1]
    assert isinstance(exit_event, domain.ProcessExit) and exit_event.exit_code == 3


async def test_keys_are_echoed_and_ctrl_d_is_end_of_file(stub: Any, capsule: str) -> None:
    info = await start_on_terminal(stub, capsule, "echo go; cat; echo done")
    await wait_output(stub, capsule, info.pid, b"go")
    await send(stub, capsule, info.pid, b"hello\r")  # Enter, as a terminal sends it
    await wait_output(stub, capsule, info.pid, b"hello\r\nhello\r\n")  # the echo, then cat's copy
    await send(stub, capsule, info.pid, b"\x04")
    events = await read_output(stub, capsule, info.pid)
    assert joined(events).endswith(b"done\r\n")
    exit_event = events[-1]
    assert isinstance(exit_event, domain.ProcessExit) and exit_event.exit_code == 0


async def test_escape_sequences_arrive_unchanged(stub: Any, capsule: str) -> None:
    script = r"printf '\033[1;31mred\033[0m \033[38;5;208morange\033[0m\033[2K\033[H'; echo $TERM"
    info = await start_on_terminal(stub, capsule, script)
    out = joined(await read_output(stub, capsule, info.pid))
    assert out == b"\x1b[1;31mred\x1b[0m \x1b[38;5;208morange\x1b[0m\x1b[2K\x1b[Hxterm-256color\r\n"


async def test_output_goes_through_the_log_whole_and_resumable(stub: Any, capsule: str) -> None:
    info = await start_on_terminal(stub, capsule, "seq 1 30000")
    events = await read_output(stub, capsule, info.pid)
    expected = b"".join(b"%d\r\n" % n for n in range(1, 30001))
    assert joined(events) == expected  # every byte written before the exit, then EIO ends it
    chunks = [e for e in events if isinstance(e, domain.OutputChunk)]
    assert all(c.stream is domain.Stream.STDOUT for c in chunks)
    middle = len(chunks) // 2
    seen = sum(len(c.data) for c in chunks[: middle + 1])
    # A chunk carries the seq of the last event it holds: a reader resumes from the one after it.
    resumed = await read_output(stub, capsule, info.pid, from_seq=chunks[middle].seq + 1)
    assert joined(resumed) == expected[seen:]


async def test_resize_without_a_terminal_is_invalid_state(stub: Any, capsule: str) -> None:
    info = await start_sh(stub, capsule, "sleep 5", stdin=True)
    error = await grpc_error(resize(stub, capsule, info.pid, 100, 30))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "has no terminal" in (error.details() or "")


async def test_close_input_of_a_terminal_is_invalid_state(stub: Any, capsule: str) -> None:
    info = await start_on_terminal(stub, capsule, "sleep 5")
    error = await grpc_error(stub.CloseInput(ref(capsule, info.pid)))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "Ctrl-D" in (error.details() or "")


async def test_sizes_outside_1_to_1000_are_invalid(stub: Any, capsule: str) -> None:
    for cols, rows, field in ((0, 24, "terminal.cols"), (80, 1001, "terminal.rows")):
        error = await grpc_error(start_on_terminal(stub, capsule, "true", cols=cols, rows=rows))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert (error.details() or "").startswith(f"{field} is "), error.details()
    info = await start_on_terminal(stub, capsule, "sleep 5")
    for cols, rows, field in ((1001, 24, "cols"), (80, 0, "rows")):
        error = await grpc_error(resize(stub, capsule, info.pid, cols, rows))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert (error.details() or "").startswith(f"{field} is "), error.details()


async def test_resize_of_an_exited_process_is_invalid_state(stub: Any, capsule: str) -> None:
    info = await start_on_terminal(stub, capsule, "true")
    await read_output(stub, capsule, info.pid)
    error = await grpc_error(resize(stub, capsule, info.pid, 100, 30))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION


async def test_listed_processes_say_which_run_on_a_terminal(stub: Any, capsule: str) -> None:
    on_terminal = await start_on_terminal(stub, capsule, "sleep 5")
    piped = await start_sh(stub, capsule, "sleep 5")
    listed = wire.process_info
    infos = {
        p.pid: listed(p) for p in (await stub.ListProcesses(pb.CapsuleRef(capsule_id=capsule))).processes
    }
    assert infos[on_terminal.pid].terminal and not infos[piped.pid].terminal
    await asyncio.gather(
        *(stub.StopProcess(pb.StopRequest(process=ref(capsule, p), grace_sec=0)) for p in infos)
    )


async def test_a_restarted_process_gets_a_new_terminal_of_the_last_size(stub: Any, capsule: str) -> None:
    restart = pb.RestartPolicy(
        policy=pb.RestartPolicy.ON_FAILURE, max_restarts=1, backoff_sec=0.01, max_backoff_sec=0.01
    )
    info = await start_sh(
        stub, capsule, "tty; read line; stty size; exit 1", terminal=terminal(80, 24), restart=restart
    )
    await wait_output(stub, capsule, info.tag, b"/dev/pts/")
    await resize(stub, capsule, info.tag, 120, 40)
    await send(stub, capsule, info.tag, b"\r")
    await eventually(
        lambda: output_count(stub, capsule, info.tag, b"/dev/pts/", 2), what="the second run's tty line"
    )
    await send(stub, capsule, info.tag, b"\r")
    events = await read_output(stub, capsule, info.tag)
    out = joined(events)
    assert out.count(b"\r\n40 120\r\n") == 2, out  # the restart's terminal has the resized size
    exit_event = events[-1]
    assert isinstance(exit_event, domain.ProcessExit) and exit_event.exit_code == 1


async def output_count(stub: Any, capsule: str, selector: str, needle: bytes, count: int) -> bool:
    """True once the process's retained stdout holds needle count times."""
    request = pb.OutputRequest(process=ref(capsule, selector), from_seq=0)
    seen = b""
    async with asyncio.timeout(0.5):
        stream = stub.StreamOutput(request)
        try:
            async for batch in stream:
                seen += joined(wire.output_events(batch))
                if seen.count(needle) >= count:
                    return True
        finally:
            stream.cancel()
    return False


async def test_a_signal_the_agent_was_started_ignoring_reaches_its_processes(stub: Any, capsule: str) -> None:
    """An agent run as `cmd &` ignores SIGINT and SIGQUIT: its processes get them at their default
    all the same, so ^C and a trap on INT work."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        child._defaults_for_children()
        info = await start_on_terminal(stub, capsule, "grep SigIgn /proc/self/status; echo ready; exec cat")
        await wait_output(stub, capsule, info.pid, b"ready")
        await send(stub, capsule, info.pid, b"\x03")
        events = await read_output(stub, capsule, info.pid)
        found = re.search(rb"SigIgn:\s*([0-9a-f]+)", joined(events))
        assert found is not None, events
        assert not int(found.group(1), 16) & (1 << (signal.SIGINT - 1)), found.group(0)
        exit_event = events[-1]
        assert isinstance(exit_event, domain.ProcessExit) and exit_event.signal == signal.SIGINT
    finally:
        signal.signal(signal.SIGINT, previous)
