"""Small facts about this machine's processes and ports that several tests need."""

from __future__ import annotations

import ast
import asyncio
import functools
import os
import re
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

# The runtime the tests' agents use: auto (sandbox where it works) unless CAPSULE_TEST_RUNTIME says
# sandbox or plain; .ci/run runs the suite once more on plain.
TEST_RUNTIME = os.environ.get("CAPSULE_TEST_RUNTIME", "auto")
# A capsule's cgroup as /proc/PID/cgroup names it: below capsule/, in its agent's part.
CAPSULE_CGROUP = re.compile(r":/capsule/[0-9a-f]{12}/[^/]+$")


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def is_alive(pid: int) -> bool:
    """True while pid names a process that is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def command_env(**extra: str) -> dict[str, str]:
    """The environment for a `capsule` command a test runs: none of the caller's CAPSULE_* settings,
    the tests' runtime, then extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPSULE_")}
    if TEST_RUNTIME != "auto":
        env["CAPSULE_RUNTIME"] = TEST_RUNTIME
    return env | extra


@functools.cache
def sandboxed() -> bool:
    """True when the tests' agents run capsules in sandboxes: their PIDs are then the capsule's own."""
    if TEST_RUNTIME == "plain":
        return False
    from app.agent.sandbox import SandboxRuntime
    from app.config import Settings

    def probe() -> bool:
        with tempfile.TemporaryDirectory() as directory:
            runtime, _ = asyncio.run(SandboxRuntime.probe(Settings(data_dir=Path(directory))))
        return runtime is not None

    # On a thread of its own: a test that asks is already inside an event loop.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(probe).result()


def capsule_alive(capsule_id: str, pid: int, *, sandbox: bool | None = None) -> bool:
    """True while pid, as the capsule's own processes see it, names a live process of that capsule.

    sandbox says whether the capsule is sandboxed; by default, whether the tests' agents sandbox.
    """
    if not (sandboxed() if sandbox is None else sandbox):
        return is_alive(pid)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cgroup = (entry / "cgroup").read_text()
            status = (entry / "status").read_text()
        except OSError:
            continue
        if not any(
            CAPSULE_CGROUP.search(line) and line.endswith(f"/{capsule_id}") for line in cgroup.splitlines()
        ):
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("NSpid", "").split()[-1:] == [str(pid)] and not fields["State"].strip().startswith("Z"):
            return True
    return False


class _Process(Protocol):
    @property
    def capsule_id(self) -> str: ...

    @property
    def pid(self) -> int: ...


def ready_spares(data_dir: Path) -> int:
    """How many spare sandboxes the agent on data_dir holds ready (their supervisor's socket is up)."""
    return sum(1 for d in (data_dir / "agent" / "spares").glob("*") if (d / "run" / "agent.sock").exists())


def process_alive(process: _Process) -> bool:
    """True while a process the API or the agent reported (its capsule and pid) is alive."""
    return capsule_alive(process.capsule_id, process.pid)


def processes_under(directory: Path) -> list[int]:
    """PIDs of the host's processes whose working directory lies under directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:  # gone meanwhile, or a kernel thread
                continue
            if cwd == str(directory) or cwd.startswith(f"{directory}/"):
                found.append(int(entry.name))
    return found


def modules_of_the_default_server(*prefixes: str) -> list[str]:
    """The modules under any of prefixes that a server on the embedded default has loaded once built
    (with the CLI, and no CAPSULE_* or OpenTelemetry setting of the caller's), in a fresh interpreter."""
    probe = (
        "import sys\n"
        "from app.config import Settings\n"
        "from app.main import create_app\n"
        "import app.cli.commands\n"
        "create_app(Settings())\n"
        f"print(sorted(m for m in sys.modules if m.startswith({prefixes!r})))\n"
    )
    env = {k: v for k, v in command_env().items() if not k.startswith("CAPSULE_")}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    loaded: list[str] = ast.literal_eval(result.stdout.strip())
    return loaded
