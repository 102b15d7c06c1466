"""``atman-vllm eval``: measure explanation quality on a labelled QA set.

    atman-vllm eval                          # shipped demo model, 100 facts-task examples
    atman-vllm eval --squad dev.json --model DIR --n 200
    atman-vllm eval --methods atman grad-x-input random --granularities sentence

Writes ``quality.json``, ``quality.md`` and ``examples.html`` (the top units of
each method highlighted per example) to ``--out``, and prints the table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from .baselines import BASELINES
from .harness import DEFAULT_MODEL_DIR, GRANULARITIES, METHODS, evaluate, markdown_table, write_outputs
from .tasks import DEMO_ASKS, generate_examples, load_squad

DEFAULT_N = 100
EVAL_SEED = 20_260_101  # the facts task's evaluation documents; the demo model never trained on this stream


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atman-vllm eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR),
                   help="model directory or a prepared model's name, e.g. smollm2-135m-instruct "
                        "(default: the shipped demo model)")
    p.add_argument("--squad", default=None, help="SQuAD-format JSON file (default: the generated facts task)")
    p.add_argument("--n", type=int, default=DEFAULT_N, help=f"number of examples (default {DEFAULT_N})")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="facts-task seed (and the random baseline's)")
    p.add_argument("--asks", nargs="+", default=list(DEMO_ASKS), choices=("value", "entity"),
                   help="facts task: what the questions ask for (default: value, the demo task; "
                        "'entity' adds 'Who lives in Lisbon?')")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                   help="methods to run (default: all): " + ", ".join(METHODS))
    p.add_argument("--granularities", nargs="+", default=list(GRANULARITIES), choices=list(GRANULARITIES),
                   help="prompt units to score (default: token sentence)")
    p.add_argument("--backend", choices=("vllm", "reference"), default="vllm",
                   help="AtMan backend: the vLLM engine (default) or plain transformers")
    p.add_argument("--out", default="quality-eval", help="output directory (default ./quality-eval)")
    p.add_argument("--html-examples", type=int, default=20, help="examples shown in examples.html")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the baselines")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.n <= 0:
        print(f"error: --n: must be > 0, got {args.n}", file=sys.stderr)
        return 2
    from atman_vllm.models.registry import PreparedModelError, resolve_model

    try:
        args.model = resolve_model(args.model)  # a prepared model's name -> its directory (built on first use)
    except PreparedModelError as e:
        print(f"error: --model: {e}", file=sys.stderr)
        return 1
    if not os.path.isdir(args.model):
        print(f"error: --model: no such directory: {args.model}", file=sys.stderr)
        return 2
    if args.squad:
        if not os.path.isfile(args.squad):
            print(f"error: --squad: no such file: {args.squad}", file=sys.stderr)
            return 2
        examples = load_squad(args.squad, limit=args.n)
        data_name = f"squad:{Path(args.squad).name}"
        if not examples:
            print(f"error: --squad: no answerable questions in {args.squad}", file=sys.stderr)
            return 2
    else:
        examples = generate_examples(args.n, seed=args.seed, asks=tuple(args.asks))
        data_name = "facts"
    # The bench extra's packages, by the methods that need them.
    needs = {"captum": {m for m in args.methods if m in BASELINES and BASELINES[m].needs_captum},
             "sklearn": {m for m in args.methods if m.startswith("contextcite")}}
    for module, methods in needs.items():
        if not methods:
            continue
        try:
            __import__(module)
        except ImportError:
            print(f"error: --methods {' '.join(sorted(methods))} need {module} "
                  "(pip install 'atman-vllm[bench]')", file=sys.stderr)
            return 1
    report = evaluate(examples, model_dir=args.model, methods=args.methods, granularities=args.granularities,
                      backend=args.backend, seed=args.seed, data_name=data_name,
                      progress=not args.no_progress, threads=args.threads)
    paths = write_outputs(report, args.out, args.html_examples)
    print(markdown_table(report))
    print("\n" + "\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
