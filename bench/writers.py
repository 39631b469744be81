"""The processes the benchmarks follow, as Python one-liners run with this interpreter (`python -c`),
so the same writer runs under `capsule serve`, under websocketd and under the Node peer."""

from __future__ import annotations

import sys

PYTHON = sys.executable

# Prints a first line, waits until its stdin is closed, then becomes argv[1:]. The first line tells a
# subscriber (and so the load client) that its subscription is live; closing stdin lets the writer go
# once every subscriber is.
GATE = (
    "import os, sys\nos.write(1, b'live\\n')\nsys.stdin.buffer.read()\nos.execvp(sys.argv[1], sys.argv[1:])\n"
)

# argv: total bytes. 64 KiB writes of `x`.
BLOCKS = (
    "import os, sys\n"
    "block = b'x' * 65536\n"
    "for _ in range(int(sys.argv[1]) // 65536):\n"
    "    os.write(1, block)\n"
)

# argv: lines per second, lines. Each line is the CLOCK_MONOTONIC time in ns at its write(2).
STAMPS = (
    "import os, sys, time\n"
    "rate, count = float(sys.argv[1]), int(sys.argv[2])\n"
    "due = time.monotonic()\n"
    "for _ in range(count):\n"
    "    due += 1 / rate\n"
    "    pause = due - time.monotonic()\n"
    "    if pause > 0:\n"
    "        time.sleep(pause)\n"
    "    os.write(1, b'%d\\n' % time.monotonic_ns())\n"
)

# argv: total bytes. 64 KiB writes; at the end one line on stderr: `RESULT <seconds> <longest write s>`.
TIMED_BLOCKS = (
    "import os, sys, time\n"
    "block = b'x' * 65536\n"
    "longest = 0.0\n"
    "began = time.perf_counter()\n"
    "for _ in range(int(sys.argv[1]) // 65536):\n"
    "    at = time.perf_counter()\n"
    "    os.write(1, block)\n"
    "    longest = max(longest, time.perf_counter() - at)\n"
    "os.write(2, b'RESULT %f %f\\n' % (time.perf_counter() - began, longest))\n"
)


def python(script: str, *args: object) -> list[str]:
    return [PYTHON, "-c", script, *map(str, args)]


def gated(argv: list[str]) -> list[str]:
    """argv behind the gate: a first line, then argv once stdin is closed."""
    return [PYTHON, "-c", GATE, *argv]
