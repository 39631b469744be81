"""Tests that try to get out: from a process in capsule A, through the API, on the sandbox runtime.

Each test acts from inside a capsule of team A (exec, background processes) and checks from the
host that nothing of the server, of the host or of capsule B (team B's, with a secret in its
workspace and a process running) was seen, reached or harmed. One server for the module, with its
embedded agent, always on the sandbox runtime: where a sandbox cannot start here the tests fail and
say why; they never skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

import app
from app.agent.launch import BASE_PATH
from app.agent.sandbox import SandboxRuntime
from app.agent.server import IN_PROCESS
from app.config import Settings
from tests.e2e.client import HttpClient
from tests.e2e.conftest import Server, running_server
from tests.system import is_alive

pytestmark = pytest.mark.asyncio(loop_scope="module")

# Set in the server's own environment (this process's), where no capsule may see it.
SECRET_NAME = "CAPSULE_TEST_SECRET"
SECRET = f"server-secret-{secrets.token_hex(8)}"
B_SECRET = f"b-secret-{secrets.token_hex(8)}"
B_FILE = f"{B_SECRET}.txt"  # named by its secret too, so a search by name would find it
DEADLINE_SEC = 10.0
# The same interpreter as the server's: the sandbox binds it read-only for the supervisor inside.
PYTHON = sys.executable
# What the sandbox binds of this Python and of the app, read-only.
PYTHON_DIRS = sorted(
    {
        str(Path(sys.prefix).resolve()),
        str(Path(sys.base_prefix).resolve()),
        str(Path(app.__file__).resolve().parent),
    }
)


@dataclass
class Victim:
    """Capsule B, another team's: a secret file in its workspace and a process running."""

    capsule_id: str
    workspace: Path  # its host path
    sleeper_pid: int  # as B sees it


@dataclass
class Served:
    """The module's server and what the tests look for from inside a capsule."""

    server: Server
    settings: Settings
    a: HttpClient  # team A's
    b: HttpClient  # team B's
    dev_key: str
    victim: Victim
    created: list[tuple[HttpClient, str]] = field(default_factory=list)

    @property
    def capsules_dir(self) -> Path:
        return self.settings.agent_dir.resolve() / "capsules"

    async def capsule(self, *, network: bool = False, limits: dict[str, Any] | None = None) -> str:
        """A new sandboxed capsule of team A; destroyed after the test."""
        return await self._create(self.a, network=network, limits=limits)

    async def _create(self, api: HttpClient, *, network: bool, limits: dict[str, Any] | None) -> str:
        created = (await api.run("CreateCapsule", network=network, limits=limits)).ok()["createCapsule"]
        assert created["runtime"] == "SANDBOX", created
        self.created.append((api, created["id"]))
        return str(created["id"])

    def workspace(self, capsule_id: str) -> Path:
        return self.capsules_dir / capsule_id / "workspace"


@dataclass(frozen=True)
class HostProcess:
    """A process as the host sees it."""

    pid: int
    uid: int
    inner_pid: int | None  # its pid in the capsule's namespace; None for one outside it (the launcher)
    cmdline: str


