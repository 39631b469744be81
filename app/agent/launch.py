"""What a spawned process gets: its argv, a clean environment and a cwd inside the workspace."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from app.domain import EnvVar, check_cmd, check_env_name
from app.errors import InvalidRequest

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def argv(cmd: str, args: Sequence[str]) -> list[str]:
    """The command and its arguments, checked (no shell ever parses them)."""
    check_cmd(cmd)
    for index, arg in enumerate(args):
        if "\0" in arg:
            raise InvalidRequest(f"args[{index}] contains a NUL byte")
    return [cmd, *args]


def environment(workspace: Path, envs: Sequence[EnvVar]) -> Mapping[str, str]:
    """A clean base (never the agent's own environment, which holds secrets) plus the caller's envs."""
    env = {"PATH": BASE_PATH, "HOME": str(workspace), "LANG": "C.UTF-8"}
    for var in envs:
        check_env_name(var.name)
        if "\0" in var.value:
            raise InvalidRequest(f"env {var.name} contains a NUL byte")
        env[var.name] = var.value
    return env


def working_dir(workspace: Path, cwd: str | None) -> Path:
    """The directory to run in: the workspace, or cwd resolved inside it (symlinks followed)."""
    root = workspace.resolve()
    if not cwd:
        return root
    if "\0" in cwd:
        raise InvalidRequest("cwd contains a NUL byte")
    shown = repr(cwd) if len(cwd) <= 80 else f"{cwd[:80]!r}... ({len(cwd)} characters)"
    try:
        resolved = Path(os.path.realpath(root / cwd))  # an absolute cwd replaces root here
    except OSError as exc:  # a link it may not read (/proc/1/root in a sandbox), a loop
        raise InvalidRequest(f"cwd {shown} cannot be used: {exc.strerror}") from None
    if resolved != root and root not in resolved.parents:
        raise InvalidRequest(f"cwd {shown} is outside the capsule's workspace {root}")
    try:
        is_dir = stat.S_ISDIR(resolved.stat().st_mode)
    except (FileNotFoundError, NotADirectoryError):
        is_dir = False
    except OSError as exc:  # a name over NAME_MAX or a path over PATH_MAX, a symlink loop
        limits = " (a name holds at most 255 bytes, a path 4096)" if exc.errno == errno.ENAMETOOLONG else ""
        raise InvalidRequest(f"cwd {shown} cannot be used: {exc.strerror}{limits}") from None
    if not is_dir:
        raise InvalidRequest(f"cwd {shown} is not a directory in the workspace: create it first")
    return resolved
