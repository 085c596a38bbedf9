"""Admission from measured capacity, on a controlled clock: the speed model, the queueing estimate, the
streams' demand and the latency feedback."""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Sequence

import pytest

from stream_server.capacity import (
    CapacityModel,
    CapacitySettings,
    SpeedModel,
    calibration_clips,
    erlang_c,
    late_share,
    max_utilization,
    wait_tail,
)
from stream_server.engines.base import TranscribeRequest, Transcript
from stream_server.transport import capacity_servers, measure_engine_speed
from tests.fakes import FakeEngine

SETTINGS = CapacitySettings(
    workers=1,
    target_latency_s=1.0,
    endpointing_s=0.5,
    speculative_s=0.2,
    vad_lag_s=0.0,
    speculation_waste=0.0,
)
CALIBRATION = [(x, 0.02 + 0.03 * x) for x in (1.0, 2.0, 4.0, 8.0)] * 2
"""A model taking 20 ms + 30 ms per second of audio (ONNX int8 on 2 cores is about 0.06 s/s)."""


def model(settings: CapacitySettings = SETTINGS) -> CapacityModel:
    m = CapacityModel(settings)
    m.calibrate(CALIBRATION)
    return m


def test_speed_model_fits_fixed_and_per_second_cost_and_follows_change() -> None:
    """Noiseless calls give back a and b exactly; when the engine slows down, the fit follows."""
    speed = SpeedModel(decay=0.9)
    for x in (1.0, 3.0, 5.0, 10.0):
        speed.observe(x, 0.05 + 0.04 * x)
    a, b = speed.coefficients
    assert (a, b) == (pytest.approx(0.05), pytest.approx(0.04))
    for _ in range(100):  # twice as slow now (another process took a core)
        for x in (1.0, 5.0):
            speed.observe(x, 2 * (0.05 + 0.04 * x))
    assert speed.call_s(5.0) == pytest.approx(2 * (0.05 + 0.2), rel=0.02)


def test_equal_lengths_put_all_cost_per_second_and_nothing_is_negative() -> None:
    """With one clip length a and b are not separable: b carries it all; a and b never go negative."""
    speed = SpeedModel()
    speed.observe(4.0, 0.4)
    speed.observe(4.0, 0.4)
    assert speed.coefficients == (0.0, pytest.approx(0.1))
    odd = SpeedModel()
    odd.observe(1.0, 0.5)
    odd.observe(10.0, 0.1)  # longer was faster: noise
    a, b = odd.coefficients
    assert a >= 0 and b >= 0


def test_erlang_c_and_the_wait_tail_have_their_textbook_values() -> None:
    """One server waits with probability rho; two servers at offered load 1 with 1/3; the tail shrinks
    with time and grows with load."""
    assert erlang_c(1, 0.7) == pytest.approx(0.7)
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert erlang_c(4, 0.0) == 0.0 and erlang_c(2, 2.5) == 1.0
    tail = [wait_tail(workers=1, rho=0.5, mean_service_s=0.2, service_cv2=1.0, t_s=t) for t in (0, 0.2, 0.5)]
    assert tail[0] == pytest.approx(0.5) and tail[0] > tail[1] > tail[2]
    # M/M/1: P(W > t) = rho * exp(-(1 - rho) t / s) exactly when cv2 = 1.
    assert tail[2] == pytest.approx(0.5 * math.exp(-0.5 * 0.5 / 0.2))
    assert wait_tail(workers=1, rho=0.8, mean_service_s=0.2, service_cv2=1.0, t_s=0.2) > tail[1]


def test_max_utilization_grows_with_budget_and_workers_and_is_zero_when_the_call_alone_is_too_long() -> None:
    """The allowed load rises with the wait budget and the number of workers, falls with the call time's
    spread, and is 0 for a negative budget."""

    def rho(budget: float, workers: int = 1, cv2: float = 1.0) -> float:
        return max_utilization(
            workers=workers, mean_service_s=0.2, service_cv2=cv2, wait_budget_s=budget, quantile=0.95
        )

    assert rho(-0.01) == 0.0
    assert 0 < rho(0.2) < rho(0.5) < rho(2.0) < 1
    assert rho(0.3, workers=2) > rho(0.3)
    assert rho(0.3, cv2=0.1) > rho(0.3, cv2=1.0)
    found = rho(0.3)
    tail = wait_tail(workers=1, rho=found, mean_service_s=0.2, service_cv2=1.0, t_s=0.3)
    assert tail == pytest.approx(0.05, abs=1e-3)


