"""Seconds from `capsule serve` to its first answered request, beside a bare uvicorn app.

Run by hand: .venv/bin/python -m bench.serve_start [--runs N]
First start: a fresh data directory (migrations, team and key created); restart: the same one again.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CAPSULE = Path(sys.executable).parent / "capsule"
BARE = (
    "import uvicorn, sys\n"
    "from starlette.applications import Starlette\n"
    "from starlette.responses import JSONResponse\n"
    "from starlette.routing import Route\n"
    "async def ok(request): return JSONResponse({'status': 'ok'})\n"
    "uvicorn.run(Starlette(routes=[Route('/healthz', ok)]), port=int(sys.argv[1]), log_level='warning')\n"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def time_to_answer(argv: list[str], port: int, cwd: Path) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPSULE_")}
    began = time.perf_counter()
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as answer:
                    if answer.status == 200:
                        return time.perf_counter() - began
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError(f"{argv} exited with {process.returncode}") from None
                time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=15)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    first, again, bare = [], [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            port = free_port()
            serve = [str(CAPSULE), "serve", "--port", str(port)]
            first.append(time_to_answer(serve, port, Path(tmp)))
            again.append(time_to_answer(serve, port, Path(tmp)))
            bare.append(time_to_answer([sys.executable, "-c", BARE, str(port)], port, Path(tmp)))
    print(f"{runs} runs, median (max) seconds to the first answered request")
    for name, times in (
        ("capsule serve, first start", first),
        ("capsule serve, restart", again),
        ("bare uvicorn app", bare),
    ):
        print(f"{name:<28}{statistics.median(times):>8.2f}{max(times):>8.2f}")


if __name__ == "__main__":
    main()
