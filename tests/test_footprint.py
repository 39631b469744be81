"""What the embedded default loads: nothing of the Redis or PostgreSQL clients it does not use."""

from __future__ import annotations

import subprocess
import sys

from tests.system import command_env


def test_the_embedded_default_loads_no_redis_or_postgresql_client() -> None:
    """redis-py costs the server 6 MB (and brings OpenTelemetry's metrics API), asyncpg 3 MB."""
    probe = (
        "import sys\n"
        "from app.config import Settings\n"
        "from app.main import create_app\n"
        "import app.cli.commands\n"
        "create_app(Settings())\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'redis', 'asyncpg'}))\n"
    )
    env = {k: v for k, v in command_env().items() if not k.startswith("CAPSULE_")}
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout
