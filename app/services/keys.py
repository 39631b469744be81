"""API keys: create (shown once), authenticate in constant time, list, revoke, and the development key."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy.exc import IntegrityError

from app.bus.broadcast import Bus
from app.bus.events import KEY_REVOKED_CHANNEL, key_revoked_to_json
from app.domain import Team, as_utc, utcnow
from app.errors import BusUnavailable, NotFound
from app.services.flights import Flights
from app.store import models
from app.store.repositories import ApiKeyRepository, TeamRepository
from app.store.session import Database

logger = logging.getLogger(__name__)

KEY_PREFIX = "cap_"
# cap_ and secrets.token_urlsafe(32): 43 characters of the URL-safe base64 alphabet.
KEY_RE = re.compile(r"cap_[A-Za-z0-9_-]{43}")
# The first characters, stored to tell keys apart in listings; far too short to guess the rest.
SHOWN_PREFIX_LEN = 12
DEFAULT_TEAM = "default"
DEV_KEY_FILE = "dev-api-key"
# How long a verified key is taken at its word without asking the store again. A revocation ends
# that at once on this replica and, through the bus, on every other; one the bus could not carry
# within this long (or KeyRevocations' next check, which looks at these keys too).
VERIFIED_KEY_TTL_SEC = 2.0
MAX_VERIFIED_KEYS = 10_000


def new_key() -> str:
    """A fresh key: cap_ and 32 random bytes, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The sha256 hex digest of a key: the only form of it the store keeps."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def is_well_formed(key: str) -> bool:
    """True when the text has the shape of a key (checked before any database work)."""
    return KEY_RE.fullmatch(key) is not None


@dataclass(frozen=True, slots=True)
class Credential:
    """What a valid key proves: which key it is, and whose."""

    key_id: int
    team: Team


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """One key as a listing shows it: never the key, nor its hash."""

    id: int
    team: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None


