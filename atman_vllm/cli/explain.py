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


def read_images(paths: Sequence[str]) -> list:
    """The --image files decoded and checked (before any model loads), as core ``PromptImage``s."""
    if not paths:
        return []
    from atman_vllm.imaging import prompt_image

    out = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                out.append(prompt_image(f.read(), "image"))
        except OSError as e:
            raise UsageError(f"--image: cannot read {path}: {e.strerror}") from None
        except InvalidRequestError as e:
            raise UsageError(f"--image: {path} {e.message}") from None
    return out


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="atman-vllm explain", description="Explain why a model produces a target text (AtMan).")
    p.add_argument("--model", required=True, help="model directory (config, weights, tokenizer) or a model's name: "
                   "smollm2-135m-instruct, tiny-shapes-vlm")
    p.add_argument("--prompt", required=True, help="the prompt; with --image, put the model's image placeholder "
                                                   "(<image> for Idefics3) where each image goes, or none: the "
                                                   "images then come first")
    p.add_argument("--image", action="append", metavar="FILE", help="an image of the prompt (repeatable, in order)")
    p.add_argument("--image-granularity", help="token|word|sentence|paragraph: image tiles (default: as --granularity)")
    p.add_argument("--heatmap", metavar="OUT.png", help="write the image tiles' relevance over the images as a PNG")
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
                     "search", "budget", "image_granularity")
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
        from atman_vllm.vllm.engine_config import model_type

        if model_type(model_dir) == "idefics3":
            from atman_vllm.reference.vlm import ReferenceVLMExplainer

            return ReferenceVLMExplainer(model_dir)
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
    images = read_images(args.image or [])
    if args.heatmap and not images:
        raise UsageError("--heatmap: draws the relevance of image tiles; give --image")
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
        prompt = args.prompt
        if images:
            images = backend.prompt_images(images)  # decoded and checked (field "images")
            placeholder = backend.vision.placeholder
            if placeholder not in prompt:  # no placeholder: the images come first, in order
                prompt = placeholder * len(images) + prompt
        # No --target: the greedy completion's own token ids are explained.
        result = backend.explain(prompt, args.target, options, images=images,
                                 max_tokens=args.max_tokens or DEFAULT_MAX_TOKENS)
    except InvalidRequestError as e:
        name = "--image" if e.field.startswith("images") else _option_name(e.field)
        raise UsageError(f"{name}: {e.message}") from None
    finally:
        # Stop the engine's processes now: they hold this process's stdout open.
        getattr(backend, "shutdown", lambda: None)()

    if args.heatmap:
        from atman_vllm.view import save_heatmap

        save_heatmap(result, [im.data for im in images], args.heatmap)
    if args.json:
        sys.stdout.write(json.dumps(result.to_dict(), ensure_ascii=False, indent=2) + "\n")
    else:
        from rich.console import Console

        from .render import render_explanation

        render_explanation(result, Console())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, run)
