"""The PyTorch definition / CPU fallback against the float64 reference, and
the host-side contract (CSR builder, dispatch, validation). No Triton here:
the Triton kernels are tested in test_paged_attention_bias_triton.py."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from paged_attention_reference import (
    DECODE,
    PREFILL,
    fresh_seed,
    make_batch,
    reference_attention,
    relative_error,
)

from atman_vllm.core.options import Mode
from atman_vllm.core.jobs import KeyBias
from atman_vllm.kernels import (
    KeyBiasCSR,
    paged_attention_with_key_bias,
    paged_attention_with_key_bias_torch,
)
from tolerances import assert_close

REPO = Path(__file__).resolve().parents[2]
# Spec bound against the float64 reference, relative to the largest output (relative_error):
# 1e-4 is ~840 eps(float32), far above float32 rounding on any CPU.
SPEC_RELATIVE = 1e-4


@pytest.fixture
def gen() -> torch.Generator:
    seed = fresh_seed()
    print(f"seed={seed} (replay with ATMAN_TEST_SEED={seed})")  # shown by pytest on failure
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("block_size, layout", [(16, "HND"), (32, "NHD")])
@pytest.mark.parametrize("mode", ["plain", "log-additive", "multiplicative"])
def test_torch_fallback_matches_reference(gen, block_size, layout, mode):
    batch = make_batch(gen, block_size=block_size, layout=layout, with_bias=mode != "plain")
    mode = "log-additive" if mode == "plain" else mode
    out = paged_attention_with_key_bias_torch(*batch.args(), mode)
    err = relative_error(out[: batch.num_real_tokens], reference_attention(batch, mode))
    assert err <= SPEC_RELATIVE, f"seed={gen.initial_seed()} rel err {err:.2e} {batch.describe()}"


def test_auto_on_cpu_runs_the_torch_path_into_out(gen):
    batch = make_batch(gen, block_size=16, num_heads=6, num_kv_heads=2, head_size=24)
    out = torch.full_like(batch.query, 7.0)
    result = paged_attention_with_key_bias(*batch.args(), Mode.MULTIPLICATIVE, out)
    assert result is out
    err = relative_error(out[: batch.num_real_tokens], reference_attention(batch, "multiplicative"))
    assert err <= SPEC_RELATIVE, f"seed={gen.initial_seed()} rel err {err:.2e}"
    assert (out[batch.num_real_tokens :] == 7.0).all(), "padding rows past query_start_loc[-1] were written"


@pytest.mark.parametrize("mode", ["log-additive", "multiplicative"])
@pytest.mark.parametrize("raw_score", [2.5, -2.5])
def test_suppression_lowers_the_weight_for_positive_and_negative_scores(mode, raw_score):
    """ATMAN_SPEC §2: f < 1 must lower the attention to key k whatever the
    sign of its raw score. One query, three keys; V is one-hot per key so
    the output is the attention weight vector itself."""
    head_size, block_size = 4, 16
    key_cache = torch.zeros(1, block_size, 1, head_size)
    value_cache = torch.zeros(1, block_size, 1, head_size)
    raw = [raw_score, raw_score - 3.0, raw_score + 1.0]  # key 0 is neither the min nor the max
    for k, s in enumerate(raw):
        key_cache[0, k, 0, 0] = s
        value_cache[0, k, 0, k] = 1.0
    query = torch.zeros(1, 1, head_size)
    query[0, 0, 0] = 1.0  # H[q, k] = raw[k]
    common = (key_cache, value_cache, torch.zeros(1, 1, dtype=torch.int32), torch.tensor([3], dtype=torch.int32),
              torch.tensor([0, 1], dtype=torch.int32), 1, 1.0)  # fmt: skip
    plain = paged_attention_with_key_bias_torch(query, *common)[0, 0, :3]
    csr = KeyBiasCSR.from_key_biases([KeyBias((0,), (0.1,), Mode(mode))])
    suppressed = paged_attention_with_key_bias_torch(
        query, *common, csr.start_loc, csr.positions, csr.values, csr.mode
    )[0, 0, :3]
    assert suppressed[0] < plain[0], (mode, raw_score, plain.tolist(), suppressed.tolist())
    assert_close(suppressed.sum(), 1.0, torch.float32, what="attention weights sum")


def test_key_bias_csr_from_key_biases():
    biases = [
        KeyBias((2, 5), (0.1, 0.5)),
        None,
        KeyBias((0,), (2.0,)),
    ]
    csr = KeyBiasCSR.from_key_biases(biases)
    assert csr.start_loc.tolist() == [0, 2, 2, 3]
    assert csr.positions.tolist() == [2, 5, 0]
    assert csr.positions.dtype == torch.int32 and csr.values.dtype == torch.float32
    # Bitwise: the builder stores math.log(f) as float32, exactly what this tensor holds.
    assert torch.equal(csr.values, torch.tensor([math.log(0.1), math.log(0.5), math.log(2.0)]))
    assert csr.mode == "log-additive"
    with pytest.raises(ValueError, match="one mode"):
        KeyBiasCSR.from_key_biases([KeyBias((1,), (0.1,), Mode.MULTIPLICATIVE), KeyBias((1,), (0.1,))]).mode


def test_rejects_inconsistent_inputs(gen):
    batch = make_batch(gen, block_size=16, kinds=(PREFILL, DECODE), padding_rows=0)
    args = list(batch.args())
    with pytest.raises(ValueError, match="mode"):
        paged_attention_with_key_bias_torch(*args, "additive")
    with pytest.raises(ValueError, match="together"):
        paged_attention_with_key_bias_torch(*args[:8], args[8], None, args[10])
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_attention_with_key_bias_torch(batch.query[:, :3], *args[1:])
    with pytest.raises(ValueError, match="dtype"):
        paged_attention_with_key_bias_torch(batch.query.double(), *args[1:])


def test_interpreter_without_the_flag_is_a_clear_error():
    """Triton's interpreter only works if TRITON_INTERPRET=1 was set before
    triton.language was imported; elsewhere the dispatcher must refuse
    rather than crash inside Triton. Checked in a fresh process without the
    flag, so the result does not depend on this process's environment."""
    code = (
        "import torch\n"
        "from atman_vllm.kernels import paged_attention_with_key_bias as f\n"
        "q = torch.zeros(1, 1, 16); kc = torch.zeros(1, 16, 1, 16)\n"
        "i = lambda *v: torch.tensor(v, dtype=torch.int32)\n"
        "try:\n"
        "    f(q, kc, kc, i(0)[None], i(1), i(0, 1), 1, 1.0, implementation='interpreter')\n"
        "except RuntimeError as e:\n"
        "    print('REFUSED', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert "REFUSED" in res.stdout and "TRITON_INTERPRET=1" in res.stdout, res.stdout + res.stderr
