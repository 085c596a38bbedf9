"""Admission from measured capacity (README, "Capacity and admission"). Pure: no I/O, no clock of its own.

The server admits a stream only when it can serve it within ``target_latency_ms`` (end of speech to
final, endpointing included) without hurting the streams it already serves. Three things are measured
and kept up to date:

- **the engine's speed**, :class:`SpeedModel`: an engine call of ``x`` seconds of audio takes
  ``a + b·x`` seconds on one worker, fitted by exponentially weighted least squares, seeded by a
  calibration at start-up (:func:`calibration_clips`) and refitted from every final batch the server
  runs; plus the observed spread of final call times;
- **each stream's demand**: seconds of speech it finalized and finals it produced per second over the
  last ``window_s``; a stream counts at least as a *typical* conversational stream (``speech_ratio`` of
  speech in segments of ``segment_s``) until it has been open ``min_history_s``, and at least the
  typical stream after that too, so a quiet stream keeps its seat for when it speaks;
- **the servers' busy time**: the share of time calls for finals ran (speculative ones included,
  wasted or not); once the server has run ``min_history_s``, the open streams use at least that, which
  catches what the streams' finals alone leave out;
- **the finals' own latency** (segment close to final sent), as the check on the model.

Workers whose threads share the cores (the ONNX default: every worker may use every core) are one
*server*: their calls overlap and slow each other, so the queue is modelled with one server at the
speed of a lone call, and the busy time is the union of the calls' intervals.

The streams' demand, in worker-seconds per second, divided by the workers is the load ``ρ``. How much
load meets the target comes from a queueing estimate: finals arrive at random, are served by ``c``
workers with the measured mean and spread of call times, and 95 % of finals must have their wait plus
their own call within the time the target leaves after the endpointing silence (or, with speculative
finals, after the speculation point: the model starts then). The wait's tail is Erlang C with Kingman's
correction for the call-time spread::

    P(wait > t) ≈ C(c, cρ) · exp(-2·c·(1 - ρ)·t / (s̄·(1 + cs²)))

and a final of call time ``s`` is late when its wait exceeds ``budget - s``, so the share of late finals
is that tail averaged over the call times (the measured ones of the window, or the prior's: exponential
segment lengths). ``ρ_max`` is the largest ρ at which waiting makes at most 5 % more finals late than an
idle server would (a segment whose call alone outlasts the budget is late whatever the load, and no
refusal helps it); a new stream is admitted when the load with it stays under ``ρ_max``, and while the
finals' measured p95 wait for a worker stays within what the budget leaves after a median call.
Interims are not counted: they are shed first under load (README, "Batching and scheduling").
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CapacitySettings:
    """What admission aims at and assumes about a new stream.

    Attributes:
        workers: engine calls that run at once on cores of their own: the engine's workers, or fewer
            when their threads share the cores (two workers of two threads on two cores count as one
            server whose calls sometimes overlap).
        admission: refuse streams beyond capacity (false: only report it).
        target_latency_s: end of speech to final, endpointing included.
        endpointing_s: the server's default endpointing silence (the part of the target the model
            cannot use).
        speculative_s: when speculative finals start (0: off); the model may then start this long into
            the pause instead of at its end.
        vad_lag_s: how much later than the true end of speech the VAD starts counting the pause (the
            default VAD's p95 on real recordings, ``load_tests/vad_lag.py``: 180 ms); the target spends it.
        speculation_waste: calls per final spent on speculative finals whose speaker resumed, before
            anything is measured (about 0.4-0.7 were measured at 200 ms on recorded conversation; the
            measured busy time replaces this once the server has run ``min_history_s``).
        speech_ratio: share of a typical stream's time that is speech (a two-party conversation: 0.5).
        segment_s: mean length of a typical stream's segments.
        max_segment_s: no segment is longer (the session core cuts it).
        quantile: the share of finals that must meet the target (0.95).
        min_history_s: a stream's own demand counts once it has been open this long.
        window_s: window of the streams' demand, the call times and the finals' latency.
    """

    workers: int = 1
    admission: bool = True
    target_latency_s: float = 1.0
    endpointing_s: float = 0.5
    speculative_s: float = 0.2
    vad_lag_s: float = 0.18
    speculation_waste: float = 0.5
    speech_ratio: float = 0.5
    segment_s: float = 3.0
    max_segment_s: float = 20.0
    quantile: float = 0.95
    min_history_s: float = 30.0
    window_s: float = 60.0

    @property
    def enabled(self) -> bool:
        return self.admission

    @property
    def model_budget_s(self) -> float:
        """Time the target leaves for waiting and the model call."""
        head_start = (
            self.endpointing_s - self.speculative_s if 0 < self.speculative_s < self.endpointing_s else 0
        )
        return self.target_latency_s - self.endpointing_s - self.vad_lag_s + head_start

    @property
    def final_budget_s(self) -> float:
        """Time the target leaves from the segment's close (after the endpointing silence) to its final:
        what the finals' measured latency is held to."""
        return max(0.0, self.target_latency_s - self.endpointing_s - self.vad_lag_s)


class SpeedModel:
    """``seconds = a + b · audio_s`` for one engine call on one worker, by exponentially weighted least
    squares (each new observation weighs ``1 / (1 - decay)`` times the oldest kept one's)."""

    def __init__(self, *, decay: float = 0.99) -> None:
        self.decay = decay
        self._n = self._sx = self._sy = self._sxx = self._sxy = 0.0
        self.observations = 0

    def observe(self, audio_s: float, seconds: float) -> None:
        """One engine call: its audio and how long it took."""
        d = self.decay
        self._n = d * self._n + 1
        self._sx = d * self._sx + audio_s
        self._sy = d * self._sy + seconds
        self._sxx = d * self._sxx + audio_s * audio_s
        self._sxy = d * self._sxy + audio_s * seconds
        self.observations += 1

    @property
    def coefficients(self) -> tuple[float, float]:
        """``(a, b)``: fixed seconds per call and seconds per second of audio (both >= 0)."""
        if self._n <= 0:
            return 0.0, 0.0
        mean_x, mean_y = self._sx / self._n, self._sy / self._n
        var_x = self._sxx / self._n - mean_x * mean_x
        if var_x <= 1e-9:  # every call the same length: all of it per second
            return 0.0, max(0.0, mean_y / mean_x) if mean_x > 0 else 0.0
        b = (self._sxy / self._n - mean_x * mean_y) / var_x
        b = max(0.0, b)
        a = max(0.0, mean_y - b * mean_x)
        return a, b

    def call_s(self, audio_s: float) -> float:
        """Predicted seconds of one call on ``audio_s`` seconds of audio."""
        a, b = self.coefficients
        return a + b * audio_s


def calibration_clips(max_audio_s: float) -> list[float]:
    """Clip lengths to time at start-up: short, typical and long segments (each run twice)."""
    lengths = [1.0, 2.0, 4.0, 8.0]
    return [x for x in lengths if x <= max_audio_s] or [max_audio_s]


@dataclass(frozen=True)
class CapacityState:
    """What :meth:`CapacityModel.state` reports (``/health``, ``/metrics``, the admission decision).

    Attributes:
        sessions: streams open, counted in transcribed channels (an N-channel stream counts N).
        capacity_sessions: typical (one-channel) streams the server can hold at the target (open ones
            included).
        sessions_left: typical streams it can still admit (an N-channel stream needs N).
        load: the open streams' demand as a share of ``max_load`` (1.0 = at capacity).
        demand: the open streams' demand in worker-seconds per second.
        max_load: ``ρ_max``, the utilization at which finals still meet the target.
        utilization: the share of the servers' time spent on finals over the last window (measured).
        final_p95_s: 95th percentile of segment close to final over the window, None before 20 finals.
        call_s: the speed model's ``(a, b)``.
        typical_demand: a typical stream's demand, worker-seconds per second.
        accepting: a new stream would be admitted now.
        reason: why not, when not.
    """

    sessions: int
    capacity_sessions: int
    sessions_left: int
    load: float
    demand: float
    max_load: float
    utilization: float
    final_p95_s: float | None
    call_s: tuple[float, float]
    typical_demand: float
    accepting: bool
    reason: str


class _Stream:
    __slots__ = ("finals", "opened_s", "weight")

    def __init__(self, opened_s: float, weight: int = 1) -> None:
        self.opened_s = opened_s
        self.weight = weight  # channels transcribed: an N-channel stream is N streams of load
        self.finals: deque[tuple[float, float]] = deque()  # (when, audio seconds)


class CapacityModel:
    """The engine's speed, the open streams' demand and the finals' latency, and what they allow.

    Args:
        settings: the target and the typical stream.
        speed: the engine's speed model (a fresh one by default).
    """

    MIN_SAMPLES = 20
    """Observed call times and latencies count once there are this many in the window."""

    def __init__(self, settings: CapacitySettings, speed: SpeedModel | None = None) -> None:
        self.settings = settings
        self.speed = speed or SpeedModel()
        self._streams: dict[Hashable, _Stream] = {}
        self._calls: deque[tuple[float, float, float]] = deque()  # (when, audio seconds, seconds)
        self._last_close_s: float | None = None
        self._max_load_cache: tuple[tuple[float, ...], float] | None = None
        self._busy: deque[tuple[float, float]] = deque()  # (when it ended, seconds) of calls for finals
        self._latencies: deque[tuple[float, float]] = deque()  # (when, close -> final seconds)
        self._waits: deque[tuple[float, float]] = deque()  # (when, seconds a final call waited to start)
        self._started_s: float | None = None

    # -- Inputs -------------------------------------------------------------------------------------

    def calibrate(self, samples: Sequence[tuple[float, float]]) -> None:
        """Seed the speed model with start-up timings: ``(audio seconds, call seconds)`` pairs."""
        for audio_s, seconds in samples:
            self.speed.observe(audio_s, seconds)

    def observe_call(
        self,
        now_s: float,
        *,
        audio_s: float,
        seconds: float,
        size: int,
        interim: bool,
        aborted: bool = False,
        queue_wait_s: float = 0.0,
    ) -> None:
        """An engine call finished (the batcher's report). Interims are not counted (they are shed
        first); speculative finals are, wasted or not. An aborted call's time counts as busy time but
        says nothing about the engine's speed."""
        self._mark(now_s)
        if interim or size < 1:
            return
        self._busy.append((now_s, seconds))
        if aborted:
            return
        self._waits.append((now_s, queue_wait_s))
        self.speed.observe(audio_s, seconds)
        self._calls.append((now_s, audio_s, seconds))  # each final of a batch waits for the whole call

    def observe_latency(self, now_s: float, seconds: float) -> None:
        """A final left: ``seconds`` from its segment's close."""
        self._latencies.append((now_s, seconds))

    def open(self, key: Hashable, now_s: float, weight: int = 1) -> None:
        """A stream was admitted; ``weight``: the channels it transcribes (each one is a typical
        stream's worth of load)."""
        self._mark(now_s)
        self._streams[key] = _Stream(now_s, weight)

    def reweigh(self, key: Hashable | None, weight: int) -> None:
        """An open stream turned out to transcribe ``weight`` channels (a Twilio call learns its tracks
        after it was admitted)."""
        stream = self._streams.get(key) if key is not None else None
        if stream is not None:
            stream.weight = weight

    def close(self, key: Hashable, now_s: float | None = None) -> None:
        """A stream ended (at ``now_s``: the busy time measured before then held its work, so it no
        longer bounds what the streams still open use)."""
        if self._streams.pop(key, None) is not None and now_s is not None:
            self._last_close_s = now_s

    def observe_final(self, key: Hashable, now_s: float, audio_s: float) -> None:
        """A stream's segment of ``audio_s`` seconds was finalized."""
        stream = self._streams.get(key)
        if stream is not None:
            stream.finals.append((now_s, audio_s))

    # -- Estimates ----------------------------------------------------------------------------------

    def typical_demand(self) -> float:
        """Worker-seconds per second of a typical stream: its finals' arrival rate times their call time,
        plus the speculation that speech overtakes (when speculative finals are on)."""
        s = self.settings
        rate = s.speech_ratio / s.segment_s
        waste = s.speculation_waste if s.speculative_s > 0 else 0.0
        return rate * self.speed.call_s(s.segment_s) * (1 + waste)

    def stream_demand(self, key: Hashable, now_s: float) -> float:
        """A stream's demand: what it used over the window, at least a typical stream's."""
        stream = self._streams.get(key)
        typical = self.typical_demand()
        if stream is None:
            return typical
        typical *= stream.weight
        self._trim(stream.finals, now_s)
        age_s = now_s - stream.opened_s
        if age_s < self.settings.min_history_s or not stream.finals:
            return typical
        span_s = min(age_s, self.settings.window_s)
        used = sum(self.speed.call_s(audio_s) for _, audio_s in stream.finals) / span_s
        return max(typical, used)

    PRIOR_POINTS = 40
    """Quantiles of the prior's segment lengths that stand for its call times."""

    def service_stats(self, now_s: float) -> tuple[float, float, tuple[float, ...]]:
        """Mean call seconds, squared coefficient of variation, and the call times of finals: measured
        over the window when there are enough, else the speed model's over the prior's segment lengths."""
        self._trim(self._calls, now_s)
        if len(self._calls) >= self.MIN_SAMPLES:
            times = tuple(sorted(seconds for _, _, seconds in self._calls))
            mean = sum(times) / len(times)
            var = sum((t - mean) ** 2 for t in times) / len(times)
            return mean, (var / (mean * mean) if mean > 0 else 1.0), times
        s = self.settings
        # Segments of a conversation have roughly exponential lengths (standard deviation = mean, p95
        # about three means), so the call time's spread is the per-second part's share of it.
        a, b = self.speed.coefficients
        mean = a + b * s.segment_s
        cv2 = (b * s.segment_s / mean) ** 2 if mean > 0 else 1.0
        k = self.PRIOR_POINTS
        lengths = (min(-s.segment_s * math.log(1 - (i + 0.5) / k), s.max_segment_s) for i in range(k))
        return mean, cv2, tuple(self.speed.call_s(x) for x in lengths)

    def max_load(self, now_s: float) -> float:
        """ρ_max: the highest utilization at which the target quantile of finals meets the target
        (recomputed only when the call times it depends on have changed: it runs at every handshake)."""
        mean_s, cs2, calls = self.service_stats(now_s)
        key = (mean_s, cs2, len(calls), calls[0] if calls else 0.0, calls[-1] if calls else 0.0)
        if self._max_load_cache is not None and self._max_load_cache[0] == key:
            return self._max_load_cache[1]
        value = max_utilization(
            workers=self.settings.workers,
            mean_service_s=mean_s,
            service_cv2=cs2,
            wait_budget_s=self.settings.model_budget_s,
            quantile=self.settings.quantile,
            service_times_s=calls,
        )
        self._max_load_cache = (key, value)
        return value

    def utilization(self, now_s: float, since_s: float | None = None) -> float:
        """Measured share of the servers' time in calls for finals (speculative ones included, wasted or
        not) over the window (or since ``since_s``, when later): with one server, the share of time at
        least one call ran; with several, the calls' seconds over the servers' time. 0 in the first
        second."""
        s = self.settings
        self._trim(self._busy, now_s)
        span = min(s.window_s, now_s - (self._started_s if self._started_s is not None else now_s))
        if since_s is not None:
            span = min(span, now_s - since_s)
        if span <= 1:
            return 0.0
        start = now_s - span
        if s.workers > 1:
            return min(1.0, sum(min(x, end - start) for end, x in self._busy) / (span * s.workers))
        # One server whose calls may overlap: the union of the calls' intervals.
        busy = 0.0
        reach = start
        for begin, end in sorted((max(start, end - x), end) for end, x in self._busy):
            if end > reach:
                busy += end - max(begin, reach)
                reach = end
        return min(1.0, busy / span)

    def state(self, now_s: float, weight: int = 1) -> CapacityState:
        """Everything admission and the endpoints report, now, for admitting a stream of ``weight``
        channels (``accepting`` only when that many typical streams still fit)."""
        s = self.settings
        typical = self.typical_demand()
        utilization = self.utilization(now_s)
        # What the open streams use: each one's finals (at least a typical stream), or what the servers
        # were measured to be busy with, when more (it also holds wasted speculation).
        demand = sum(self.stream_demand(key, now_s) for key in self._streams)
        # Only busy time since the last stream closed: before, the servers also worked for streams that
        # are gone (right after a burst ends, that would refuse the next streams for a whole window).
        since = self._last_close_s
        measured_s = self._history_s(now_s) if since is None else now_s - since
        if self._streams and measured_s >= s.min_history_s:
            demand = max(demand, self.utilization(now_s, since) * s.workers)
        open_weight = sum(stream.weight for stream in self._streams.values())
        per_stream = max(typical, demand / open_weight) if self._streams else typical
        rho_max = self.max_load(now_s)
        budget = rho_max * s.workers
        if per_stream > 0:
            capacity = max(1, int(budget / per_stream + 1e-9))
            left = max(0, int((budget - demand) / per_stream + 1e-9))
        else:  # not calibrated: nothing known, nothing refused
            capacity, left = 1_000_000, 1_000_000
        if not self._streams and left < weight:
            left = weight  # one stream is always served, even when the target is out of reach
        p95 = self.final_p95(now_s)
        wait_p95 = self._p95(self._waits, now_s)
        wait_budget = self.wait_budget_s(now_s)
        reason = ""
        if left < weight:
            reason = f"the open streams use {demand:.2f} of {budget:.2f} worker-seconds per second"
            if weight > 1:
                reason += f" (room for {left} channel(s), {weight} asked)"
        elif wait_p95 is not None and wait_p95 > wait_budget and self._streams:
            reason = (
                f"finals wait too long for the model: p95 {wait_p95:.2f} s (budget {wait_budget:.2f} s; "
                f"p95 from segment close to final {p95 if p95 is not None else math.nan:.2f} s)"
            )
        return CapacityState(
            sessions=open_weight,
            capacity_sessions=capacity,
            sessions_left=left if not reason else 0,
            load=demand / budget if budget > 0 else math.inf,
            demand=demand,
            max_load=rho_max,
            utilization=utilization,
            final_p95_s=p95,
            call_s=self.speed.coefficients,
            typical_demand=typical,
            accepting=not reason or not s.enabled,
            reason=reason if s.enabled else "",
        )

    def final_p95(self, now_s: float) -> float | None:
        """95th percentile of close-to-final latency over the window (None before enough finals)."""
        return self._p95(self._latencies, now_s)

    def wait_p95(self, now_s: float) -> float | None:
        """95th percentile of how long final calls waited for a worker (None before enough)."""
        return self._p95(self._waits, now_s)

    def wait_budget_s(self, now_s: float) -> float:
        """How long a final may wait for the model: what the budget leaves after a typical (median)
        call, at least 50 ms."""
        _, _, calls = self.service_stats(now_s)
        median = sorted(calls)[len(calls) // 2] if calls else 0.0
        return max(0.05, self.settings.model_budget_s - median)

    def _p95(self, window: deque[tuple[float, float]], now_s: float) -> float | None:
        self._trim(window, now_s)
        if len(window) < self.MIN_SAMPLES:
            return None
        values = sorted(x for _, x in window)
        return values[min(len(values) - 1, int(math.ceil(0.95 * len(values))) - 1)]

    # -- Internals ----------------------------------------------------------------------------------

    def _history_s(self, now_s: float) -> float:
        return now_s - self._started_s if self._started_s is not None else 0.0

    def _mark(self, now_s: float) -> None:
        if self._started_s is None:
            self._started_s = now_s

    def _trim(self, window: deque[Any], now_s: float) -> None:
        while window and window[0][0] < now_s - self.settings.window_s:
            window.popleft()


def erlang_c(workers: int, offered: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with ``offered = λ/μ`` (< workers)."""
    if offered <= 0:
        return 0.0
    if offered >= workers:
        return 1.0
    term = 1.0
    total = 1.0  # k = 0
    for k in range(1, workers):
        term *= offered / k
        total += term
    last = term * offered / workers * workers / (workers - offered)  # A^c / c! * c / (c - A)
    return last / (total + last)


def wait_tail(*, workers: int, rho: float, mean_service_s: float, service_cv2: float, t_s: float) -> float:
    """P(wait > t): Erlang C with Kingman's correction for the spread of service times."""
    if rho >= 1:
        return 1.0
    if t_s < 0:
        return 1.0
    c = erlang_c(workers, rho * workers)
    rate = 2 * workers * (1 - rho) / (mean_service_s * (1 + service_cv2)) if mean_service_s > 0 else math.inf
    return c * math.exp(-rate * t_s)


UNREACHABLE_SHARE = 0.5
"""When more finals than this are late on an idle server, the target is out of reach (ρ_max = 0)."""


def late_share(
    *,
    workers: int,
    rho: float,
    mean_service_s: float,
    service_cv2: float,
    budget_s: float,
    service_times_s: Sequence[float] | np.ndarray[Any, np.dtype[np.float64]],
) -> float:
    """Share of finals whose wait plus own call time exceeds ``budget_s``: the wait's tail at
    ``budget_s - s`` averaged over the call times ``s``."""
    if len(service_times_s) == 0:
        return 0.0
    if rho >= 1:
        return 1.0
    # wait_tail(t) for every call time at once: Erlang C and the decay rate do not depend on the call
    # (this runs at every handshake, 50 times per bisection, over a minute of calls: issue 8 measured
    # 52 ms per admission decision when it looped in Python).
    t = budget_s - np.asarray(service_times_s, dtype=np.float64)
    c = erlang_c(workers, rho * workers)
    if mean_service_s > 0:
        rate = 2 * workers * (1 - rho) / (mean_service_s * (1 + service_cv2))
        tails = np.where(t < 0, 1.0, c * np.exp(-rate * np.maximum(t, 0.0)))
    else:  # no service time: nobody waits past zero
        tails = np.where(t < 0, 1.0, np.where(t > 0, 0.0, c))
    return float(tails.mean())


def max_utilization(
    *,
    workers: int,
    mean_service_s: float,
    service_cv2: float,
    wait_budget_s: float,
    quantile: float,
    service_times_s: Sequence[float] = (0.0,),
) -> float:
    """The largest utilization at which waiting makes at most ``1 - quantile`` more finals late than on
    an idle server, a final being late when it waits longer than ``wait_budget_s`` minus its own call
    time (``service_times_s``: the calls' spread of lengths; by default the budget is for the wait
    alone). Calls longer than the budget on their own are late at any load and are not held against it;
    but when more than ``UNREACHABLE_SHARE`` of them are, the target is out of reach: 0."""
    allowed = 1 - quantile
    times = np.asarray(service_times_s, dtype=np.float64)  # once, not once per step of the bisection

    def late(rho: float) -> float:
        return late_share(
            workers=workers,
            rho=rho,
            mean_service_s=mean_service_s,
            service_cv2=service_cv2,
            budget_s=wait_budget_s,
            service_times_s=times,
        )

    lo, hi = 0.0, 0.999
    idle = late(0.0)
    if idle > UNREACHABLE_SHARE:
        return 0.0  # most finals are late even on an idle server: the target is out of reach
    allowed += idle  # what is late on an idle server no admission can help: only waiting counts
    if late(hi) <= allowed:
        return hi
    for _ in range(30):  # to 1e-9 of the utilization
        mid = (lo + hi) / 2
        if late(mid) <= allowed:
            lo = mid
        else:
            hi = mid
    return lo
