"""Capsule; capsule, capsules, createCapsule, destroyCapsule."""

from __future__ import annotations

from datetime import datetime

import strawberry
from strawberry import ID, UNSET

from app.api.auth import team_field, team_mutation
from app.api.context import Info
from app.api.enums import CapsuleStatus, ProcessStatus
from app.api.processes import Process
from app.domain import CapsuleInfo

DEFAULT_TIMEOUT_SEC = 300


@strawberry.input
class CreateCapsuleInput:
    timeout_sec: int | None = DEFAULT_TIMEOUT_SEC


@strawberry.type
class Capsule:
    id: ID
    status: CapsuleStatus
    host_id: ID
    created_at: datetime
    last_active_at: datetime
    timeout_sec: int = strawberry.field(description="Idle seconds after which the capsule is stopped.")

    @strawberry.field
    async def processes(self, info: Info, status: ProcessStatus | None = None) -> list[Process]:
        infos = await info.context.services.processes.list(self.id, status)
        return [Process.from_info(p) for p in infos]

    @classmethod
    def from_info(cls, capsule: CapsuleInfo) -> Capsule:
        return cls(
            id=ID(capsule.id),
            status=capsule.status,
            host_id=ID(capsule.host_id),
            created_at=capsule.created_at,
            last_active_at=capsule.last_active_at,
            timeout_sec=capsule.timeout_sec,
        )


@strawberry.type
class CapsuleQuery:
    @team_field()
    async def capsule(self, info: Info, id: ID) -> Capsule | None:
        capsule = await info.context.services.capsules.get(id)
        return None if capsule is None else Capsule.from_info(capsule)

    @team_field()
    async def capsules(self, info: Info) -> list[Capsule]:
        return [Capsule.from_info(c) for c in await info.context.services.capsules.list()]


@strawberry.type
class CapsuleMutation:
    @team_mutation()
    async def create_capsule(
        self,
        info: Info,
        # Printed as `= {}` as the contract has it; the field's own default then applies.
        input: CreateCapsuleInput = CreateCapsuleInput(timeout_sec=UNSET),  # noqa: B008
    ) -> Capsule:
        timeout_sec = input.timeout_sec if isinstance(input.timeout_sec, int) else DEFAULT_TIMEOUT_SEC
        capsule = await info.context.services.capsules.create(timeout_sec=timeout_sec)
        return Capsule.from_info(capsule)

    @team_mutation(
        description="Ends every process of the capsule and removes it from its host: STOPPED once the host "
        "confirmed, STOPPING while the host cannot be reached (the stop is retried until it can)."
    )
    async def destroy_capsule(self, info: Info, id: ID) -> Capsule:
        return Capsule.from_info(await info.context.services.capsules.destroy(id))
