"""The batching worker against a fake engine that records batch sizes and can raise."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace

import aiohttp
import numpy as np
import pytest

from stream_server.__main__ import build_parser, config_from_args
from stream_server.batcher import HEALTH_WINDOW_S, MAX_RESTARTS, Batcher, BatchReport
from stream_server.compat import timeout
from stream_server.config import BatchConfig, Config
from stream_server.engines.base import CallAborted, TranscribeRequest, Transcript
from stream_server.errors import BatcherClosed, BatcherFailed, ConfigError, EngineTimeout

from .conftest import scaled
from .fakes import FakeEngine
from .serving import running_server


def req(seconds: float, *, language: str = "auto", marker: float = 0.1) -> TranscribeRequest:
    audio = np.full(int(seconds * 16000), marker, dtype=np.float32)
    return TranscribeRequest(audio=audio, language=language)  # type: ignore[arg-type]


class GatedEngine(FakeEngine):
    """Calls wait until ``gate`` opens (a model busy for as long as the test wants): every call, or only
    those whose first request carries one of the ``held`` markers. ``entered`` is set once a held call
    is in, ``returned`` once one has returned.

    The wait is bounded (``scaled(10)`` s) so that a test of a defect fails instead of hanging.
    """

    def __init__(self, *, workers: int = 1, held: Sequence[float] | None = None) -> None:
        super().__init__()
        self._info = replace(self._info, max_concurrent_calls=workers)
        self.held = None if held is None else {np.float32(m) for m in held}
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.returned = threading.Event()

    def transcribe(self, requests: Sequence[TranscribeRequest]) -> list[Transcript]:
        if self.held is not None and requests[0].audio[0] not in self.held:
            return super().transcribe(requests)
        self.entered.set()
        try:
            self.gate.wait(scaled(10))
            return super().transcribe(requests)
        finally:
            self.returned.set()


class CountingEngine(FakeEngine):
    """Records the most calls in progress at once (``peak``); with ``barrier`` set, each call first waits
    there for another, so calls that do not run at the same time fail (BrokenBarrierError)."""

    def __init__(self, *, workers: int = 2, delay_s: float = 0.0) -> None:
        super().__init__(delay_s=delay_s)
        self._info = replace(self._info, max_concurrent_calls=workers)
        self.count_lock = threading.Lock()
        self.active = 0
        self.peak = 0
        self.barrier: threading.Barrier | None = None

    def transcribe(self, requests: Sequence[TranscribeRequest]) -> list[Transcript]:
        with self.count_lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            if self.barrier is not None:
                self.barrier.wait()
            return super().transcribe(requests)
        finally:
            with self.count_lock:
                self.active -= 1


class PoisonRequest(TranscribeRequest):
    """A request that breaks batch assembly (a bug outside the engine call), as a stand-in for any."""

    @property
    def batch_key(self) -> tuple[str, bool]:
        raise RuntimeError("batch assembly bug")


class ManualClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def in_thread(event: threading.Event) -> bool:
    """Wait for a threading.Event off the loop (bounded)."""
    return await asyncio.get_running_loop().run_in_executor(None, event.wait, scaled(5))


async def until(predicate: Callable[[], bool]) -> None:
    """Yield to the loop until ``predicate`` holds (bounded: the test fails rather than hangs)."""
    async with timeout(scaled(5)):
        while not predicate():
            await asyncio.sleep(0.001)


async def settle() -> None:
    """Let every callback and task that is ready run (a few loop turns; no wall-clock time)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_waiting_requests_share_one_batch() -> None:
    """Requests that arrive together are run as one batch, up to max_batch_size."""
    engine = FakeEngine(delay_s=0.05)
    batcher = Batcher(engine, BatchConfig(max_batch_size=4, max_wait_ms=50))
    batcher.start()
    results = await asyncio.gather(*(batcher.submit_final(req(1.0 + i / 10)) for i in range(10)))
    await batcher.stop()
    assert [r.text for r in results] == [f"clip {1.0 + i / 10:.2f}" for i in range(10)]
    sizes = [len(b) for b in engine.batches]
    assert sum(sizes) == 10 and max(sizes) == 4 and len(sizes) <= 4


