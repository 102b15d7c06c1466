"""``atman-vllm explain``: explain one target (or a generated one) from the command line.

Options are checked before the model is loaded, so a typo costs nothing;
the backend is imported only here, so the core and the CLI stay light.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from atman_vllm.core import ExplainOptions, InvalidRequestError, make_options

from .engine_args import add_engine_arguments, engine_kwargs
from .parser import OneLineParser, UsageError, run_command

DEFAULT_MAX_TOKENS = 16


def number(text: str) -> int | float:
    """An int when written as one, so errors echo the value as typed ("got -1", not "got -1.0")."""
    try:
        return int(text)
    except ValueError:
        return float(text)  # ValueError -> argparse: "--factor: invalid number value: 'x'"


def parse_spans(text: str) -> tuple[tuple[int, int], ...]:
    """'0:3,10:5' -> ((0, 3), (10, 5))."""
    try:
        spans = tuple(tuple(int(x) for x in part.split(":")) for part in text.split(","))
    except ValueError:
        spans = ()
    if not spans or any(len(s) != 2 for s in spans):
        raise UsageError(f"--spans: expected START:LENGTH[,START:LENGTH...], got {text!r}")
    return spans  # type: ignore[return-value]


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="atman-vllm explain", description="Explain why a model produces a target text (AtMan).")
    p.add_argument("--model", required=True, help="model directory (config, weights, tokenizer) or a prepared model's name: smollm2-135m-instruct")
    p.add_argument("--prompt", required=True)
    p.add_argument("--target", help="text to explain; omitted: the model's greedy continuation")
    p.add_argument("--max-tokens", type=int, help=f"tokens to generate when --target is omitted (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--backend", choices=["vllm", "reference"], default="vllm")
    p.add_argument("--granularity", help="token|word|sentence|paragraph|custom|spans|auto (default auto)")
    p.add_argument("--delimiter", help="unit separator for --granularity custom")
    p.add_argument("--spans", type=parse_spans, help='explicit units as "START:LENGTH,..." character ranges')
    p.add_argument("--target-granularity", help="complete|token (default complete)")
    p.add_argument("--factor", type=number, help="suppression factor (default 0.1)")
    p.add_argument("--mode", help="log-additive|multiplicative (default log-additive)")
    p.add_argument("--kappa", type=number, help="correlated suppression threshold in [0, 1] (default off)")
    p.add_argument("--postprocessing", help="none|absolute|square (default none)")
    p.add_argument("--normalize", action="store_true", help="min-max scale each explanation to [0, 1]")
    p.add_argument("--search", help="exhaustive|hierarchical (default exhaustive): hierarchical scores paragraphs, "
                                    "then refines the strongest down to the granularity")
    p.add_argument("--budget", type=int, help="forward passes of --search hierarchical (default 32)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (the service's contract)")
    add_engine_arguments(p)
    return p


def _option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def options_from_args(args: argparse.Namespace) -> ExplainOptions:
    given = {
        name: getattr(args, name)
        for name in ("factor", "mode", "kappa", "granularity", "delimiter", "spans", "target_granularity", "postprocessing",
                     "search", "budget")
        if getattr(args, name) is not None
    }
    if args.normalize:
        given["normalize"] = True
    try:
        return make_options(None, **given).validated()
    except InvalidRequestError as e:
        raise UsageError(f"{_option_name(e.field)}: {e.message}") from None


def load_backend(name: str, model_dir: str, engine_args: dict | None = None) -> Any:
    if name == "reference":
        from atman_vllm.reference import ReferenceExplainer

        return ReferenceExplainer(model_dir)
    from atman_vllm.api import AtmanLLM

    return AtmanLLM(model=model_dir, **(engine_args or {}))


def run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    for name in ("prompt", "target"):
        if getattr(args, name) == "":
            raise UsageError(f"--{name}: must not be empty")
    if args.target is not None and args.max_tokens is not None:
        raise UsageError("--max-tokens: only used when --target is omitted")
    if args.max_tokens is not None and args.max_tokens <= 0:
        raise UsageError(f"--max-tokens: must be > 0, got {args.max_tokens}")
    from atman_vllm.models.registry import PreparedModelError, resolve_model

    try:
        args.model = resolve_model(args.model)  # a prepared model's name -> its directory (built on first use)
    except PreparedModelError as e:
        print(f"error: --model: {e}", file=sys.stderr)
        return 1
    if not os.path.isdir(args.model):
        raise UsageError(f"--model: no such directory: {args.model}")

    try:
        backend = load_backend(args.backend, args.model, engine_kwargs(args))
    except ImportError as e:
        print(f"error: --backend {args.backend}: unavailable ({e})", file=sys.stderr)
        return 1
    try:
        # No --target: the greedy completion's own token ids are explained.
        result = backend.explain(args.prompt, args.target, options,
                                 max_tokens=args.max_tokens or DEFAULT_MAX_TOKENS)
    except InvalidRequestError as e:
        raise UsageError(f"{_option_name(e.field)}: {e.message}") from None
    finally:
        # Stop the engine's processes now: they hold this process's stdout open.
        getattr(backend, "shutdown", lambda: None)()

    if args.json:
        sys.stdout.write(json.dumps(result.to_dict(), ensure_ascii=False, indent=2) + "\n")
    else:
        from rich.console import Console

        from .render import render_explanation

        render_explanation(result, Console())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, run)
