"""A process survives the trip through JSON (as stored events keep it) with every field intact."""

from __future__ import annotations

import dataclasses
import json
import signal
from datetime import UTC, datetime, timedelta, timezone

import pytest

from app import domain
from app.bus.events import (
    capsule_events_channel,
    key_revoked_from_json,
    key_revoked_to_json,
    process_info_from_dict,
    process_info_to_dict,
)

STARTED_AT = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)


def running() -> domain.ProcessInfo:
    return domain.ProcessInfo(
        capsule_id="cap-1",
        pid=4242,
        tag="web.server-1",
        cmd="sh",
        args=("-c", "echo 'héllo' \"$X\""),
        cwd="/workspace/sub dir",
        status=domain.ProcessStatus.RUNNING,
        started_at=STARTED_AT,
        stdin=True,
        terminal=True,
    )


def exited() -> domain.ProcessInfo:
    return domain.ProcessInfo(
        capsule_id="cap-1",
        pid=7,
        tag="proc-0badf00d",
        cmd="sleep",
        args=("60",),
        cwd="/workspace",
        status=domain.ProcessStatus.EXITED,
        started_at=STARTED_AT,
        exit_code=-15,
        signal=signal.SIGTERM,
        timed_out=True,
        ended_at=STARTED_AT + timedelta(seconds=3),
    )


def through_json(info: domain.ProcessInfo) -> domain.ProcessInfo:
    return process_info_from_dict(json.loads(json.dumps(process_info_to_dict(info))))


@pytest.mark.parametrize("info", [running(), exited()], ids=["running", "exited"])
def test_round_trip_keeps_every_field(info: domain.ProcessInfo) -> None:
    back = through_json(info)
    assert back == info
    assert back.started_at.tzinfo is UTC


def test_signal_goes_by_name_and_times_as_utc() -> None:
    ended_elsewhere = STARTED_AT.astimezone(timezone(timedelta(hours=2))) + timedelta(seconds=3)
    info = dataclasses.replace(exited(), ended_at=ended_elsewhere)
    data = process_info_to_dict(info)
    assert data["signal"] == "SIGTERM"
    assert data["ended_at"] == "2024-05-01T12:30:18.123456+00:00"
    back = through_json(info)
    assert back.ended_at == ended_elsewhere
    assert back.ended_at is not None and back.ended_at.tzinfo is UTC


def test_naive_datetimes_are_taken_as_utc() -> None:
    info = dataclasses.replace(running(), started_at=STARTED_AT.replace(tzinfo=None))
    assert through_json(info).started_at == STARTED_AT


def test_channel_names_are_per_capsule() -> None:
    assert capsule_events_channel("a") != capsule_events_channel("b")
    assert "cap-1" in capsule_events_channel("cap-1")


def test_key_revocations_carry_the_key_id() -> None:
    assert key_revoked_from_json(key_revoked_to_json(42)) == 42


@pytest.mark.parametrize("text", ["{}", "[]", "not json", '{"key_id": "42"}', '{"key_id": true}', "null"])
def test_anything_else_is_no_key_revocation(text: str) -> None:
    with pytest.raises(ValueError):
        key_revoked_from_json(text)
