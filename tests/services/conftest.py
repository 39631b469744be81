"""Fixtures for the service tests.

A real host agent on loopback, for the tests that build the services by hand (test_lifecycle); and
`teams`: the team services of two new teams, built the way the server builds them, on one AppState
per module and database kind (AppState.open: SQLite or PostgreSQL, the memory bus, an embedded agent
on loopback). Every service is team-scoped, so tests that share the state but not their teams see
nothing of each other; a fresh database per test would cost more than the tests themselves.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, cast

import pytest
import pytest_asyncio

from app import domain
from app.config import Settings
from app.domain import CapsuleInfo, CapsuleStatus, InputLimits, ProcessEventKind, ProcessStatus, Team
from app.errors import CapsuleError, ErrorCode, InvalidState, NotFound
from app.hosts.client import HostClient
from app.services.events import encode_cursor
from app.services.team import TeamServices
from app.state import EMBEDDED_HOST_ID, AppState
from app.store import models
from app.store.repositories import CapsuleRepository, ProcessRecordRepository
from tests.conftest import fresh_database
from tests.factories import make_capsule, make_team
from tests.hosts import conftest as hosts
from tests.system import TEST_RUNTIME, processes_under

# The hosts fixtures, for the tests here that build the services by hand (test_lifecycle).
agent, capsule_id, client, pool, settings = (
    hosts.agent,
    hosts.capsule_id,
    hosts.client,
    hosts.pool,
    hosts.settings,
)

T = TypeVar("T")

DEADLINE_SEC = 10.0
MAX_CAPSULES = 2
MAX_PROCESSES = 3
MAX_INPUT_BYTES = 1024
# A host no agent answers for: capsules placed there are the store's alone, so neither the exit
# recorder nor the reconciler (which follow the embedded agent) touches their records.
NOWHERE_HOST_ID = "nowhere"
# A capsule id no team has.
MISSING = "cap-0000000000000000"


async def until(check: Callable[[], Awaitable[T | None]], *, what: str) -> T:
    """Polls check until it answers something other than None or False; fails past the deadline."""
    try:
        async with asyncio.timeout(DEADLINE_SEC):
            while not (found := await check()):
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"still waiting, after {DEADLINE_SEC}s, for {what}")
    return found


def closable(events: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    """A service's stream as the async generator it is, so aclosing() can end it (and its cleanup)."""
    return cast("AsyncGenerator[T, None]", events)


async def collect(events: AsyncIterator[T], *, count: int | None = None) -> list[T]:
    """The events an iterator yields until it ends (or `count` of them); fails past the deadline."""
    seen: list[T] = []
    async with asyncio.timeout(DEADLINE_SEC), aclosing(closable(events)) as generator:
        async for event in generator:
            seen.append(event)
            if len(seen) == count:
                break
    return seen


async def first(events: AsyncIterator[T]) -> T:
    """The first event (a service that refuses raises here: its checks run on first iteration)."""
    [event] = await collect(events, count=1)
    return event


def words(error: CapsuleError, capsule_id: str) -> str:
    """An error's message with the capsule id taken out, to compare what two errors say."""
    return str(error).replace(capsule_id, "<capsule>")


@dataclass
class Teams:
    """A server's shared parts as AppState opens them, and the services of two teams on it: ours,
    which a test acts for, and theirs, whose capsules ours must not reach."""

    state: AppState
    ours: TeamServices
    theirs: TeamServices

    @property
    def host(self) -> HostClient:
        """The embedded agent, as the services reach it."""
        return self.state.platform.pool.client(EMBEDDED_HOST_ID)

    async def capsule(self, services: TeamServices | None = None) -> CapsuleInfo:
        """A new RUNNING capsule of the team (ours unless told), placed on the agent."""
        return await (services or self.ours).capsules.create(timeout_sec=300)

    async def stored_capsule(
        self, status: CapsuleStatus, *, services: TeamServices | None = None, host_id: str = NOWHERE_HOST_ID
    ) -> CapsuleInfo:
        """A capsule of the team in the store only, in any status (on a host nothing follows)."""
        team = (services or self.ours).team
        row = await make_capsule(
            self.state.platform.db, models.Team(id=team.id, name=team.name), status=status, host_id=host_id
        )
        return row.to_info()

    async def stored(self, capsule_id: str, services: TeamServices | None = None) -> CapsuleInfo:
        """The capsule as the store has it now."""
        async with self.state.platform.db.session() as session:
            row = await CapsuleRepository(session, (services or self.ours).team.id).get(capsule_id)
        assert row is not None, f"no capsule {capsule_id} in the store"
        return row.to_info()

    async def record(self, capsule_id: str, tag: str) -> models.ProcessRecord | None:
        """Our team's newest record of the tag in the capsule, or None."""
        async with self.state.platform.db.session() as session:
            return await ProcessRecordRepository(session, self.ours.team.id).get_by_tag(capsule_id, tag)

    async def exited_record(self, capsule_id: str, tag: str) -> models.ProcessRecord:
        """The record of the tag once it says EXITED (the exit recorder writes it a moment after the exit)."""

        async def ended() -> models.ProcessRecord | None:
            record = await self.record(capsule_id, tag)
            return record if record is not None and record.status is ProcessStatus.EXITED else None

        return await until(ended, what=f"the record of {tag} in {capsule_id} to say EXITED")

    async def newest_seq(self, capsule_id: str, services: TeamServices | None = None) -> int:
        """The seq of the capsule's newest event, as the store has it now (0: none yet)."""
        async with self.state.platform.db.session() as session:
            row = await CapsuleRepository(session, (services or self.ours).team.id).get(capsule_id)
        return 0 if row is None else row.last_event_seq

    @asynccontextmanager
    async def events(self, capsule_id: str, services: TeamServices | None = None) -> AsyncIterator[EventLog]:
        """ProcessService.events of the capsule after its newest event now: it gets every event
        written from here on, however long it takes to get going."""
        log = EventLog(teams=self, capsule_id=capsule_id, after=await self.newest_seq(capsule_id, services))
        cursor = encode_cursor(capsule_id, log.after)
        events = closable((services or self.ours).processes.events(capsule_id, cursor))

        async def listen() -> None:
            async with aclosing(events):
                async for event in events:
                    log.received.append(event)

        listener = asyncio.create_task(listen())
        try:
            yield log
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)


