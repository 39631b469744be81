"""Processes on a pseudo-terminal through the API: start with terminal, typed keys, resizeTerminal."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from app.services.events import encode_cursor
from tests.e2e.client import HttpClient, subscribe, ws_session
from tests.e2e.conftest import Server
from tests.e2e.test_processes import collect_output, start, wait_for_status

# Reports its terminal's size on each SIGWINCH, and "int" on SIGINT before it exits 3.
WATCHER = (
    "trap 'echo winch $(stty size)' WINCH; trap 'echo int; exit 3' INT; "
    "echo ready $(stty size); while :; do sleep 0.05; done"
)


async def output_until(server: Server, key: str, capsule_id: str, selector: str, needle: str) -> str:
    """The process's output from its start until needle is in it."""
    text = ""
    async with ws_session(server.ws_url, key, "graphql-transport-ws") as session:
        async with asyncio.timeout(10):
            async for result in subscribe(session, "ProcessOutput", capsuleId=capsule_id, selector=selector):
                event = result["processOutput"]
                if event["__typename"] == "OutputChunk":
                    assert event["stream"] == "STDOUT"
                    text += str(event["data"])
                    if needle in text:
                        return text
    raise AssertionError(f"{needle!r} never came; the output was {text!r}")


async def resize(api: HttpClient, capsule_id: str, selector: str, cols: int, rows: int) -> Any:
    return await api.run("ResizeTerminal", capsuleId=capsule_id, selector=selector, cols=cols, rows=rows)


async def test_a_terminal_process_sees_a_tty_of_its_size(
    server: Server, key: str, api: HttpClient, capsule_id: str
) -> None:
    script = "tty; stty size; [ -t 0 ] && [ -t 1 ] && echo both-ttys; printf '\\033[32mgreen\\033[0m\\n'"
    started = await start(api, capsule_id, "sh", "-c", script, terminal={"cols": 90, "rows": 20})
    assert started["terminal"] is True
    text = await collect_output(server, key, capsule_id, started["tag"])
    assert re.fullmatch(r"/dev/pts/\d+\r\n20 90\r\nboth-ttys\r\n\x1b\[32mgreen\x1b\[0m\r\n", text), text
    exited = await wait_for_status(api, capsule_id, started["tag"], "EXITED")
    assert exited["terminal"] is True and exited["exitCode"] == 0


async def test_the_default_terminal_is_80_by_24(
    server: Server, key: str, api: HttpClient, capsule_id: str
) -> None:
    started = await start(api, capsule_id, "stty", "size", terminal={})
    assert await collect_output(server, key, capsule_id, started["tag"]) == "24 80\r\n"


async def test_without_a_terminal_nothing_is_a_tty(
    server: Server, key: str, api: HttpClient, capsule_id: str
) -> None:
    started = await start(api, capsule_id, "sh", "-c", "[ -t 0 ] || [ -t 1 ] || echo no-tty", stdin=True)
    assert started["terminal"] is False
    assert await collect_output(server, key, capsule_id, started["tag"]) == "no-tty\n"


async def test_resize_and_ctrl_c(server: Server, key: str, api: HttpClient, capsule_id: str) -> None:
    started = await start(api, capsule_id, "sh", "-c", WATCHER, terminal={"cols": 80, "rows": 24})
    tag = started["tag"]
    await output_until(server, key, capsule_id, tag, "ready 24 80\r\n")
    assert (await resize(api, capsule_id, tag, 132, 50)).ok() == {"resizeTerminal": True}
    await output_until(server, key, capsule_id, tag, "winch 50 132\r\n")
    await api.run("SendInput", capsuleId=capsule_id, selector=tag, data="\u0003")
    text = await collect_output(server, key, capsule_id, tag)
    assert text.endswith("int\r\n"), text
    exited = await wait_for_status(api, capsule_id, tag, "EXITED")
    assert exited["exitCode"] == 3


async def test_typed_keys_reach_a_shell(server: Server, key: str, api: HttpClient, capsule_id: str) -> None:
    started = await start(api, capsule_id, "sh", terminal={"cols": 80, "rows": 24})
    tag = started["tag"]
    await api.run("SendInput", capsuleId=capsule_id, selector=tag, data="echo $((6 * 7))\r")
    await output_until(server, key, capsule_id, tag, "42\r\n")
    await api.run("SendInput", capsuleId=capsule_id, selector=tag, data="\u0004")  # EOF: sh exits
    exited = await wait_for_status(api, capsule_id, tag, "EXITED")
    assert exited["exitCode"] == 0


async def test_resize_errors(api: HttpClient, capsule_id: str) -> None:
    piped = await start(api, capsule_id, "sleep", "30")
    answer = await resize(api, capsule_id, piped["tag"], 100, 30)
    assert answer.codes == ["INVALID_STATE"] and "has no terminal" in answer.errors[0]["message"]

    on_terminal = await start(api, capsule_id, "sleep", "30", terminal={"cols": 80, "rows": 24})
    for cols, rows, field in ((0, 24, "cols"), (80, 1001, "rows"), (-1, 24, "cols")):
        answer = await resize(api, capsule_id, on_terminal["tag"], cols, rows)
        assert answer.codes == ["INVALID_REQUEST"], answer.errors
        assert answer.errors[0]["message"].startswith(f"{field} is "), answer.errors

    for size, field in (({"cols": 1001}, "terminal.cols"), ({"rows": 0}, "terminal.rows")):
        answer = await api.run("StartProcess", capsuleId=capsule_id, input={"cmd": "true", "terminal": size})
        assert answer.codes == ["INVALID_REQUEST"], answer.errors
        assert answer.errors[0]["message"].startswith(f"{field} is "), answer.errors

    answer = await resize(api, capsule_id, "no-such-process", 80, 24)
    assert answer.codes == ["NOT_FOUND"]


async def test_process_events_say_terminal(
    server: Server, key: str, api: HttpClient, capsule_id: str
) -> None:
    started = await start(api, capsule_id, "true", tag="term", terminal={"cols": 80, "rows": 24})
    await wait_for_status(api, capsule_id, started["tag"], "EXITED")
    seen: dict[str, bool] = {}
    async with ws_session(server.ws_url, key, "graphql-transport-ws") as session:
        async with asyncio.timeout(10):
            # From the capsule's first event on: the stored STARTED and EXITED, replayed.
            after = encode_cursor(capsule_id, 0)
            async for result in subscribe(session, "ProcessEvents", capsuleId=capsule_id, after=after):
                event = result["processEvents"]
                seen[event["kind"]] = event["process"]["terminal"]
                if event["kind"] == "EXITED":
                    break
    assert seen == {"STARTED": True, "EXITED": True}
