"""What every benchmark runs on: `capsule serve` and `capsule agent` as subprocesses on temporary data
directories, the peers (websocketd, the bare Strawberry server, the Node graphql-ws server), the Node
load client, a fresh PostgreSQL database, and the RSS of process trees read from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = Path(__file__).resolve().parent / "node"
BIN = Path(sys.executable).parent
GRAPHQL = ROOT / "graphql"
MB = 1_000_000
MiB = 1024 * 1024

# Limits that would refuse the load itself: no request budget, no cap on connections or execs, room
# for 20 starts at once; a connection may wait long for its connection_init while thousands connect.
BENCH_ENV = {
    "CAPSULE_TEAM_REQUESTS_PER_SEC": "0",
    "CAPSULE_WS_MAX_CONNECTIONS_PER_TEAM": "0",
    "CAPSULE_TEAM_MAX_CONCURRENT_EXECS": "0",
    "CAPSULE_MAX_PROCESSES_PER_CAPSULE": "4096",
    "CAPSULE_WS_INIT_TIMEOUT_SEC": "600",
    "CAPSULE_RECONCILE_INTERVAL_SEC": "3600",
}


def document(name: str) -> str:
    """An operation of graphql/ with the fragments it spreads appended."""
    text = (GRAPHQL / f"{name}.graphql").read_text()
    for fragment in sorted((GRAPHQL / "fragments").glob("*.graphql")):
        if f"...{fragment.stem}" in text:
            text += "\n" + fragment.read_text()
    return text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Setup: the peers' programs.


def ensure_websocketd() -> str:
    """websocketd's path; installs Debian's package with apt-get where it is missing."""
    found = shutil.which("websocketd")
    if found:
        return found
    print(
        "bench: websocketd is missing; installing Debian's package (apt-get install websocketd)", flush=True
    )
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "websocketd"]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"bench: apt-get could not install websocketd (a peer the suite needs):\n{done.stderr}")
    return shutil.which("websocketd") or sys.exit("bench: websocketd installed, yet not on PATH")


def ensure_node_modules() -> None:
    """bench/node/node_modules from package-lock.json (npm ci) where it is missing."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        sys.exit("bench: the load client and the Node peer need node and npm (apt-get install nodejs npm)")
    if (NODE_DIR / "node_modules" / "graphql-ws").is_dir():
        return
    print("bench: installing the Node load client's packages (npm ci in bench/node)", flush=True)
    done = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        sys.exit(f"bench: npm ci failed in bench/node:\n{done.stderr}")


# Memory of process trees, from /proc.


def rss_bytes(pid: int) -> int:
    """VmRSS of one process; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def private_bytes(pid: int) -> int:
    """The pages of one process that no other process maps (Private_Clean + Private_Dirty of its
    smaps_rollup); 0 once it is gone."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return total


def _processes() -> dict[int, tuple[int, str]]:
    """Every process: pid -> (parent pid, command line)."""
    found: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    return found


def descendants(pid: int) -> dict[int, str]:
    """The processes below pid: pid -> command line."""
    table = _processes()
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    found: dict[int, str] = {}
    todo = list(children.get(pid, []))
    while todo:
        current = todo.pop()
        found[current] = table[current][1]
        todo.extend(children.get(current, []))
    return found


def is_supervisor(cmdline: str) -> bool:
    """A sandbox's bwrap or the capsule supervisor inside it (not a capsule's own process)."""
    return "app.agent.inner" in cmdline or cmdline.split(" ", 1)[0].endswith("bwrap")


def supervisors(pid: int) -> list[int]:
    """The sandbox supervisors below pid (bwrap and app.agent.inner)."""
    return [child for child, cmdline in descendants(pid).items() if is_supervisor(cmdline)]


def supervisors_rss(pid: int) -> tuple[int, int]:
    """RSS of the sandbox supervisors below pid (bwrap and app.agent.inner), and how many there are."""
    found = supervisors(pid)
    return sum(rss_bytes(child) for child in found), len(found)


def supervisors_private(pid: int) -> int:
    """What the sandbox supervisors below pid hold that no other process maps (see private_bytes)."""
    return sum(private_bytes(child) for child in supervisors(pid))


class RssSampler:
    """Peak RSS of what `measure` returns, sampled on a thread every `interval` seconds."""

    def __init__(self, measure: Callable[[], int], interval: float = 0.1) -> None:
        self.measure, self.interval, self.peak = measure, interval, 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, await asyncio.to_thread(self.measure))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)

    async def __aenter__(self) -> RssSampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        self.peak = max(self.peak, self.measure())


# Subprocesses.


def _wait_http(url: str, process: subprocess.Popen[bytes], log: Path, deadline_sec: float = 60) -> None:
    deadline = time.monotonic() + deadline_sec
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{process.args!r} did not answer {url} within {deadline_sec:.0f} s:\n{tail(log)}")


def tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def keep_log(log: Path, name: str) -> Path:
    """A copy of a server's log outside its temporary directory, for a run that failed."""
    kept = Path(tempfile.gettempdir()) / f"capsule-bench-{name}-{os.getpid()}.log"
    with contextlib.suppress(OSError):
        shutil.copyfile(log, kept)
    return kept


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGINT, timeout: float = 30) -> None:
    """Stops a process started in a session of its own: sig, then SIGKILL to its whole group."""
    if process.poll() is None:
        process.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any CAPSULE_* setting of the caller's, then extra."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CAPSULE_")} | extra


@dataclass
class Serve:
    """A running `capsule serve`: its URLs, the dev key it wrote, its process."""

    process: subprocess.Popen[bytes]
    url: str
    ws_url: str
    key: str
    data_dir: Path
    log: Path
    http: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.AsyncClient(headers={"Authorization": f"Bearer {self.key}"}, timeout=60)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def query(self, text: str, **variables: Any) -> dict[str, Any]:
        answer = (await self.http.post(self.url, json={"query": text, "variables": variables})).json()
        if answer.get("errors"):
            raise RuntimeError(f"capsule serve answered {answer['errors']}")
        return dict(answer["data"])

    async def create_capsule(self) -> dict[str, Any]:
        capsule = (await self.query(document("CreateCapsule"), timeoutSec=3600))["createCapsule"]
        if capsule["status"] != "RUNNING":
            raise RuntimeError(f"createCapsule answered {capsule}")
        return dict(capsule)

    async def start(self, capsule_id: str, argv: list[str], *, stdin: bool = False) -> str:
        """startProcess; the new process's tag."""
        answer = await self.query(
            document("StartProcess"),
            capsuleId=capsule_id,
            input={"cmd": argv[0], "args": argv[1:], "stdin": stdin},
        )
        return str(answer["startProcess"]["tag"])

    async def close_input(self, capsule_id: str, tag: str) -> None:
        await self.query(document("CloseInput"), capsuleId=capsule_id, selector=tag)

    async def wait_exited(self, capsule_id: str, tag: str, deadline_sec: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + deadline_sec
        while time.monotonic() < deadline:
            process = (await self.query(document("Process"), capsuleId=capsule_id, selector=tag))["process"]
            if process["status"] == "EXITED":
                return dict(process)
            await asyncio.sleep(0.1)
        raise RuntimeError(f"process {tag} did not exit within {deadline_sec:.0f} s")


@contextlib.asynccontextmanager
async def serving(
    runtime: str | None, *, env: Mapping[str, str] | None = None, name: str = "serve"
) -> AsyncIterator[Serve]:
    """A `capsule serve` on a fresh data directory (SQLite, memory bus, in-process agent unless env
    says otherwise), stopped with SIGINT after the block, its directory removed."""
    with tempfile.TemporaryDirectory(prefix=f"capsule-bench-{name}-") as tmp:
        data_dir = Path(tmp) / "data"
        port = free_port()
        extra = BENCH_ENV | {"CAPSULE_DATA_DIR": str(data_dir)} | dict(env or {})
        if runtime:
            extra["CAPSULE_RUNTIME"] = runtime
        log = Path(tmp) / "serve.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [str(BIN / "capsule"), "serve", "--host", "127.0.0.1", "--port", str(port)],
                cwd=tmp,
                env=clean_env(**extra),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            await asyncio.to_thread(_wait_http, f"http://127.0.0.1:{port}/healthz", process, log)
            key = (data_dir / "dev-api-key").read_text().strip()
            served = Serve(
                process,
                f"http://127.0.0.1:{port}/graphql",
                f"ws://127.0.0.1:{port}/graphql",
                key,
                data_dir,
                log,
            )
            try:
                yield served
            finally:
                await served.http.aclose()
        except BaseException:
            kept = keep_log(log, name)
            print(f"bench: capsule serve's log is kept at {kept}", file=sys.stderr)
            raise
        finally:
            await asyncio.to_thread(stop, process)


@contextlib.contextmanager
def agent_process(
    runtime: str | None, directory: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A `capsule agent` alone on a free loopback port (with env besides): the process and its address."""
    address = f"127.0.0.1:{free_port()}"
    extra = BENCH_ENV | {"CAPSULE_DATA_DIR": str(directory / "agent-data")} | dict(env or {})
    if runtime:
        extra["CAPSULE_RUNTIME"] = runtime
    log = directory / "agent.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "capsule"), "agent", "--listen", address],
            cwd=directory,
            env=clean_env(**extra),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process, address
    finally:
        stop(process, signal.SIGTERM)


@contextlib.contextmanager
def peer_process(argv: list[str], health_url: str, name: str) -> Iterator[subprocess.Popen[bytes]]:
    """A peer server, answering health_url, until the block ends."""
    with tempfile.TemporaryDirectory(prefix=f"capsule-bench-{name}-") as tmp:
        log = Path(tmp) / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, cwd=tmp, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=clean_env()
            )
        try:
            _wait_http(health_url, process, log)
            yield process
        finally:
            stop(process, signal.SIGTERM, timeout=10)


@contextlib.contextmanager
def node_peer(argv: list[str]) -> Iterator[tuple[subprocess.Popen[bytes], str, str]]:
    """The Node graphql-ws peer running argv: its process, its WebSocket URL and its close-input URL."""
    port = free_port()
    config = json.dumps({"port": port, "argv": argv, "backlog": 2048})
    base = f"http://127.0.0.1:{port}"
    with peer_process(
        ["node", str(NODE_DIR / "peer.mjs"), config], f"{base}/healthz", "node-peer"
    ) as process:
        yield process, f"ws://127.0.0.1:{port}/graphql", f"{base}/close-input"


@contextlib.contextmanager
def strawberry_peer(chunks: int, size: int) -> Iterator[str]:
    """The bare Strawberry server yielding `chunks` chunks of `size` bytes: its WebSocket URL."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.peers", "--port", str(port), "--chunks", str(chunks)]
    argv += ["--size", str(size)]
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "strawberry.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=clean_env()
            )
        try:
            _wait_http(f"http://127.0.0.1:{port}/healthz", process, log)
            yield f"ws://127.0.0.1:{port}/graphql"
        finally:
            stop(process, signal.SIGTERM, timeout=10)


