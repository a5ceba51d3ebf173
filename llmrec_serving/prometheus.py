"""Prometheus metrics of the gateway, on a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Request, queue and adapter metrics (``llmrec_*``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llmrec_requests",
            "Requests answered, by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "llmrec_request_seconds",
            "Request latency, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "llmrec_rejected", "Requests refused by admission (429/503).", ["status"], registry=r
        )
        self.cancelled = Counter(
            "llmrec_cancelled", "Requests whose client went away mid-work.", ["route"], registry=r
        )
        self.queue_waiting = Gauge("llmrec_queue_waiting", "Requests waiting.", registry=r)
        self.queue_running = Gauge("llmrec_queue_running", "Requests running.", registry=r)
        self.adapter_hits = Counter(
            "llmrec_adapter_cache_hits", "Requests whose adapter was already loaded.", registry=r
        )
        self.adapter_loads = Counter(
            "llmrec_adapter_loads", "Adapters loaded into the engine (cold).", registry=r
        )
        self.adapter_load_seconds = Histogram(
            "llmrec_adapter_load_seconds",
            "Validate + load time of one adapter.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.adapter_evictions = Counter(
            "llmrec_adapter_evictions",
            "Adapters unloaded (lru, superseded, stale, forgotten: the user was deleted, "
            "moved: back on their first engine).",
            ["reason"],
            registry=r,
        )
        self.adapter_rejected = Counter(
            "llmrec_adapter_rejected", "Stored adapters that failed validation.", registry=r
        )
        self.adapters_loaded = Gauge(
            "llmrec_adapters_loaded",
            "Adapters currently loaded, by engine.",
            ["engine"],
            registry=r,
        )
        self.engine_up = Gauge(
            "llmrec_engine_up",
            "1 while the engine answers its health check.",
            ["engine"],
            registry=r,
        )
        self.engine_requests = Counter(
            "llmrec_engine_requests", "Requests sent to each engine.", ["engine"], registry=r
        )
        self.engine_adapters = Gauge(
            "llmrec_engine_adapter",
            "1 for each adapter an engine holds (user ids pseudonymized, as in the logs).",
            ["engine", "adapter"],
            registry=r,
        )
        self.served = Counter(
            "llmrec_served", "Requests by adapter kind (user, shared, base).", ["kind"], registry=r
        )
        self.items = Counter(
            "llmrec_recommended_items", "Catalog items returned by recommendations.", registry=r
        )