async def test_engine_runs_off_the_event_loop_in_one_thread() -> None:
    """The engine is called from one dedicated worker thread, never the event loop's: the loop runs on
    while a call is in progress."""
    engine = GatedEngine()
    batcher = Batcher(engine, BatchConfig(max_batch_size=2, max_wait_ms=0))
    batcher.start()
    finals = [asyncio.ensure_future(batcher.submit_final(req(0.5))) for _ in range(6)]
    assert await in_thread(engine.entered)
    await settle()
    assert not engine.returned.is_set(), "the loop ran while the engine was in a call"
    engine.gate.set()
    await asyncio.wait_for(asyncio.gather(*finals), scaled(5))
    await batcher.stop()
    assert len(engine.threads) == 1 and next(iter(engine.threads)).startswith("engine")


async def test_failed_batch_fails_only_its_requests_and_worker_carries_on() -> None:
    """An engine exception reaches every request of that batch, and later batches still succeed."""
    engine = FakeEngine(fail_when=lambda r: r.language == "ja")
    batcher = Batcher(engine, BatchConfig(max_batch_size=8, max_wait_ms=20))
    batcher.start()
    outcomes = await asyncio.gather(
        batcher.submit_final(req(1, language="ja")),
        batcher.submit_final(req(1, language="ja")),
        batcher.submit_final(req(1, language="en")),
        return_exceptions=True,
    )
    assert isinstance(outcomes[0], RuntimeError) and isinstance(outcomes[1], RuntimeError)
    assert not isinstance(outcomes[2], BaseException)
    later = await batcher.submit_final(req(2, language="en"))
    await batcher.stop()
    assert later.text == "clip 2.00"


async def test_poison_request_fails_alone_after_retry() -> None:
    """When one request breaks a shared batch, the rest are retried one by one and succeed."""
    engine = FakeEngine(fail_when=lambda r: float(r.audio[0]) == np.float32(0.9))
    batcher = Batcher(engine, BatchConfig(max_batch_size=8, max_wait_ms=30))
    batcher.start()
    outcomes = await asyncio.gather(
        batcher.submit_final(req(1, marker=0.1)),
        batcher.submit_final(req(1, marker=0.9)),
        batcher.submit_final(req(1, marker=0.2)),
        return_exceptions=True,
    )
    await batcher.stop()
    assert len(engine.batches[0]) == 3, "they were batched together first"
    assert isinstance(outcomes[1], RuntimeError)
    assert not isinstance(outcomes[0], BaseException) and not isinstance(outcomes[2], BaseException)


async def test_batches_never_mix_languages() -> None:
    """Requests with different batch keys (language, itn) never share a model call."""
    engine = FakeEngine()
    batcher = Batcher(engine, BatchConfig(max_batch_size=8, max_wait_ms=30))
    batcher.start()
    langs = ["en", "zh", "en", "zh", "ja", "en"]
    await asyncio.gather(*(batcher.submit_final(req(1, language=lang)) for lang in langs))
    await batcher.stop()
    for batch in engine.batches:
        assert len({r.batch_key for r in batch}) == 1


async def test_similar_lengths_are_grouped() -> None:
    """With more waiting than fits, a batch takes the requests closest in length to the oldest."""
    engine = GatedEngine(held=[0.5])
    batcher = Batcher(engine, BatchConfig(max_batch_size=3, max_wait_ms=0))
    batcher.start()
    blocker = asyncio.ensure_future(batcher.submit_final(req(0.1, marker=0.5)))
    assert await in_thread(engine.entered)  # the worker is busy with the blocker; the rest queue up
    lengths = [10.0, 2.0, 9.5, 2.1, 9.8, 1.9]
    rest = [asyncio.ensure_future(batcher.submit_final(req(s))) for s in lengths]
    await until(lambda: batcher.queue_depth == len(lengths))
    engine.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker, *rest), scaled(5))
    await batcher.stop()
    grouped = [sorted(round(len(r.audio) / 16000, 1) for r in b) for b in engine.batches[1:]]
    assert [9.5, 9.8, 10.0] in grouped and [1.9, 2.0, 2.1] in grouped


