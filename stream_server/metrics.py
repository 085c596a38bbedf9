"""Prometheus metrics (``GET /metrics``), one registry per server so tests can run several in a process.

Every name starts with ``stream_``; the process collector adds ``process_resident_memory_bytes`` and
friends, and on CUDA a collector reads ``torch.cuda.memory_reserved/allocated`` and NVML's used memory at
scrape time (README, "Observability").
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .batcher import BatchReport

logger = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)

# The label values each labelled series is created with, at 0, when Metrics() is built: a dashboard or a
# test sees every series from the start, not only once the first such event happened (which one
# happens first may depend on timing). Values outside these (a new refusal reason...) still work; they
# appear on first use. tests/test_metrics.py checks that the transport uses no literal left out here.
KINDS = ("final", "interim")
"""Queues."""
BATCH_KINDS = ("final", "speculative", "interim")
"""Engine calls: a batch of speculative finals only is ``speculative`` (it may be wasted), not ``final``."""
SPECULATION_OUTCOMES = ("used", "wasted", "refused")
WEBHOOK_OUTCOMES = ("delivered", "retried", "rejected", "failed", "dropped")
"""How a webhook delivery ended (``webhook.py``); ``retried`` counts each retry."""
REJECTION_REASONS = (
    "twilio_signature",
    "not_found",
    "draining",
    "not_ready",
    "bad_request",
    "unauthorized",
    "origin",
    "max_sessions",
    "per_ip",
    "per_key",
    "capacity",
)


class GpuMemoryCollector(Collector):
    """Reads GPU memory at scrape time; absent GPU or NVML is normal and reported as nothing."""

    def __init__(self, device_index: int) -> None:
        self.device_index = device_index
        self._nvml_handle: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml_handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception as exc:  # NVMLError_LibraryNotFound and friends: no NVML here
            logger.debug("NVML unavailable: %s", exc)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            import torch

            reserved = float(torch.cuda.memory_reserved(self.device_index))
            allocated = float(torch.cuda.memory_allocated(self.device_index))
            peak = float(torch.cuda.max_memory_reserved(self.device_index))
        except Exception:
            return
        yield GaugeMetricFamily(
            "stream_gpu_memory_reserved_bytes", "torch.cuda.memory_reserved", value=reserved
        )
        yield GaugeMetricFamily(
            "stream_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated", value=allocated
        )
        yield GaugeMetricFamily(
            "stream_gpu_memory_max_reserved_bytes", "torch.cuda.max_memory_reserved", value=peak
        )
        if self._nvml_handle is not None:
            try:
                import pynvml

                info = pynvml.nvmlDeviceGetMemoryInfo(self._nvml_handle)
                yield GaugeMetricFamily(
                    "stream_gpu_nvml_used_bytes", "device memory used, from NVML", value=float(info.used)
                )
            except Exception as exc:
                logger.debug("NVML read failed: %s", exc)


class Metrics:
    """Every instrument the server updates."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        self.sessions_active = Gauge("stream_sessions_active", "Open WebSocket streams", registry=r)
        self.event_loop_tasks = Gauge(
            "stream_event_loop_tasks", "Tasks alive on the server's event loop (leak check)", registry=r
        )
        self.sessions_total = Counter(
            "stream_sessions_total", "Streams by how they ended", ["outcome"], registry=r
        )
        self.sessions_rejected = Counter(
            "stream_sessions_rejected_total", "Handshakes refused", ["reason"], registry=r
        )
        # Key names only, never keys: the label's values are bounded by the configured keys.
        self.auth_accepted = Counter(
            "stream_auth_accepted_total",
            "Stream handshakes let in by credentials, by key name and method (key: an API key, token: a "
            "grant token from that key)",
            ["key", "method"],
            registry=r,
        )
        self.auth_failures = Counter(
            "stream_auth_failures_total",
            "Requests refused for their credentials or their Origin (stream handshakes and grants), by "
            "reason: the refusal's code in lower case",
            ["reason"],
            registry=r,
        )
        self.auth_grants = Counter(
            "stream_auth_grants_total",
            "Grant tokens issued, by the name of the key that asked",
            ["key"],
            registry=r,
        )
        self.audio_seconds = Counter("stream_audio_seconds_total", "Seconds of audio received", registry=r)
        self.segments_finalized = Counter(
            "stream_segments_finalized_total", "Final transcripts sent", registry=r
        )
        self.segment_errors = Counter(
            "stream_segment_errors_total", "Segments answered with an Error instead of a final", registry=r
        )
        self.interims_sent = Counter("stream_interims_sent_total", "Interim results sent", registry=r)
        self.speculations = Counter(
            "stream_speculative_finals_total",
            "Finals started during the trailing pause, by outcome: used as the final, wasted because "
            "speech resumed, or refused because the model was busy",
            ["outcome"],
            registry=r,
        )
        self.interims_skipped = Counter(
            "stream_interims_skipped_total", "Interim requests skipped under load", registry=r
        )
        self.client_errors = Counter(
            "stream_client_errors_total", "Error events sent to clients", ["code"], registry=r
        )
        self.queue_depth = Gauge("stream_queue_depth", "Requests waiting for the model", ["kind"], registry=r)
        self.batch_size = Histogram(
            "stream_batch_size", "Requests per model call", ["kind"], buckets=BATCH_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "stream_inference_seconds",
            "Wall time of one model call",
            ["kind"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "stream_queue_wait_seconds",
            "Time the oldest request of a batch waited",
            ["kind"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_failures = Counter(
            "stream_batch_failures_total", "Model calls that raised or timed out", registry=r
        )
        self.engine_timeouts = Counter(
            "stream_engine_timeouts_total",
            "Model calls that ran past engine_call_timeout_s (their segments failed; the worker was held "
            "until the call returned)",
            registry=r,
        )
        self.aborted_calls = Counter(
            "stream_engine_aborted_calls_total",
            "Model calls stopped while running because no one wanted their answers any more (a "
            "speculative final whose speaker resumed)",
            registry=r,
        )
        self.final_latency_seconds = Histogram(
            "stream_final_latency_seconds",
            "From the arrival of the audio that closed a segment to its final being sent "
            "(end-of-speech latency adds the endpointing silence)",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.real_time_factor = Gauge(
            "stream_real_time_factor", "Inference seconds per audio second, last batch", ["kind"], registry=r
        )
        self.model_ready = Gauge("stream_model_ready", "1 once the model is loaded and warm", registry=r)
        self.engine_busy_seconds = Counter(
            "stream_engine_busy_seconds_total",
            "Worker-seconds spent in model calls, by kind (divide by the workers for utilization)",
            ["kind"],
            registry=r,
        )
        self.engine_workers = Gauge("stream_engine_workers", "Model calls that may run at once", registry=r)
        self.capacity_sessions = Gauge(
            "stream_capacity_sessions",
            "Typical conversational streams the server can serve at the latency target (measured speed)",
            registry=r,
        )
        self.capacity_sessions_left = Gauge(
            "stream_capacity_sessions_left",
            "Typical streams it can still admit now (0: new streams get 503); route and autoscale on it",
            registry=r,
        )
        self.capacity_load = Gauge(
            "stream_capacity_load_ratio",
            "The open streams' demand over what meets the latency target (1 = at capacity)",
            registry=r,
        )
        self.engine_utilization = Gauge(
            "stream_engine_utilization",
            "Share of the servers' time in calls for finals (speculative ones included) over the last minute",
            registry=r,
        )
        self.engine_call_seconds = Gauge(
            "stream_engine_call_seconds",
            "The speed model: seconds of one call = fixed + per_audio_second x audio seconds",
            ["term"],
            registry=r,
        )
        self.spooled_bytes = Gauge(
            "stream_spooled_bytes",
            "Audio read from fast clients and waiting on disk for the model (all streams)",
            registry=r,
        )
        self.calls_active = Gauge("stream_calls_active", "Twilio calls streaming now", registry=r)
        self.call_subscribers = Gauge(
            "stream_call_subscribers", "Sockets following a live call (/v1/calls/{callSid})", registry=r
        )
        self.twilio_input_errors = Counter(
            "stream_twilio_input_errors_total",
            "Twilio messages skipped (media before start, unknown event, bad base64...) by code",
            ["code"],
            registry=r,
        )
        self.twilio_gap_seconds = Counter(
            "stream_twilio_gap_seconds_total",
            "Silence filled in for lost Twilio media chunks (from their timestamps)",
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "stream_webhook_deliveries_total", "Webhook deliveries by outcome", ["outcome"], registry=r
        )
        self.webhook_queued = Gauge(
            "stream_webhook_queued", "Webhook deliveries waiting or in flight", registry=r
        )
        self.subscribers_dropped = Counter(
            "stream_call_subscribers_dropped_total",
            "Call subscribers cut because they read too slowly",
            registry=r,
        )

        for kind in KINDS:
            self.queue_depth.labels(kind)
        for outcome in WEBHOOK_OUTCOMES:
            self.webhook_deliveries.labels(outcome)
        for kind in BATCH_KINDS:
            for per_kind in (
                self.batch_size,
                self.inference_seconds,
                self.queue_wait_seconds,
                self.engine_busy_seconds,
            ):
                per_kind.labels(kind)
        for outcome in SPECULATION_OUTCOMES:
            self.speculations.labels(outcome)
        for reason in REJECTION_REASONS:
            self.sessions_rejected.labels(reason)

    def watch_gpu(self, device_index: int) -> None:
        """Add the GPU memory collector (call once, when the engine runs on CUDA)."""
        self.registry.register(GpuMemoryCollector(device_index))

    def record_batch(self, report: BatchReport) -> None:
        if report.interim:
            kind = "interim"
        elif report.size and report.speculative == report.size:
            kind = "speculative"
        else:
            kind = "final"
        self.engine_busy_seconds.labels(kind).inc(report.inference_s)
        self.batch_size.labels(kind).observe(report.size)
        self.inference_seconds.labels(kind).observe(report.inference_s)
        self.queue_wait_seconds.labels(kind).observe(report.queue_wait_s)
        if report.audio_s > 0:
            self.real_time_factor.labels(kind).set(report.inference_s / report.audio_s)
        if report.failed:
            self.batch_failures.inc()
        if report.aborted:
            self.aborted_calls.inc()
        if report.timed_out:
            self.engine_timeouts.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