def test_calls_too_long_on_their_own_are_not_held_against_the_load_unless_most_are() -> None:
    """The late share averages the wait's tail over the call times. Calls longer than the budget alone
    are late at any load: the allowed load is what keeps waiting from making 5 % more finals late
    (the share at rho_max is the idle share plus 5 %). When most calls are too long, the target is out
    of reach: 0."""

    def rho(calls: list[float]) -> float:
        return max_utilization(
            workers=2,
            mean_service_s=sum(calls) / len(calls),
            service_cv2=1.0,
            wait_budget_s=0.8,
            quantile=0.95,
            service_times_s=calls,
        )

    short = [0.1] * 98
    few_long = rho(short + [1.0, 1.0])
    assert 0.5 < few_long < 1
    share = late_share(
        workers=2,
        rho=few_long,
        mean_service_s=0.118,
        service_cv2=1.0,
        budget_s=0.8,
        service_times_s=short + [1.0, 1.0],
    )
    assert share == pytest.approx(0.02 + 0.05, abs=2e-3)
    assert rho([0.5] * 98 + [1.0, 1.0]) < rho(short + [1.0, 1.0]), "longer calls, less load"
    assert rho([0.1] * 40 + [1.0] * 60) == 0.0
    # The wait budget alone (the default call times: none) allows more than budget minus a long call.
    alone = max_utilization(workers=2, mean_service_s=0.12, service_cv2=1.0, wait_budget_s=0.8, quantile=0.95)
    assert alone > few_long


def test_capacity_counts_typical_streams_and_seats_left_fall_as_streams_open() -> None:
    """Capacity is the allowed load over a typical stream's demand; every open stream takes one seat."""
    m = model()
    start = m.state(0.0)
    assert start.capacity_sessions >= 2 and start.sessions_left == start.capacity_sessions
    for k in range(start.capacity_sessions):
        m.open(k, 0.0)
    full = m.state(0.0)
    assert full.sessions_left == 0 and not full.accepting and "worker-seconds" in full.reason
    assert full.load == pytest.approx(
        start.capacity_sessions * m.typical_demand() / (full.max_load), rel=1e-6
    )
    m.close(0)
    assert m.state(0.0).accepting


def test_a_stream_that_talks_more_than_typical_counts_more_and_a_quiet_one_keeps_its_seat() -> None:
    """After min_history_s a stream's own use counts when above typical; a silent stream counts as typical."""
    m = model()
    m.open("talker", 0.0)
    m.open("quiet", 0.0)
    for t in range(0, 60, 5):  # a 5 s segment every 5 s: all speech, twice the typical 50 %
        m.observe_final("talker", float(t), 5.0)
    typical = m.typical_demand()
    assert m.stream_demand("talker", 10.0) == pytest.approx(typical), "too young to judge"
    assert m.stream_demand("talker", 59.0) > 1.8 * typical
    assert m.stream_demand("quiet", 59.0) == pytest.approx(typical)


def test_finals_waiting_too_long_stop_admission_until_they_recover() -> None:
    """When the finals' measured p95 wait for a worker exceeds what the budget leaves after a median
    call, new streams are refused; once the window has passed with prompt finals, they are admitted."""
    m = model()
    m.open("a", 0.0)
    for i in range(30):
        m.observe_call(1.0 + i * 0.1, audio_s=2.0, seconds=0.08, size=1, interim=False, queue_wait_s=0.9)
        m.observe_latency(1.0 + i * 0.1, 1.0)
    late = m.state(5.0)
    assert not late.accepting and late.sessions_left == 0 and "wait" in late.reason
    assert late.final_p95_s == pytest.approx(1.0)
    for i in range(30):
        m.observe_call(70.0 + i, audio_s=2.0, seconds=0.08, size=1, interim=False, queue_wait_s=0.01)
    assert m.state(100.0).accepting
    assert m.wait_p95(100.0) == pytest.approx(0.01)


def test_one_stream_is_served_even_when_the_target_is_out_of_reach() -> None:
    """An engine slower than the target still serves one stream at a time rather than none."""
    m = CapacityModel(SETTINGS)
    m.calibrate([(x, 0.5 + 0.5 * x) for x in (1.0, 2.0, 4.0)])
    idle = m.state(0.0)
    assert idle.max_load == 0.0 and idle.accepting and idle.sessions_left == 1
    m.open("only", 0.0)
    assert not m.state(0.0).accepting


def test_admission_off_accepts_everything_and_unknown_speed_refuses_nothing() -> None:
    """admission off turns refusals off; before any calibration nothing is refused either."""
    off = CapacityModel(CapacitySettings(admission=False))
    off.calibrate(CALIBRATION)
    for k in range(100):
        off.open(k, 0.0)
    assert off.state(0.0).accepting
    fresh = CapacityModel(SETTINGS)
    for k in range(100):
        fresh.open(k, 0.0)
    assert fresh.state(0.0).accepting


def test_measured_call_times_replace_the_prior_and_interims_do_not_count() -> None:
    """Once enough finals were timed, their mean, spread and p95 drive the estimate; interim calls are
    not counted in the speed or the utilization."""
    m = model()
    prior = m.service_stats(0.0)
    for i in range(40):
        m.observe_call(float(i), audio_s=2.0, seconds=0.08, size=1, interim=False)
        m.observe_call(float(i), audio_s=8.0, seconds=5.0, size=1, interim=True)
    mean, cv2, calls = m.service_stats(40.0)
    assert mean == pytest.approx(0.08) and cv2 == pytest.approx(0.0, abs=1e-9)
    assert calls == pytest.approx([0.08] * 40)
    assert prior[1] == pytest.approx((0.03 * 3 / (0.02 + 0.03 * 3)) ** 2)  # exponential segment lengths
    assert m.speed.call_s(8.0) < 1.0
    assert m.state(40.0).utilization == pytest.approx(40 * 0.08 / 40, rel=0.1)


