"""Load test of the service: mixed explain and generate traffic over gRPC.

    python benchmarks/load/run.py                      # tiny model, own server, ~3 minutes
    python benchmarks/load/run.py --model DIR --seconds 30
    python benchmarks/load/run.py --target 127.0.0.1:50051   # an already running server

Not part of CI. Loopback only; bounded in time (``--seconds`` per phase) and in
count (``--max-requests`` per phase); stops by itself. For each concurrency
level (1, 4, 16: calls in flight) it runs two phases: generate only, then
mixed (every worker alternates explain and generate calls), and reports throughput, p50/p95/p99 latency,
errors by status code, and generation tokens/s with and without explain
traffic. Writes JSON and a markdown table (``--out``, default
benchmarks/load/results.{json,md}).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, beside this file

from harness import GENERATE_TOKENS, PROMPT, TARGET, Call, drive, is_loopback, start_server, stop_server  # noqa: E402
from harness import cpu_count as _cpu_count  # noqa: E402
from harness import explain_call as _explain  # noqa: E402
from harness import generate_call as _generate  # noqa: E402

from atman_vllm.client import AsyncAtmanClient  # noqa: E402

HERE = Path(__file__).resolve().parent


@dataclass
class PhaseResult:
    name: str
    concurrency: int
    mix: str  # "generate" | "mixed"
    wall_s: float
    calls: list[Call] = field(default_factory=list)

    def summary(self) -> dict:
        out = {"phase": self.name, "concurrency": self.concurrency, "mix": self.mix, "wall_s": round(self.wall_s, 2)}
        for kind in ("explain", "generate"):
            calls = [c for c in self.calls if c.kind == kind]
            if not calls:
                continue
            ok = [c.latency_s for c in calls if c.status == "OK"]
            errors: dict[str, int] = {}
            for c in calls:
                if c.status != "OK":
                    errors[c.status] = errors.get(c.status, 0) + 1
            stats = {"requests": len(calls), "ok": len(ok), "errors": errors,
                     "throughput_per_s": round(len(ok) / self.wall_s, 2)}
            if ok:
                p50, p95, p99 = np.percentile(ok, [50, 95, 99])
                stats.update(p50_s=round(float(p50), 4), p95_s=round(float(p95), 4), p99_s=round(float(p99), 4))
            if kind == "generate":
                done = [c for c in calls if c.status == "OK"]
                stats["tokens_per_s"] = round(sum(c.tokens for c in done) / self.wall_s, 1)
                # What one client sees: its stream's tokens over its call's wall time.
                per_stream = [c.tokens / c.latency_s for c in done]
                stats["stream_tokens_per_s"] = round(float(np.median(per_stream)), 1) if done else 0.0
            out[kind] = stats
        return out


async def run_phase(target: str, concurrency: int, mix: str, seconds: float, max_requests: int) -> PhaseResult:
    result = PhaseResult(f"{mix}@{concurrency}", concurrency, mix, 0.0)
    async with AsyncAtmanClient(target, timeout=120) as client:
        def loop(index: int):
            async def call(turn: int) -> Call:
                # mixed: every worker alternates, half of them starting with an explain
                explains = mix == "mixed" and (index + turn) % 2 == 0
                return await (_explain(client) if explains else _generate(client))
            return call

        result.calls, result.wall_s = await drive([loop(i) for i in range(concurrency)], seconds, max_requests)
    return result


def markdown(summaries: list[dict], meta: dict) -> str:
    lines = [f"Load test, {meta['date']}, {meta['machine']}; model {meta['model']}; "
             f"{meta['seconds_per_phase']} s per phase; explain = word granularity, "
             f"{meta['explain_units']} units; generate = {GENERATE_TOKENS} tokens.", "",
             "| phase | kind | requests | ok | errors | req/s | p50 s | p95 s | p99 s "
             "| gen tokens/s (all) | per stream |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        for kind in ("generate", "explain"):
            if kind not in s:
                continue
            k = s[kind]
            errors = ", ".join(f"{code} {n}" for code, n in k["errors"].items()) or "-"
            cells = [s["phase"], kind, k["requests"], k["ok"], errors, k["throughput_per_s"],
                     *(k.get(p, "-") for p in ("p50_s", "p95_s", "p99_s")),
                     k.get("tokens_per_s", ""), k.get("stream_tokens_per_s", "")]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


async def main_async(args) -> int:
    server = None
    target = args.target
    if target is None:
        log_path = Path(tempfile.gettempdir()) / "atman-load-server.log"
        print(f"starting a server (log: {log_path}) ...", flush=True)
        server, ready = start_server(args.model, log_path)
        target = ready["grpc"]
    if not is_loopback(target):
        raise SystemExit("the load test only targets loopback addresses")
    try:
        async with AsyncAtmanClient(target, timeout=120) as client:
            info = await client.server_info()
            units = len((await client.explain(PROMPT, TARGET, granularity="word")).explanations[0].prompt_scores)
            await _generate(client)  # warm-up
        summaries = []
        for concurrency in args.concurrency:
            for mix in ("generate", "mixed"):
                phase = await run_phase(target, concurrency, mix, args.seconds, args.max_requests)
                summaries.append(phase.summary())
                print(json.dumps(summaries[-1]), flush=True)
    finally:
        if server is not None:
            stop_server(server)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {_cpu_count()} cores",
            "model": info.model, "limits": info.limits, "versions": info.versions,
            "seconds_per_phase": args.seconds, "explain_units": units}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "phases": summaries}, indent=2) + "\n")
    table = markdown(summaries, meta)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=None, help="a running server (loopback); default: start one")
    parser.add_argument("--model", default=None, help="model for the server started here (default: a tiny llama)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    parser.add_argument("--max-requests", type=int, default=2000, help="requests per phase at most")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output path without suffix")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