async def test_finals_go_before_interims() -> None:
    """When finals and interims both wait, finals run first and never share a batch with interims."""
    engine = GatedEngine(held=[0.7])
    batcher = Batcher(
        engine, BatchConfig(max_batch_size=4, max_wait_ms=0, max_queue=64, interim_queue_fraction=1.0)
    )
    batcher.start()
    blocker = asyncio.ensure_future(batcher.submit_final(req(0.1, marker=0.7)))
    assert await in_thread(engine.entered)
    interims = [batcher.submit_interim(req(1, marker=0.5)) for _ in range(3)]
    assert all(f is not None for f in interims)
    finals = [asyncio.ensure_future(batcher.submit_final(req(1, marker=0.2))) for _ in range(3)]
    await until(lambda: batcher.finals_waiting == 3)
    engine.gate.set()
    await asyncio.wait_for(
        asyncio.gather(blocker, *finals, *[f for f in interims if f is not None]), scaled(5)
    )
    await batcher.stop()
    kinds = [{float(r.audio[0]) for r in b} for b in engine.batches[1:]]
    assert kinds[0] == {np.float32(0.2)}
    assert all(len(k) == 1 for k in kinds)


async def test_interims_refused_when_finals_wait_or_queue_busy() -> None:
    """An interim is refused (None) while finals are waiting or the queue is past its interim share."""
    engine = GatedEngine(held=[0.7])
    batcher = Batcher(
        engine, BatchConfig(max_batch_size=1, max_wait_ms=0, max_queue=8, interim_queue_fraction=0.25)
    )
    batcher.start()
    running = asyncio.ensure_future(batcher.submit_final(req(0.1, marker=0.7)))
    assert await in_thread(engine.entered)
    waiting = asyncio.ensure_future(batcher.submit_final(req(0.1)))
    await until(lambda: batcher.finals_waiting == 1)
    assert batcher.submit_interim(req(1)) is None
    engine.gate.set()
    await asyncio.wait_for(asyncio.gather(running, waiting), scaled(5))
    first = batcher.submit_interim(req(1))
    second = batcher.submit_interim(req(1))
    third = batcher.submit_interim(req(1))  # the worker has not run in between: two wait, the share
    assert first is not None and second is not None and third is None
    await asyncio.wait_for(asyncio.gather(first, second), scaled(5))
    await batcher.stop()


async def test_full_queue_makes_finals_wait_not_fail() -> None:
    """With the queue full, a new final waits for room and then completes; nothing is dropped."""
    engine = FakeEngine(delay_s=0.02)
    batcher = Batcher(engine, BatchConfig(max_batch_size=1, max_wait_ms=0, max_queue=2))
    batcher.start()
    results = await asyncio.gather(*(batcher.submit_final(req(0.2)) for _ in range(12)))
    await batcher.stop()
    assert len(results) == 12 and sum(len(b) for b in engine.batches) == 12


async def test_stop_fails_queued_requests() -> None:
    """Stopping the batcher fails what is still queued or running with BatcherClosed instead of leaving it
    hanging, and refuses what comes after."""
    engine = GatedEngine()
    batcher = Batcher(engine, BatchConfig(max_batch_size=1, max_wait_ms=0))
    batcher.start()
    futures = [asyncio.ensure_future(batcher.submit_final(req(0.1))) for _ in range(3)]
    assert await in_thread(engine.entered)
    stopping = asyncio.ensure_future(batcher.stop())
    outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), scaled(5))
    engine.gate.set()
    await asyncio.wait_for(stopping, scaled(5))
    assert all(isinstance(o, BatcherClosed) for o in outcomes), outcomes
    with pytest.raises(BatcherClosed):
        await batcher.submit_final(req(0.1))


async def test_cancelled_requests_are_not_run() -> None:
    """A request whose caller went away before its batch started is not sent to the engine."""
    engine = GatedEngine(held=[0.1])
    batcher = Batcher(engine, BatchConfig(max_batch_size=1, max_wait_ms=0))
    batcher.start()
    first = asyncio.ensure_future(batcher.submit_final(req(0.1, marker=0.1)))
    assert await in_thread(engine.entered)
    doomed = asyncio.ensure_future(batcher.submit_final(req(0.1, marker=0.9)))
    await until(lambda: batcher.finals_waiting == 1)
    doomed.cancel()
    engine.gate.set()
    await asyncio.wait_for(first, scaled(5))
    after = await asyncio.wait_for(batcher.submit_final(req(0.2, marker=0.3)), scaled(5))  # queued behind it
    await batcher.stop()
    assert after.text == "clip 0.20"
    assert all(float(r.audio[0]) != np.float32(0.9) for b in engine.batches for r in b)