def host_processes(capsule_id: str, uid: int | None = None) -> list[HostProcess]:
    """The host's processes whose cgroup names the capsule, or whose real uid is uid."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cgroup = (entry / "cgroup").read_text()
            status = dict(
                line.split(":", 1) for line in (entry / "status").read_text().splitlines() if ":" in line
            )
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # ended while we looked
            continue
        real_uid = int(status["Uid"].split()[0])
        if status["State"].strip().startswith("Z"):
            continue
        in_cgroup = any(line.endswith(f"/{capsule_id}") for line in cgroup.splitlines())
        if not in_cgroup and real_uid != uid:
            continue
        nspids = [int(pid) for pid in status.get("NSpid", "").split()]
        inner = nspids[-1] if len(nspids) > 1 else None
        found.append(HostProcess(pid=int(entry.name), uid=real_uid, inner_pid=inner, cmdline=cmdline))
    return found


def pids_cgroup(capsule_id: str) -> Path:
    """The directory of the pids cgroup a capsule's processes are in (cgroup v1 or v2)."""
    member = next(p for p in host_processes(capsule_id) if p.inner_pid is not None)
    for line in Path(f"/proc/{member.pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            return Path("/sys/fs/cgroup/pids") / path.lstrip("/")
    [unified] = [line for line in Path(f"/proc/{member.pid}/cgroup").read_text().splitlines() if "::" in line]
    return Path("/sys/fs/cgroup") / unified.split("::", 1)[1].lstrip("/")


def local_addresses() -> set[str]:
    """The host's own IPv4 addresses (loopback included), from the kernel's routing table."""
    addresses, last = {"127.0.0.1"}, ""
    for line in Path("/proc/net/fib_trie").read_text().splitlines():
        text = line.strip()
        if text.startswith("|-- "):
            last = text[4:]
        elif text == "/32 host LOCAL":
            addresses.add(last)
    return addresses


async def until_true(check: Any, *, what: str) -> Any:
    """Polls check() until it answers something true; fails past the deadline."""
    try:
        async with asyncio.timeout(DEADLINE_SEC):
            while not (found := check()):
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"still waiting, after {DEADLINE_SEC}s, for {what}")
    return found


async def run(api: HttpClient, capsule_id: str, cmd: str, *args: str, **fields: Any) -> dict[str, Any]:
    """exec in the capsule; the result."""
    answer = await api.run("Exec", capsuleId=capsule_id, input={"cmd": cmd, "args": list(args), **fields})
    return dict(answer.ok()["exec"])


async def sh(api: HttpClient, capsule_id: str, script: str, *args: str) -> dict[str, Any]:
    """exec of a shell script in the capsule, args as $1...; the result."""
    return await run(api, capsule_id, "sh", "-c", script, "sh", *args)


async def start(api: HttpClient, capsule_id: str, cmd: str, *args: str, **fields: Any) -> dict[str, Any]:
    """A background process started in the capsule; the Process."""
    answer = await api.run(
        "StartProcess", capsuleId=capsule_id, input={"cmd": cmd, "args": list(args), **fields}
    )
    return dict(answer.ok()["startProcess"])


async def usage(api: HttpClient, capsule_id: str) -> dict[str, Any]:
    """The capsule's usage, which the sandbox always measures."""
    capsule = (await api.run("Capsule", id=capsule_id)).ok()["capsule"]
    assert capsule["usage"] is not None, capsule
    return dict(capsule["usage"])


async def b_answers(served: Served) -> None:
    """B's exec still answers, its secret is intact and its process still runs."""
    victim = served.victim
    result = await run(served.b, victim.capsule_id, "cat", B_FILE)
    assert (result["exitCode"], result["stdout"]) == (0, B_SECRET + "\n"), result
    processes = (await served.b.run("Processes", capsuleId=victim.capsule_id)).ok()["processes"]
    assert [(p["pid"], p["status"]) for p in processes] == [(victim.sleeper_pid, "RUNNING")]


