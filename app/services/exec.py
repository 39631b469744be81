"""Run a command to completion in a capsule."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from app import domain
from app.domain import Encoding, ExecSpec, InputLimits
from app.hosts.pool import HostPool
from app.services.capsules import CapsuleService
from app.services.limits import TeamLimits

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ExecOutcome:
    """An exec's result, with its output as text: both streams in one encoding."""

    capsule_id: str
    cmd: str
    result: domain.ExecResult
    stdout: str
    stderr: str
    encoding: Encoding


def _texts(stdout: bytes, stderr: bytes) -> tuple[str, str, Encoding]:
    """Both streams in the same encoding: UTF8 when both are valid UTF-8, else BASE64."""
    out, out_encoding = domain.encode_output(stdout)
    err, err_encoding = domain.encode_output(stderr)
    if out_encoding is err_encoding:
        return out, err, out_encoding
    return domain.to_base64(stdout), domain.to_base64(stderr), Encoding.BASE64


class ExecService:
    """Exec use case for one team; built per request."""

    def __init__(
        self,
        *,
        pool: HostPool,
        capsules: CapsuleService,
        input_limits: InputLimits,
        limits: TeamLimits,
        team_id: int,
    ) -> None:
        self._pool, self._capsules, self._input_limits = pool, capsules, input_limits
        self._limits, self._team_id = limits, team_id

    async def run(self, capsule_id: str, spec: ExecSpec) -> ExecOutcome:
        """Runs to completion or timeout and returns the output."""
        domain.check_exec_spec(spec, self._input_limits)
        capsule = await self._capsules.require_running(capsule_id)
        async with self._limits.exec_slot(self._team_id), self._capsules.in_use(capsule):
            result = await self._pool.client(capsule.host_id).exec(capsule_id, spec)
        logger.info(
            "capsule %s exec %s exited %s (signal %s)",
            capsule_id,
            spec.cmd,
            result.exit_code,
            domain.signal_name(result.signal),
        )
        stdout, stderr, encoding = _texts(result.stdout, result.stderr)
        return ExecOutcome(
            capsule_id=capsule_id,
            cmd=spec.cmd,
            result=result,
            stdout=stdout,
            stderr=stderr,
            encoding=encoding,
        )
