"""The ways of explaining a completion that ``bench_explain.py`` times, and the floor.

Each ``run_<method>`` runs in its own process (started by ``bench_explain``
with the thread environment set), measures every case (a context length and
a unit granularity: token or sentence) and appends one JSON record per
measurement to ``out_path`` as soon as it has it, so a method killed at its
time limit still leaves what it finished.

Methods whose full run is predicted to exceed ``max_run_s`` (from the
previous case, scaled by forward passes × length: a pass costs about its
length, token units or sentence units) measure an evenly spaced subset of the perturbations and extrapolate linearly in the
number of forward passes; the record then says ``extrapolated: true``. (a)
and (f) get a higher threshold (``--max-run-s-a``) than the others; (f)
measures exactly the forks (a) measured, so their ratio compares the same work.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from process_tree import TreeSampler, Window

MIB = 1 << 20
GEN_TOKENS = 64  # plain generation, for the memory comparison of (a)


@dataclass
class Record:
    method: str
    length: int  # tokens of prompt + target, incl. BOS, as the method saw them
    case: str = ""  # the context's key: "512" (token units), "1024s" (sentence units)
    granularity: str = "token"
    status: str = "ok"
    wall_s: float | None = None
    extrapolated: bool = False
    measured_passes: int | None = None  # forward passes actually run when extrapolated
    measured_wall_s: float | None = None
    units: int | None = None  # perturbations (one per prompt token)
    forward_passes: int | None = None
    computed_tokens: int | None = None
    cached_tokens: int | None = None
    computed_source: str = ""  # "engine" (vLLM-reported) or "n*L" (every pass is a full pass)
    peak_rss_mib: float | None = None
    start_rss_mib: float | None = None
    cpu_s: float | None = None
    load_1m: float | None = None
    threads: str = ""
    note: str = ""
    extra: dict = field(default_factory=dict)

    def fill_window(self, w: Window) -> None:
        self.wall_s = w.wall_s
        self.cpu_s = w.cpu_s
        self.peak_rss_mib = w.peak_rss / MIB
        self.start_rss_mib = w.start_rss / MIB
        self.load_1m = w.load_1m
        self.extra["cpu_s_by_process"] = w.cpu_by_process


class Sink:
    def __init__(self, path: str):
        self.path = path

    def write(self, rec: Record) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(asdict(rec)) + "\n")
        print(f"[bench] {rec.method} L={rec.length} status={rec.status} wall={rec.wall_s} "
              f"extrapolated={rec.extrapolated} computed={rec.computed_tokens}", flush=True)


class Predictor:
    """Predicts a full run's wall time from the previous case: time ∝ passes × length (every fork
    of a full-pass method costs its length; AtMan's forks cost what follows their perturbation,
    on average half of it, at token and sentence units alike)."""

    def __init__(self):
        self.prev: tuple[int, float] | None = None

    def predict(self, length: int, units: int) -> float | None:
        if self.prev is None:
            return None
        work, t = self.prev
        return t * (units + 1) * length / work

    def record(self, length: int, units: int, wall_s: float) -> None:
        self.prev = ((units + 1) * length, wall_s)


def subset_size(n: int, predicted: float | None, max_run_s: float, minimum: int = 24) -> int | None:
    """How many perturbations to measure, or None for all of them."""
    if predicted is None or predicted <= max_run_s:
        return None
    k = max(minimum, math.ceil(n * (max_run_s / 4) / predicted))
    return None if k >= n else k


def evenly_spaced(items: list, k: int) -> list:
    """k items spread over the whole list (perturbation cost depends on position for (a)/(b))."""
    if k >= len(items):
        return list(items)
    step = len(items) / k
    return [items[int(i * step)] for i in range(k)]


def _env_threads() -> str:
    """The thread settings a vLLM engine of this process starts from."""
    return (f"env OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
            f"VLLM_CPU_OMP_THREADS_BIND={os.environ.get('VLLM_CPU_OMP_THREADS_BIND')}")


def _torch_threads() -> str:
    import torch

    return (f"torch.get_num_threads()={torch.get_num_threads()}, "
            f"GOMP_CPU_AFFINITY={os.environ.get('GOMP_CPU_AFFINITY', 'unset')!r}")


# --- (a) / (b): this project's vLLM path -------------------------------------------------


def engine_kwargs(args) -> dict:
    """(a), (b) and (f) run the same engine settings."""
    return dict(enforce_eager=True, dtype="float32", block_size=32, max_model_len=args.max_model_len,
                kv_cache_memory_bytes=args.kv_cache_mib * MIB)


def case_record(method: str, c: dict, **kw) -> Record:
    return Record(method, c["tokens"], case=c["key"], granularity=c["granularity"], **kw)


def run_atman(method: str, ctx: dict, args, sink: Sink) -> None:
    from atman_vllm.api import AtmanLLM
    from atman_vllm.core import ExplainRequest, make_options

    prefix = method == "a"
    sampler = TreeSampler()
    t0 = time.perf_counter()
    llm = AtmanLLM(args.model_dir, **engine_kwargs(args), enable_prefix_caching=prefix)
    start_s = time.perf_counter() - t0
    w = ctx["warmup"]
    llm.explain(w["prompt"], w["target"], granularity="token")
    time.sleep(1.0)
    idle_rss = sampler.current_rss() / MIB
    predictor = Predictor()
    for c in ctx["cases"]:
        length, gran = c["tokens"], c["granularity"]
        rec = case_record(method, c, computed_source="engine",
                          threads=_env_threads())
        rec.extra["engine_start_s"] = start_s
        rec.extra["idle_rss_mib"] = idle_rss
        plan = llm.plan(ExplainRequest(c["prompt"], c["target"], make_options(granularity=gran)))
        n = len(plan.jobs) - 1
        rec.units = n
        # What the floor (f) needs: every fork's first perturbed position, and which forks ran.
        firsts = [j.bias.first_position for j in plan.jobs[1:]]
        rec.extra["first_positions"] = firsts
        rec.extra["token_floor"] = sum(length - p for p in firsts) + length
        k = subset_size(n, predictor.predict(length, n), args.max_run_s)
        if k is None:
            with sampler.window() as win:
                res = llm.explain(c["prompt"], c["target"], granularity=gran)
            rec.fill_window(win)
            rec.forward_passes = res.stats.forward_passes
            rec.computed_tokens = res.stats.computed_tokens
            rec.cached_tokens = res.stats.cached_tokens
            rec.extra["engine_elapsed_s"] = res.stats.elapsed_s
        else:
            jobs = [plan.jobs[0], *evenly_spaced(plan.jobs[1:], k)]
            rec.extra["measured_first_positions"] = [j.bias.first_position for j in jobs[1:]]
            with sampler.window() as win:
                results = llm.run_jobs(jobs)
            rec.fill_window(win)
            scale = len(plan.jobs) / len(jobs)
            rec.extrapolated, rec.measured_passes, rec.measured_wall_s = True, len(jobs), win.wall_s
            rec.wall_s = win.wall_s * scale
            rec.cpu_s = win.cpu_s * scale
            rec.forward_passes = len(plan.jobs)
            rec.computed_tokens = round(sum(r.computed_tokens for r in results) * scale)
            rec.cached_tokens = round(sum(r.cached_tokens for r in results) * scale)
        rec.extra["worker_cpu_s"] = worker_cpu_s(rec)
        predictor.record(length, n, rec.wall_s)
        sink.write(rec)

        if method == "a" and c["key"] in ctx["plain"]:
            # plain generation on the same engine, same context length (other text: no cache hit)
            from vllm import SamplingParams
            from vllm.inputs import TokensPrompt

            g = ctx["plain"][c["key"]]
            params = SamplingParams(max_tokens=GEN_TOKENS, temperature=0.0, ignore_eos=True)
            with sampler.window() as win:
                out = llm.llm.generate([TokensPrompt(prompt_token_ids=g["token_ids"])], params, use_tqdm=False)
            gen = Record("a:generate", len(g["token_ids"]), case=c["key"], computed_source="engine", threads=rec.threads)
            gen.fill_window(win)
            gen.forward_passes = len(out[0].outputs[0].token_ids)
            gen.computed_tokens = len(g["token_ids"]) + len(out[0].outputs[0].token_ids) - 1
            gen.note = f"plain greedy generation of {GEN_TOKENS} tokens after a {len(g['token_ids'])}-token prompt"
            gen.extra["idle_rss_mib"] = idle_rss
            sink.write(gen)
    blocks = llm.kv_block_stats()
    print(f"[bench] kv blocks after run: {blocks}", flush=True)
    sampler.close()


def worker_cpu_s(rec: Record) -> float | None:
    """CPU seconds of the vLLM worker process (it does the model's work), scaled as the record's
    time is when extrapolated; None where the tree has no vLLM worker."""
    by = rec.extra.get("cpu_s_by_process", {})
    cpu = [v for k, v in by.items() if "Worker" in k]
    if not cpu:
        return None
    return sum(cpu) * (rec.wall_s / rec.measured_wall_s if rec.extrapolated else 1.0)


# --- (f): the floor: stock vLLM prefilling the same fork shapes ---------------------------


def run_floor(ctx: dict, args, sink: Sink) -> None:
    """Stock vLLM (plugin off) prefilling, after the same unperturbed prompt, one request per fork
    of (a) whose tokens equal the prompt's up to the fork's first perturbed position and differ
    at it: the prefix cache serves the blocks (a)'s fork reuses, the engine computes the same
    new tokens against the same context lengths, and only the last position's logits (no
    vocabulary-wide LM head per token). Exactly the forks (a) measured, scaled as (a) scaled."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    atman = {r["case"]: r for r in map(json.loads, Path(args.a_records).read_text().splitlines())
             if r["method"] == "a"}
    sampler = TreeSampler()
    llm = LLM(args.model_dir, **engine_kwargs(args), enable_prefix_caching=True)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)

    def forks_of(ids: list[int], firsts: list[int]) -> list[TokensPrompt]:
        return [TokensPrompt(prompt_token_ids=ids[:p] + [(ids[p] + 1) % vocab] + ids[p + 1:]) for p in firsts]

    w = ctx["warmup"]["token_ids"]
    llm.generate(forks_of(w, list(range(1, len(w) - 4))), params, use_tqdm=False)
    for c in ctx["cases"]:
        a = atman.get(c["key"])
        if a is None:
            continue
        ids, firsts = c["token_ids"], a["extra"]["first_positions"]
        measured = a["extra"].get("measured_first_positions", firsts)
        rec = case_record("f", c, computed_source="engine",
                          threads=_env_threads())
        rec.units = len(firsts)
        llm.reset_prefix_cache()
        with sampler.window() as win:
            outs = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
            outs += llm.generate(forks_of(ids, measured), params, use_tqdm=False)
        rec.fill_window(win)
        computed = sum(len(o.prompt_token_ids) - (o.num_cached_tokens or 0) for o in outs)
        cached = sum(o.num_cached_tokens or 0 for o in outs)
        scale = (len(firsts) + 1) / (len(measured) + 1)
        if len(measured) < len(firsts):
            rec.extrapolated, rec.measured_passes, rec.measured_wall_s = True, len(outs), win.wall_s
            rec.wall_s, rec.cpu_s = win.wall_s * scale, win.cpu_s * scale
        rec.forward_passes = len(firsts) + 1
        rec.computed_tokens, rec.cached_tokens = round(computed * scale), round(cached * scale)
        rec.extra["worker_cpu_s"] = worker_cpu_s(rec)
        sink.write(rec)
    sampler.close()


