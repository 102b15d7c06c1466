"""Prometheus metrics of the AtMan service, beside vLLM's own.

They live in prometheus_client's default registry, which is the one vLLM's
``/metrics`` route exports in ``--openai`` mode (single API process); with
gRPC only, ``--metrics-port`` serves the same registry.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250)


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.explain_requests = Counter(
            "atman_explain_requests", "Explain calls by transport and final status",
            ["transport", "status"], registry=registry)
        self.explain_forks = Counter(
            "atman_explain_forks", "Forward passes (forks) run for explain calls", registry=registry)
        self.explain_computed_tokens = Counter(
            "atman_explain_computed_tokens", "Token positions computed for explain calls", registry=registry)
        self.explain_cached_tokens = Counter(
            "atman_explain_cached_tokens", "Token positions served from the prefix cache for explain calls",
            registry=registry)
        self.explain_latency = Histogram(
            "atman_explain_latency_seconds", "Wall time of successful explain calls",
            buckets=_LATENCY_BUCKETS, registry=registry)
        self.explains_in_flight = Gauge(
            "atman_explains_in_flight", "Explain calls running now (the explain queue depth)", registry=registry)
        self.generate_requests = Counter(
            "atman_generate_requests", "Generate calls by final status", ["status"], registry=registry)
        self.generated_tokens = Counter(
            "atman_generated_tokens", "Tokens streamed by Generate", registry=registry)
