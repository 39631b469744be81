"""ExecResult and exec."""

from __future__ import annotations

import strawberry
from strawberry import ID

from app import domain
from app.api.auth import team_mutation
from app.api.context import Info
from app.api.enums import Encoding
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
    exit_code: int
    duration_ms: int
    encoding: Encoding
    timed_out: bool
    truncated: bool = strawberry.field(description="True when output beyond the exec output cap was dropped.")

    @classmethod
    def from_outcome(cls, outcome: ExecOutcome) -> ExecResult:
        # The text fields come from the outcome, the rest from the agent's result.
        return cls(**domain.common_fields(outcome.result, cls) | domain.common_fields(outcome, cls))


@strawberry.type
class ExecMutation:
    @team_mutation(description="Runs to completion (or timeout) and returns its output.")
    async def exec(self, info: Info, capsule_id: ID, input: ExecInput) -> ExecResult:
        outcome = await info.context.services.exec.run(capsule_id, input.to_spec())
        return ExecResult.from_outcome(outcome)
