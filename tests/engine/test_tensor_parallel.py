"""Tensor parallel (issue 16): an explanation and a steered generation on TP=2 equal TP=1.

The TP=2 engine runs in a fresh interpreter (this file's ``__main__``): its engine core and its two
workers (vLLM's mp executor) are processes of their own, and nothing of it is left in the test
process when it ends, so the session's in-process engines keep their distributed state. No thread
binding is given: the library picks one core per rank (vllm/parallel.py), which the runner reports.

What TP=2 has to get right on every rank: each worker attaches the per-row key bias to its own
attention metadata (its heads are a shard of the heads), and target scoring computes logits from
the gathered hidden states on every rank (``compute_logits`` all-gathers the vocabulary shards);
the driver's scores are the ones returned. Any rank missing the bias would change the scores by
far more than rounding (a perturbation moves the cross-entropies by ~1e-2 here, the tolerance is ~1e-5).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import torch

from atman_vllm.core import Control, ExplainOptions
from tolerances import assert_close

from .conftest import ENGINE_ARGS
from .texts import LONG

TARGET = " Lisbon."
OPTIONS = {"granularity": "token"}
CONTROL = {"start": 0, "length": 12, "factor": 0.05}
TP = 2


def _compute(llm) -> dict:
    """What both engines compute: an explanation of LONG -> TARGET, and steered next-token logprobs."""
    result = llm.explain(LONG, TARGET, ExplainOptions.from_dict(OPTIONS))
    control = Control(**CONTROL)
    steered = llm.next_token_logprobs(LONG, controls=[control], num_logprobs=5)
    plain = llm.next_token_logprobs(LONG, num_logprobs=5)
    return {"result": result.to_dict(), "steered": sorted(steered.items()), "plain": sorted(plain.items())}


def _tp_in_subprocess(model_dir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING",
                                                            "VLLM_CPU_OMP_THREADS_BIND")}
    proc = subprocess.run([sys.executable, "-m", "engine.test_tensor_parallel", model_dir], capture_output=True,
                          text=True, cwd=__file__.rsplit("/engine/", 1)[0], env=env, timeout=600)
    assert proc.returncode == 0, f"the TP={TP} runner failed:\n{proc.stderr[-4000:]}"
    out = json.loads(proc.stdout.rsplit("\nRESULTS", 1)[1])
    # vLLM logs each rank's OpenMP cores ("local_rank=0, core ids=[0]") when it binds them.
    out["bound"] = sorted(set(re.findall(r"local_rank=(\d+), core ids=(\[[\d, ]*\])", proc.stdout + proc.stderr)))
    return out


def _scores(d: dict) -> list[float]:
    return [s["score"] for e in d["explanations"] for s in e["prompt_scores"]]


def test_tensor_parallel_equals_single_worker(engines, tiny_models):
    started = time.perf_counter()
    tp = _tp_in_subprocess(str(tiny_models["llama"]))
    print(f"TP={TP} run: {time.perf_counter() - started:.1f} s; binding chosen: {tp['binding']!r}, "
          f"vLLM bound {tp['bound']}")
    one = _compute(engines["llama"])

    # No binding was given: the library chose one core (range) per rank, and vLLM bound each rank to it.
    assert tp["binding"] is not None and len(tp["binding"].split("|")) == TP
    assert [rank for rank, _ in tp["bound"]] == [str(r) for r in range(TP)], tp["bound"]
    assert len({cores for _, cores in tp["bound"]}) == min(TP, os.cpu_count() or 1), "ranks share no core"
    assert tp["tensor_parallel_size"] == TP
    want, got = one["result"], tp["result"]
    assert [t["text"] for t in got["target_tokens"]] == [t["text"] for t in want["target_tokens"]]
    ce_scale = max(abs(t["logprob"]) for t in want["target_tokens"])
    # Another reduction order (the all-reduce sums two partial GEMMs): float32 rounding of the
    # cross-entropies the scores are differences of.
    assert_close([t["logprob"] for t in got["target_tokens"]], [t["logprob"] for t in want["target_tokens"]],
                 torch.float32, what="TP target logprobs")
    assert_close(_scores(got), _scores(want), torch.float32, scale=ce_scale, what="TP scores")
    assert np.max(np.abs(_scores(want))) > 1e3 * 64 * 1.2e-7 * ce_scale, "the scores must be far above rounding"
    assert got["stats"]["forward_passes"] == want["stats"]["forward_passes"]
    assert got["stats"]["cached_tokens"] > 0, "forks reuse the unperturbed pass's blocks under TP too"

    # Steered logprobs: same top tokens, same values; the control must move them (so a rank without
    # the bias would show).
    steered_one, steered_tp = dict(one["steered"]), dict(tp["steered"])
    assert set(steered_tp) == set(steered_one)
    ids = sorted(steered_one)
    assert_close([steered_tp[i] for i in ids], [steered_one[i] for i in ids], torch.float32,
                 what="TP steered logprobs")
    plain = dict(one["plain"])
    moved = max(abs(steered_one[i] - plain[i]) for i in ids if i in plain)
    assert moved > 1e-3, f"the control barely moves the logprobs ({moved:.2g}): the comparison would not see a missing bias"


if __name__ == "__main__":
    from atman_vllm.api import AtmanLLM

    from atman_vllm.vllm.parallel import BIND_ENV, cpu_thread_binding

    engine_args = dict(ENGINE_ARGS, tensor_parallel_size=TP, distributed_executor_backend="mp")
    with cpu_thread_binding(engine_args) as binding:  # what AtmanLLM will choose (and then sets itself)
        pass
    assert os.environ.get(BIND_ENV) is None, "the binding is set only while an engine starts"
    llm = AtmanLLM(sys.argv[1], **engine_args)
    assert os.environ.get(BIND_ENV) is None, "the binding is set only while an engine starts"
    out = _compute(llm)
    out["binding"] = binding
    out["tensor_parallel_size"] = llm.vllm_config.parallel_config.tensor_parallel_size
    llm.shutdown()
    print("\nRESULTS" + json.dumps(out))
