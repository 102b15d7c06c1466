"""``atman-vllm explain --backend reference`` on a tiny locally built model."""

import json

import jsonschema
import pytest

from atman_vllm.cli import main
from atman_vllm.core import EXPLAIN_RESULT_SCHEMA
from atman_vllm.models.factory import build_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"), seed=0))


def test_reference_backend_json_matches_the_contract(capsys, model_dir):
    prompt, target = "The cat sat on the mat. The dog", " ran away"
    code = main(["explain", "--backend", "reference", "--model", model_dir, "--prompt", prompt, "--target", target,
                 "--granularity", "word", "--target-granularity", "token", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    jsonschema.validate(result, EXPLAIN_RESULT_SCHEMA)
    assert result["prompt"] == prompt and result["target"] == target
    assert [u["text"] for u in result["explanations"][0]["prompt_scores"]] == prompt.split()
    assert len(result["explanations"]) == len(result["target_tokens"]) >= 2
    n_units = len(prompt.split()) + len(result["target_tokens"]) - 1
    assert result["stats"]["perturbations"] == n_units and result["stats"]["forward_passes"] == n_units + 1
    assert all(t["logprob"] < 0 for t in result["target_tokens"])
    assert any(s["score"] != 0 for s in result["explanations"][0]["prompt_scores"])  # the bias did something


def test_reference_backend_generates_a_target_and_renders(capsys, model_dir):
    code = main(["explain", "--backend", "reference", "--model", model_dir, "--prompt", "The cat sat on the",
                 "--max-tokens", "3", "--factor", "0.2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "top 5 units" in out and "factor 0.2" in out


def test_reference_backend_hierarchical_search(capsys, model_dir):
    prompt = "The cat sat on the mat. It was warm.\n\nThe dog ran in the park. It was cold.\n\nBirds sang. The dog"
    common = ["explain", "--backend", "reference", "--model", model_dir, "--prompt", prompt, "--target", " barked",
              "--granularity", "token", "--json"]
    assert main(common) == 0
    exhaustive = json.loads(capsys.readouterr().out)
    assert main([*common, "--search", "hierarchical", "--budget", "10"]) == 0
    hier = json.loads(capsys.readouterr().out)
    jsonschema.validate(hier, EXPLAIN_RESULT_SCHEMA)
    assert hier["options"]["search"] == "hierarchical" and hier["options"]["budget"] == 10
    assert hier["stats"]["forward_passes"] <= 10 < exhaustive["stats"]["forward_passes"]
    ex, hi = exhaustive["explanations"][0]["prompt_scores"], hier["explanations"][0]["prompt_scores"]
    assert [(s["start"], s["length"]) for s in hi] == [(s["start"], s["length"]) for s in ex]
    refined = [i for i, s in enumerate(hi) if s["refined"]]
    assert 0 < len(refined) < len(hi)
    assert all(hi[i]["inherited_from"] in ("sentence", "paragraph") for i in range(len(hi)) if i not in refined)
    # The same forks as the exhaustive search (the reference runs each alone: same arithmetic).
    assert max(abs(hi[i]["score"] - ex[i]["score"]) for i in refined) < 1e-5
    assert max(abs(ex[i]["score"]) for i in refined) > 0