@dataclass
class EventLog:
    """What a ProcessService.events subscription has received."""

    teams: Teams
    capsule_id: str
    after: int  # the seq it was subscribed after
    received: list[domain.CapsuleEvent] = field(default_factory=list)

    async def event(self, kind: ProcessEventKind, tag: str) -> domain.CapsuleEvent:
        """The first event of this kind for the tag, once it has come."""

        async def arrived() -> domain.CapsuleEvent | None:
            return next((e for e in self.received if (e.kind, e.process.tag) == (kind, tag)), None)

        return await until(arrived, what=f"{kind.value} of {tag}")

    async def settled(self) -> list[domain.CapsuleEvent]:
        """The events once every one the store has for the capsule now has arrived, in order."""
        newest = await self.teams.newest_seq(self.capsule_id)

        async def arrived() -> bool:
            return newest == self.after or any(e.seq == newest for e in self.received)

        await until(arrived, what=f"event {newest} of {self.capsule_id}")
        seqs = [e.seq for e in self.received]
        assert seqs == list(range(self.after + 1, self.after + 1 + len(seqs))), seqs  # in order, no hole
        return list(self.received)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A fresh, migrated database of the parametrised kind, shared by one module's tests."""
    yield from fresh_database(request, tmp_path_factory.mktemp("services"))


def service_settings(data_dir: Path, database_url: str) -> Settings:
    """Small limits, so tests reach them; no idle reaping or periodic reconciling in between."""
    return Settings(
        runtime=TEST_RUNTIME,
        data_dir=data_dir,
        database_url=database_url,
        retention_sec=60.0,
        output_cap_bytes=1024 * 1024,
        exec_output_cap_bytes=64 * 1024,
        exec_default_timeout_sec=10.0,
        input_timeout_sec=1.0,
        host_call_timeout_sec=10.0,
        input_limits=InputLimits(input_bytes=MAX_INPUT_BYTES),
        idle_check_interval_sec=3600.0,
        reconcile_interval_sec=3600.0,
        max_capsules_per_team=MAX_CAPSULES,
        max_processes_per_capsule=MAX_PROCESSES,
    )


@asynccontextmanager
async def open_state(config: Settings) -> AsyncIterator[AppState]:
    """AppState.open(config); no process under the data directory outlives it."""
    async with AppState.open(config) as state:
        yield state
    await until(lambda: _none_under(config.data_dir), what=f"the processes under {config.data_dir} to end")


async def _none_under(directory: Path) -> bool:
    return not processes_under(directory)


async def new_teams(state: AppState) -> Teams:
    """Two new teams on the state: each test's own, so tests sharing a state see nothing of each other."""
    services = []
    for _ in range(2):
        row = await make_team(state.platform.db)
        assert row.id is not None
        services.append(state.platform.for_team(Team(id=row.id, name=row.name)))
    return Teams(state=state, ours=services[0], theirs=services[1])


async def destroy_all(teams: Teams) -> None:
    """Destroys the teams' capsules on the agent, and checks that none of their processes is left."""
    workspaces = teams.state.settings.agent_dir.resolve() / "capsules"
    for services in (teams.ours, teams.theirs):
        for capsule in await services.capsules.list():
            if capsule.host_id == EMBEDDED_HOST_ID:
                if capsule.status is not CapsuleStatus.STOPPED:
                    await services.capsules.destroy(capsule.id)
                gone = functools.partial(_none_under, workspaces / capsule.id)
                await until(gone, what=f"the processes of {capsule.id} to end")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app_state(
    module_database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[AppState]:
    """One server's shared parts for a module's tests; each test acts for teams of its own."""
    async with open_state(
        service_settings(tmp_path_factory.mktemp("served") / "data", module_database_url)
    ) as state:
        yield state


@pytest_asyncio.fixture(loop_scope="module")
async def teams(app_state: AppState) -> AsyncIterator[Teams]:
    """Two new teams on the module's server; their capsules are destroyed after the test."""
    created = await new_teams(app_state)
    try:
        yield created
    finally:
        await destroy_all(created)


async def refused_as_missing(teams: Teams, call: Callable[[str], Awaitable[object]]) -> NotFound:
    """Calls with another team's capsule and with a missing one: both NotFound, in the same words.

    The other team's capsule is a running one of theirs, so nothing but its owner can tell them apart."""
    theirs = await teams.capsule(teams.theirs)
    with pytest.raises(NotFound) as other:
        await call(theirs.id)
    with pytest.raises(NotFound) as missing:
        await call(MISSING)
    assert other.value.code is ErrorCode.NOT_FOUND
    assert words(other.value, theirs.id) == words(missing.value, MISSING)
    return other.value


async def refused_when_not_running(teams: Teams, call: Callable[[str], Awaitable[object]]) -> None:
    """A capsule that is not running (stopped, or in error) is INVALID_STATE, named with its state."""
    for status in (CapsuleStatus.STOPPED, CapsuleStatus.ERROR):
        capsule = await teams.stored_capsule(status)
        with pytest.raises(InvalidState, match=f"is {status.value}, not RUNNING") as caught:
            await call(capsule.id)
        assert caught.value.code is ErrorCode.INVALID_STATE