async def test_reports_each_batch() -> None:
    """The on_batch hook sees each call's size, audio seconds and failure flag."""
    reports: list[BatchReport] = []
    engine = FakeEngine(fail_when=lambda r: len(r.audio) > 48000)
    batcher = Batcher(engine, BatchConfig(max_batch_size=4, max_wait_ms=0), on_batch=reports.append)
    batcher.start()
    await batcher.submit_final(req(1.5))
    with pytest.raises(RuntimeError):
        await batcher.submit_final(req(4))
    await batcher.stop()
    assert [(r.size, r.audio_s, r.failed) for r in reports] == [(1, 1.5, False), (1, 4.0, True)]


async def test_speculative_requests_wait_with_finals_but_are_refused_when_finals_wait() -> None:
    """A speculative request is refused while finals wait, and otherwise runs in the finals' queue."""
    engine = GatedEngine(held=[0.7])
    batcher = Batcher(
        engine, BatchConfig(max_batch_size=4, max_wait_ms=0, max_queue=64, interim_queue_fraction=1.0)
    )
    batcher.start()
    running = asyncio.ensure_future(batcher.submit_final(req(0.1, marker=0.7)))
    assert await in_thread(engine.entered)
    waiting = asyncio.ensure_future(batcher.submit_final(req(0.2)))
    await until(lambda: batcher.finals_waiting == 1)
    assert batcher.submit_speculative(req(1)) is None, "a final is waiting"
    engine.gate.set()
    await asyncio.wait_for(asyncio.gather(running, waiting), scaled(5))
    interim = batcher.submit_interim(req(1, marker=0.5))
    speculative = batcher.submit_speculative(req(1, marker=0.3))
    assert interim is not None and speculative is not None
    await asyncio.wait_for(asyncio.gather(interim, speculative), scaled(5))
    await batcher.stop()
    order = [float(b[0].audio[0]) for b in engine.batches[2:]]
    assert order == [np.float32(0.3), np.float32(0.5)], "speculation goes before interims"


# -- Several workers on one engine --------------------------------------------------------------------


async def test_workers_follow_the_engines_concurrency_and_run_at_once() -> None:
    """With an engine that allows two calls at once, two finals run at the same time in two threads, one
    each, rather than as one batch of two."""
    engine = CountingEngine(workers=2)
    engine.barrier = threading.Barrier(2, timeout=scaled(5))  # each call goes on only once both are in
    reports: list[BatchReport] = []
    batcher = Batcher(engine, BatchConfig(max_batch_size=8, max_wait_ms=5), on_batch=reports.append)
    assert batcher.workers == 2
    batcher.start()
    await asyncio.wait_for(
        asyncio.gather(batcher.submit_final(req(1.0)), batcher.submit_final(req(1.1))), scaled(10)
    )
    await batcher.stop()
    assert [len(b) for b in engine.batches] == [1, 1] and engine.peak == 2, "neither waited for the other"
    assert len(engine.threads) == 2
    assert sorted(r.worker for r in reports) == [0, 1]


async def test_an_interim_never_takes_the_last_idle_worker() -> None:
    """With one of two workers busy, an interim is refused, and a final that arrives starts at once on the
    worker kept free."""
    engine = GatedEngine(workers=2, held=[0.9])
    batcher = Batcher(engine, BatchConfig(max_batch_size=4, max_wait_ms=0, interim_queue_fraction=1.0))
    batcher.start()
    long_final = asyncio.ensure_future(batcher.submit_final(req(5.0, marker=0.9)))
    assert await in_thread(engine.entered)
    assert batcher.busy_workers == 1
    assert batcher.submit_interim(req(1.0)) is None, "it would take the worker kept for finals"
    quick = await asyncio.wait_for(batcher.submit_final(req(0.5)), scaled(5))
    assert not long_final.done(), "the second final did not wait for the first"
    assert quick.text == "clip 0.50"
    engine.gate.set()
    await asyncio.wait_for(long_final, scaled(5))
    interim = batcher.submit_interim(req(1.0))
    assert interim is not None, "both idle: an interim may take one"
    await asyncio.wait_for(interim, scaled(5))
    await batcher.stop()