class KeyService:
    """Creates, checks, lists and revokes API keys; built once per server (or per CLI command)."""

    def __init__(self, db: Database, *, bus: Bus | None = None) -> None:
        # With a bus, a revocation is announced to every replica at once; without one, replicas
        # still notice at their next periodic check (KeyRevocations).
        self._db, self._bus = db, bus
        # Connections opened at once with one key (viewers reconnecting) share one lookup.
        self._lookups: Flights[Credential | None] = Flights()
        # Keys verified lately, by digest, until when; forget() bumps the generation, so that a
        # lookup that began before a revocation is not kept after it.
        self._verified: dict[str, tuple[Credential, float]] = {}
        self._generation = 0

    async def create_key(self, team_name: str) -> tuple[Team, str]:
        """Creates the team if needed and a key for it; the plaintext key is returned here only."""
        team = await self._team(team_name)
        key = new_key()
        async with self._db.transaction() as session:
            row = await ApiKeyRepository(session).add(
                models.ApiKey(team_id=team.id, key_hash=hash_key(key), prefix=key[:SHOWN_PREFIX_LEN])
            )
        logger.info("created API key %s (%s...) for team %s", row.id, key[:SHOWN_PREFIX_LEN], team.name)
        return team, key

    async def authenticate(self, key: str) -> Team | None:
        """The team of an unrevoked key; None for an unknown, revoked or malformed one."""
        credential = await self.credential(key)
        return None if credential is None else credential.team

    async def credential(self, key: str) -> Credential | None:
        """The key's id and team when it is unrevoked; None for an unknown, revoked or malformed one.

        The store is asked only for the prefix, which is not secret; the hash of the rest is compared
        here in constant time, so no timing tells a caller how much of a guess was right.
        """
        if not is_well_formed(key):
            return None
        digest = hash_key(key)
        kept = self._verified.get(digest)
        if kept is not None and kept[1] > time.monotonic():
            return kept[0]
        generation = self._generation
        found = await self._lookups.run(digest, lambda: self._credential(key, digest))
        if found is None:
            self._verified.pop(digest, None)
        elif generation == self._generation:
            if len(self._verified) >= MAX_VERIFIED_KEYS:
                self._verified.clear()
            self._verified[digest] = (found, time.monotonic() + VERIFIED_KEY_TTL_SEC)
        return found

    def forget(self, key_id: int) -> None:
        """Asks the store again about the key at its next use (it was revoked)."""
        self._generation += 1
        for digest in [d for d, (credential, _) in self._verified.items() if credential.key_id == key_id]:
            del self._verified[digest]

    @property
    def verified_ids(self) -> frozenset[int]:
        """The ids of the keys taken at their word now."""
        return frozenset(credential.key_id for credential, _ in self._verified.values())

    async def _credential(self, key: str, digest: str) -> Credential | None:
        async with self._db.session() as session:
            candidates = await ApiKeyRepository(session).unrevoked_by_prefix(key[:SHOWN_PREFIX_LEN])
        found: Credential | None = None
        for row, team in candidates:  # nearly always one; compare them all, whichever matches
            if hmac.compare_digest(row.key_hash, digest) and row.id is not None:
                found = Credential(key_id=row.id, team=_team_of(team))
        return found

    async def list_keys(self, team_name: str) -> list[KeyInfo]:
        """The team's keys, revoked ones too, oldest first; NotFound when there is no such team."""
        async with self._db.session() as session:
            team = await TeamRepository(session).get_by_name(team_name)
            if team is None or team.id is None:
                raise NotFound(f"no team {team_name!r}: `capsule keys create --team {team_name}` makes it")
            rows = await ApiKeyRepository(session).list_for_team(team.id)
        return [_info(row, team.name) for row in rows]

    async def revoke_id(self, key_id: int) -> tuple[KeyInfo, bool]:
        """Revokes the key with this id; the key as it is now, and False when it was revoked already.

        NotFound when there is no such key.
        """
        async with self._db.transaction() as session:
            keys = ApiKeyRepository(session)
            changed = await keys.revoke(key_id, utcnow())
            row = await keys.get(key_id)
            team = None if row is None else await TeamRepository(session).get(row.team_id)
            if row is None or team is None:
                raise NotFound(f"no API key {key_id}: `capsule keys list --team NAME` shows the ids")
            info = _info(row, team.name)
        if changed:
            self.forget(key_id)
            logger.info("revoked API key %s (%s...) of team %s", key_id, info.prefix, info.team)
            await self._announce(key_id)
        return info, changed

    async def revoke(self, key: str) -> bool:
        """Revokes a key given in full; False when it is unknown or was revoked already."""
        credential = await self.credential(key)
        if credential is None:
            return False
        _, changed = await self.revoke_id(credential.key_id)
        return changed

    async def revoked_among(self, key_ids: Sequence[int]) -> set[int]:
        """Which of these keys are revoked now (one query)."""
        async with self._db.session() as session:
            return await ApiKeyRepository(session).revoked_among(key_ids)

    async def _announce(self, key_id: int) -> None:
        if self._bus is None:
            return
        try:
            await self._bus.publish(KEY_REVOKED_CHANNEL, key_revoked_to_json(key_id))
        except BusUnavailable:
            # The revocation is in the store; every replica's periodic check still finds it.
            logger.warning("could not announce the revocation of API key %s on the bus", key_id)

    async def ensure_dev_key(self, data_dir: Path) -> tuple[str, bool]:
        """The `default` team's key kept in <data_dir>/dev-api-key; (key, True) when made just now."""
        existing = await self.dev_key(data_dir)
        if existing is not None:
            return existing, False
        path = data_dir / DEV_KEY_FILE
        _, key = await self.create_key(DEFAULT_TEAM)
        await asyncio.to_thread(_write_key, path, key)
        logger.info("wrote a new development API key to %s", path)
        return key, True

    async def dev_key(self, data_dir: Path) -> str | None:
        """The key `serve` keeps in <data_dir>/dev-api-key while it still authenticates; else None."""
        existing = await asyncio.to_thread(_read_key, data_dir / DEV_KEY_FILE)
        if existing is None or await self.authenticate(existing) is None:
            return None
        return existing

    async def _team(self, name: str) -> Team:
        async with self._db.session() as session:
            team = await TeamRepository(session).get_by_name(name)
        if team is not None:
            return _team_of(team)
        try:
            async with self._db.transaction() as session:
                team = await TeamRepository(session).add(models.Team(name=name))
        except IntegrityError:
            # Another caller created the team between our read and our insert.
            async with self._db.session() as session:
                team = await TeamRepository(session).get_by_name(name)
            if team is None:
                raise
        else:
            logger.info("created team %s", name)
        return _team_of(team)


def _info(row: models.ApiKey, team: str) -> KeyInfo:
    assert row.id is not None  # a stored key has its id
    return KeyInfo(
        id=row.id,
        team=team,
        prefix=row.prefix,
        created_at=as_utc(row.created_at),
        revoked_at=None if row.revoked_at is None else as_utc(row.revoked_at),
    )


def _team_of(row: models.Team) -> Team:
    assert row.id is not None  # a stored team has its id
    return Team(id=row.id, name=row.name)


def _read_key(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def _write_key(path: Path, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write a private temporary file and rename it, so the key is never readable by others
    # and a crash never leaves half a key behind.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(key + "\n")
    os.replace(temporary, path)
