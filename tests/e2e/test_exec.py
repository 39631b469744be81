"""exec through the API: UTF8 and BASE64 output, exit codes, timeouts, truncation, stdin, envs."""

from __future__ import annotations

import base64

from tests.e2e.client import HttpClient


async def run(api: HttpClient, capsule_id: str, **fields: object) -> dict[str, object]:
    return dict((await api.run("Exec", capsuleId=capsule_id, input=fields)).ok()["exec"])


async def test_utf8_output_and_exit_code(api: HttpClient, capsule_id: str) -> None:
    result = await run(api, capsule_id, cmd="sh", args=["-c", "printf 'héllo ✓'; printf oops >&2; exit 5"])
    assert result["stdout"] == "héllo ✓" and result["stderr"] == "oops"
    assert result["exitCode"] == 5 and result["encoding"] == "UTF8"
    assert result["timedOut"] is False and result["truncated"] is False and result["signal"] is None
    assert result["capsuleId"] == capsule_id and result["cmd"] == "sh"
    assert isinstance(result["durationMs"], int)


async def test_binary_output_is_base64(api: HttpClient, capsule_id: str) -> None:
    result = await run(api, capsule_id, cmd="sh", args=["-c", "printf '\\377\\000\\001'"])
    assert result["encoding"] == "BASE64"
    assert base64.b64decode(str(result["stdout"])) == b"\xff\x00\x01"


async def test_timeout_returns_partial_output(api: HttpClient, capsule_id: str) -> None:
    result = await run(api, capsule_id, cmd="sh", args=["-c", "echo started; sleep 30"], timeoutSec=1)
    assert result["timedOut"] is True and result["stdout"] == "started\n"
    assert (result["signal"], result["exitCode"]) == ("SIGKILL", -9)


async def test_the_signal_that_ended_it(api: HttpClient, capsule_id: str) -> None:
    result = await run(api, capsule_id, cmd="sh", args=["-c", "kill -TERM $$"])
    assert (result["signal"], result["exitCode"], result["timedOut"]) == ("SIGTERM", -15, False)


async def test_a_normal_exit_has_no_signal(api: HttpClient, capsule_id: str) -> None:
    result = await run(api, capsule_id, cmd="true")
    assert (result["signal"], result["exitCode"], result["timedOut"]) == (None, 0, False)


async def test_truncation(api: HttpClient, capsule_id: str) -> None:
    result = await run(api, capsule_id, cmd="head", args=["-c", "200000", "/dev/zero"])
    assert result["truncated"] is True and result["exitCode"] == 0


async def test_stdin_envs_and_cwd(api: HttpClient, capsule_id: str) -> None:
    await run(api, capsule_id, cmd="mkdir", args=["sub"])
    result = await run(
        api,
        capsule_id,
        cmd="sh",
        args=["-c", 'read line; echo "$line $GREETING $(basename $PWD)"'],
        stdin="hello\n",
        envs=[{"name": "GREETING", "value": "world"}],
        cwd="sub",
    )
    assert result["stdout"] == "hello world sub\n"


async def test_host_environment_does_not_leak(api: HttpClient, capsule_id: str) -> None:
    result = await run(api, capsule_id, cmd="env")
    assert "CAPSULE_" not in str(result["stdout"])
