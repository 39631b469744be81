"""`capsule serve` run as the README says: embedded default, the key it writes, a clean Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.e2e.client import HttpClient
from tests.system import free_port, is_alive

CAPSULE = Path(sys.executable).parent / "capsule"


async def test_serve_embedded_default(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPSULE_")}
    server = subprocess.Popen(
        [str(CAPSULE), "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert server.stdout is not None
    printed: list[str] = []
    try:
        async with asyncio.timeout(30):
            while not any("Uvicorn running" in line for line in printed):  # it listens from then on
                line = await asyncio.to_thread(server.stdout.readline)
                assert line, f"serve ended early: {''.join(printed)}"
                printed.append(line.decode())
        text = "".join(printed)
        assert f"http://localhost:{port}/graphql" in text
        key = (tmp_path / ".capsule" / "dev-api-key").read_text().strip()
        assert key in text
        api = HttpClient(f"http://127.0.0.1:{port}/graphql", key)
        try:
            capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
            result = (await api.run("Exec", capsuleId=capsule_id, input={"cmd": "echo", "args": ["hi"]})).ok()
            assert result["exec"]["stdout"] == "hi\n"
            started = await api.run(
                "StartProcess", capsuleId=capsule_id, input={"cmd": "sleep", "args": ["1000"]}
            )
            pid = started.ok()["startProcess"]["pid"]
            graphiql = await api.http.get(f"http://127.0.0.1:{port}/graphql", headers={"Accept": "text/html"})
            assert graphiql.status_code == 200 and "graphiql" in graphiql.text.lower()
        finally:
            await api.aclose()
        server.send_signal(signal.SIGINT)
        async with asyncio.timeout(15):
            code = await asyncio.to_thread(server.wait)
        assert code == 0
        assert not is_alive(pid), "Ctrl-C must kill the processes the server started"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
