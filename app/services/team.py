"""The services of one team, built per request from the server's shared parts."""

from __future__ import annotations

from dataclasses import dataclass, field

from app.bus.broadcast import Bus
from app.config import Settings
from app.domain import Team
from app.hosts.pool import HostPool
from app.services.capsules import CapsuleActivity, CapsuleService
from app.services.exec import ExecService
from app.services.fanout import OutputFanout
from app.services.feeds import EventFeeds
from app.services.hosts import HostService
from app.services.keys import KeyService
from app.services.lifecycle import CapsuleLifecycle
from app.services.limits import TeamLimits
from app.services.output import OutputService
from app.services.processes import ProcessService
from app.services.records import ProcessRecords
from app.services.revocations import KeyRevocations
from app.store.session import Database


@dataclass(frozen=True, slots=True)
class Platform:
    """The parts every team service shares: store, bus, hosts; built once per server."""

    settings: Settings
    db: Database
    bus: Bus
    pool: HostPool
    hosts: HostService
    keys: KeyService
    revocations: KeyRevocations
    records: ProcessRecords
    lifecycle: CapsuleLifecycle
    fanout: OutputFanout
    feeds: EventFeeds
    limits: TeamLimits
    activity: CapsuleActivity = field(default_factory=CapsuleActivity)

    def for_team(self, team: Team) -> TeamServices:
        """The use cases, acting for one team."""
        capsules = CapsuleService(
            db=self.db,
            pool=self.pool,
            hosts=self.hosts,
            lifecycle=self.lifecycle,
            activity=self.activity,
            team=team,
            max_capsules=self.settings.max_capsules_per_team,
            default_limits=self.settings.capsule_limits,
        )
        input_limits = self.settings.input_limits
        processes = ProcessService(
            db=self.db,
            pool=self.pool,
            feeds=self.feeds,
            capsules=capsules,
            records=self.records,
            team_id=team.id,
            input_limits=input_limits,
            max_processes=self.settings.max_processes_per_capsule,
        )
        return TeamServices(
            team=team,
            capsules=capsules,
            processes=processes,
            exec=ExecService(
                pool=self.pool,
                capsules=capsules,
                input_limits=input_limits,
                limits=self.limits,
                team_id=team.id,
            ),
            output=OutputService(pool=self.pool, fanout=self.fanout, capsules=capsules, processes=processes),
        )


@dataclass(frozen=True, slots=True)
class TeamServices:
    """What a resolver may call, all for the same team."""

    team: Team
    capsules: CapsuleService
    processes: ProcessService
    exec: ExecService
    output: OutputService