@pytest.fixture(scope="module")
def sandbox_settings(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> Settings:
    """The e2e settings on the sandbox runtime, the database where `capsule serve` keeps it."""
    data_dir = tmp_path_factory.mktemp("isolation") / "data"
    data_dir.mkdir()
    shutil.copyfile(sqlite_template, data_dir / "capsule.db")
    settings = Settings(
        data_dir=data_dir,
        retention_sec=60.0,
        output_cap_bytes=4 * 1024 * 1024,
        exec_output_cap_bytes=64 * 1024,
        idle_check_interval_sec=0.2,
    )
    return replace(settings, runtime="sandbox")


@pytest.fixture(scope="module")
def server_environment() -> Iterator[None]:
    """The secret in the server's environment while the module's server runs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SECRET_NAME, SECRET)
        yield


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def module_served(
    sandbox_settings: Settings, server_environment: None, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Served]:
    """The server, its dev key written as `capsule serve` writes it, and capsule B."""
    probe = Settings(data_dir=tmp_path_factory.mktemp("probe"))
    runtime, missing = await SandboxRuntime.probe(probe)
    if runtime is None:
        pytest.fail(f"the sandbox runtime does not work on this machine: {missing}")
    async with running_server(sandbox_settings) as server:
        dev_key, _ = await server.state.platform.keys.ensure_dev_key(sandbox_settings.data_dir)
        a = HttpClient(server.url, await server.new_key("team-a"))
        b = HttpClient(server.url, await server.new_key("team-b"))
        try:
            created = (await b.run("CreateCapsule")).ok()["createCapsule"]
            assert created["runtime"] == "SANDBOX", created
            victim_id = created["id"]
            assert (await sh(b, victim_id, f"echo {B_SECRET} > {B_FILE}"))["exitCode"] == 0
            sleeper = await start(b, victim_id, "sleep", "1001")
            victim = Victim(
                capsule_id=victim_id,
                workspace=sandbox_settings.agent_dir.resolve() / "capsules" / victim_id / "workspace",
                sleeper_pid=sleeper["pid"],
            )
            assert (victim.workspace / B_FILE).read_text() == B_SECRET + "\n"
            yield Served(server=server, settings=sandbox_settings, a=a, b=b, dev_key=dev_key, victim=victim)
        finally:
            await a.aclose()
            await b.aclose()


@pytest_asyncio.fixture(loop_scope="module")
async def served(module_served: Served) -> AsyncIterator[Served]:
    """The module's server; the capsules a test made are destroyed after it, nothing of them left."""
    yield module_served
    created, module_served.created = module_served.created, []
    for api, capsule_id in created:
        (await api.run("DestroyCapsule", id=capsule_id)).ok()
    for _, capsule_id in created:
        await until_true(
            lambda gone=capsule_id: not host_processes(gone), what=f"the processes of {capsule_id} to end"
        )


async def test_proc_shows_only_the_capsules_own_processes(served: Served) -> None:
    capsule_id = await served.capsule()
    background = await start(served.a, capsule_id, "sleep", "1000")
    # Builtins only, so the listing itself adds no process.
    listed = await sh(served.a, capsule_id, 'echo $$; for d in /proc/[0-9]*; do echo "${d#/proc/}"; done')
    shell, *visible = (int(line) for line in listed["stdout"].split())
    inside = {p.inner_pid for p in host_processes(capsule_id) if p.inner_pid is not None}
    assert set(visible) == inside | {shell}
    assert background["pid"] in inside and len(visible) <= 5


async def test_the_pids_the_api_reports_are_the_capsules_own(served: Served) -> None:
    capsule_id = await served.capsule()
    started = await start(served.a, capsule_id, "sh", "-c", "echo $$ > pid; exec sleep 1000", tag="itself")
    pid_file = served.workspace(capsule_id) / "pid"
    await until_true(lambda: pid_file.exists() and pid_file.read_text().strip(), what="the pid file")
    said = int((await run(served.a, capsule_id, "cat", "pid"))["stdout"])
    listed = (await served.a.run("Processes", capsuleId=capsule_id)).ok()["processes"]
    assert started["pid"] == said == listed[0]["pid"]
    host = await until_true(
        lambda: next((p for p in host_processes(capsule_id) if p.cmdline == "sleep 1000"), None),
        what="the shell to become sleep",
    )
    assert host.inner_pid == said != host.pid
    # The pid is the selector that reaches it.
    signalled = await served.a.run("SignalProcess", capsuleId=capsule_id, selector=str(said))
    assert signalled.ok()["signalProcess"]["pid"] == said
    await until_true(lambda: not is_alive(host.pid), what=f"pid {said} (host {host.pid}) to end")


def _unreachable_targets(served: Served) -> list[str]:
    settings, victim = served.settings, served.victim
    database = Path(settings.database_url.split(":///", 1)[1]).resolve()
    data_dir = settings.data_dir.resolve()
    assert database.is_file() and (data_dir / "dev-api-key").read_text().strip() == served.dev_key
    b_run = victim.workspace.parent / "run"
    return [
        str(data_dir),
        str(data_dir / "dev-api-key"),
        str(database),
        str(settings.agent_dir.resolve() / "capsules"),
        str(victim.workspace),
        str(victim.workspace / B_FILE),
        str(b_run / "agent.sock"),
    ]


async def test_server_data_and_other_capsules_are_unreachable(served: Served) -> None:
    capsule_id = await served.capsule()
    targets = _unreachable_targets(served)
    tries = []
    for index, target in enumerate(targets):
        tries += [target, f"/workspace/../..{target}", f"/tmp/../..{target}", f"/workspace/link{index}"]
        tries += [f"/proc/{pid}/root{target}" for pid in ("1", "2", "self")]
    tries += ["/proc/1/root/", "/proc/1/cwd/"]
    script = (
        'i=0; for target in $TARGETS; do ln -s "$target" "/workspace/link$i"; i=$((i+1)); done; '
        'for path in "$@"; do '
        '  if cat "$path" 2>/dev/null || ls -aL "$path" >/dev/null 2>&1; then echo "REACHED $path"; fi; '
        "done"
    )
    answer = await run(
        served.a,
        capsule_id,
        "sh",
        "-c",
        script,
        "sh",
        *tries,
        envs=[{"name": "TARGETS", "value": " ".join(targets)}],
    )
    assert answer["exitCode"] == 0, answer
    assert "REACHED" not in answer["stdout"], answer["stdout"]
    for secret in (B_SECRET, served.dev_key, "SQLite format 3"):
        assert secret not in answer["stdout"]
    # By name, anywhere the capsule can look: nothing but its own socket.
    names = ["dev-api-key", "capsule.db*", B_FILE, "agent.sock"]
    pattern = " -o ".join(f"-name '{name}'" for name in names)
    found = await sh(
        served.a, capsule_id, f"find / -path /proc -prune -o \\( {pattern} \\) -print 2>/dev/null"
    )
    assert found["stdout"].split() == ["/run/capsule/agent.sock"]
    # A cwd outside the workspace is refused before anything runs, one through a link included.
    link_to_b = f"link{targets.index(str(served.victim.workspace))}"
    for cwd in ("../..", "/", str(served.victim.workspace), link_to_b):
        refused = await served.a.run("Exec", capsuleId=capsule_id, input={"cmd": "pwd", "cwd": cwd})
        assert refused.codes == ["INVALID_REQUEST"], (cwd, refused)


async def test_a_cwd_through_a_link_it_may_not_read_is_invalid_request(served: Served) -> None:
    capsule_id = await served.capsule()
    for cwd in ("/proc/1/root", "/proc/1/cwd"):
        answer = await served.a.run("Exec", capsuleId=capsule_id, input={"cmd": "pwd", "cwd": cwd})
        assert answer.codes == ["INVALID_REQUEST"], (cwd, answer)


async def test_open_by_handle_cannot_reach_the_host_filesystem(served: Served) -> None:
    capsule_id = await served.capsule()
    # The "shocker" escape: a file handle names an inode of the whole filesystem, past any mount;
    # this one is the root directory of an ext4 filesystem (inode 2), the one /workspace lies on.
    script = (
        "import ctypes, os, struct\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "handle = struct.pack('Ii', 8, 1) + struct.pack('II', 2, 0)\n"
        "fd = os.open('/workspace', os.O_RDONLY)\n"
        "got = libc.open_by_handle_at(fd, ctypes.create_string_buffer(handle), os.O_RDONLY)\n"
        "print(got, os.strerror(ctypes.get_errno()))\n"
    )
    answer = await run(served.a, capsule_id, PYTHON, "-c", script)
    assert answer["exitCode"] == 0, answer
    assert answer["stdout"] == "-1 Operation not permitted\n"


async def test_kill_reaches_no_host_process(served: Served) -> None:
    capsule_id = await served.capsule()
    bystander = await asyncio.create_subprocess_exec("sleep", "1000")
    try:
        b_processes = host_processes(served.victim.capsule_id)
        victims = [bystander.pid, os.getpid(), 1, *(p.pid for p in b_processes)]
        said = await sh(
            served.a,
            capsule_id,
            'for pid in "$@"; do kill -9 "$pid" 2>/dev/null; echo $?; done',
            *map(str, victims),
        )
        assert said["stdout"].split() == ["1"] * len(victims)
        # Everything it may signal, at once: that is its own capsule, which ends with its supervisor.
        await served.a.run("Exec", capsuleId=capsule_id, input={"cmd": "kill", "args": ["-9", "-1"]})
        assert all(is_alive(pid) for pid in victims)
        await b_answers(served)
    finally:
        bystander.kill()
        await bystander.wait()


async def test_writes_outside_workspace_and_tmp_fail(served: Served) -> None:
    capsule_id = await served.capsule()
    name = f"escape-{secrets.token_hex(4)}"
    refused = ["/", "/usr", "/etc", "/bin", "/root", "/run", "/dev", "/proc", "/sys", *PYTHON_DIRS]
    script = (
        'for dir in "$@"; do '
        '  touch "$dir/$NAME" 2>/dev/null && echo "WROTE $dir"; '
        '  mkdir "$dir/$NAME.d" 2>/dev/null && echo "WROTE in $dir"; '
        "done; "
        'mknod /tmp/disk b "$DISK_MAJOR" "$DISK_MINOR" 2>/dev/null && echo "WROTE a device node"; '
        "echo capsule > /proc/sys/kernel/hostname 2>/dev/null && echo 'WROTE the hostname'; "
        'for dir in /workspace /tmp /run/capsule; do echo mine > "$dir/$NAME" || echo "REFUSED $dir"; done'
    )
    device = os.stat("/").st_dev
    envs = {"NAME": name, "DISK_MAJOR": str(os.major(device)), "DISK_MINOR": str(os.minor(device))}
    try:
        answer = await run(
            served.a,
            capsule_id,
            "sh",
            "-c",
            script,
            "sh",
            *refused,
            envs=[{"name": k, "value": v} for k, v in envs.items()],
        )
        assert answer["stdout"] == "", answer
    finally:  # were a write to land on the host after all, it must not stay
        for directory in refused:
            with contextlib.suppress(OSError):
                (Path(directory) / name).unlink()
            with contextlib.suppress(OSError):
                (Path(directory) / f"{name}.d").rmdir()
    # The workspace and /run/capsule are the capsule's own directories on the host, its /tmp is its
    # own: what it writes there lands there alone, owned by the capsule's unprivileged host uid.
    capsule_dir = served.capsules_dir / capsule_id
    uid = (capsule_dir / "workspace").stat().st_uid
    assert uid != 0 and uid != os.getuid()
    for written in (capsule_dir / "workspace" / name, capsule_dir / "run" / name):
        assert written.read_text() == "mine\n" and written.stat().st_uid == uid
    assert not (Path("/tmp") / name).exists()
    seen_by_b = await run(served.b, served.victim.capsule_id, "ls", f"/tmp/{name}")
    assert seen_by_b["exitCode"] != 0


async def test_the_environment_holds_nothing_of_the_server(served: Served) -> None:
    assert os.environ[SECRET_NAME] == SECRET
    capsule_id = await served.capsule()
    env = await run(served.a, capsule_id, "env")
    variables = dict(line.split("=", 1) for line in env["stdout"].splitlines())
    assert SECRET not in env["stdout"] and not any(name.startswith("CAPSULE_") for name in variables)
    assert (variables["PATH"], variables["HOME"]) == (BASE_PATH, "/workspace")
    # However it looks: pid 1 inside, bwrap, is root's, and was started with the agent's environment.
    await start(served.a, capsule_id, "sleep", "1000")
    every = await sh(served.a, capsule_id, "cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null; true")
    assert "HOME=/workspace" in every["stdout"] and SECRET not in every["stdout"]


@contextlib.asynccontextmanager
async def host_listener() -> AsyncIterator[tuple[int, list[str]]]:
    """A TCP server on every host address that greets whoever connects; yields its port and who came."""
    came: list[str] = []

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        came.append(str(writer.get_extra_info("peername")))
        writer.write(b"hello from the host\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet, "0.0.0.0", 0)
    try:
        yield server.sockets[0].getsockname()[1], came
    finally:
        server.close()
        await server.wait_closed()


# bash's /dev/tcp, to each of $ADDRESSES on $PORT: the greeting, or why not.
CONNECT = (
    "for address in $ADDRESSES; do "
    '  timeout 5 bash -c \'exec 3<>"/dev/tcp/$0/$1" && head -n1 <&3\' "$address" "$PORT" 2>&1; '
    "done"
)


async def test_without_network_only_loopback(served: Served) -> None:
    capsule_id = await served.capsule()
    devices = await run(served.a, capsule_id, "cat", "/proc/net/dev")
    assert [line.split(":")[0].strip() for line in devices["stdout"].splitlines()[2:]] == ["lo"]
    async with host_listener() as (port, came):
        envs = [
            {"name": "ADDRESSES", "value": " ".join(sorted(local_addresses()))},
            {"name": "PORT", "value": str(port)},
        ]
        answer = await run(served.a, capsule_id, "sh", "-c", CONNECT, envs=envs)
        assert "hello from the host" not in answer["stdout"]
        assert "Connection refused" in answer["stdout"]  # its own loopback, where nothing listens
        assert came == []


async def test_with_network_the_hosts_loopback_is_reached(served: Served) -> None:
    capsule_id = await served.capsule(network=True)
    capsule = (await served.a.run("Capsule", id=capsule_id)).ok()["capsule"]
    assert (capsule["runtime"], capsule["network"]) == ("SANDBOX", True)
    devices = await run(served.a, capsule_id, "cat", "/proc/net/dev")
    assert len(devices["stdout"].splitlines()[2:]) > 1
    async with host_listener() as (port, came):
        envs = [{"name": "ADDRESSES", "value": "127.0.0.1"}, {"name": "PORT", "value": str(port)}]
        answer = await run(served.a, capsule_id, "sh", "-c", CONNECT, envs=envs)
        assert answer["stdout"] == "hello from the host\n", answer
        assert len(came) == 1


async def test_with_network_the_agent_does_not_take_orders_from_a_capsule(served: Served) -> None:
    capsule_id = await served.capsule(network=True)
    agent = served.server.state.agent
    assert agent is not None
    # The embedded agent is called in the server's process and listens on nothing: no socket in its
    # directory, no port. Where a socket would be, and the agent's own address, are both tried.
    socket_path = served.server.state.settings.agent_dir.resolve() / "agent.sock"
    assert agent.port == 0 and agent.address == IN_PROCESS and not socket_path.exists()
    script = (
        "import sys, grpc\n"
        "from app.pb import agent_pb2 as pb, agent_pb2_grpc\n"
        "stub = agent_pb2_grpc.AgentStub(grpc.insecure_channel(sys.argv[1]))\n"
        "request = pb.ExecRequest(capsule_id=sys.argv[2], cmd='cat', args=[sys.argv[3]])\n"
        "print(stub.Exec(request, timeout=5))\n"
    )
    for target in (f"unix:{socket_path}", agent.address):
        answer = await run(
            served.a, capsule_id, PYTHON, "-c", script, target, served.victim.capsule_id, B_FILE
        )
        assert answer["exitCode"] != 0 and B_SECRET not in answer["stdout"], answer


FORK_BOMB = "exec 2> bomb.err; while :; do sleep 1000 & done"


async def test_a_fork_bomb_stops_at_its_limit_while_others_answer(served: Served) -> None:
    capsule_id = await served.capsule(limits={"maxProcesses": 20})
    # bash retries a refused fork and goes on: the capsule stays at its limit until it is destroyed.
    await start(served.a, capsule_id, "bash", "-c", FORK_BOMB, timeoutSec=60)
    errors = served.workspace(capsule_id) / "bomb.err"
    await until_true(
        lambda: errors.exists() and "Resource temporarily unavailable" in errors.read_text(errors="replace"),
        what="the fork bomb to meet its limit",
    )
    limit = int((pids_cgroup(capsule_id) / "pids.max").read_text())
    assert len(host_processes(capsule_id)) <= limit
    for _ in range(3):  # another capsule answers within a second, however long the bomb runs
        began = time.perf_counter()
        answer = await run(served.b, served.victim.capsule_id, "true")
        assert answer["exitCode"] == 0 and time.perf_counter() - began < 1.0
    await b_answers(served)
    # And it ends, whole, on destroy (the fixture checks that nothing of it is left).


async def test_a_capsule_runs_at_most_max_processes(served: Served) -> None:
    capsule_id = await served.capsule(limits={"maxProcesses": 20})
    # dash gives up at the first refused fork; forks counts those that were not refused.
    await sh(served.a, capsule_id, "n=0; while :; do sleep 1000 & n=$((n+1)); echo $n > forks; done")
    forks = int((await run(served.a, capsule_id, "cat", "forks"))["stdout"])
    assert forks < 20  # the shell itself is one of the 20


async def test_destroy_leaves_no_process_setsid_ones_included(served: Served) -> None:
    capsule_id = await served.capsule()
    uid = served.workspace(capsule_id).stat().st_uid
    script = 'setsid sleep 1002 & (setsid sh -c "sleep 1003 & exec sleep 1004" &) ; exec sleep 1005'
    await start(served.a, capsule_id, "sh", "-c", script)
    # A daemon that outlives the exec that started it, in a session of its own: the exec waits until
    # it has left the exec's session, or the end of the exec could take it along.
    daemon = "setsid sh -c 'echo $$ > daemon; exec sleep 1006' </dev/null >/dev/null 2>&1 &"
    await sh(served.a, capsule_id, f"{daemon} while [ ! -s daemon ]; do :; done")
    wanted = {f"sleep {n}" for n in range(1002, 1007)}
    await until_true(
        lambda: wanted <= {p.cmdline for p in host_processes(capsule_id)}, what="the capsule's sleeps"
    )
    assert all(p.uid == uid for p in host_processes(capsule_id) if p.cmdline in wanted)
    (await served.a.run("DestroyCapsule", id=capsule_id)).ok()
    await until_true(lambda: not host_processes(capsule_id, uid), what="every process of the capsule to end")


async def test_an_allocation_past_the_memory_limit_is_killed_and_others_are_fine(served: Served) -> None:
    capsule_id = await served.capsule(limits={"memoryMiB": 64})
    hog = await run(served.a, capsule_id, PYTHON, "-c", "b = b'x' * (200 << 20); print(len(b))")
    assert (hog["signal"], hog["exitCode"], hog["timedOut"], hog["stdout"]) == ("SIGKILL", -9, False, "")
    assert (await run(served.a, capsule_id, "echo", "still here"))["stdout"] == "still here\n"
    assert (await usage(served.a, capsule_id))["memoryPeakBytes"] <= 64 * 1024 * 1024
    await b_answers(served)


async def test_usage_reports_what_runs(served: Served) -> None:
    capsule_id = await served.capsule()
    before = await usage(served.a, capsule_id)
    assert before["cpuSec"] > 0 and before["memoryBytes"] > 0 and before["processes"] == 0
    started = [await start(served.a, capsule_id, "sleep", "1000") for _ in range(3)]

    async def processes_now() -> int:
        return int((await usage(served.a, capsule_id))["processes"])

    assert await processes_now() == 3
    await sh(served.a, capsule_id, "i=0; while [ $i -lt 50000 ]; do i=$((i+1)); done")
    assert (await usage(served.a, capsule_id))["cpuSec"] > before["cpuSec"]
    (await served.a.run("SignalProcess", capsuleId=capsule_id, selector=str(started[0]["pid"]))).ok()
    async with asyncio.timeout(DEADLINE_SEC):
        while await processes_now() != 2:
            await asyncio.sleep(0.02)
