"""ExecResult and exec."""

from __future__ import annotations

import strawberry
from strawberry import ID

from app import domain
from app.api.auth import team_mutation
from app.api.context import Info
from app.api.enums import Encoding, Signal
from app.api.processes import CommandInput
from app.services.exec import ExecOutcome


@strawberry.input
class ExecInput(CommandInput):
    timeout_sec: int | None = 60
    stdin: str | None = None

    def to_spec(self) -> domain.ExecSpec:
        return domain.ExecSpec(
            **self.command(),
            stdin=None if self.stdin is None else self.stdin.encode("utf-8"),
            timeout_sec=self.timeout_sec,
        )


@strawberry.type
class ExecResult:
    capsule_id: ID
    cmd: str
    stdout: str
    stderr: str
    exit_code: int = strawberry.field(
        description="The command's exit status; -N when signal N ended it (signal names it then)."
    )
    signal: Signal | None = strawberry.field(
        description="Set when a signal ended the command (SIGKILL when timeoutSec ran out)."
    )
    duration_ms: int
    encoding: Encoding
    timed_out: bool
    truncated: bool = strawberry.field(description="True when output beyond the exec output cap was dropped.")

    @classmethod
    def from_outcome(cls, outcome: ExecOutcome) -> ExecResult:
        result = outcome.result
        return cls(
            capsule_id=ID(outcome.capsule_id),
            cmd=outcome.cmd,
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            exit_code=result.exit_code,
            signal=Signal.of(result.signal),
            duration_ms=result.duration_ms,
            encoding=outcome.encoding,
            timed_out=result.timed_out,
            truncated=result.truncated,
        )


@strawberry.type
class ExecMutation:
    @team_mutation(description="Runs to completion (or timeout) and returns its output.")
    async def exec(self, info: Info, capsule_id: ID, input: ExecInput) -> ExecResult:
        outcome = await info.context.services.exec.run(capsule_id, input.to_spec())
        return ExecResult.from_outcome(outcome)
