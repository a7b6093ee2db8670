"""The server's Prometheus metrics (prometheus-client), on a registry of their own so that two servers in
one process (tests, Ray replicas) never share counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

OUTCOMES = ("completed", "invalid", "cancelled", "rejected", "timed_out", "failed")


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llada_requests", "Completion requests (chat and text) by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.queue_depth = Gauge("llada_queue_depth", "Requests waiting for a batch row", registry=r)
        self.batch_rows = Gauge("llada_batch_rows", "Rows in the running batch (all groups)", registry=r)
        self.denoiser_calls = Counter("llada_denoiser_calls", "Denoiser calls by kind", ["kind"], registry=r)
        for kind in ("full", "cached"):
            self.denoiser_calls.labels(kind)
        self.step_seconds = Histogram("llada_step_seconds", "Wall time of one denoising step of a group",
                                      buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.queue_seconds = Histogram("llada_queue_seconds", "Time from arrival to a batch row",
                                       buckets=(.001, .01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.completion_tokens = Counter("llada_completion_tokens", "Answer tokens returned", registry=r)
        self.tokens_per_second = Gauge("llada_tokens_per_second",
                                       "Answer tokens per second of the running batch over its last step", registry=r)
        self.image_cache = Counter("llada_image_cache", "Image-embedding cache lookups", ["result"], registry=r)
        for result in ("hit", "miss"):
            self.image_cache.labels(result)

    def finished(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def admitted(self, waits: list[float]) -> None:
        for wait in waits:
            self.queue_seconds.observe(wait)

    def stepped(self, seconds: float, calls: dict[str, int], committed: int) -> None:
        self.step_seconds.observe(seconds)
        self.denoiser_calls.labels("full").inc(calls["full_forwards"])
        self.denoiser_calls.labels("cached").inc(calls["cached_forwards"])
        self.tokens_per_second.set(committed / seconds if seconds > 0 else 0.0)

    def tokens(self, count: int) -> None:
        self.completion_tokens.inc(count)

    def image_lookups(self, hits: int, misses: int) -> None:
        self.image_cache.labels("hit").inc(hits)
        self.image_cache.labels("miss").inc(misses)

    def text(self) -> bytes:
        return generate_latest(self.registry)