async def test_speculation_is_refused_only_when_it_would_wait_behind_a_final() -> None:
    """A speculative final is accepted while a worker is free, and refused once the waiting finals fill
    every idle worker."""
    engine = GatedEngine(workers=2)
    batcher = Batcher(engine, BatchConfig(max_batch_size=4, max_wait_ms=0, interim_queue_fraction=1.0))
    batcher.start()
    first = asyncio.ensure_future(batcher.submit_final(req(1.0)))
    await until(lambda: batcher.busy_workers == 1)
    speculative = batcher.submit_speculative(req(1.0, marker=0.3))
    assert speculative is not None, "one worker is still free"
    await until(lambda: batcher.busy_workers == 2)
    waiting = asyncio.ensure_future(batcher.submit_final(req(2.0)))
    await until(lambda: batcher.finals_waiting == 1)
    assert batcher.submit_speculative(req(1.0)) is None, "it would wait behind a final"
    engine.gate.set()
    await asyncio.wait_for(asyncio.gather(first, speculative, waiting), scaled(5))
    await batcher.stop()


async def test_bulk_finals_run_after_live_ones_one_per_call() -> None:
    """Finals of a stream sent faster than real time wait behind live finals and run one per call."""
    engine = GatedEngine(held=[0.1])
    batcher = Batcher(engine, BatchConfig(max_batch_size=8, max_wait_ms=0))
    batcher.start()
    blocker = asyncio.ensure_future(batcher.submit_final(req(0.1, marker=0.1)))
    assert await in_thread(engine.entered)
    bulk = [asyncio.ensure_future(batcher.submit_final(req(1, marker=0.7), bulk=True)) for _ in range(3)]
    await until(lambda: batcher.bulk_waiting == 3)
    live = asyncio.ensure_future(batcher.submit_final(req(1, marker=0.3)))
    await until(lambda: batcher.finals_waiting == 1)
    engine.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker, live, *bulk), scaled(5))
    await batcher.stop()
    markers = [[float(r.audio[0]) for r in b] for b in engine.batches]
    assert markers[1] == [np.float32(0.3)], "the live final went first"
    assert markers[2:] == [[np.float32(0.7)]] * 3, "bulk finals one per call"


async def test_bulk_work_leaves_a_worker_free_only_while_live_streams_are_about() -> None:
    """With two workers, bulk finals use both when no live final was seen lately, and only one otherwise."""
    engine = CountingEngine(workers=2, delay_s=0.05)
    engine.barrier = threading.Barrier(2, timeout=scaled(5))  # two at a time, or the calls fail
    batcher = Batcher(engine, BatchConfig(max_batch_size=8, max_wait_ms=0))
    batcher.start()
    await asyncio.wait_for(
        asyncio.gather(*(batcher.submit_final(req(1), bulk=True) for _ in range(4))), scaled(10)
    )
    alone = engine.peak
    engine.barrier = None
    await batcher.submit_final(req(0.5))  # a live stream shows up
    engine.peak = 0
    await asyncio.wait_for(
        asyncio.gather(*(batcher.submit_final(req(1), bulk=True) for _ in range(4))), scaled(10)
    )
    await batcher.stop()
    assert (alone, engine.peak) == (2, 1)


def test_batch_size_zero_means_what_the_engine_prefers() -> None:
    """max_batch_size 0 takes the engine's preferred batch size; a set value wins."""
    prefers_one = FakeEngine()
    prefers_one._info = replace(prefers_one.info, preferred_batch_size=1)
    assert Batcher(prefers_one, BatchConfig()).max_batch_size == 1
    assert Batcher(FakeEngine(), BatchConfig()).max_batch_size == 8
    assert Batcher(prefers_one, BatchConfig(max_batch_size=3)).max_batch_size == 3


class AbortableFake(FakeEngine):
    """A call runs until released or aborted; aborting raises CallAborted, as ONNX Runtime's does."""

    def __init__(self) -> None:
        super().__init__()
        self._info = replace(self._info, max_concurrent_calls=2)
        self.started = threading.Event()
        self.stop = threading.Event()
        self.aborts: list[int] = []

    def transcribe(self, requests: Sequence[TranscribeRequest]) -> list[Transcript]:
        self.started.set()
        if requests[0].audio[0] == np.float32(0.9):  # the slow kind: waits to be released or aborted
            if not self.stop.wait(scaled(10)):
                raise AssertionError("neither released nor aborted")
            if self.aborts:
                raise CallAborted("aborted")
        return super().transcribe(requests)

    def abort(self, requests: Sequence[TranscribeRequest]) -> bool:
        self.aborts.append(len(requests))
        self.stop.set()
        return True


