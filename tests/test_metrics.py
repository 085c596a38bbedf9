"""Prometheus metrics: every known labelled series exists, at 0, from the start."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from stream_server import transport
from stream_server.limits import FairShare
from stream_server.metrics import BATCH_KINDS, KINDS, REJECTION_REASONS, SPECULATION_OUTCOMES, Metrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(metrics: Metrics) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }


def test_every_known_labelled_series_exists_at_zero_before_any_event() -> None:
    """A new Metrics has each speculation outcome, refusal reason and per-kind series at 0, so which of
    them happened first (a matter of timing) never decides whether a series exists."""
    s = samples(Metrics())
    for outcome in SPECULATION_OUTCOMES:
        assert s[("stream_speculative_finals_total", (("outcome", outcome),))] == 0
    for reason in REJECTION_REASONS:
        assert s[("stream_sessions_rejected_total", (("reason", reason),))] == 0
    for kind in KINDS:
        assert s[("stream_queue_depth", (("kind", kind),))] == 0
    for kind in BATCH_KINDS:
        assert s[("stream_batch_size_count", (("kind", kind),))] == 0
        assert s[("stream_inference_seconds_count", (("kind", kind),))] == 0
        assert s[("stream_queue_wait_seconds_count", (("kind", kind),))] == 0
        assert s[("stream_engine_busy_seconds_total", (("kind", kind),))] == 0


def test_the_transport_uses_no_label_value_left_out_of_the_initial_series() -> None:
    """Every literal label value the transport gives these series, and the fair-share refusal reasons,
    is among those created up front."""
    source = Path(transport.__file__).read_text()

    def literals(metric: str) -> set[str]:
        return set(re.findall(rf'\.{metric}\.labels\("([a-z_]+)"', source))

    assert literals("speculations") and literals("speculations") <= set(SPECULATION_OUTCOMES)
    rejected = literals("sessions_rejected")
    assert rejected and rejected <= set(REJECTION_REASONS), rejected - set(REJECTION_REASONS)
    assert literals("queue_depth") <= set(KINDS)
    fair = FairShare(max_per_ip=1, max_per_key=1)
    fair.open("192.0.2.1", "a")
    by_ip, by_key = fair.refusal("192.0.2.1", None), fair.refusal("192.0.2.2", "a")
    assert by_ip is not None and by_key is not None
    assert {by_ip.reason, by_key.reason} <= set(REJECTION_REASONS)


def test_a_batch_of_speculative_finals_is_not_labelled_a_final() -> None:
    """Engine calls are labelled by what they were: speculative finals (which may be wasted) apart
    from finals, interims apart from both."""
    from stream_server.batcher import BatchReport

    metrics = Metrics()
    report = BatchReport(size=1, interim=False, audio_s=2.0, inference_s=0.5, queue_wait_s=0.0, failed=False)
    metrics.record_batch(replace(report, speculative=1))
    metrics.record_batch(report)
    metrics.record_batch(replace(report, size=2, speculative=1))  # mixed: it carries a final
    metrics.record_batch(replace(report, interim=True))
    s = samples(metrics)
    assert s[("stream_batch_size_count", (("kind", "speculative"),))] == 1
    assert s[("stream_batch_size_count", (("kind", "final"),))] == 2
    assert s[("stream_batch_size_count", (("kind", "interim"),))] == 1
