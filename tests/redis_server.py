"""A redis-server of a test's own on a free port, to stop and start again: the machine's Redis at
6379 serves every other test (and other test runs), which a restart would break."""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from tests.system import free_port


async def redis_up(port: int) -> bool:
    """True when something accepts connections on the port."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


@dataclass
class PrivateRedis:
    """One redis-server on its own port and directory; start() and stop() as often as needed."""

    port: int
    directory: str
    running: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def launch(self) -> subprocess.Popen[bytes]:
        """Starts it (again) on its port, without waiting for it to answer."""
        options = ["--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"]
        process = subprocess.Popen(
            ["redis-server", *options, "--dir", self.directory],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.running.append(process)
        return process

    async def start(self, within: float = 30.0) -> None:
        """Starts it and waits until it accepts connections."""
        self.launch()
        async with asyncio.timeout(within):
            while not await redis_up(self.port):
                await asyncio.sleep(0.02)

    async def stop(self, within: float = 10.0) -> None:
        """Shuts it down (SHUTDOWN NOSAVE, as an operator would) and waits until it is gone."""
        subprocess.run(
            ["redis-cli", "-p", str(self.port), "shutdown", "nosave"], check=False, capture_output=True
        )
        async with asyncio.timeout(within):
            for process in self.running:
                await asyncio.to_thread(process.wait)
            while await redis_up(self.port):
                await asyncio.sleep(0.02)

    def kill(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.kill()
                process.wait()


@asynccontextmanager
async def private_redis() -> AsyncIterator[PrivateRedis]:
    """A PrivateRedis, not yet started; whatever of it runs is killed at the end."""
    server = PrivateRedis(port=free_port(), directory=tempfile.mkdtemp(prefix="capsule-redis-"))
    try:
        yield server
    finally:
        server.kill()
