"""Capsule; capsule, capsules, createCapsule, destroyCapsule."""

from __future__ import annotations

from datetime import datetime

import strawberry
from strawberry import ID, UNSET

from app import domain
from app.api.auth import team_field, team_mutation
from app.api.context import Info
from app.api.enums import CapsuleRuntime, CapsuleStatus, ProcessStatus
from app.api.processes import Process
from app.api.usage import ResourceUsage
from app.domain import CapsuleInfo

DEFAULT_TIMEOUT_SEC = 300


def _given(value: object) -> bool:
    """False for a field left out (UNSET) or sent as null."""
    return value is not None and value is not UNSET


# Fields without defaults print as in the contract (no `= null`): left out, they are UNSET.
@strawberry.input
class CapsuleLimitsInput:
    max_processes: int | None = strawberry.field(
        default=UNSET, description="Null: the server's default (at least 256)."
    )
    memory_mib: int | None = strawberry.field(default=UNSET, name="memoryMiB")
    cpus: float | None = UNSET

    def to_requested(self) -> domain.RequestedLimits:
        """The limits asked for; None where the server's default applies."""
        return domain.RequestedLimits(
            max_processes=self.max_processes if _given(self.max_processes) else None,
            memory_mib=self.memory_mib if _given(self.memory_mib) else None,
            cpus=self.cpus if _given(self.cpus) else None,
        )


@strawberry.input
class CreateCapsuleInput:
    timeout_sec: int | None = DEFAULT_TIMEOUT_SEC
    network: bool | None = strawberry.field(
        default=False, description="Let its processes reach networks beyond the capsule's own loopback."
    )
    limits: CapsuleLimitsInput | None = UNSET

    def timeout(self) -> int:
        return self.timeout_sec if isinstance(self.timeout_sec, int) else DEFAULT_TIMEOUT_SEC

    def requested_limits(self) -> domain.RequestedLimits | None:
        return self.limits.to_requested() if isinstance(self.limits, CapsuleLimitsInput) else None


@strawberry.type(description="What a capsule's processes may use together.")
class CapsuleLimits:
    max_processes: int = strawberry.field(
        description="Most processes and threads alive in the capsule at once."
    )
    memory_mib: int | None = strawberry.field(
        name="memoryMiB", description="Memory in MiB; null: no limit beyond the host's."
    )
    cpus: float | None = strawberry.field(
        description="CPU share in cores (0.5 = half a core); null: no limit."
    )

    @classmethod
    def of(cls, limits: domain.CapsuleLimits) -> CapsuleLimits:
        return cls(max_processes=limits.max_processes, memory_mib=limits.memory_mib, cpus=limits.cpus)


@strawberry.type
class Capsule:
    id: ID
    status: CapsuleStatus
    host_id: ID
    created_at: datetime
    last_active_at: datetime
    timeout_sec: int = strawberry.field(description="Idle seconds after which the capsule is stopped.")
    runtime: CapsuleRuntime
    network: bool = strawberry.field(
        description="Whether its processes reach networks beyond the capsule's own loopback."
    )
    limits: CapsuleLimits
    capsule: strawberry.Private[CapsuleInfo]

    @strawberry.field
    async def processes(self, info: Info, status: ProcessStatus | None = None) -> list[Process]:
        infos = await info.context.services.processes.list(self.id, status)
        return [Process.from_info(p) for p in infos]

    async def _usage(self, info: Info) -> ResourceUsage | None:
        # Asked of the host only when selected: a list of capsules costs no round trips otherwise.
        return ResourceUsage.of(await info.context.services.capsules.usage(self.capsule))

    usage: ResourceUsage | None = strawberry.field(
        resolver=_usage,
        description="Null where the runtime cannot measure it (PLAIN), while the capsule is not RUNNING, "
        "and while its host cannot be reached.",
    )

    @classmethod
    def from_info(cls, capsule: CapsuleInfo) -> Capsule:
        return cls(
            id=ID(capsule.id),
            status=capsule.status,
            host_id=ID(capsule.host_id),
            created_at=capsule.created_at,
            last_active_at=capsule.last_active_at,
            timeout_sec=capsule.timeout_sec,
            runtime=CapsuleRuntime.of(capsule.runtime),
            network=capsule.network,
            limits=CapsuleLimits.of(capsule.limits),
            capsule=capsule,
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
        # Printed as `= {}` as the contract has it; the fields' own defaults then apply.
        input: CreateCapsuleInput = CreateCapsuleInput(timeout_sec=UNSET, network=UNSET),  # noqa: B008
    ) -> Capsule:
        capsule = await info.context.services.capsules.create(
            timeout_sec=input.timeout(), network=input.network is True, limits=input.requested_limits()
        )
        return Capsule.from_info(capsule)

    @team_mutation(
        description="Ends every process of the capsule and removes it from its host: STOPPED once the host "
        "confirmed, STOPPING while the host cannot be reached (the stop is retried until it can)."
    )
    async def destroy_capsule(self, info: Info, id: ID) -> Capsule:
        return Capsule.from_info(await info.context.services.capsules.destroy(id))