# --- (c): the reference explainer (plain transformers, batched forks) --------------------


def run_reference(ctx: dict, args, sink: Sink) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from atman_vllm.core import ExplainRequest, make_options
    from atman_vllm.reference import ReferenceExplainer

    sampler = TreeSampler()
    ref = ReferenceExplainer(args.model_dir)
    w = ctx["warmup"]
    ref.explain(w["prompt"], w["target"], granularity="token")
    predictor = Predictor()
    for c in ctx["cases"]:
        length, gran = c["tokens"], c["granularity"]
        rec = case_record("c", c, computed_source="n*L", threads=_torch_threads())
        # Eager attention holds batch × heads × L² scores a few times over: 16 forks of 2,048 tokens
        # were killed for memory on 24 GiB (llama-32k), so the batch shrinks with L² beyond 1,024.
        ref.batch_size = max(1, min(16, 16 * 1024 ** 2 // length ** 2))
        rec.note = f"batch_size={ref.batch_size} forks per forward"
        plan = ref.plan(ExplainRequest(c["prompt"], c["target"], make_options(granularity=gran)))
        n = len(plan.jobs) - 1
        rec.units = n
        k = subset_size(n, predictor.predict(length, n), args.max_run_s, minimum=2 * ref.batch_size - 1)
        if k is not None:  # whole batches: unperturbed + k forks = multiple of batch_size
            k = math.ceil((k + 1) / ref.batch_size) * ref.batch_size - 1
            k = None if k >= n else k
        if k is None:
            with sampler.window() as win:
                res = ref.explain(c["prompt"], c["target"], granularity=gran)
            rec.fill_window(win)
            rec.forward_passes, rec.computed_tokens = res.stats.forward_passes, res.stats.computed_tokens
            rec.cached_tokens = res.stats.cached_tokens
        else:
            jobs = [plan.jobs[0], *evenly_spaced(plan.jobs[1:], k)]
            with sampler.window() as win:
                ref.run_jobs(jobs)
            rec.fill_window(win)
            scale = len(plan.jobs) / len(jobs)
            rec.extrapolated, rec.measured_passes, rec.measured_wall_s = True, len(jobs), win.wall_s
            rec.wall_s, rec.cpu_s = win.wall_s * scale, win.cpu_s * scale
            rec.forward_passes = len(plan.jobs)
            rec.computed_tokens, rec.cached_tokens = len(plan.jobs) * len(plan.encoded.token_ids), 0
        predictor.record(length, n, rec.wall_s)
        sink.write(rec)
    sampler.close()


# --- (d) / (e): Captum FeatureAblation, local model or remote vLLM server ----------------


def _ablation_mask(unit_of_feature: list[int], k: int | None):
    """A FeatureAblation feature mask: one group per unit (AtMan's units: a token, or a
    sentence's tokens) or, with ``k``, k units spread over the prompt and one group holding
    every other token: k + 1 ablations + 1 baseline pass of full length."""
    import torch

    n_units = max(unit_of_feature) + 1
    chosen = range(n_units) if k is None else evenly_spaced(list(range(n_units)), k)
    group = {u: g for g, u in enumerate(chosen)}
    return torch.tensor([[group.get(u, len(group)) for u in unit_of_feature]], dtype=torch.long)


class PassCounter:
    def __init__(self):
        self.passes = 0
        self.tokens = 0

    def reset(self) -> None:
        self.passes = self.tokens = 0


def _run_captum(method: str, attr, tokenizer, ctx: dict, args, sink: Sink, counter: PassCounter,
                sampler: TreeSampler, threads, note: str, engine_tokens=None) -> None:
    import torch
    from captum.attr import TextTokenInput

    def attribute(prompt, target, unit_of_feature=None, k=None):
        inp = TextTokenInput(prompt, tokenizer, skip_tokens=[tokenizer.bos_token_id])  # BOS is never ablated (as in AtMan)
        unit_of_feature = unit_of_feature or list(range(inp.n_itp_features))
        assert len(unit_of_feature) == inp.n_itp_features, (len(unit_of_feature), inp.n_itp_features)
        kwargs = {"feature_mask": _ablation_mask(unit_of_feature, k)}
        if method == "d":
            kwargs["forward_in_tokens"] = False  # one full pass per ablation, as AtMan's forks
        with torch.no_grad():
            attr.attribute(inp, target=target, **kwargs)
        return inp

    w = ctx["warmup"]
    attribute(w["prompt"], w["target"], k=4)
    predictor = Predictor()
    for c in ctx["cases"]:
        length = c["tokens"]
        n_target = len(tokenizer.encode(c["target"], add_special_tokens=False))
        inp0 = TextTokenInput(c["prompt"], tokenizer, skip_tokens=[tokenizer.bos_token_id])
        n = max(c["unit_of_feature"]) + 1  # AtMan's units of this case
        seq_len = inp0.inp_tensor.shape[1] + n_target
        rec = case_record(method, dict(c, tokens=seq_len), threads=threads() if callable(threads) else threads,
                          note=note)
        rec.units = n
        k = subset_size(n, predictor.predict(length, n), args.max_run_s)
        counter.reset()
        before = engine_tokens() if engine_tokens else None
        with sampler.window() as win:
            attribute(c["prompt"], c["target"], c["unit_of_feature"], k)
        rec.fill_window(win)
        passes = counter.passes
        if before is not None:
            after = engine_tokens()
            rec.extra["engine_prompt_tokens"] = int(after[0] - before[0])
            rec.extra["engine_cache_hit_tokens"] = int(after[1] - before[1])
        if k is None:
            rec.forward_passes = passes
            rec.computed_tokens = counter.tokens
        else:
            scale = (n + 1) / passes
            rec.extrapolated, rec.measured_passes, rec.measured_wall_s = True, passes, win.wall_s
            rec.wall_s, rec.cpu_s = win.wall_s * scale, win.cpu_s * scale
            rec.forward_passes = n + 1
            rec.computed_tokens = round(counter.tokens * scale)
        rec.computed_source = "n*L"
        if before is not None and k is None:
            rec.computed_source = "engine"
            rec.computed_tokens = rec.extra["engine_prompt_tokens"] - rec.extra["engine_cache_hit_tokens"]
            rec.cached_tokens = rec.extra["engine_cache_hit_tokens"]
        elif before is not None:
            rec.computed_source = "engine (scaled)"
            rec.computed_tokens = round((rec.extra["engine_prompt_tokens"] - rec.extra["engine_cache_hit_tokens"])
                                        * (n + 1) / passes)
            rec.cached_tokens = round(rec.extra["engine_cache_hit_tokens"] * (n + 1) / passes)
        predictor.record(length, n, rec.wall_s)
        sink.write(rec)


def run_captum_local(ctx: dict, args, sink: Sink) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from captum.attr import FeatureAblation, LLMAttribution
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sampler = TreeSampler()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    counter = PassCounter()
    forward = model.forward

    def counting_forward(*a, **kw):  # Captum calls model.forward directly (no module hooks)
        counter.passes += 1
        counter.tokens += int(kw["input_ids"].shape[1])
        return forward(*a, **kw)

    model.forward = counting_forward
    attr = LLMAttribution(FeatureAblation(model), tokenizer)
    note = (f"FeatureAblation via LLMAttribution, forward_in_tokens=False (one full pass per ablation), "
            f"baseline token id 0, batch 1, attn={model.config._attn_implementation}")
    _run_captum("d", attr, tokenizer, ctx, args, sink, counter, sampler, _torch_threads, note)
    sampler.close()


def _metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def run_captum_remote(ctx: dict, args, sink: Sink) -> None:
    from captum.attr import FeatureAblation, RemoteLLMAttribution, VLLMProvider
    from transformers import AutoTokenizer

    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    base = f"http://127.0.0.1:{args.port}"
    env = dict(os.environ, VLLM_PLUGINS="", VLLM_CPU_KVCACHE_SPACE=str(args.server_kv_gib))
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model_dir,
           "--host", "127.0.0.1", "--port", str(args.port), "--enforce-eager", "--dtype", "float32",
           "--max-model-len", str(args.max_model_len), "--block-size", "32"]
    log = open(args.server_log, "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    print(f"[bench] stock vLLM server pid {server.pid}: {' '.join(cmd)} (log {args.server_log})", flush=True)
    sampler = TreeSampler()  # the server is our child: its RSS and CPU count in the tree
    try:
        t0 = time.perf_counter()
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {server.returncode}; see {args.server_log}")
            try:
                urllib.request.urlopen(base + "/v1/models", timeout=2).read()
                break
            except OSError:
                if time.perf_counter() - t0 > 600:
                    raise RuntimeError("vLLM server did not come up in 600 s")
                time.sleep(2)
        print(f"[bench] server up after {time.perf_counter() - t0:.1f} s", flush=True)

        def engine_tokens() -> tuple[float, float]:
            text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
            return _metric_sum(text, "vllm:prompt_tokens_total"), _metric_sum(text, "vllm:prefix_cache_hits_total")

        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        provider = VLLMProvider(base + "/v1")
        counter = PassCounter()
        get_logprobs = provider.get_logprobs

        def counting_get_logprobs(input_prompt, target_str, tokenizer=None):
            counter.passes += 1
            counter.tokens += len(tokenizer.encode(input_prompt + target_str))
            return get_logprobs(input_prompt, target_str, tokenizer)

        provider.get_logprobs = counting_get_logprobs
        attr = RemoteLLMAttribution(FeatureAblation(RemoteLLMAttribution.placeholder_model), tokenizer, provider)
        note = ("RemoteLLMAttribution+VLLMProvider: one /v1/completions request (prompt_logprobs=0, max_tokens=1) "
                "per ablation, sequential; stock server (VLLM_PLUGINS=''), prefix caching at its default")

        def threads() -> str:
            text = Path(args.server_log).read_text(errors="replace")
            return "server: " + "; ".join(thread_lines(text))

        _run_captum("e", attr, tokenizer, ctx, args, sink, counter, sampler, threads, note, engine_tokens)
        plugin_lines = [ln for ln in Path(args.server_log).read_text(errors="replace").splitlines()
                        if "atman" in ln.lower() or "plugin" in ln.lower()]
        print("[bench] server plugin log lines:", *plugin_lines[:5], sep="\n  ", flush=True)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        sampler.close()
        log.close()


THREAD_PATTERNS = (r"Reducing Torch threads[^\n]*", r"OMP_NUM_THREADS=\d+ is set; leaving Torch threads at \d+",
                   r"local_rank=\d+, core ids=\[[^\]]*\]", r"VLLM_CPU_OMP_THREADS_BIND='[^']*'")


def thread_lines(log_text: str) -> list[str]:
    """The vLLM log lines that say how many torch/OpenMP threads its processes use."""
    found: list[str] = []
    for pat in THREAD_PATTERNS:
        for m in re.finditer(pat, log_text):
            line_start = log_text.rfind("\n", 0, m.start()) + 1
            proc = re.match(r"\(([A-Za-z]+) pid=\d+\)", log_text[line_start:m.start()].strip())
            s = (f"{proc.group(1)}: " if proc else "") + m.group(0)
            if s not in found:
                found.append(s)
    return found


METHODS = {
    "a": lambda ctx, args, sink: run_atman("a", ctx, args, sink),
    "b": lambda ctx, args, sink: run_atman("b", ctx, args, sink),
    "c": run_reference,
    "d": run_captum_local,
    "e": run_captum_remote,
    "f": run_floor,
}
