"""API keys: create (shown once), authenticate by hash, revoke, and the development key."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
from pathlib import Path

from sqlalchemy.exc import IntegrityError

from app.domain import Team, utcnow
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


def new_key() -> str:
    """A fresh key: cap_ and 32 random bytes, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The sha256 hex digest of a key: the only form of it the store keeps."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def is_well_formed(key: str) -> bool:
    """True when the text has the shape of a key (checked before any database work)."""
    return KEY_RE.fullmatch(key) is not None


class KeyService:
    """Creates, checks and revokes API keys; built once per server."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def create_key(self, team_name: str) -> tuple[Team, str]:
        """Creates the team if needed and a key for it; the plaintext key is returned here only."""
        team = await self._team(team_name)
        key = new_key()
        async with self._db.transaction() as session:
            await ApiKeyRepository(session).add(
                models.ApiKey(team_id=team.id, key_hash=hash_key(key), prefix=key[:SHOWN_PREFIX_LEN])
            )
        logger.info("created API key %s... for team %s", key[:SHOWN_PREFIX_LEN], team.name)
        return team, key

    async def authenticate(self, key: str) -> Team | None:
        """The team of an unrevoked key; None for an unknown, revoked or malformed one."""
        if not is_well_formed(key):
            return None
        async with self._db.session() as session:
            team = await ApiKeyRepository(session).team_of(hash_key(key))
        return None if team is None else _team_of(team)

    async def revoke(self, key: str) -> bool:
        """Revokes a key; False when it is unknown or was revoked already."""
        if not is_well_formed(key):
            return False
        async with self._db.transaction() as session:
            revoked = await ApiKeyRepository(session).revoke(hash_key(key), utcnow())
        if revoked:
            logger.info("revoked API key %s...", key[:SHOWN_PREFIX_LEN])
        return revoked

    async def ensure_dev_key(self, data_dir: Path) -> tuple[str, bool]:
        """The `default` team's key kept in <data_dir>/dev-api-key; (key, True) when made just now."""
        path = data_dir / DEV_KEY_FILE
        existing = await asyncio.to_thread(_read_key, path)
        if existing is not None and await self.authenticate(existing) is not None:
            return existing, False
        _, key = await self.create_key(DEFAULT_TEAM)
        await asyncio.to_thread(_write_key, path, key)
        logger.info("wrote a new development API key to %s", path)
        return key, True

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