async def test_a_running_call_nobody_wants_is_aborted_and_reported_as_such() -> None:
    """Cancelling every request of a running call (a speculation overtaken by speech) makes the batcher
    abort it: no failure, no retry, the worker free for the next final, the report marked aborted."""
    engine = AbortableFake()
    reports: list[BatchReport] = []
    batcher = Batcher(engine, BatchConfig(max_batch_size=1, max_wait_ms=0), on_batch=reports.append)
    batcher.start()
    speculative = batcher.submit_speculative(req(2.0, marker=0.9))
    assert speculative is not None
    await asyncio.get_running_loop().run_in_executor(None, engine.started.wait, scaled(5))
    speculative.cancel()
    final = await asyncio.wait_for(batcher.submit_final(req(1.0)), scaled(5))
    # The final may be served (by the second worker) before the aborted call's thread has returned:
    # stop cancels a worker still waiting for its call, so wait (bounded) for the aborted call's report.
    for _ in range(200):
        if any(r.aborted for r in reports):
            break
        await asyncio.sleep(scaled(0.025))
    await batcher.stop()
    assert final.text == "clip 1.00" and engine.aborts == [1]
    aborted = [r for r in reports if r.aborted]
    assert len(aborted) == 1 and not aborted[0].failed and aborted[0].speculative == 1
    assert len(engine.batches) == 1, "the aborted call never reached the fake's transcript, nor a retry"


async def test_a_call_someone_still_waits_for_is_not_aborted() -> None:
    """A running call whose request is still wanted runs to the end even when a queued one is cancelled."""
    engine = AbortableFake()
    batcher = Batcher(engine, BatchConfig(max_batch_size=1, max_wait_ms=0))
    batcher.start()
    wanted = asyncio.ensure_future(batcher.submit_final(req(2.0, marker=0.9)))
    await asyncio.get_running_loop().run_in_executor(None, engine.started.wait, scaled(5))
    other = batcher.submit_speculative(req(1.0, marker=0.2))
    assert other is not None
    other.cancel()
    await settle()  # the watch runs as a done callback of the cancelled future
    assert engine.aborts == []
    engine.stop.set()
    assert (await asyncio.wait_for(wanted, scaled(5))).text == "clip 2.00"
    await batcher.stop()


# -- Stopping, supervision, call timeouts, health (issue 8) -------------------------------------------


async def test_stop_wakes_finals_waiting_for_room_with_batcher_closed() -> None:
    """A final waiting for room in a full queue gets BatcherClosed when the batcher stops, even while the
    worker is waiting for company rather than in a call."""
    batcher = Batcher(FakeEngine(), BatchConfig(max_batch_size=2, max_wait_ms=1000, max_queue=2))
    batcher.start()
    first = asyncio.ensure_future(batcher.submit_final(req(0.1)))  # the worker waits for a second final
    bulk = asyncio.ensure_future(batcher.submit_final(req(0.2), bulk=True))  # (bulk ones do not count)
    await until(lambda: batcher.queue_depth == 2)
    waiting = asyncio.ensure_future(batcher.submit_final(req(0.3)))
    await settle()  # it is waiting for room now
    assert not waiting.done() and batcher.busy_workers == 0
    await asyncio.wait_for(batcher.stop(), scaled(5))
    outcomes = await asyncio.wait_for(asyncio.gather(first, bulk, waiting, return_exceptions=True), scaled(5))
    assert all(isinstance(o, BatcherClosed) for o in outcomes), outcomes


async def test_stop_keeps_the_event_loop_running_while_a_call_finishes() -> None:
    """Stopping with a model call in progress waits for it without blocking the event loop."""
    engine = GatedEngine()
    batcher = Batcher(engine, BatchConfig(max_batch_size=1, max_wait_ms=0))
    batcher.start()
    running = asyncio.ensure_future(batcher.submit_final(req(0.1)))
    assert await in_thread(engine.entered)
    stopping = asyncio.ensure_future(batcher.stop())
    await settle()
    # With a blocked loop this line would run only after the gate's own timeout let the call end.
    assert not engine.returned.is_set(), "the loop ran while the call was still in progress"
    assert not stopping.done(), "stop waits for the call in progress"
    engine.gate.set()
    await asyncio.wait_for(stopping, scaled(5))
    assert engine.returned.is_set()
    with pytest.raises(BatcherClosed):
        await running