@contextlib.contextmanager
def websocketd(argv: list[str]) -> Iterator[str]:
    """websocketd in line mode running argv for each connection: its WebSocket URL."""
    port = free_port()
    command = [ensure_websocketd(), "--port", str(port), "--address", "127.0.0.1", "--loglevel", "error"]
    # websocketd answers plain HTTP with 404 when nothing static is served: probe the port instead.
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "websocketd.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [*command, *argv], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            deadline = time.monotonic() + 20
            while True:
                with socket.socket() as sock:
                    if sock.connect_ex(("127.0.0.1", port)) == 0:
                        break
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"websocketd did not start:\n{tail(log)}")
                time.sleep(0.05)
            yield f"ws://127.0.0.1:{port}/"
        finally:
            stop(process, signal.SIGTERM, timeout=10)


# The Node load client.


@dataclass
class LoadClient:
    """One run of bench/node/load.mjs: its `live` moment and its result."""

    process: asyncio.subprocess.Process
    live: asyncio.Event = field(default_factory=asyncio.Event)
    result: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # what went wrong around the run, for the figure's detail
    live_count: int = 0  # subscribers live when `live` came (the others were dropped before)
    _reader: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            event = json.loads(line)
            if event["event"] == "live":
                self.live_count = int(event.get("live", 0))
                self.live.set()
            elif event["event"] == "result":
                self.result = event
            elif event["event"] == "error":
                raise RuntimeError(f"load client: {event['message']}")

    async def wait_live(self, within: float) -> bool:
        """True once every subscriber has its first message or was dropped before; False when the
        client ended first or `within` passed."""
        assert self._reader is not None
        waiter = asyncio.create_task(self.live.wait())
        done, _ = await asyncio.wait({waiter, self._reader}, timeout=within, return_when="FIRST_COMPLETED")
        waiter.cancel()
        if self._reader in done:
            self._reader.result()
        return self.live.is_set()

    async def go(self) -> None:
        """Tells the client that the writer goes now: spans are measured from here."""
        assert self.process.stdin is not None
        self.process.stdin.write(b"go\n")
        await self.process.stdin.drain()

    async def finish(self) -> dict[str, Any]:
        assert self._reader is not None
        await self._reader
        await self.process.wait()
        if not self.result:
            raise RuntimeError(f"load client exited with {self.process.returncode} and no result")
        return self.result


async def load_client(mode: str, **config: Any) -> LoadClient:
    process = await asyncio.create_subprocess_exec(
        "node",
        str(NODE_DIR / "load.mjs"),
        mode,
        json.dumps(config),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=16 * MiB,
    )
    client = LoadClient(process)
    client._reader = asyncio.create_task(client._read())
    return client


async def run_load(mode: str, **config: Any) -> dict[str, Any]:
    return await (await load_client(mode, **config)).finish()


# PostgreSQL.

POSTGRES_ADMIN = os.environ.get("BENCH_POSTGRES_URL", "postgresql://{user}@127.0.0.1:5432/test")


@contextlib.asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    """A fresh database on the PostgreSQL at 127.0.0.1:5432 (user postgres, else root; trust), dropped
    after the block: its SQLAlchemy URL."""
    import asyncpg  # type: ignore[import-untyped]

    admin, errors = None, []
    for user in ("postgres", "root"):
        dsn = POSTGRES_ADMIN.format(user=user)
        try:
            admin = await asyncpg.connect(dsn, timeout=10)
            break
        except (OSError, asyncpg.PostgresError) as exc:
            errors.append(f"{dsn}: {exc}")
    if admin is None:
        raise RuntimeError("PostgreSQL is unreachable: " + "; ".join(errors))
    name = f"capsule_bench_{os.getpid()}_{secrets.token_hex(4)}"
    user = await admin.fetchval("SELECT current_user")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql+asyncpg://{user}@127.0.0.1:5432/{name}"
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
