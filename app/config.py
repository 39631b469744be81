"""Settings: the only code that reads CAPSULE_* environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from app.domain import CapsuleLimits, EventRetention, InputLimits, check_limits
from app.errors import InvalidRequest

MiB = 1024 * 1024

# Each bus URL scheme and the backend that speaks it.
BUS_SCHEMES: Mapping[str, str] = {
    "memory": "memory",
    "redis": "redis",
    "rediss": "redis",
    "postgres": "postgres",
    "postgresql": "postgres",
}


RUNTIMES = ("auto", "sandbox", "plain")
# How a sandbox's limits are enforced: a cgroup per capsule, or rlimits where the host has no cgroups.
SANDBOX_LIMITS = ("auto", "cgroup", "rlimit")
LOG_FORMATS = ("plain", "json")


class ConfigError(ValueError):
    """A setting has a value the service cannot start with."""


def bus_backend_kind(url: str) -> str:
    """memory, redis or postgres: the backend a bus URL asks for; ConfigError for any other URL."""
    kind = BUS_SCHEMES.get(urlparse(url).scheme)
    if kind is None:
        raise ConfigError(f"CAPSULE_BUS_URL={url!r}: use memory://, redis:// or postgres://")
    return kind


def _parse_hosts(text: str) -> dict[str, str]:
    hosts: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        host_id, sep, address = item.partition("=")
        if not sep or not host_id.strip() or ":" not in address:
            raise ConfigError(f"CAPSULE_HOSTS entry {item!r} is not ID=HOST:PORT")
        hosts[host_id.strip()] = address.strip()
    return hosts


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    value = _optional_number(env, name)
    return default if value is None else value


def _optional_number(env: Mapping[str, str], name: str) -> float | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a number") from exc
    if value < 0:
        raise ConfigError(f"{name}={raw!r} is negative")
    return value


def _optional_int(env: Mapping[str, str], name: str) -> int | None:
    value = _optional_number(env, name)
    if value is not None and not value.is_integer():
        raise ConfigError(f"{name}={env[name]!r} is not a whole number")
    return None if value is None else int(value)


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    value = _optional_int(env, name)
    return default if value is None else value


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r}: use true or false")


# Each InputLimits field and the variable that sets it.
INPUT_LIMIT_VARIABLES: Mapping[str, str] = {
    "cmd_bytes": "CAPSULE_MAX_CMD_BYTES",
    "args": "CAPSULE_MAX_ARGS",
    "arg_bytes": "CAPSULE_MAX_ARG_BYTES",
    "envs": "CAPSULE_MAX_ENVS",
    "env_name_bytes": "CAPSULE_MAX_ENV_NAME_BYTES",
    "env_value_bytes": "CAPSULE_MAX_ENV_VALUE_BYTES",
    "cwd_bytes": "CAPSULE_MAX_CWD_BYTES",
    "input_bytes": "CAPSULE_MAX_INPUT_BYTES",
}
# Bounds of the request size limits: past 32 MiB, what one request carries might not fit the 64 MiB
# gRPC messages between a server and its agents.
MIN_REQUEST_BYTES = 1024
MAX_REQUEST_BYTES = 32 * MiB


def _input_limits(env: Mapping[str, str]) -> InputLimits:
    defaults = InputLimits()
    return InputLimits(
        **{field: _int(env, name, getattr(defaults, field)) for field, name in INPUT_LIMIT_VARIABLES.items()}
    )


def _parse_origins(text: str) -> tuple[str, ...]:
    """CAPSULE_WS_ALLOWED_ORIGINS: comma-separated origins (scheme://host[:port]), or * for any."""
    origins = tuple(filter(None, (part.strip() for part in text.split(","))))
    for origin in origins:
        parts = urlparse(origin)
        if origin != "*" and (
            parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/")
        ):
            raise ConfigError(
                f"CAPSULE_WS_ALLOWED_ORIGINS entry {origin!r} is not an origin like https://app.example.com"
            )
    return origins


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything configurable, read once at startup and passed down."""

    data_dir: Path = Path(".capsule")
    database_url: str = ""
    bus_url: str = "memory://"
    hosts: Mapping[str, str] = field(default_factory=dict)
    # The host agent's limits.
    output_cap_bytes: int = 16 * MiB
    retention_sec: float = 600.0
    exec_output_cap_bytes: int = 1 * MiB
    exec_default_timeout_sec: float = 60.0
    # How long a write to a process's stdin may wait for the process to read.
    input_timeout_sec: float = 5.0
    # Where capsules' processes run: sandbox, plain, or auto (sandbox wherever it works, else plain).
    runtime: str = "auto"
    # The API server's limits.
    host_connect_timeout_sec: float = 2.0
    host_call_timeout_sec: float = 30.0
    # What one request may carry: an HTTP body (past it, 413) and a WebSocket message (past it, close 1009).
    max_body_bytes: int = 1 * MiB
    max_ws_message_bytes: int = 1 * MiB
    # What one command, its environment and its input may hold; past these, INVALID_REQUEST.
    input_limits: InputLimits = field(default_factory=InputLimits)
    # Output an API replica keeps per followed process, so its subscribers share one agent stream.
    fanout_buffer_bytes: int = 8 * MiB
    idle_check_interval_sec: float = 5.0
    # How often every host is compared with the store besides whenever a host (re)connects.
    reconcile_interval_sec: float = 30.0
    # How often each replica re-checks the keys of its open WebSockets, should a revocation's bus
    # message not reach it (the bus down, or the revoking CLI on the memory bus).
    key_recheck_interval_sec: float = 5.0
    # Each capsule's lifecycle event history in the store, and how often a replica's subscriptions
    # look there for events whose bus message did not reach them.
    event_retention: EventRetention = field(default_factory=EventRetention)
    events_poll_sec: float = 1.0
    # What one team may hold at once; past these, RATE_LIMITED.
    max_capsules_per_team: int = 100
    max_processes_per_capsule: int = 256
    # The limits of a capsule whose createCapsule leaves them out (None: no limit beyond the host's).
    capsule_max_processes: int = 256
    capsule_memory_mib: int | None = None
    capsule_cpus: float | None = None
    # Sandboxes kept started ahead of the capsules that will take them.
    sandbox_spares: int = 2
    sandbox_limits: str = "auto"
    # Per team, over every replica sharing a Redis bus (else per replica); 0: no limit. A team may run
    # team_requests_per_sec x team_request_window_sec GraphQL operations in any window of that many seconds.
    team_requests_per_sec: float = 50.0
    team_request_window_sec: int = 2
    team_max_concurrent_execs: int = 16
    ws_max_connections_per_team: int = 500
    # WebSockets: origins besides the server's own that may connect ("*": any), how long a connection
    # may wait before connection_init, and operations in flight on one connection (0: no limit).
    ws_allowed_origins: tuple[str, ...] = ()
    ws_init_timeout_sec: float = 10.0
    ws_max_subscriptions: int = 100
    # permessage-deflate on WebSockets (off: it costs each connection ~45 KiB and each message a
    # compression, for output that is read on loopback or a LAN far more often than over a slow link).
    ws_per_message_deflate: bool = False
    # Operations: log lines as plain text or one JSON object each (CAPSULE_LOG_FORMAT), and traces
    # sent over OTLP where OTEL_EXPORTER_OTLP_ENDPOINT names a collector (unset: no tracing at all).
    log_format: str = "plain"
    otel_endpoint: str = ""

    def __post_init__(self) -> None:
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite+aiosqlite:///{self.data_dir / 'capsule.db'}")

    @property
    def embedded_agent(self) -> bool:
        """True when no host is configured here, so `serve` starts its own agent."""
        return not self.hosts

    @property
    def capsule_limits(self) -> CapsuleLimits:
        """The limits a capsule gets where its creator asks for none."""
        return CapsuleLimits(
            max_processes=self.capsule_max_processes,
            memory_mib=self.capsule_memory_mib,
            cpus=self.capsule_cpus,
        )

    @property
    def agent_dir(self) -> Path:
        return self.data_dir / "agent"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Reads CAPSULE_* variables; rejects bad values before anything starts."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            "data_dir": Path(env.get("CAPSULE_DATA_DIR") or ".capsule"),
            "database_url": env.get("CAPSULE_DATABASE_URL", ""),
            "bus_url": env.get("CAPSULE_BUS_URL") or "memory://",
            "hosts": _parse_hosts(env.get("CAPSULE_HOSTS", "")),
            "output_cap_bytes": int(_number(env, "CAPSULE_OUTPUT_CAP_BYTES", 16 * MiB)),
            "retention_sec": _number(env, "CAPSULE_RETENTION_SEC", 600.0),
            "runtime": (env.get("CAPSULE_RUNTIME") or "auto").lower(),
            "max_capsules_per_team": int(_number(env, "CAPSULE_MAX_CAPSULES_PER_TEAM", 100)),
            "max_processes_per_capsule": int(_number(env, "CAPSULE_MAX_PROCESSES_PER_CAPSULE", 256)),
            "reconcile_interval_sec": _number(env, "CAPSULE_RECONCILE_INTERVAL_SEC", 30.0),
            "key_recheck_interval_sec": _number(env, "CAPSULE_KEY_RECHECK_SEC", 5.0),
            "event_retention": EventRetention(
                max_age_sec=_number(env, "CAPSULE_EVENTS_RETENTION_SEC", 24 * 3600.0),
                max_per_capsule=_int(env, "CAPSULE_EVENTS_MAX_PER_CAPSULE", 10_000),
            ),
            "events_poll_sec": _number(env, "CAPSULE_EVENTS_POLL_SEC", 1.0),
            "capsule_max_processes": _int(env, "CAPSULE_DEFAULT_MAX_PROCESSES", 256),
            "sandbox_spares": _int(env, "CAPSULE_SANDBOX_SPARES", 2),
            "sandbox_limits": (env.get("CAPSULE_SANDBOX_LIMITS") or "auto").lower(),
            "team_requests_per_sec": _number(env, "CAPSULE_TEAM_REQUESTS_PER_SEC", 50.0),
            "team_request_window_sec": _int(env, "CAPSULE_TEAM_REQUEST_WINDOW_SEC", 2),
            "team_max_concurrent_execs": _int(env, "CAPSULE_TEAM_MAX_CONCURRENT_EXECS", 16),
            "ws_max_connections_per_team": _int(env, "CAPSULE_WS_MAX_CONNECTIONS_PER_TEAM", 500),
            "ws_allowed_origins": _parse_origins(env.get("CAPSULE_WS_ALLOWED_ORIGINS", "")),
            "ws_init_timeout_sec": _number(env, "CAPSULE_WS_INIT_TIMEOUT_SEC", 10.0),
            "ws_max_subscriptions": _int(env, "CAPSULE_WS_MAX_SUBSCRIPTIONS", 100),
            "ws_per_message_deflate": _flag(env, "CAPSULE_WS_PER_MESSAGE_DEFLATE", False),
            "capsule_memory_mib": _optional_int(env, "CAPSULE_DEFAULT_MEMORY_MIB"),
            "capsule_cpus": _optional_number(env, "CAPSULE_DEFAULT_CPUS"),
            "max_body_bytes": _int(env, "CAPSULE_MAX_BODY_BYTES", 1 * MiB),
            "max_ws_message_bytes": _int(env, "CAPSULE_MAX_WS_MESSAGE_BYTES", 1 * MiB),
            "input_limits": _input_limits(env),
            "log_format": (env.get("CAPSULE_LOG_FORMAT") or "plain").strip().lower(),
            "otel_endpoint": (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "").strip(),
        }
        settings = cls(**(values | overrides))
        bus_backend_kind(settings.bus_url)
        if settings.runtime not in RUNTIMES:
            raise ConfigError(
                f"CAPSULE_RUNTIME={settings.runtime!r}: use sandbox or plain (unset: sandbox where it works)"
            )
        if settings.sandbox_limits not in SANDBOX_LIMITS:
            raise ConfigError(
                f"CAPSULE_SANDBOX_LIMITS={settings.sandbox_limits!r}: use cgroup or rlimit "
                "(unset: cgroups where the host has them)"
            )
        if settings.log_format not in LOG_FORMATS:
            raise ConfigError(f"CAPSULE_LOG_FORMAT={settings.log_format!r}: use plain or json")
        if settings.team_request_window_sec < 1:
            raise ConfigError("CAPSULE_TEAM_REQUEST_WINDOW_SEC must be 1 second or more")
        if settings.ws_init_timeout_sec <= 0:
            raise ConfigError("CAPSULE_WS_INIT_TIMEOUT_SEC must be more than 0 seconds")
        if settings.reconcile_interval_sec <= 0:
            raise ConfigError("CAPSULE_RECONCILE_INTERVAL_SEC must be more than 0 seconds")
        if settings.key_recheck_interval_sec <= 0:
            raise ConfigError("CAPSULE_KEY_RECHECK_SEC must be more than 0 seconds")
        if settings.event_retention.max_age_sec <= 0:
            raise ConfigError("CAPSULE_EVENTS_RETENTION_SEC must be more than 0 seconds")
        if settings.event_retention.max_per_capsule < 1:
            raise ConfigError("CAPSULE_EVENTS_MAX_PER_CAPSULE must be 1 or more")
        if settings.events_poll_sec <= 0:
            raise ConfigError("CAPSULE_EVENTS_POLL_SEC must be more than 0 seconds")
        for name, size in (
            ("CAPSULE_MAX_BODY_BYTES", settings.max_body_bytes),
            ("CAPSULE_MAX_WS_MESSAGE_BYTES", settings.max_ws_message_bytes),
        ):
            if not MIN_REQUEST_BYTES <= size <= MAX_REQUEST_BYTES:
                raise ConfigError(f"{name}={size}: pass {MIN_REQUEST_BYTES} to {MAX_REQUEST_BYTES} bytes")
        try:
            check_limits(settings.capsule_limits)
        except InvalidRequest as exc:
            raise ConfigError(f"the default capsule limits (CAPSULE_DEFAULT_*) are refused: {exc}") from None
        return settings
