"""Argument parsing that fails with ONE line naming the option (exit code 2).

argparse's default prints the usage block and "prog: error: argument --x: ...";
scripts and people both read one line better: ``error: --x: ...``.
Every subcommand (explain, serve, eval) can use ``OneLineParser`` and
``run_command``.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Callable, Sequence

USAGE_ERROR_EXIT = 2


class UsageError(Exception):
    """A bad command line; the message starts with the option it is about."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        # "argument --factor: invalid ..." -> "--factor: invalid ..."
        raise UsageError(re.sub(r"^argument (\S+?)(/\S+)?: ", r"\1: ", message))


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                handler: Callable[[argparse.Namespace], int]) -> int:
    """Parse and run; a UsageError becomes one stderr line and exit code 2."""
    try:
        return int(handler(parser.parse_args(argv)) or 0)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR_EXIT
    except SystemExit as e:  # --help exits through argparse
        return e.code if isinstance(e.code, int) else 0
