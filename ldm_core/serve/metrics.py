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
BATCH_SAMPLES = Histogram(
    "ldm_batch_samples",
    "Samples denoised together in one loop (serving.max_batch_size caps it)",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
)
BATCH_REQUESTS = Histogram(
    "ldm_batch_requests",
    "Requests sharing one denoising loop (1 = a request ran alone)",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
)
OUTPUT_SUMMARY = Histogram(
    "ldm_output_summary",
    "Per generated volume: mean_intensity, foreground_fraction, detail ([0, 1] scale)",
    ["measure"],
    buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1),
)
OUTPUT_REFERENCE = Gauge(
    "ldm_output_reference",
    "The training set's value of each output measure (from bundle.json's reference)",
    ["measure"],
)
