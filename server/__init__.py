"""The AtMan service (import name ``atman_server``): gRPC and the OpenAI-compatible
HTTP API on one vLLM engine. Entry point: ``atman-vllm serve`` (``atman_server.cli``).
See docs/service.md."""
