"""Bytes/s through the host agent's StreamOutput, beside a raw pipe read of the same writer.

Run by hand: .venv/bin/python -m bench.agent_stream [--mib N] [--runs N] [--cap-mib N]
The agent runs in its own process (as `capsule agent` does), the client here, the writer in a third.
By default the agent's output cap holds a whole run, so every byte is delivered; with --cap-mib 16
(the agent's default) a stream slower than the writer skips what the cap cannot hold, and the
figure is what it delivered per second (the `sent` column says how much of the run that was).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from app.agent.launch import BASE_PATH
from app.pb import agent_pb2 as pb
from app.pb import agent_pb2_grpc

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent

# Each writer takes the byte count as its one argument.
BLOCK_WRITER = (
    "import os, sys\n"
    "block = b'x' * 65536\n"
    "for _ in range(int(sys.argv[1]) // 65536):\n"
    "    os.write(1, block)\n"
)
LINE_WRITER = (
    "import sys\n"
    "write = sys.stdout.write\n"
    "line = 'a short line of output, number %9d\\n'\n"  # 41 bytes
    "for i in range(int(sys.argv[1]) // 41):\n"
    "    write(line % i)\n"
)
# One write(2) per line: the reader wakes for tiny reads, the worst case for an agent.
UNBUFFERED_LINE_WRITER = (
    "import sys\nsys.stdout.reconfigure(line_buffering=True)\n" + LINE_WRITER.split("\n", 1)[1]
)

AGENT = (
    "import asyncio, sys\n"
    "from pathlib import Path\n"
    "from app.agent.server import run_agent\n"
    "from app.config import Settings\n"
    "settings = Settings(data_dir=Path(sys.argv[2]), output_cap_bytes=int(sys.argv[3]), retention_sec=2.0)\n"
    "asyncio.run(run_agent(sys.argv[1], settings))\n"
)


@dataclass(frozen=True)
class Case:
    name: str
    script: str
    total_bytes: int


def raw_pipe(case: Case) -> tuple[int, float]:
    """Reads the writer's stdout straight from the pipe, 64 KiB at a time."""
    started = time.perf_counter()
    # The environment the agent gives its processes, so the writer behaves the same in both runs.
    env = {"PATH": BASE_PATH, "HOME": tempfile.gettempdir(), "LANG": "C.UTF-8"}
    proc = subprocess.Popen(
        [sys.executable, "-c", case.script, str(case.total_bytes)], stdout=subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    received = 0
    while data := os.read(fd, 65536):
        received += len(data)
    proc.wait()
    return received, time.perf_counter() - started


async def through_agent(stub: agent_pb2_grpc.AgentStub, case: Case, tag: str) -> tuple[int, float]:
    """Starts the writer in the agent and reads its StreamOutput until the exit event."""
    started = time.perf_counter()
    await stub.StartProcess(
        pb.StartRequest(
            capsule_id="bench", cmd=sys.executable, args=["-c", case.script, str(case.total_bytes)], tag=tag
        )
    )
    received = 0
    request = pb.OutputRequest(process=pb.ProcessRef(capsule_id="bench", selector=tag), from_seq=0)
    async for batch in stub.StreamOutput(request):
        for event in batch.events:
            which = event.WhichOneof("event")
            if which == "chunk":
                received += len(event.chunk.data)
    return received, time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_ready(stub: agent_pb2_grpc.AgentStub) -> None:
    async with asyncio.timeout(20):
        while True:
            try:
                await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id="bench"), timeout=1)
                return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=512, help="bytes per run, in MiB")
    parser.add_argument("--runs", type=int, default=5, help="runs per case; the best counts")
    parser.add_argument("--cap-mib", type=int, default=0, help="the agent's output cap; 0: twice a run")
    options = parser.parse_args()
    total = options.mib * MiB
    cases = [
        Case("64 KiB writes", BLOCK_WRITER, total),
        Case("short lines (stdio buffered)", LINE_WRITER, total // 4),
        Case("short lines (a write per line)", UNBUFFERED_LINE_WRITER, total // 32),
    ]
    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        cap = options.cap_mib * MiB or 2 * total
        agent = subprocess.Popen(
            [sys.executable, "-c", AGENT, f"127.0.0.1:{port}", data_dir, str(cap)],
            cwd=ROOT,
            stderr=subprocess.DEVNULL,
        )
        options_ = [("grpc.max_receive_message_length", 64 * MiB)]
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options_) as channel:
                stub = agent_pb2_grpc.AgentStub(channel)
                await wait_ready(stub)
                print(f"output cap {cap // MiB} MiB, best of {options.runs} runs")
                print(
                    f"{'case':32} {'MiB':>5} {'raw MiB/s':>10} {'agent MiB/s':>12} {'ratio':>6} {'sent':>5}"
                )
                for index, case in enumerate(cases):
                    raw = max(case.total_bytes / raw_pipe(case)[1] for _ in range(options.runs))
                    best, sent = 0.0, 1.0
                    for run in range(options.runs):
                        received, seconds = await through_agent(stub, case, f"bench-{index}-{run}")
                        best = max(best, received / seconds)
                        sent = min(sent, received / case.total_bytes)
                    print(
                        f"{case.name:32} {case.total_bytes / MiB:5.0f} {raw / MiB:10.0f} "
                        f"{best / MiB:12.0f} {best / raw:6.2f} {sent:5.0%}"
                    )
        finally:
            agent.terminate()
            agent.wait(10)


if __name__ == "__main__":
    asyncio.run(main())
