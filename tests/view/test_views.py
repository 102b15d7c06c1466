"""The views without a server: notebook HTML, rich, the page's embedding, `atman-vllm view`, Captum and pandas."""

from __future__ import annotations

import html
import io
import json
import re
import sys
from pathlib import Path

import pytest
from rich.console import Console

from atman_vllm.cli import main
from atman_vllm.core import ExplainResult

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
from test_core_scoring import CONTRACT_EXAMPLE, LinearToyExplainer  # noqa: E402

PROMPT = "Ben likes to eat burgers and"


@pytest.fixture
def token_result() -> ExplainResult:
    # " burgers" strongly supports the target, " likes" works against it.
    model = LinearToyExplainer({5: 1.0, 2: -0.25, 7: 2.0})
    return model.explain(PROMPT, " fries and", granularity="word", target_granularity="token")


def _config(page: str) -> dict:
    body = re.search(r'<script type="application/json" id="atman-config">(.*?)</script>', page, re.S).group(1)
    return json.loads(body)


def test_notebook_html_shows_every_unit_with_its_score_and_a_legend(token_result):
    out = token_result._repr_html_()
    assert "<script" not in out  # shows where notebooks drop scripts
    exp = token_result.explanations[0]
    spans = re.findall(r'<span class="u (pos|neg|zero)" style="--a:([\d.]+)" data-score="([^"]+)"[^>]*>([^<]*)</span>', out)
    first = spans[:len(exp.prompt_scores)]
    assert [html.unescape(t) for *_, t in first] == [s.text for s in exp.prompt_scores]
    assert [float(v) for _, _, v, _ in first] == [s.score for s in exp.prompt_scores]
    scale = max(abs(s.score) for s in (*exp.prompt_scores, *exp.target_scores))
    strongest = max(first, key=lambda t: abs(float(t[2])))
    assert strongest[1] == "1.0000" and strongest[0] == "pos"
    assert any(sign == "neg" for sign, *_ in first)
    assert f"−{scale:.4g}" in out and f"+{scale:.4g}" in out and 'class="bar"' in out
    assert out.count('class="tt"') == len(token_result.explanations)
    assert "--pos: #d6604d" in out  # the palette of scale.py


def test_rich_display_is_the_cli_table(token_result):
    buf = io.StringIO()
    Console(file=buf, width=100).print(token_result)
    text = buf.getvalue()
    assert PROMPT in text and "target token 1: ' and'" in text and "'burgers'" in text and "+2.3026" in text


def test_page_embeds_the_result_safely():
    d = json.loads(json.dumps(CONTRACT_EXAMPLE))
    evil = "</script><script>alert(1)</script><!--"
    d["prompt"] = evil + d["prompt"]
    for e in d["explanations"]:
        for s in e["prompt_scores"]:
            s["start"] += len(evil)
    from atman_vllm.view import page_html

    page = page_html(ExplainResult.from_dict(d))
    assert evil not in page and page.count("</script>") == 2  # the config's and the code's own ends
    config = _config(page)
    assert config["result"]["prompt"] == d["prompt"] and config["api"] is None
    assert "auto" in config["choices"]["granularity"] and "custom" not in config["choices"]["granularity"]


def test_view_command_writes_the_page(tmp_path, capsys, token_result):
    src, out = tmp_path / "r.json", tmp_path / "r.html"
    src.write_text(json.dumps(token_result.to_dict()))
    assert main(["view", str(src), "-o", str(out)]) == 0
    assert _config(out.read_text())["result"] == json.loads(src.read_text())
    assert "http://" not in out.read_text() and "https://" not in out.read_text()  # works offline

    bad = tmp_path / "bad.json"
    bad.write_text('{"prompt": "x"}')
    assert main(["view", str(bad), "-o", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: result: {bad} is not an explanation result")
    bad.write_text("{not json")
    assert main(["view", str(bad), "-o", str(out)]) == 2
    assert "is not JSON" in capsys.readouterr().err
    assert main(["view", str(tmp_path / "missing.json"), "-o", str(out)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_records_and_dataframe(token_result):
    import pandas as pd  # in the test extra
    df = token_result.to_dataframe()
    n_rows = sum(len(e.prompt_scores) + len(e.target_scores) for e in token_result.explanations)
    assert len(df) == n_rows == len(token_result.to_records())
    one = df[(df.target_index == 0) & (df.source == "prompt")]
    assert list(one.unit_text) == [s.text for s in token_result.explanations[0].prompt_scores]
    assert one.loc[one.score.idxmax(), "unit_text"] == "burgers"
    # Tidy: pivoting back gives the [target tokens × units] matrix.
    matrix = df[df.source == "prompt"].pivot(index="target_index", columns="unit_index", values="score")
    assert matrix.shape == (2, len(token_result.explanations[0].prompt_scores))
    assert pd.api.types.is_float_dtype(df.score)


def test_captum_result_plots(token_result):
    import captum  # noqa: F401  (the bench extra, which make test installs)
    import matplotlib

    matplotlib.use("Agg")
    from captum.attr import LLMAttributionResult

    c = token_result.to_captum()
    assert isinstance(c, LLMAttributionResult)
    assert c.input_tokens == [s.text for s in token_result.explanations[0].prompt_scores]
    assert c.output_tokens == [t.text for t in token_result.target_tokens]
    assert c.token_attr.tolist() == [[s.score for s in e.prompt_scores] for e in token_result.explanations]
    fig, ax = c.plot_token_attr()
    assert len(ax.get_yticklabels()) == len(c.output_tokens)
    assert len(ax.get_xticklabels()) == len(c.input_tokens)
    c.plot_seq_attr()

    # Target granularity "complete": seq_attr is the explanation itself, and the
    # per-token mean of a token-level run on the same input (raw scores) equals it.
    model = LinearToyExplainer({5: 1.0, 2: -0.25, 7: 2.0})
    complete = model.explain(PROMPT, " fries and", granularity="word").to_captum()
    assert complete.token_attr is None
    assert complete.seq_attr.tolist() == pytest.approx(c.seq_attr.tolist())
    assert c.output_probs.tolist() == pytest.approx([2.718281828 ** t.logprob for t in token_result.target_tokens])


def test_core_imports_no_view_and_views_import_no_torch():
    import subprocess

    code = ("import sys, atman_vllm.core; assert 'atman_vllm.view' not in sys.modules and 'rich' not in sys.modules; "
            "import atman_vllm.view; assert 'torch' not in sys.modules and 'pandas' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