async def test_a_worker_failing_outside_the_engine_fails_its_batch_and_carries_on() -> None:
    """An exception in batch assembly fails the requests that worker held (BatcherFailed), is logged with
    its traceback, and the worker restarts: later requests are served; health is degraded meanwhile."""
    engine = FakeEngine()
    clock = ManualClock()
    batcher = Batcher(engine, BatchConfig(max_batch_size=4, max_wait_ms=0), clock=clock)
    batcher.start()
    poison = PoisonRequest(audio=req(0.5).audio)
    with pytest.raises(BatcherFailed):
        await asyncio.wait_for(batcher.submit_final(poison), scaled(5))
    later = await asyncio.wait_for(batcher.submit_final(req(1.0)), scaled(5))
    assert later.text == "clip 1.00"
    health = batcher.health
    assert health.status == "degraded" and "restart" in health.reason
    clock.now += HEALTH_WINDOW_S + 1
    assert batcher.health.status == "ok"
    await batcher.stop()


async def test_an_on_batch_callback_that_raises_does_not_stop_the_worker() -> None:
    """A failing on_batch hook (metrics) is logged and the worker goes on serving."""
    calls: list[BatchReport] = []

    def broken(report: BatchReport) -> None:
        calls.append(report)
        raise ValueError("metrics bug")

    batcher = Batcher(FakeEngine(), BatchConfig(max_batch_size=1, max_wait_ms=0), on_batch=broken)
    batcher.start()
    first = await asyncio.wait_for(batcher.submit_final(req(1.0)), scaled(5))
    second = await asyncio.wait_for(batcher.submit_final(req(2.0)), scaled(5))
    await batcher.stop()
    assert (first.text, second.text, len(calls)) == ("clip 1.00", "clip 2.00", 2)


async def test_workers_that_keep_failing_fail_the_batcher() -> None:
    """Past MAX_RESTARTS worker failures in the health window the batcher gives up: health failed,
    queued and new finals fail with BatcherFailed, interims and speculation are refused."""
    batcher = Batcher(FakeEngine(), BatchConfig(max_batch_size=1, max_wait_ms=0))
    batcher.start()
    poisons = [PoisonRequest(audio=req(0.5).audio) for _ in range(MAX_RESTARTS + 1)]
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(batcher.submit_final(p) for p in poisons), return_exceptions=True), scaled(5)
    )
    assert all(isinstance(o, BatcherFailed) for o in outcomes), outcomes
    assert batcher.health.status == "failed"
    with pytest.raises(BatcherFailed):
        await asyncio.wait_for(batcher.submit_final(req(1.0)), scaled(5))
    assert batcher.submit_interim(req(1.0)) is None and batcher.submit_speculative(req(1.0)) is None
    await batcher.stop()


async def test_a_call_past_the_timeout_fails_its_requests_and_its_worker_is_stuck_until_it_returns() -> None:
    """A model call longer than engine_call_timeout_s fails its requests with EngineTimeout; its worker
    counts as stuck (health degraded, other workers serve on) until the call returns."""
    engine = GatedEngine(workers=2)
    clock = ManualClock()
    reports: list[BatchReport] = []
    batcher = Batcher(
        engine,
        BatchConfig(max_batch_size=1, max_wait_ms=0, engine_call_timeout_s=0.05),
        on_batch=reports.append,
        clock=clock,
    )
    batcher.start()
    with pytest.raises(EngineTimeout):
        await asyncio.wait_for(batcher.submit_final(req(1.0)), scaled(5))
    assert batcher.stuck_workers == 1
    health = batcher.health
    assert health.status == "degraded" and "stuck" in health.reason
    engine.gate.set()  # the other worker serves; so does the stuck one once its call returns
    assert (await asyncio.wait_for(batcher.submit_final(req(2.0)), scaled(5))).text == "clip 2.00"
    await until(lambda: batcher.stuck_workers == 0)
    assert batcher.health.status == "degraded", "a call timed out within the window"
    clock.now += HEALTH_WINDOW_S + 1
    assert batcher.health.status == "ok"
    await batcher.stop()
    timed_out = [r for r in reports if r.timed_out]
    assert len(timed_out) == 1 and timed_out[0].failed


