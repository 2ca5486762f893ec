"""Prometheus metrics of the server, in a registry of its own (two apps in one process never share counters)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class CacheCollector:
    """The engine's cache hit counts, read when scraped."""

    def __init__(self, stats: Callable[[], dict[str, dict[str, int]]]):
        self.stats = stats

    def collect(self):
        stats = self.stats()
        for cache in ("image_features", "prefix"):
            for kind in ("hits", "misses"):
                family = CounterMetricFamily(f"llava_next_{cache}_cache_{kind}", f"{cache} cache {kind}")
                family.add_metric([], stats[cache][kind])
                yield family
        family = CounterMetricFamily("llava_next_prefix_cache_reused_tokens",
                                     "prompt tokens taken from the prefix cache")
        family.add_metric([], stats["prefix"].get("reused_tokens", 0))
        yield family


class ServerMetrics:
    def __init__(self, running: Callable[[], float], waiting: Callable[[], float],
                 cache_stats: Callable[[], dict[str, dict[str, int]]] | None):
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("llava_next_requests_running", "sequences holding a KV row (prefilling or decoding)",
              registry=r).set_function(running)
        Gauge("llava_next_requests_waiting", "sequences queued for a KV row", registry=r).set_function(waiting)
        self.requests = Counter("llava_next_requests", "finished requests by HTTP status", ["status"], registry=r)
        self.prompt_tokens = Counter("llava_next_prompt_tokens", "prompt tokens of answered requests", registry=r)
        self.generated_tokens = Counter("llava_next_generated_tokens", "tokens generated", registry=r)
        self.time_to_first_token = Histogram("llava_next_time_to_first_token_seconds",
                                             "from a request's arrival to its first token", buckets=LATENCY_BUCKETS,
                                             registry=r)
        self.time_per_output_token = Histogram("llava_next_time_per_output_token_seconds",
                                               "decoding time per token after the first, per request",
                                               buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.request_seconds = Histogram("llava_next_request_seconds", "whole request time",
                                         buckets=LATENCY_BUCKETS, registry=r)
        if cache_stats is not None:
            r.register(CacheCollector(cache_stats))

    def text(self) -> bytes:
        return generate_latest(self.registry)
