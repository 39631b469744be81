"""Bus channel names and messages, and the JSON form of a process that stored events keep."""

from __future__ import annotations

import dataclasses
import json
import signal
from datetime import datetime
from typing import Any

from app import domain


def capsule_events_channel(capsule_id: str) -> str:
    """The channel that tells of new events in one capsule's history (each message: the newest seq)."""
    return f"capsule-events.{capsule_id}"


def _moment(value: datetime | None) -> str | None:
    return None if value is None else domain.as_utc(value).isoformat()


def _parse_moment(value: str | None) -> datetime | None:
    return None if value is None else domain.as_utc(datetime.fromisoformat(value))


def process_info_to_dict(info: domain.ProcessInfo) -> dict[str, Any]:
    """Every field of a ProcessInfo as JSON-ready values; the signal goes by name."""
    return {
        "capsule_id": info.capsule_id,
        "pid": info.pid,
        "tag": info.tag,
        "cmd": info.cmd,
        "args": list(info.args),
        "cwd": info.cwd,
        "status": info.status.value,
        "started_at": _moment(info.started_at),
        "exit_code": info.exit_code,
        "signal": domain.signal_name(info.signal),
        "timed_out": info.timed_out,
        "ended_at": _moment(info.ended_at),
        "stdin": info.stdin,
        "terminal": info.terminal,
        "restarts": info.restarts,
        "ready": info.ready,
        "ready_at": _moment(info.ready_at),
        "oom_killed": info.oom_killed,
        "usage": None if info.usage is None else dataclasses.asdict(info.usage),
    }


def process_info_from_dict(data: dict[str, Any]) -> domain.ProcessInfo:
    """The inverse of process_info_to_dict."""
    started_at = _parse_moment(data["started_at"])
    if started_at is None:
        raise ValueError("process event without started_at")
    return domain.ProcessInfo(
        capsule_id=str(data["capsule_id"]),
        pid=int(data["pid"]),
        tag=str(data["tag"]),
        cmd=str(data["cmd"]),
        args=tuple(str(arg) for arg in data["args"]),
        cwd=str(data["cwd"]),
        status=domain.ProcessStatus(data["status"]),
        started_at=started_at,
        exit_code=None if data["exit_code"] is None else int(data["exit_code"]),
        signal=None if data["signal"] is None else signal.Signals[data["signal"]],
        timed_out=bool(data["timed_out"]),
        ended_at=_parse_moment(data["ended_at"]),
        stdin=bool(data["stdin"]),
        terminal=bool(data.get("terminal", False)),  # events stored before terminals hold none
        # Events stored before supervision existed hold none of these.
        restarts=int(data.get("restarts", 0)),
        ready=bool(data.get("ready", True)),
        ready_at=_parse_moment(data.get("ready_at")),
        oom_killed=bool(data.get("oom_killed", False)),
        usage=None if data.get("usage") is None else domain.ResourceUsage(**data["usage"]),
    )


# Every replica listens here, so a key revoked anywhere (even by the CLI) ends its open connections.
KEY_REVOKED_CHANNEL = "key-revoked"


def key_revoked_to_json(key_id: int) -> str:
    """The message that says an API key was revoked, by the key's id."""
    return json.dumps({"key_id": key_id}, separators=(",", ":"))


def key_revoked_from_json(text: str) -> int:
    """The key id in key_revoked_to_json's output; anything else raises ValueError."""
    try:
        key_id = json.loads(text)["key_id"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a key revocation: {type(exc).__name__} {exc}") from exc
    if not isinstance(key_id, int) or isinstance(key_id, bool):
        raise ValueError(f"not a key id: {key_id!r}")
    return key_id
