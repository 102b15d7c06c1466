"""``atman-vllm serve``: the gRPC service (and optionally the OpenAI-compatible
HTTP API) on one vLLM engine.

Every vLLM engine argument (``--max-model-len``, ``--block-size``,
``--enforce-eager``, ``--dtype``, ...) is accepted as vLLM spells it; only the
ones given on the command line are passed on, so the library's own defaults
hold for the rest.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from atman_vllm.api import DEFAULT_EXPLAIN_PRIORITY

from .limits import (
    DEFAULT_FORK_TOKENS_IN_FLIGHT,
    DEFAULT_MAX_CONCURRENT_EXPLAINS,
    DEFAULT_MAX_GENERATE_TOKENS,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_UNITS,
    PROMPT_CHARS_PER_TOKEN,
)
from .runner import ServeConfig, run

AUTH_TOKEN_ENV = "ATMAN_AUTH_TOKEN"
GIB = 2**30


def default_model_dir() -> Path:
    import atman_vllm

    return Path(atman_vllm.__file__).resolve().parent / "models" / "default"


def _service_arguments(parser: argparse.ArgumentParser) -> None:
    net = parser.add_argument_group("network and security")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to bind (default %(default)s: loopback only; 0.0.0.0 exposes the service)")
    net.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (0: any free port)")
    net.add_argument("--openai", action="store_true",
                     help="also serve vLLM's OpenAI-compatible HTTP API and POST /v1/explain")
    net.add_argument("--http-port", type=int, default=8000, help="HTTP port with --openai (0: any free port)")
    net.add_argument("--metrics-port", type=int, default=None,
                     help="serve Prometheus /metrics on this port (with --openai they are also at the HTTP /metrics)")
    net.add_argument("--auth-token", default=None,
                     help=f"require 'authorization: Bearer TOKEN' on every call (or set {AUTH_TOKEN_ENV}); "
                          "health checks and /metrics stay open")
    net.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain; enables TLS on gRPC and HTTP")
    net.add_argument("--tls-key", type=Path, default=None, help="PEM private key for --tls-cert")

    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-explain-tokens", type=int, default=None,
                        help="prompt + target tokens per explain (default: the engine's max model length)")
    limits.add_argument("--max-units", type=int, default=DEFAULT_MAX_UNITS,
                        help="units (perturbations) per explain (default %(default)s)")
    limits.add_argument("--max-concurrent-explains", type=int, default=DEFAULT_MAX_CONCURRENT_EXPLAINS,
                        help="explains running at once; more are refused with RESOURCE_EXHAUSTED / HTTP 429 "
                             "(default %(default)s)")
    limits.add_argument("--max-generate-tokens", type=int, default=DEFAULT_MAX_GENERATE_TOKENS,
                        help="max_tokens per Generate call (default %(default)s)")
    limits.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                        help="request/response size limit, gRPC messages and HTTP bodies (default %(default)s)")
    limits.add_argument("--max-prompt-chars", type=int, default=None,
                        help="characters of a prompt or target, checked before tokenizing (default: "
                             f"{PROMPT_CHARS_PER_TOKEN} x --max-explain-tokens)")

    misc = parser.add_argument_group("service")
    misc.add_argument("--kv-cache-space-gib", type=float, default=None,
                      help="KV-cache size in GiB (sets vLLM's kv_cache_memory_bytes)")
    misc.add_argument("--explain-priority", type=int, default=DEFAULT_EXPLAIN_PRIORITY,
                      help="vLLM scheduling priority of an explanation's forks; generation runs at 0 and lower "
                           "values go first, so the default %(default)s keeps explanations from delaying "
                           "generation (needs vLLM's --scheduling-policy priority, the default here)")
    misc.add_argument("--fork-tokens-in-flight", type=int, default=DEFAULT_FORK_TOKENS_IN_FLIGHT,
                      help="token positions all explanations' forks may have in the engine at once, so they "
                           "cannot crowd generation out of each step (0: no cap; default %(default)s)")
    misc.add_argument("--grace-period", type=float, default=30.0,
                      help="seconds running calls get to finish after SIGTERM (default %(default)s)")
    misc.add_argument("--log-prompts", action="store_true",
                      help="include prompt text in the per-call log line (off: prompts are never logged)")
    misc.add_argument("--chat-template", default=None,
                      help="chat template (file or inline Jinja) for /v1/chat/completions")


def build_parser():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(
        prog="atman-vllm serve",
        description="Serve AtMan explanations and generation from one vLLM engine over gRPC "
                    "(and the OpenAI-compatible HTTP API with --openai).")
    _service_arguments(parser)
    parser = AsyncEngineArgs.add_cli_args(parser)
    parser.set_defaults(model=None)
    return parser


def _engine_args(parser, args) -> dict:
    """The vLLM engine arguments given explicitly on the command line."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    engine_fields = set(AsyncEngineArgs.__dataclass_fields__) - {"model"}
    given = {name: getattr(args, name) for name in engine_fields
             if hasattr(args, name) and getattr(args, name) != parser.get_default(name)}
    if args.kv_cache_space_gib is not None:
        given["kv_cache_memory_bytes"] = int(args.kv_cache_space_gib * GIB)
    return given


def _resolve_model(model: str | None) -> str:
    if model:
        from atman_vllm.models.registry import resolve_model

        return resolve_model(model)  # a prepared model's name ("smollm2-135m-instruct") -> its directory
    default = default_model_dir()
    if not (default / "config.json").exists():
        raise SystemExit(f"atman-vllm serve: the embedded default model is not built yet ({default} has no "
                         "config.json); pass --model DIR")
    return str(default)


def main(argv: list[str] | None = None) -> int:
    # vLLM logs to stdout by default; stdout carries only the "ready" line (before vLLM is imported).
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    config = ServeConfig(
        model=_resolve_model(args.model),
        engine_args=_engine_args(parser, args),
        host=args.host,
        grpc_port=args.grpc_port,
        openai=args.openai,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        max_explain_tokens=args.max_explain_tokens,
        max_units=args.max_units,
        max_concurrent_explains=args.max_concurrent_explains,
        max_generate_tokens=args.max_generate_tokens,
        max_message_bytes=args.max_message_bytes,
        max_prompt_chars=args.max_prompt_chars,
        explain_priority=args.explain_priority,
        fork_tokens_in_flight=args.fork_tokens_in_flight,
        auth_token=args.auth_token or os.environ.get(AUTH_TOKEN_ENV) or None,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        grace_s=args.grace_period,
        log_prompts=args.log_prompts,
        chat_template=args.chat_template,
    )
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