def test_calibration_times_calls_in_every_worker_at_once() -> None:
    """The start-up calibration runs as many calls at once as the engine has workers (the speed that
    matters when finals queue), each length twice, and reports every call."""

    class TwoAtOnce(FakeEngine):
        def __init__(self) -> None:
            super().__init__()
            self._info = dataclasses.replace(self._info, max_concurrent_calls=2, max_audio_s=8.0)
            self.together = threading.Barrier(2, timeout=10)  # broken unless two calls run at once

        def transcribe(self, requests: Sequence[TranscribeRequest]) -> list[Transcript]:
            self.together.wait()
            return super().transcribe(requests)

    engine = TwoAtOnce()
    samples = measure_engine_speed(engine, at_once=2)
    assert [x for x, _ in samples] == [x for x in calibration_clips(8.0) for _ in range(4)]
    assert len(engine.batches) == len(samples) and all(t >= 0 for _, t in samples)


def test_workers_that_share_the_cores_are_one_server() -> None:
    """Two workers of one thread on two cores are two servers; two workers of two threads each (the
    ONNX default) share the cores and are one; one worker is one."""
    from stream_server.engines.base import EngineInfo

    def info(workers: int, threads: int) -> EngineInfo:
        return EngineInfo(
            "e", "m", "cpu", "int8", ("en",), max_concurrent_calls=workers, extras={"threads": str(threads)}
        )

    assert capacity_servers(info(2, 1), cores=2) == 2
    assert capacity_servers(info(2, 2), cores=2) == 1
    assert capacity_servers(info(4, 2), cores=8) == 4 and capacity_servers(info(4, 4), cores=8) == 2
    assert capacity_servers(info(1, 2), cores=2) == 1


def test_measured_busy_time_counts_when_the_streams_finals_leave_it_out() -> None:
    """After min_history_s, the open streams use at least what the server was measured busy with
    (wasted speculation, say): overlapping calls on one server count once, and seats fall with it."""
    m = model()
    m.open("a", 0.0)
    before = m.state(0.0)
    for i in range(60):  # a call of 0.5 s every second, two at once half the time: 50 % busy
        # 16 s of audio in 0.5 s: what the calibrated speed says, so only the busy time is news.
        m.observe_call(float(i) + 0.5, audio_s=16.0, seconds=0.5, size=1, interim=False)
        if i % 2:
            m.observe_call(float(i) + 0.5, audio_s=16.0, seconds=0.5, size=1, interim=False, aborted=True)
    m.observe_call(60.0, audio_s=5.0, seconds=3.0, size=1, interim=True)  # interims are shed: not counted
    assert m.utilization(60.0) == pytest.approx(0.5, abs=0.02)
    busy = m.state(60.0)
    assert before.sessions_left >= 2 and before.demand < 0.1
    assert busy.demand == pytest.approx(0.5, abs=0.02) and busy.sessions_left < before.sessions_left


def test_busy_time_of_streams_that_closed_does_not_refuse_the_next_ones() -> None:
    """When busy streams close, the busy time they caused no longer counts against the streams that
    open next (it did for a whole window: after a burst, the next streams were refused); once the
    new streams have run min_history_s, the busy time since the close counts again."""
    m = model()
    m.open("a", 0.0)
    for i in range(60):
        m.observe_call(float(i) + 0.5, audio_s=16.0, seconds=0.5, size=1, interim=False)
    busy = m.state(60.0)
    m.close("a", 60.0)
    m.open("b", 61.0)
    fresh = m.state(61.0)
    assert fresh.demand < busy.demand / 2 and fresh.sessions_left > busy.sessions_left
    for i in range(61, 100):
        m.observe_call(float(i) + 0.5, audio_s=16.0, seconds=0.5, size=1, interim=False)
    assert m.state(100.0).demand == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.8, 0.99, 1.0])
def test_late_share_is_the_wait_tail_averaged_over_the_call_times(rho: float) -> None:
    """The vectorized late share is the mean of wait_tail at budget minus each call time (calls longer
    than the budget are late for sure), whatever the load."""
    times = [0.05, 0.2, 0.31, 0.5, 0.79, 0.8, 1.2]
    expected = sum(
        wait_tail(workers=2, rho=rho, mean_service_s=0.3, service_cv2=0.5, t_s=0.8 - x) for x in times
    ) / len(times)
    got = late_share(
        workers=2, rho=rho, mean_service_s=0.3, service_cv2=0.5, budget_s=0.8, service_times_s=times
    )
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
