"""Soak benchmark of the service: ten minutes of mixed gRPC and HTTP traffic, then a leak check.

    python benchmarks/load/soak.py                               # tiny model, own server, ~13 minutes
    python benchmarks/load/soak.py --seconds 45 --alone-seconds 20 --out /tmp/soak_try   # a short try
    python benchmarks/load/soak.py -- --max-concurrent-explains 2   # extra server args after --
    python benchmarks/load/soak.py --target 127.0.0.1:50051 --http http://127.0.0.1:8000 [--server-pid PID]

Not a test; not run in CI. Loopback only. Every phase is bounded in time and in
count (``--max-requests``); calls still running ``--drain-seconds`` after a
phase's end are cancelled, so it stops by itself.

1. warm-up: every kind of call once; the engine's free KV blocks at idle ("before").
2. "generation alone": ``--gen-clients`` generation clients (default half of
   ``--concurrency``; half of them gRPC ``Generate`` streams, half HTTP
   ``/v1/completions`` streams with the ``openai`` client) for
   ``--alone-seconds``: time to first token (TTFT) and latency.
3. mixed warm-up (``--warmup-seconds`` of the soak's traffic), then the server
   process tree's RSS at idle ("start").
4. "soak": ``--concurrency`` calls in flight for ``--seconds``: the same
   generation clients, and the other workers cycling through gRPC ``Explain``,
   gRPC ``ExplainStream``, gRPC ``Generate`` with ``explain: true``, HTTP
   ``POST /v1/explain`` (httpx), and cancelled calls on both transports (the
   client cancels / disconnects after a random short delay).
5. idle again: free KV blocks ("after", waiting up to ``--idle-wait`` seconds
   for them to come back), RSS ("end"), a last Generate and Explain.

Expected errors: RESOURCE_EXHAUSTED / HTTP 429 (the explain slots'
back-pressure; the worker retries after 50 ms) and CANCELLED for the calls
cancelled on purpose. Anything else is unexpected. Goals: 0 unexpected
errors, free KV blocks back to their idle value, RSS growth <= 5 %,
generation p99 latency under explain load <= 1.5x alone. Writes
``--out``.json and ``--out``.md (default benchmarks/load/soak_results) and
prints the table; exits 0 on PASS, 1 on FAIL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, beside this file

from harness import (  # noqa: E402
    GENERATE_TOKENS,
    SERVER_ARGS,
    Call,
    cpu_count,
    drive,
    explain_call,
    generate_call,
    is_loopback,
    is_loopback_url,
    percentiles,
    start_server,
    stop_server,
)

from atman_vllm.client import AsyncAtmanClient, AtmanError, ExplainProgress, GenerationDelta  # noqa: E402
from atman_vllm.core.results import ExplainResult  # noqa: E402

HERE = Path(__file__).resolve().parent
CALL_TIMEOUT_S = 120.0
GEN_EXPLAIN_TOKENS = 16  # Generate + explain: the completion is the explain's target
CANCEL_DELAY_S = (0.002, 0.1)  # a cancelled call is cancelled after a uniform random delay in this range
GOAL_RSS_GROWTH_PCT = 5.0
GOAL_P99_RATIO = 1.5

GENERATION_KINDS = ("grpc.generate", "http.completions")
OTHER_KINDS = ("grpc.explain", "grpc.explain_stream", "grpc.generate+explain", "http.explain",
               "grpc.cancelled", "http.cancelled")
CANCEL_KINDS = ("grpc.cancelled", "http.cancelled")
EXPECTED = {"RESOURCE_EXHAUSTED"}  # for every kind; CANCELLED too for the cancel kinds

NAMES = ["Otto", "Mira", "Ben", "Lena", "Ravi", "Ana", "Tom", "Ida", "Noor", "Kai"]
CITIES = ["Lisbon", "Oslo", "Lima", "Rome", "Kyiv", "Quito", "Accra", "Hanoi"]
JOBS = ["pilot", "baker", "nurse", "judge", "tailor", "farmer", "potter", "sailor"]
PETS = ["cat", "dog", "parrot", "goat", "horse"]


def make_prompt(rng: random.Random) -> tuple[str, str]:
    """A short fact list and a question about one of the facts; (prompt, the answer as target)."""
    people = rng.sample(NAMES, rng.randint(2, 4))
    facts, answers = [], []
    for person in people:
        kind = rng.randrange(3)
        if kind == 0:
            value = rng.choice(CITIES)
            facts.append(f"{person} lives in {value}.")
            answers.append((f"Where does {person} live?", value))
        elif kind == 1:
            value = rng.choice(JOBS)
            facts.append(f"{person} works as a {value}.")
            answers.append((f"What is the job of {person}?", value))
        else:
            value = rng.choice(PETS)
            facts.append(f"{person} owns a {value}.")
            answers.append((f"Which pet does {person} own?", value))
    question, answer = rng.choice(answers)
    return " ".join(facts) + f" Q: {question} A:", " " + answer


# -- HTTP statuses as the gRPC names the service maps them from (docs/service.md, "Limits and errors") ---------

HTTP_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
               500: "INTERNAL", 503: "UNAVAILABLE"}


def http_status(code: int) -> str:
    return HTTP_STATUS.get(code, f"HTTP_{code}")


def _error_message(body: str) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:300]


class Traffic:
    """The calls of the soak, each returning a ``Call``; failures become statuses, never exceptions."""

    def __init__(self, grpc_target: str, http_url: str, model: str):
        self.grpc = AsyncAtmanClient(grpc_target, timeout=CALL_TIMEOUT_S)
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        self.http = httpx.AsyncClient(base_url=http_url, timeout=CALL_TIMEOUT_S, limits=limits)
        self.openai = openai.AsyncOpenAI(
            base_url=http_url.rstrip("/") + "/v1", api_key="unused", max_retries=0, timeout=CALL_TIMEOUT_S,
            http_client=httpx.AsyncClient(timeout=CALL_TIMEOUT_S, limits=limits))
        self.model = model

    async def close(self) -> None:
        await self.grpc.close()
        await self.http.aclose()
        await self.openai.close()

    # generation

    async def grpc_generate(self, rng: random.Random) -> Call:
        prompt, _ = make_prompt(rng)
        return await generate_call(self.grpc, prompt, GENERATE_TOKENS, kind="grpc.generate")

    async def http_completions(self, rng: random.Random, kind: str = "http.completions") -> Call:
        prompt, _ = make_prompt(rng)
        started_s, started = time.monotonic(), time.perf_counter()
        tokens, ttft, status, detail = 0, None, "OK", ""
        try:
            stream = await self.openai.completions.create(
                model=self.model, prompt=prompt, max_tokens=GENERATE_TOKENS, temperature=0.0, stream=True,
                stream_options={"include_usage": True})
            try:
                async for chunk in stream:
                    if chunk.choices and ttft is None:
                        ttft = time.perf_counter() - started
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
            finally:
                await stream.close()
        except openai.APIStatusError as exc:
            status, detail = http_status(exc.status_code), str(exc.message)[:300]
        except openai.APITimeoutError as exc:
            status, detail = "DEADLINE_EXCEEDED", str(exc)
        except openai.APIConnectionError as exc:
            status, detail = "CONNECTION_ERROR", repr(exc.__cause__ or exc)
        return Call(kind, status, time.perf_counter() - started, tokens, ttft, started_s, detail)

    # explanations

    async def grpc_explain(self, rng: random.Random, kind: str = "grpc.explain", granularity: str = "word") -> Call:
        prompt, target = make_prompt(rng)
        return await explain_call(self.grpc, prompt, target, kind=kind, granularity=granularity)

    async def grpc_explain_stream(self, rng: random.Random, kind: str = "grpc.explain_stream",
                                  granularity: str = "word") -> Call:
        prompt, target = make_prompt(rng)
        started_s, started = time.monotonic(), time.perf_counter()
        status, detail = "OK", ""
        progress, result = 0, None
        try:
            async for event in self.grpc.explain_stream(prompt, target, granularity=granularity):
                if isinstance(event, ExplainProgress):
                    progress += 1
                elif isinstance(event, ExplainResult):
                    result = event
            if result is None:
                status, detail = "NO_RESULT", f"the stream ended after {progress} progress events and no result"
        except AtmanError as exc:
            status, detail = exc.code.name, exc.message
        return Call(kind, status, time.perf_counter() - started, started_s=started_s, detail=detail)

    async def grpc_generate_explain(self, rng: random.Random, kind: str = "grpc.generate+explain") -> Call:
        prompt, _ = make_prompt(rng)
        started_s, started = time.monotonic(), time.perf_counter()
        tokens, ttft, status, detail = 0, None, "OK", ""
        finished, result = False, None
        try:
            async for event in self.grpc.generate(prompt, max_tokens=GEN_EXPLAIN_TOKENS, explain=True,
                                                  explain_options={"granularity": "word"}):
                if isinstance(event, GenerationDelta):
                    if event.token_ids and ttft is None:
                        ttft = time.perf_counter() - started
                    tokens += len(event.token_ids)
                    finished = finished or event.finished
                elif isinstance(event, ExplainResult):
                    result = event
            if not finished or result is None:
                status, detail = "NO_RESULT", f"finished delta: {finished}, explanation: {result is not None}"
        except AtmanError as exc:
            status, detail = exc.code.name, exc.message
        return Call(kind, status, time.perf_counter() - started, tokens, ttft, started_s, detail)

    async def http_explain(self, rng: random.Random, kind: str = "http.explain", granularity: str = "word") -> Call:
        prompt, target = make_prompt(rng)
        started_s, started = time.monotonic(), time.perf_counter()
        status, detail = "OK", ""
        try:
            reply = await self.http.post("/v1/explain", json={"prompt": prompt, "target": target,
                                                              "options": {"granularity": granularity}})
            if reply.status_code != 200:
                status, detail = http_status(reply.status_code), _error_message(reply.text)
            elif not reply.json().get("explanations"):
                status, detail = "NO_RESULT", reply.text[:300]
        except httpx.TimeoutException as exc:
            status, detail = "DEADLINE_EXCEEDED", repr(exc)
        except httpx.TransportError as exc:
            status, detail = "CONNECTION_ERROR", repr(exc)
        return Call(kind, status, time.perf_counter() - started, started_s=started_s, detail=detail)

    # cancelled calls: start one, cancel the task (gRPC: cancels the call; HTTP: closes the connection)

    async def cancelled(self, rng: random.Random, transport: str) -> Call:
        kind = f"{transport}.cancelled"
        if transport == "grpc":
            # token granularity: more forks, so the cancel more often lands while they run
            ops = {"generate": lambda: self.grpc_generate(rng),
                   "explain": lambda: self.grpc_explain(rng, granularity="token"),
                   "explain_stream": lambda: self.grpc_explain_stream(rng, granularity="token"),
                   "generate+explain": lambda: self.grpc_generate_explain(rng)}
        else:
            ops = {"completions": lambda: self.http_completions(rng),
                   "explain": lambda: self.http_explain(rng, granularity="token")}
        op = rng.choice(sorted(ops))
        delay = rng.uniform(*CANCEL_DELAY_S)
        started_s, started = time.monotonic(), time.perf_counter()
        task = asyncio.create_task(guarded(ops[op], kind))
        done, _ = await asyncio.wait({task}, timeout=delay)
        if task in done:  # it ended before the cancel: its own status
            call = task.result()
            return Call(kind, call.status, call.latency_s, started_s=started_s,
                        detail=f"{op} ended before the cancel" + (f": {call.detail}" if call.detail else ""))
        task.cancel()
        try:
            call = await task
        except asyncio.CancelledError:
            return Call(kind, "CANCELLED", time.perf_counter() - started, started_s=started_s,
                        detail=f"{op} cancelled after {delay * 1000:.0f} ms")
        return Call(kind, call.status, call.latency_s, started_s=started_s,  # it ended just before the cancel
                    detail=f"{op} ended before the cancel" + (f": {call.detail}" if call.detail else ""))


async def guarded(make_call, kind: str) -> Call:
    """An unforeseen exception becomes an (unexpected) status, so one bad call does not end a worker."""
    started_s, started = time.monotonic(), time.perf_counter()
    try:
        return await make_call()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported, not hidden
        return Call(kind, f"EXCEPTION:{type(exc).__name__}", time.perf_counter() - started,
                    started_s=started_s, detail=str(exc)[:300])


def call_for(traffic: Traffic, kind: str):
    return {"grpc.generate": traffic.grpc_generate,
            "http.completions": traffic.http_completions,
            "grpc.explain": traffic.grpc_explain,
            "grpc.explain_stream": traffic.grpc_explain_stream,
            "grpc.generate+explain": traffic.grpc_generate_explain,
            "http.explain": traffic.http_explain,
            "grpc.cancelled": lambda rng: traffic.cancelled(rng, "grpc"),
            "http.cancelled": lambda rng: traffic.cancelled(rng, "http")}[kind]


def generation_loops(traffic: Traffic, clients: int, seed: int) -> list:
    """``clients`` generation workers, alternately gRPC and HTTP; the same prompts in every phase."""
    loops = []
    for i in range(clients):
        kind = GENERATION_KINDS[i % 2]
        rng = random.Random(f"{seed}-gen-{i}")  # same sequence alone and under load
        fn = call_for(traffic, kind)
        loops.append(lambda turn, fn=fn, rng=rng, kind=kind: guarded(lambda: fn(rng), kind))
    return loops


def other_loops(traffic: Traffic, workers: int, seed: int, phase: str) -> list:
    """``workers`` workers cycling through OTHER_KINDS, each from its own offset."""
    loops = []
    for i in range(workers):
        rng = random.Random(f"{seed}-{phase}-other-{i}")

        def loop(turn: int, i=i, rng=rng):
            kind = OTHER_KINDS[(i + turn) % len(OTHER_KINDS)]
            return guarded(lambda: call_for(traffic, kind)(rng), kind)
        loops.append(loop)
    return loops


def is_expected(kind: str, status: str) -> bool:
    return status in EXPECTED or (status == "CANCELLED" and kind in CANCEL_KINDS)


# -- the server process tree's memory ---------------------------------------------------------------------------

def _proc_children(pid: int) -> list[int]:
    children, parents = [], {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError):
                pass
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        children += kids
        frontier += kids
    return children


def _proc_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def tree_rss(pid: int) -> dict:
    """RSS of ``pid`` and all its descendants (psutil if installed, else /proc)."""
    processes = []
    try:
        import psutil

        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                processes.append({"pid": proc.pid, "name": proc.name(), "rss": proc.memory_info().rss})
            except psutil.NoSuchProcess:
                pass
        source = "psutil"
    except ImportError:
        for p in [pid, *_proc_children(pid)]:
            try:
                name = Path(f"/proc/{p}/comm").read_text().strip()
                processes.append({"pid": p, "name": name, "rss": _proc_rss(p)})
            except OSError:
                pass
        source = "/proc"
    return {"time": time.monotonic(), "total_bytes": sum(p["rss"] for p in processes), "processes": processes,
            "source": source}


def pid_listening_on(port: int) -> int | None:
    """The process listening on a loopback TCP port (for a server this script did not start)."""
    try:
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid
    except Exception:  # noqa: BLE001 - no psutil, or not allowed: RSS is then not measured
        pass
    return None


# -- idle state ---------------------------------------------------------------------------------------------------

async def idle_kv(client: AsyncAtmanClient, wait_s: float, want: int | None = None) -> dict:
    """Free KV blocks once nothing runs: the first reading with no explain in flight that equals ``want``
    (or, without ``want``, the previous reading); after ``wait_s`` the last reading, whatever it is."""
    started = time.monotonic()
    previous = None
    while True:
        info = await client.server_info(timeout=10)
        free = info.free_kv_blocks
        settled = info.explains_in_flight == 0 and (free == want if want is not None else free == previous)
        waited = time.monotonic() - started
        if settled or waited >= wait_s:
            return {"free_kv_blocks": free, "explains_in_flight": info.explains_in_flight,
                    "waited_s": round(waited, 2), "settled": settled, "kv_block_size": info.kv_block_size}
        previous = free
        await asyncio.sleep(0.25)


# -- the report ---------------------------------------------------------------------------------------------------

def kind_summary(calls: list[Call], wall_s: float) -> dict:
    out = {}
    for kind in sorted({c.kind for c in calls}):
        mine = [c for c in calls if c.kind == kind]
        statuses = Counter(c.status for c in mine)
        ok = [c for c in mine if c.status == "OK"]
        entry = {"requests": len(mine), "ok": len(ok),
                 "expected_errors": {s: n for s, n in statuses.items() if s != "OK" and is_expected(kind, s)},
                 "unexpected_errors": {s: n for s, n in statuses.items() if s != "OK" and not is_expected(kind, s)},
                 "ok_per_s": round(len(ok) / wall_s, 2) if wall_s else 0.0,
                 "latency": percentiles([c.latency_s for c in ok], (50, 99))}
        ttfts = [c.ttft_s for c in ok if c.ttft_s is not None]
        if ttfts:
            entry["ttft"] = percentiles(ttfts, (50, 99))
            entry["tokens"] = sum(c.tokens for c in ok)
        out[kind] = entry
    return out


def generation_stats(calls: list[Call]) -> dict:
    out = {}
    for name, kinds in (("all", GENERATION_KINDS), *((k, (k,)) for k in GENERATION_KINDS)):
        ok = [c for c in calls if c.kind in kinds and c.status == "OK"]
        out[name] = {"n": len(ok), "ttft": percentiles([c.ttft_s for c in ok if c.ttft_s is not None], (50, 99)),
                     "latency": percentiles([c.latency_s for c in ok], (50, 99))}
    return out


def _ratio(load: dict | None, alone: dict | None, key: str = "p99_s") -> float | None:
    if not load or not alone or not alone[key]:
        return None
    return round(load[key] / alone[key], 3)


def server_log_findings(log_path: Path | None) -> dict | None:
    """Tracebacks and ERROR lines in the server's log, each traceback named by its exception line and
    by the line above it (what logged it: "Task exception was never retrieved", "Exception in ASGI ...")."""
    if log_path is None or not log_path.exists():
        return None
    lines = log_path.read_text(errors="replace").splitlines()
    errors = [line for line in lines if " ERROR " in line or line.startswith("ERROR")]
    tracebacks: Counter = Counter()
    where: dict[str, str] = {}
    for i, line in enumerate(lines):
        if not line.startswith("Traceback"):
            continue
        before = next((lines[j] for j in range(i - 1, max(-1, i - 4), -1) if lines[j].strip()), "")
        if before.startswith(("The above exception", "During handling")):
            continue  # the rest of a chain already counted
        end = next((j for j in range(i + 1, min(len(lines), i + 400))
                    if lines[j] and not lines[j][0].isspace() and not lines[j].startswith("Traceback")), None)
        exception = lines[end] if end is not None else "?"
        if i and lines[i - 1].startswith("future: <Task"):
            context = lines[i - 2] if i >= 2 else ""
        else:
            context = lines[i - 1] if i else ""
        key = f"{context.strip()[:80]} -> {exception[:200]}"
        tracebacks[key] += 1
        if key not in where:  # the last frame in this project's code
            frames = [f.strip() for f in lines[i + 1:end] if f.startswith('  File "') and "site-packages" not in f
                      and ("/server/" in f or "/atman_vllm/" in f)]
            where[key] = frames[-1] if frames else ""
    return {"log": str(log_path), "tracebacks": sum(tracebacks.values()), "error_lines": len(errors),
            "tracebacks_by_kind": [{"count": n, "what": key, "last_frame": where[key]}
                                   for key, n in tracebacks.most_common()]}


def _fmt(stats: dict | None, key: str) -> str:
    return "-" if not stats else f"{stats[key]:.4f}"


def _errors(d: dict) -> str:
    return ", ".join(f"{s} {n}" for s, n in sorted(d.items())) or "-"


def markdown(report: dict) -> str:
    meta, goals = report["meta"], report["goals"]
    lines = [f"Soak, {meta['date']}, {meta['machine']}; model {meta['model']}; concurrency {meta['concurrency']} "
             f"({meta['gen_clients']} generation clients + {meta['other_workers']} others); "
             f"alone {meta['alone_seconds']} s, warm-up {meta['warmup_seconds']} s, soak {meta['seconds']} s; "
             f"generate = {GENERATE_TOKENS} tokens; server args: {' '.join(meta['server_args']) or '-'}.", "",
             f"**{'PASS' if report['pass'] else 'FAIL'}**", "",
             "| goal | measured | limit | |", "|---|---:|---:|---|"]
    for g in goals:
        lines.append(f"| {g['goal']} | {g['value']} | {g['limit']} | {'PASS' if g['pass'] else 'FAIL'} |")
    lines += ["", "| phase | kind | requests | ok | expected errors | unexpected errors | ok/s | p50 s | p99 s "
              "| TTFT p50 s | TTFT p99 s |", "|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for phase in ("alone", "soak"):
        for kind, k in report["phases"].get(phase, {}).get("kinds", {}).items():
            lines.append("| " + " | ".join(str(c) for c in [
                phase, kind, k["requests"], k["ok"], _errors(k["expected_errors"]), _errors(k["unexpected_errors"]),
                k["ok_per_s"], _fmt(k["latency"], "p50_s"), _fmt(k["latency"], "p99_s"),
                _fmt(k.get("ttft"), "p50_s"), _fmt(k.get("ttft"), "p99_s")]) + " |")
    lines += ["", "Generation, alone vs under explain load (OK calls):", "",
              "| clients | n alone | n load | TTFT p50 alone | load | TTFT p99 alone | load | ratio "
              "| latency p50 alone | load | latency p99 alone | load | ratio |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, g in report["generation"].items():
        a, b = g["alone"], g["load"]
        lines.append("| " + " | ".join(str(c) for c in [
            name, a["n"], b["n"], _fmt(a["ttft"], "p50_s"), _fmt(b["ttft"], "p50_s"), _fmt(a["ttft"], "p99_s"),
            _fmt(b["ttft"], "p99_s"), g["ttft_p99_ratio"], _fmt(a["latency"], "p50_s"),
            _fmt(b["latency"], "p50_s"), _fmt(a["latency"], "p99_s"), _fmt(b["latency"], "p99_s"),
            g["latency_p99_ratio"]]) + " |")
    side = [c for phase in ("warmup", "after") for c in report["phases"].get(phase, {}).get("kinds", {}).values()]
    lines += ["", f"Warm-up (every kind once) and after the soak (a Generate and an Explain): "
                  f"{sum(k['requests'] for k in side)} calls, {sum(k['ok'] for k in side)} OK."]
    kv, rss = report["kv"], report["rss"]
    lines += ["", f"Free KV blocks at idle: before {kv['before']['free_kv_blocks']}, after "
                  f"{kv['after']['free_kv_blocks']} (came back: {kv['after']['settled']}, after "
                  f"{kv['after']['waited_s']} s; block size {kv['before']['kv_block_size']}).",
              "RSS of the server process tree: " + (
                  f"start {rss['start_mib']} MiB, end {rss['end_mib']} MiB, growth {rss['growth_pct']} % "
                  f"({rss['processes']} processes, {rss['source']})." if rss.get("start_mib") is not None
                  else "not measured (no server pid).")]
    if rss.get("start_mib") is not None:
        start = {p["pid"]: p for p in rss["start_by_process"]}
        lines += [f"- pid {p['pid']} {p['name']}: {start[p['pid']]['rss'] / 2**20:.1f} -> {p['rss'] / 2**20:.1f} MiB"
                  if p["pid"] in start else f"- pid {p['pid']} {p['name']}: new, {p['rss'] / 2**20:.1f} MiB"
                  for p in rss["end_by_process"]]
        lines.append(f"- during the soak (every {report['meta']['sample_every']} s): "
                     + ", ".join(f"{m:.0f}" for m in rss["samples_mib"]) + f", end {rss['end_mib']:.0f} MiB")
    if report["unexpected_samples"]:
        lines += ["", "Unexpected errors (first of each kind and status):", ""]
        lines += [f"- {s['phase']} {s['kind']} {s['status']}: {s['detail']}" for s in report["unexpected_samples"]]
    log = report.get("server_log")
    if log:
        lines += ["", f"Server log {log['log']}: {log['tracebacks']} tracebacks, {log['error_lines']} ERROR lines; "
                      f"exit status {report['server_exit']}."]
        lines += [f"- {t['count']} x {t['what']} (at {t['last_frame']})" for t in log["tracebacks_by_kind"]]
    return "\n".join(lines) + "\n"


# -- main ---------------------------------------------------------------------------------------------------------

async def main_async(args, server_args: list[str]) -> int:
    server, log_path, pid = None, None, args.server_pid
    if args.target is None:
        log_path = Path(tempfile.gettempdir()) / "atman-soak-server.log"
        print(f"starting a server (log: {log_path}) ...", flush=True)
        started = time.monotonic()
        server, ready = start_server(args.model, log_path, openai=True, extra_args=server_args)
        grpc_target, http_url, pid = ready["grpc"], f"http://{ready['http']}", server.pid
        print(f"server up in {time.monotonic() - started:.0f} s: gRPC {grpc_target}, HTTP {http_url}", flush=True)
    else:
        if args.http is None:
            raise SystemExit("--target needs --http too (the soak uses both transports)")
        if server_args:
            raise SystemExit("server args after -- only apply to a server this script starts")
        grpc_target, http_url = args.target, args.http
        if pid is None:
            pid = pid_listening_on(int(grpc_target.rsplit(":", 1)[1]))
    if not is_loopback(grpc_target) or not is_loopback_url(http_url):
        raise SystemExit("the soak only targets loopback addresses")

    report: dict = {"phases": {}}
    all_calls: dict[str, list[Call]] = {}
    traffic = None
    server_exit = None
    try:
        models = (await openai.AsyncOpenAI(base_url=http_url + "/v1", api_key="unused", max_retries=0)
                  .models.list()).data
        traffic = Traffic(grpc_target, http_url, models[0].id)
        info = await traffic.grpc.server_info()

        def record(phase: str, calls: list[Call], wall_s: float) -> None:
            all_calls[phase] = calls
            report["phases"][phase] = {"wall_s": round(wall_s, 2), "kinds": kind_summary(calls, wall_s)}
            counts = Counter(c.kind for c in calls)
            bad = sum(1 for c in calls if c.status != "OK" and not is_expected(c.kind, c.status))
            print(f"{phase}: {len(calls)} calls in {wall_s:.1f} s, {bad} unexpected errors; "
                  + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())), flush=True)

        # 1. every kind once, then the idle KV blocks
        rng = random.Random(f"{args.seed}-warmup")
        started = time.monotonic()
        warm = [await guarded(lambda k=k: call_for(traffic, k)(rng), k) for k in (*GENERATION_KINDS, *OTHER_KINDS)]
        record("warmup", warm, time.monotonic() - started)
        kv_before = await idle_kv(traffic.grpc, args.idle_wait)
        print(f"idle free KV blocks: {kv_before['free_kv_blocks']}", flush=True)

        # 2. generation alone
        gen_clients = args.gen_clients if args.gen_clients is not None else args.concurrency // 2
        others = args.concurrency - gen_clients
        print(f"generation alone: {gen_clients} clients for {args.alone_seconds} s ...", flush=True)
        calls, wall = await drive(generation_loops(traffic, gen_clients, args.seed), args.alone_seconds,
                                  args.max_requests, drain_s=args.drain_seconds)
        record("alone", calls, wall)

        # 3. mixed warm-up, then RSS at idle
        loops = lambda phase: (generation_loops(traffic, gen_clients, args.seed)  # noqa: E731
                               + other_loops(traffic, others, args.seed, phase))
        if args.warmup_seconds > 0:
            print(f"mixed warm-up: {args.warmup_seconds} s ...", flush=True)
            calls, wall = await drive(loops("mixed-warmup"), args.warmup_seconds, args.max_requests,
                                      drain_s=args.drain_seconds)
            record("mixed-warmup", calls, wall)
            report["phases"].pop("mixed-warmup")  # counted for errors, not shown per kind
        await idle_kv(traffic.grpc, args.idle_wait, kv_before["free_kv_blocks"])
        rss_samples = [tree_rss(pid)] if pid else []

        # 4. the soak, sampling RSS as it goes
        print(f"soak: concurrency {args.concurrency} for {args.seconds} s ...", flush=True)
        soak_calls: list[Call] = []

        async def sampler() -> None:
            started = time.monotonic()
            while True:
                await asyncio.sleep(args.sample_every)
                sample = tree_rss(pid) if pid else None
                if sample:
                    rss_samples.append(sample)
                bad = sum(1 for c in soak_calls if c.status != "OK" and not is_expected(c.kind, c.status))
                print(f"  {time.monotonic() - started:5.0f} s: {len(soak_calls)} calls, {bad} unexpected"
                      + (f", RSS {sample['total_bytes'] / 2**20:.0f} MiB" if sample else ""), flush=True)

        sampling = asyncio.create_task(sampler())
        try:
            calls, wall = await drive(loops("soak"), args.seconds, args.max_requests, drain_s=args.drain_seconds,
                                      calls=soak_calls)
        finally:
            sampling.cancel()
        record("soak", calls, wall)

        # 5. idle again
        kv_after = await idle_kv(traffic.grpc, args.idle_wait, kv_before["free_kv_blocks"])
        rss_end = tree_rss(pid) if pid else None
        started = time.monotonic()
        after = [await guarded(lambda k=k: call_for(traffic, k)(rng), k) for k in ("grpc.generate", "grpc.explain")]
        record("after", after, time.monotonic() - started)
        try:
            health = await traffic.grpc.health(timeout=10)
        except AtmanError as exc:
            health = exc.code.name
    finally:
        if traffic is not None:
            await traffic.close()
        if server is not None:
            server_exit = stop_server(server)

    # the report
    alone, load = generation_stats(all_calls["alone"]), generation_stats(all_calls["soak"])
    generation = {name: {"alone": alone[name], "load": load[name],
                         "ttft_p99_ratio": _ratio(load[name]["ttft"], alone[name]["ttft"]),
                         "latency_p99_ratio": _ratio(load[name]["latency"], alone[name]["latency"])}
                  for name in alone}
    unexpected = [(phase, c) for phase, calls in all_calls.items() for c in calls
                  if c.status != "OK" and not is_expected(c.kind, c.status)]
    samples, seen = [], set()
    for phase, c in unexpected:
        if (phase, c.kind, c.status) not in seen:
            seen.add((phase, c.kind, c.status))
            samples.append({"phase": phase, "kind": c.kind, "status": c.status, "detail": c.detail})
    rss: dict = {"samples_mib": [round(s["total_bytes"] / 2**20, 1) for s in rss_samples]}
    if rss_samples and rss_end:
        start_b, end_b = rss_samples[0]["total_bytes"], rss_end["total_bytes"]
        rss.update(start_mib=round(start_b / 2**20, 1), end_mib=round(end_b / 2**20, 1),
                   growth_pct=round(100 * (end_b - start_b) / start_b, 2), processes=len(rss_end["processes"]),
                   source=rss_end["source"],
                   start_by_process=rss_samples[0]["processes"], end_by_process=rss_end["processes"])
    ratio = generation["all"]["latency_p99_ratio"]
    goals = [
        {"goal": "unexpected errors", "value": len(unexpected), "limit": 0, "pass": not unexpected},
        {"goal": "free KV blocks back to idle", "value": f"{kv_after['free_kv_blocks']} / {kv_before['free_kv_blocks']}",
         "limit": "equal", "pass": kv_after["free_kv_blocks"] == kv_before["free_kv_blocks"]},
        {"goal": "RSS growth %", "value": rss.get("growth_pct", "n/a"), "limit": GOAL_RSS_GROWTH_PCT,
         "pass": rss.get("growth_pct") is not None and rss["growth_pct"] <= GOAL_RSS_GROWTH_PCT},
        {"goal": "generation p99 latency, under load / alone", "value": ratio if ratio is not None else "n/a",
         "limit": GOAL_P99_RATIO, "pass": ratio is not None and ratio <= GOAL_P99_RATIO},
        {"goal": "health after the soak", "value": health, "limit": "SERVING", "pass": health == "SERVING"},
    ]
    if server is not None:
        goals.append({"goal": "server exit status after SIGTERM", "value": server_exit, "limit": 0,
                      "pass": server_exit == 0})
    report.update(
        meta={"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {cpu_count()} cores, "
              f"{socket.gethostname()}", "model": info.model, "limits": info.limits, "versions": info.versions,
              "grpc": grpc_target, "http": http_url, "concurrency": args.concurrency, "gen_clients": gen_clients,
              "other_workers": others, "alone_seconds": args.alone_seconds, "warmup_seconds": args.warmup_seconds,
              "seconds": args.seconds, "seed": args.seed, "sample_every": args.sample_every,
              "server_args": ([*SERVER_ARGS, *server_args] if server is not None else [])},
        goals=goals, generation=generation, kv={"before": kv_before, "after": kv_after}, rss=rss,
        unexpected_errors=len(unexpected), unexpected_samples=samples, server_exit=server_exit,
        server_log=server_log_findings(log_path), **{"pass": all(g["pass"] for g in goals)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    table = markdown(report)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 0 if report["pass"] else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    server_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, server_args = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     usage="%(prog)s [options] [-- extra server args]")
    parser.add_argument("--target", default=None, help="a running server's gRPC address (loopback); "
                        "default: start one")
    parser.add_argument("--http", default=None, help="that server's HTTP base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--server-pid", type=int, default=None,
                        help="pid of a running server, for RSS (default: whoever listens on the gRPC port)")
    parser.add_argument("--model", default=None, help="model for the server started here (default: a tiny llama)")
    parser.add_argument("--seconds", type=float, default=600.0, help="length of the soak (default %(default)s)")
    parser.add_argument("--alone-seconds", type=float, default=60.0,
                        help="length of the generation-alone phase (default %(default)s)")
    parser.add_argument("--warmup-seconds", type=float, default=30.0,
                        help="mixed traffic before the RSS start sample (default %(default)s)")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight in the soak")
    parser.add_argument("--gen-clients", type=int, default=None,
                        help="generation clients, alone and in the soak (default: half of --concurrency)")
    parser.add_argument("--max-requests", type=int, default=200_000, help="calls per phase at most")
    parser.add_argument("--drain-seconds", type=float, default=120.0,
                        help="calls still running this long after a phase's end are cancelled")
    parser.add_argument("--idle-wait", type=float, default=10.0,
                        help="seconds to wait at idle for the free KV blocks to come back")
    parser.add_argument("--sample-every", type=float, default=15.0, help="RSS / progress sample interval, s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "soak_results", help="output path without suffix")
    args = parser.parse_args(argv)
    if not 0 <= (args.gen_clients if args.gen_clients is not None else args.concurrency // 2) <= args.concurrency:
        parser.error("--gen-clients must be between 0 and --concurrency")
    return asyncio.run(main_async(args, server_args))


if __name__ == "__main__":
    sys.exit(main())
