"""The atman-vllm console script: argument errors, command registry, rendering."""

import io
import re

import pytest
from rich.console import Console

import atman_vllm.cli as cli
from atman_vllm.cli import main
from atman_vllm.cli.render import render_explanation
from atman_vllm.core import ExplainResult
from test_core_scoring import CONTRACT_EXAMPLE, LinearToyExplainer


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def base(tmp_path):
    return ["explain", "--model", str(tmp_path), "--prompt", "Ben likes", "--target", " fries"]


@pytest.mark.parametrize("extra, expected", [
    (["--factor", "-1"], "error: --factor: must be finite and > 0, got -1"),
    (["--factor", "0"], "error: --factor: must be finite and > 0, got 0"),
    (["--factor", "nan"], "error: --factor: must be finite and > 0, got nan"),
    (["--factor", "abc"], "error: --factor: invalid number value: 'abc'"),
    (["--kappa", "2"], "error: --kappa: must be in [0, 1], got 2"),
    (["--mode", "additive"], "error: --mode: unknown value 'additive'"),
    (["--granularity", "letter"], "error: --granularity: unknown value 'letter'"),
    (["--granularity", "custom"], "error: --delimiter: granularity 'custom' needs a non-empty delimiter"),
    (["--granularity", "word", "--spans", "0:3"], "error: --spans: spans are only allowed with granularity 'spans'"),
    (["--spans", "0-3"], "error: --spans: expected START:LENGTH"),
    (["--spans", "0:3:4"], "error: --spans: expected START:LENGTH"),
    (["--target-granularity", "word"], "error: --target-granularity: unknown value 'word'"),
    (["--postprocessing", "cube"], "error: --postprocessing: unknown value 'cube'"),
    (["--search", "greedy"], "error: --search: unknown value 'greedy'"),
    (["--budget", "8"], "error: --budget: is only used with search 'hierarchical'"),
    (["--search", "hierarchical", "--budget", "1"], "error: --budget: must be at least 2 forward passes"),
    (["--backend", "hf"], "error: --backend: invalid choice: 'hf'"),
    (["--max-tokens", "3"], "error: --max-tokens: only used when --target is omitted"),
    (["--unknown-flag"], "error: unrecognized arguments: --unknown-flag"),
])
def test_bad_option_exits_2_with_one_line_naming_it(capsys, base, extra, expected):
    code, out, err = run(capsys, *base, *extra)
    assert code == 2 and out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(expected), err


def test_missing_required_options_and_empty_prompt(capsys, tmp_path):
    code, _, err = run(capsys, "explain", "--prompt", "x")
    assert code == 2 and err.count("\n") == 1 and "--model" in err
    code, _, err = run(capsys, "explain", "--model", str(tmp_path), "--prompt", "", "--target", "y")
    assert code == 2 and err == "error: --prompt: must not be empty\n"
    code, _, err = run(capsys, "explain", "--model", str(tmp_path), "--prompt", "x", "--max-tokens", "0")
    assert code == 2 and err == "error: --max-tokens: must be > 0, got 0\n"


def test_missing_model_directory_is_one_clear_line(capsys, tmp_path):
    missing = tmp_path / "nope"
    code, _, err = run(capsys, "explain", "--model", str(missing), "--prompt", "x", "--target", "y")
    assert code == 2 and err == f"error: --model: no such directory: {missing}\n"


def test_command_registry(capsys, monkeypatch):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and all(name in out for name in ("explain", "serve", "eval"))
    code, _, err = run(capsys)
    assert code == 2 and "usage" in err
    code, _, err = run(capsys, "explane")
    assert code == 2 and err == "error: unknown command 'explane'; expected one of: explain, serve, eval, view, doctor\n"
    monkeypatch.setitem(cli.COMMANDS, "serve", ("atman_vllm.no_such_module", "run the service"))
    code, _, err = run(capsys, "serve", "--port", "1")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("error: the 'serve' command is unavailable: cannot import atman_vllm.no_such_module")
    code, out, _ = run(capsys, "explain", "--help")
    assert code == 0 and "--target-granularity" in out


def test_render_explanation_shows_heatmap_and_top_units():
    model = LinearToyExplainer({5: 1.0, 2: 0.25, 7: 2.0})
    result = model.explain("Ben likes to eat burgers and", " fries and", granularity="word", target_granularity="token")
    buf = io.StringIO()
    console = Console(file=buf, width=100, color_system="truecolor", force_terminal=True)
    render_explanation(result, console)
    text = buf.getvalue()
    plain_text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert "Ben likes to eat burgers and" in plain_text
    assert "\x1b[30;48;2;214;96;77mburgers" in text  # the top unit: the full warm end of the scale
    text = plain_text
    assert "target token 0: ' fries'" in text and "target token 1: ' and'" in text
    assert "'burgers'" in text and "+2.3026" in text  # top unit: -log(0.1) for " burgers"
    plain = io.StringIO()
    render_explanation(ExplainResult.from_dict(CONTRACT_EXAMPLE), Console(file=plain, width=100))
    assert "'Ben'" in plain.getvalue() and "+0.1200" in plain.getvalue() and "7 forward passes" in plain.getvalue()


def test_parallel_arguments_reach_the_engine(base):
    """explain passes vLLM's parallel arguments on (issue 16); serve takes all of vLLM's, DP included."""
    from atman_vllm.cli.engine_args import engine_kwargs
    from atman_vllm.cli.explain import build_parser as explain_parser

    args = explain_parser().parse_args(base[1:] + ["--tensor-parallel-size", "2", "--distributed-executor-backend", "mp"])
    kw = engine_kwargs(args)
    assert kw["tensor_parallel_size"] == 2 and kw["distributed_executor_backend"] == "mp"
    assert "pipeline_parallel_size" not in engine_kwargs(explain_parser().parse_args(base[1:]))

    from atman_server.cli import _engine_args, build_parser as serve_parser

    parser = serve_parser()
    given = _engine_args(parser, parser.parse_args(["--data-parallel-size", "2", "--tensor-parallel-size", "2"]))
    assert given["data_parallel_size"] == 2 and given["tensor_parallel_size"] == 2
