"""The benchmark suite: every figure of docs/performance.md, ours beside a peer, in one run.

    .venv/bin/python -m bench [--quick] [--only NAME ...] [--runtime sandbox|plain] [--out PATH]

Runs on loopback against real `capsule serve` processes (each on a temporary data directory: SQLite,
the memory bus, the in-process agent; PostgreSQL at 127.0.0.1:5432 for one figure), each beside its
peer, with one load client for both (Node `ws`, bench/node). Prints one table; a full run (neither
--quick nor --only) writes it to docs/performance.md with the machine, the date and the commit.
Installs what the peers need when it is missing: websocketd (apt-get) and bench/node's packages (npm ci).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

from bench.figures import BENCHMARKS, FULL, ON_STREAM_SERVER, QUICK, Context, Figure
from bench.harness import ROOT, ensure_node_modules, ensure_websocketd

DOC = ROOT / "docs" / "performance.md"


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return f"{model}, {os.cpu_count()} cores, {mem_kib / 1024 / 1024:.0f} GiB RAM, Linux {platform.release()}"


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout

    head = git("rev-parse", "--short=12", "HEAD").strip() or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no").strip()
    return head + (" with uncommitted changes" if dirty else "")


def load() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def table(figures: list[Figure]) -> str:
    rows = [("figure", "ours", "peer", "ratio", "target", "met?")]
    rows += [(f.name, f.cell(f.ours), f.cell(f.peer), f.ratio, f.target, f.verdict) for f in figures]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |" for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def document(figures: list[Figure], header: dict[str, str]) -> str:
    out = [
        "# Performance",
        "",
        "Written by `python -m bench` (see `bench/`) from one run of the suite; run it again rather than",
        "editing this file. Ratios are ours ÷ the peer's.",
        "",
    ]
    out += [f"- {name}: {value}" for name, value in header.items()]
    out += ["", table(figures), "", "## How each figure is measured"]
    methods: dict[str, list[Figure]] = {}
    for figure in figures:
        methods.setdefault(figure.method, []).append(figure)
    for method, group in methods.items():
        out += ["", method, ""]
        for f in group:
            out.append(
                f"- {f.name}: ours {f.cell(f.ours)}, peer {f.cell(f.peer)}"
                + (f"; {f.detail}" if f.detail else "")
            )
    missed = [figure.name for figure in figures if figure.met is False]
    out += ["", "## Missed targets", ""]
    out += [f"- {name}" for name in missed] or ["- none"]
    return "\n".join(out) + "\n"


async def run(names: list[str], ctx: Context) -> tuple[list[Figure], list[str]]:
    try:
        return await _run(names, ctx)
    finally:
        await ctx.release_stream()


async def _run(names: list[str], ctx: Context) -> tuple[list[Figure], list[str]]:
    figures, failures = [], []
    for name in names:
        if name not in ON_STREAM_SERVER:
            await ctx.release_stream()
        began = time.monotonic()
        print(f"bench: {name} ...", end="", flush=True, file=sys.stderr)
        try:
            got = await BENCHMARKS[name](ctx)
        except Exception as exc:
            print(f" failed after {time.monotonic() - began:.0f} s", file=sys.stderr)
            traceback.print_exc()
            failures.append(f"{name}: {exc}")
            continue
        figures += got
        print(f" {time.monotonic() - began:.0f} s", file=sys.stderr)
        for figure in got:
            print(
                f"  {figure.name}: ours {figure.cell(figure.ours)}, peer {figure.cell(figure.peer)}, "
                f"{figure.verdict}" + (f" ({figure.detail})" if figure.detail else ""),
                file=sys.stderr,
            )
    return figures, failures


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a minute or two")
    parser.add_argument(
        "--only", action="append", choices=list(BENCHMARKS), metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}",
    )  # fmt: skip
    parser.add_argument(
        "--runtime", choices=("sandbox", "plain"), help="CAPSULE_RUNTIME for the servers (default: auto)"
    )
    parser.add_argument(
        "--out", type=Path, help="write the document here (default: docs/performance.md on a full run only)"
    )
    options = parser.parse_args()
    ensure_websocketd()
    ensure_node_modules()
    names = options.only or list(BENCHMARKS)
    sizes = QUICK if options.quick else FULL
    ctx = Context(runtime=options.runtime, sizes=sizes)
    started, load_before = datetime.datetime.now(datetime.UTC), load()
    began = time.monotonic()
    figures, failures = asyncio.run(run(names, ctx))
    seconds = time.monotonic() - began
    print(table(figures))
    missed = [figure.name for figure in figures if figure.met is False]
    plural = "" if len(figures) == 1 else "s"
    print(f"\n{len(figures)} figure{plural} in {seconds:.0f} s; targets missed: {len(missed)}")
    for failure in failures:
        print(f"FAILED {failure}")
    out = options.out or (None if options.quick or options.only else DOC)
    if out is not None:
        runtime = options.runtime or "auto"
        seen = ", ".join(sorted(ctx.runtimes_seen)) or "none"
        header = {
            "Date": started.strftime("%Y-%m-%d %H:%M UTC"),
            "Commit": commit(),
            "Machine": machine(),
            "Load average (1, 5, 15 min)": f"{load_before} at the start, {load()} at the end",
            "Runtime": f"CAPSULE_RUNTIME={runtime} (capsules ran on: {seen}); `exec true` on both",
            "Sizes": ("--quick" if options.quick else "full") + f"; the run took {seconds:.0f} s",
            "Command": "`python -m bench" + "".join(f" {arg}" for arg in sys.argv[1:]) + "`",
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(document(figures, header))
        print(f"wrote {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
