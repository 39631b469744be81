"""ExecService.run on the real store and the embedded agent: a missing capsule, another team's, one not
running, bad input, and valid (both streams in one encoding, exit codes, signals, timeouts)."""

from __future__ import annotations

import base64
import signal

import pytest

from app.domain import Encoding, ExecSpec
from app.errors import ErrorCode, InvalidRequest, NotFound
from tests.services.conftest import (
    MAX_INPUT_BYTES,
    MISSING,
    Teams,
    refused_as_missing,
    refused_when_not_running,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

TRUE = ExecSpec(cmd="true")


class TestRun:
    async def test_not_existing_capsule_is_not_found(self, teams: Teams) -> None:
        with pytest.raises(NotFound, match=f"^no capsule {MISSING}$"):
            await teams.ours.exec.run(MISSING, TRUE)

    async def test_other_teams_capsule_is_not_found(self, teams: Teams) -> None:
        await refused_as_missing(teams, lambda capsule_id: teams.ours.exec.run(capsule_id, TRUE))

    async def test_capsule_not_running_is_invalid_state(self, teams: Teams) -> None:
        await refused_when_not_running(teams, lambda capsule_id: teams.ours.exec.run(capsule_id, TRUE))

    @pytest.mark.parametrize(
        ("spec", "words"),
        [
            (ExecSpec(cmd=""), "cmd is empty"),
            (ExecSpec(cmd="true\0"), "NUL"),
            (ExecSpec(cmd="true", timeout_sec=-1), "timeoutSec is negative"),
            (ExecSpec(cmd="true", timeout_sec=float("nan")), "timeoutSec is not a number"),
            (
                ExecSpec(cmd="cat", stdin=b"x" * (MAX_INPUT_BYTES + 1)),
                f"stdin has {MAX_INPUT_BYTES + 1} bytes; at most {MAX_INPUT_BYTES} are allowed",
            ),
        ],
    )
    async def test_bad_input_is_invalid_request(self, teams: Teams, spec: ExecSpec, words: str) -> None:
        capsule = await teams.capsule()
        with pytest.raises(InvalidRequest, match=words) as caught:
            await teams.ours.exec.run(capsule.id, spec)
        assert caught.value.code is ErrorCode.INVALID_REQUEST

    async def test_valid_utf8_streams_and_exit_code(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        spec = ExecSpec(cmd="sh", args=("-c", "printf 'héllo ✓'; printf oops >&2; exit 5"))
        outcome = await teams.ours.exec.run(capsule.id, spec)
        assert (outcome.capsule_id, outcome.cmd) == (capsule.id, "sh")
        assert (outcome.stdout, outcome.stderr, outcome.encoding) == ("héllo ✓", "oops", Encoding.UTF8)
        assert (outcome.result.exit_code, outcome.result.signal, outcome.result.timed_out) == (5, None, False)

    async def test_stdin_up_to_the_limit_is_read(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        data = b"y" * MAX_INPUT_BYTES
        outcome = await teams.ours.exec.run(capsule.id, ExecSpec(cmd="cat", stdin=data))
        assert outcome.stdout == data.decode()

    async def test_one_stream_not_utf8_makes_both_base64(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        spec = ExecSpec(cmd="sh", args=("-c", "printf 'text'; printf '\\377\\000' >&2"))
        outcome = await teams.ours.exec.run(capsule.id, spec)
        assert outcome.encoding is Encoding.BASE64
        assert base64.b64decode(outcome.stdout) == b"text"
        assert base64.b64decode(outcome.stderr) == b"\xff\x00"

    async def test_timed_out_is_killed_with_its_output_so_far(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        spec = ExecSpec(cmd="sh", args=("-c", "echo started; exec sleep 30"), timeout_sec=0.3)
        outcome = await teams.ours.exec.run(capsule.id, spec)
        assert outcome.result.timed_out and outcome.stdout == "started\n"
        assert (outcome.result.signal, outcome.result.exit_code) == (signal.SIGKILL, -9)
