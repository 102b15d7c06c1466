"""The ``atman-vllm`` console script: ``atman-vllm COMMAND [options]``.

Each command is a module imported only when used (so ``explain`` never pays
for the service's imports and a missing optional part fails only its own
command). A command module exposes ``main(argv: list[str]) -> int``; to add
one, add a line to ``COMMANDS``.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Sequence

# name -> (module with main(argv) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "explain": ("atman_vllm.cli.explain", "explain why a model produces a target text"),
    "serve": ("atman_server.cli", "run the explanation service (gRPC, optional OpenAI-compatible HTTP)"),
    "eval": ("atman_vllm.quality.cli", "measure explanation quality on a labelled data set"),
    "view": ("atman_vllm.cli.view", "write the explanation page (HTML) for a saved JSON result"),
    "doctor": ("atman_vllm.cli.doctor", "show what AtMan runs on here and self-test the plugin's seams"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: atman-vllm COMMAND [options]   (atman-vllm COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if not argv:
        print(_usage(), file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; expected one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    # vLLM logs to stdout by default; keep stdout for results (--json output).
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        print(f"error: the '{name}' command is unavailable: cannot import {module_name} ({e})", file=sys.stderr)
        return 1
    return int(module.main(rest) or 0)


def console_main() -> None:
    """The console script. The result is printed and flushed before exiting;
    then the process exits directly: vLLM's engine threads can abort the
    interpreter's own teardown ("terminate called without an active
    exception"), which would turn a finished command into exit status -6."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