async def test_every_worker_stuck_is_failed_health() -> None:
    """With its only worker stuck in a call past the timeout, the batcher cannot serve: health failed
    (until the call returns)."""
    engine = GatedEngine(workers=1)
    batcher = Batcher(engine, BatchConfig(max_batch_size=1, max_wait_ms=0, engine_call_timeout_s=0.05))
    batcher.start()
    with pytest.raises(EngineTimeout):
        await asyncio.wait_for(batcher.submit_final(req(1.0)), scaled(5))
    assert batcher.health.status == "failed"
    engine.gate.set()
    await until(lambda: batcher.stuck_workers == 0)
    assert batcher.health.status == "degraded"
    await batcher.stop()


async def test_a_call_past_the_timeout_is_aborted_when_the_engine_can() -> None:
    """An engine that can abort has its timed-out call stopped: the worker is free at once."""
    engine = AbortableFake()
    batcher = Batcher(engine, BatchConfig(max_batch_size=1, max_wait_ms=0, engine_call_timeout_s=0.05))
    batcher.start()
    with pytest.raises(EngineTimeout):
        await asyncio.wait_for(batcher.submit_final(req(2.0, marker=0.9)), scaled(5))
    await until(lambda: batcher.stuck_workers == 0)
    assert engine.aborts == [1]
    assert (await asyncio.wait_for(batcher.submit_final(req(1.0)), scaled(5))).text == "clip 1.00"
    await batcher.stop()


async def test_zero_engine_call_timeout_means_no_limit() -> None:
    """engine_call_timeout_s 0 lets a call run as long as it takes."""
    engine = GatedEngine()
    batcher = Batcher(engine, BatchConfig(max_batch_size=1, max_wait_ms=0, engine_call_timeout_s=0))
    batcher.start()
    final = asyncio.ensure_future(batcher.submit_final(req(1.0)))
    assert await in_thread(engine.entered)
    await asyncio.sleep(0.1)  # well past the 0.05 s the tests above time out at
    assert not final.done() and batcher.health.status == "ok"
    engine.gate.set()
    assert (await asyncio.wait_for(final, scaled(5))).text == "clip 1.00"
    await batcher.stop()


def test_engine_call_timeout_is_a_flag_and_is_validated() -> None:
    """--engine-call-timeout-s sets BatchConfig.engine_call_timeout_s (default 30); a negative one is
    refused, naming the field."""
    assert config_from_args(build_parser().parse_args([])).batch.engine_call_timeout_s == 30
    args = build_parser().parse_args(["--engine-call-timeout-s", "2.5"])
    assert config_from_args(args).batch.engine_call_timeout_s == 2.5
    with pytest.raises(ConfigError, match="engine_call_timeout_s"):
        BatchConfig(engine_call_timeout_s=-1)


@pytest.mark.e2e
async def test_health_endpoint_says_degraded_or_failed_without_the_reason() -> None:
    """/health reports the batcher: failed (503, not ready) while every worker is stuck, then degraded
    (200, ready) after a call timed out; the reason stays in the log."""
    engine = GatedEngine(workers=1)
    engine.gate.set()  # start-up (calibration) runs freely
    config = Config(batch=BatchConfig(max_batch_size=1, max_wait_ms=0, engine_call_timeout_s=0.05))
    async with running_server(engine, config) as (server, url):
        health_url = url.replace("ws://", "http://") + "/health"
        async with aiohttp.ClientSession() as http:
            async with http.get(health_url) as response:
                assert response.status == 200 and (await response.json())["status"] == "ready"
            engine.gate.clear()
            assert server.batcher is not None
            with pytest.raises(EngineTimeout):
                await asyncio.wait_for(server.batcher.submit_final(req(1.0)), scaled(5))
            async with http.get(health_url) as response:
                body = await response.json()
                assert response.status == 503 and body["status"] == "failed" and body["ready"] is False
                assert "stuck" not in json.dumps(body) and "timeout" not in json.dumps(body)
            engine.gate.set()
            await until(lambda: server.batcher is not None and server.batcher.stuck_workers == 0)
            async with http.get(health_url) as response:
                body = await response.json()
                assert response.status == 200 and body["status"] == "degraded" and body["ready"] is True
                assert "stuck" not in json.dumps(body) and "timeout" not in json.dumps(body)
            async with http.get(health_url.replace("/health", "/metrics")) as response:
                assert "stream_engine_timeouts_total 1.0" in await response.text()
