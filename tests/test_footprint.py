"""What the embedded default loads: nothing of the Redis or PostgreSQL clients it does not use."""

from __future__ import annotations

from tests.system import modules_of_the_default_server


def test_the_embedded_default_loads_no_redis_or_postgresql_client() -> None:
    """redis-py costs the server 6 MB (and brings OpenTelemetry's metrics API), asyncpg 3 MB."""
    assert modules_of_the_default_server("redis", "asyncpg") == []
