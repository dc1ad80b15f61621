"""The predictor's Prometheus metrics, exported on ``/metrics`` next to KServe's own
``request_*_seconds``.

They are process-wide (Prometheus' default registry, which KServe's ``/metrics`` serves),
so they are defined once, here; the Grafana dashboard in ``manifests/`` reads exactly
these names and labels (``tests/test_manifests.py`` holds the two together).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUEST_LATENCY = Histogram(
    "ldm_request_latency_seconds",
    "Time from request parsed to response encoded, by sampler",
    ["sampler"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
SAMPLES_GENERATED = Counter("ldm_samples_generated_total", "Volumes generated", ["sampler"])
IN_FLIGHT = Gauge("ldm_requests_in_flight", "Requests generating right now")
QUEUED = Gauge("ldm_requests_queued", "Requests waiting for a generation slot")
REJECTED = Counter(
    "ldm_requests_rejected_total",
    "Requests refused or failed, by reason (invalid, busy, timeout, out_of_memory, error)",
    ["reason"],
)
