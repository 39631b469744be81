"""ResourceUsage: CPU and memory as a host's kernel measures them."""

from __future__ import annotations

import strawberry

from app import domain


@strawberry.type(
    description="CPU and memory, measured by the host's kernel. Byte counts are Floats: exact up to 2^53."
)
class ResourceUsage:
    cpu_sec: float = strawberry.field(description="User plus system CPU seconds used so far.")
    memory_bytes: float = strawberry.field(
        description="Resident memory now, in bytes; 0 once everything has ended."
    )
    memory_peak_bytes: float = strawberry.field(
        description="The most resident memory used at any one time, in bytes."
    )
    processes: int = strawberry.field(description="Processes alive now.")

    @classmethod
    def of(cls, usage: domain.ResourceUsage | None) -> ResourceUsage | None:
        if usage is None:
            return None
        # GraphQL's Int stops at 2^31: byte counts travel as Floats, as the contract says.
        return cls(
            cpu_sec=usage.cpu_sec,
            memory_bytes=float(usage.memory_bytes),
            memory_peak_bytes=float(usage.memory_peak_bytes),
            processes=usage.processes,
        )
