"""``atman-vllm view result.json -o result.html``: the /ui page for a saved result, no server needed.

The input is the JSON contract (``--json`` of explain, the body of
``POST /v1/explain``'s reply, ``ExplainResult.to_dict()``); the output is one
self-contained HTML file that works offline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from atman_vllm.core import ExplainResult

from .parser import OneLineParser, UsageError, run_command


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="atman-vllm view", description="Write the explanation page for a saved result.")
    p.add_argument("result", help="a result as JSON (the contract of explain --json and POST /v1/explain); - for stdin")
    p.add_argument("-o", "--output", required=True, help="HTML file to write; - for stdout")
    return p


def load_result(source: str) -> ExplainResult:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"result: cannot read {source}: {e.strerror}") from None
    try:
        return ExplainResult.from_dict(json.loads(text))
    except json.JSONDecodeError as e:
        raise UsageError(f"result: {source} is not JSON ({e})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        # from_dict reads every field the page shows, so a result it accepts renders.
        raise UsageError(f"result: {source} is not an explanation result ({type(e).__name__}: {e})") from None


def run(args: argparse.Namespace) -> int:
    from atman_vllm.view import page_html

    page = page_html(load_result(args.result))
    if args.output == "-":
        sys.stdout.write(page)
    else:
        Path(args.output).write_text(page, encoding="utf-8")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, run)
