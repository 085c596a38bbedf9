"""The batching workers shared by every session (README, "Batching and scheduling").

Requests wait in a bounded queue with their futures. ``workers`` worker tasks (as many as the engine
can run at once, :attr:`EngineInfo.max_concurrent_calls`; each call in its own executor thread, all on
one copy of the weights) each take the oldest final (or, when no final waits, the oldest interim), wait
up to ``max_wait_ms`` for company, fill a batch with requests of the same ``batch_key`` and the closest
lengths, run the engine, and resolve *every* future: with a transcript, or with the batch's exception
when the engine raises. A worker never dies of a batch's failure.

Scheduling for tail latency (README, "Batching and scheduling"):

- **finals first**, then speculative finals (they wait with the finals), then *bulk* finals (of streams
  sent faster than real time: an uploader's backlog must not delay a live caption), then interims;
  finals and interims never share a batch;
- **spread, then batch**: when several workers are idle, waiting finals are shared out between them
  (two calls at once finish sooner than one batch of two on a busy CPU); only what exceeds the idle
  workers is batched;
- **a worker kept free for finals**: with more than one worker, an interim never takes the last idle
  one, so a final that arrives while the others are busy starts at once; nor does a bulk final while
  live finals were seen in the last ``LIVE_RECENT_S``; bulk finals run one per call;
- **shedding, in order**: an interim is refused while any final waits (or, with several workers, when
  it would take the reserved one); a speculative final is refused when it would wait behind another
  final. So when everyone talks at once, interims go first, then speculation; finals are never refused;
- **unwanted calls stopped**: when every request of a running call has been cancelled (a speculative
  final whose speaker resumed), an engine that can (:class:`~stream_server.engines.base.AbortableEngine`:
  ONNX Runtime) stops the call, and the worker is free at once instead of after the whole call.

Finals are never dropped: ``submit_final`` waits for room, and that wait is the back-pressure the
transport applies to the stream. Interims are skipped when they have waited too long.

Nothing hangs (README, "Observability": `/health`):

- a call longer than ``engine_call_timeout_s`` fails its requests with :class:`EngineTimeout`; a thread
  cannot be stopped, so an engine that can abort is told to, and otherwise the worker counts as *stuck*
  until its call returns (the other workers serve on);
- the workers are supervised: an exception outside the engine call (a bug in batch assembly) is logged
  with its traceback, fails the requests that worker held (:class:`BatcherFailed`) and restarts it; past
  ``MAX_RESTARTS`` in ``HEALTH_WINDOW_S`` the batcher gives up and fails everything; an ``on_batch``
  hook that raises is logged and the worker goes on;
- :meth:`Batcher.stop` fails what is queued and wakes the finals waiting for room, with
  :class:`BatcherClosed`, and waits for the calls in progress without blocking the event loop;
- :attr:`Batcher.health` sums it up for ``/health``: ``ok``, ``degraded`` (a worker stuck, or failed or
  timed-out calls or restarts in the last ``HEALTH_WINDOW_S``) or ``failed`` (every worker stuck, or
  given up).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from .config import BatchConfig, batch_size_for
from .engines.base import AbortableEngine, CallAborted, Engine, TranscribeRequest, Transcript
from .errors import BatcherClosed, BatcherFailed, EngineError, EngineTimeout, InterimSkipped

logger = logging.getLogger(__name__)

LIVE_RECENT_S = 10.0
"""Bulk work leaves a worker free for live finals when one was submitted this recently."""

HEALTH_WINDOW_S = 60.0
"""A failed or timed-out call, or a worker restart, leaves the batcher degraded this long."""

MAX_RESTARTS = 5
"""Worker restarts within ``HEALTH_WINDOW_S`` beyond which the batcher gives up (a failure that repeats
is a bug that restarting does not cure)."""

STOP_WAIT_S = 30.0
"""How long :meth:`Batcher.stop` waits for the calls in progress when calls have no timeout."""

HealthStatus = Literal["ok", "degraded", "failed"]
CallOutcome = Literal["ok", "failed", "aborted", "timeout"]


@dataclass(frozen=True)
class BatcherHealth:
    """Whether the batcher can serve, for ``/health``.

    Attributes:
        status: ``ok``; ``degraded``: serving, but a worker is stuck in a call past the timeout, or calls
            failed or timed out, or a worker restarted, in the last ``HEALTH_WINDOW_S``; ``failed``:
            nothing can be served now (every worker stuck) or any more (the workers kept failing).
        reason: why, in words for the server's log: it may name internals, so clients never see it.
    """

    status: HealthStatus
    reason: str = ""


@dataclass(frozen=True)
class BatchReport:
    """What one engine call did, for metrics.

    Attributes:
        size: requests in the batch.
        interim: the batch held interims.
        audio_s: seconds of audio in the batch.
        inference_s: wall time of the engine call.
        queue_wait_s: how long the oldest request waited before the call began.
        failed: the engine raised.
        speculative: how many of the requests were speculative finals.
        worker: which worker ran it (0 .. workers - 1).
        aborted: stopped while running because every request in it had been cancelled (its time is
            not the call's).
        timed_out: ran past ``engine_call_timeout_s``: its requests failed, ``inference_s`` is how long
            the worker was held (until the call returned).
    """

    size: int
    interim: bool
    audio_s: float
    inference_s: float
    queue_wait_s: float
    failed: bool
    speculative: int = 0
    worker: int = 0
    aborted: bool = False
    timed_out: bool = False


@dataclass(eq=False)
class _Item:
    request: TranscribeRequest
    future: asyncio.Future[Transcript]
    interim: bool
    speculative: bool = False
    bulk: bool = False
    enqueued_s: float = field(default_factory=time.monotonic)


class Batcher:
    """Batches transcription requests from all sessions onto one engine.

    Args:
        engine: the loaded model; called from ``workers`` threads at most at once.
        config: batch size, wait, queue bounds.
        on_batch: called on the event loop after every engine call (metrics, capacity).
        interim_max_wait_s: an interim that waited longer is skipped.
        workers: engine calls at once; default the engine's ``max_concurrent_calls``.
        clock: monotonic seconds for :attr:`health`'s window (tests move it by hand).
    """

    def __init__(
        self,
        engine: Engine,
        config: BatchConfig,
        *,
        on_batch: Callable[[BatchReport], None] | None = None,
        interim_max_wait_s: float = 2.0,
        workers: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.config = config
        self.workers = max(1, workers if workers is not None else engine.info.max_concurrent_calls)
        self.max_batch_size = batch_size_for(config.max_batch_size, engine.info.preferred_batch_size)
        self._on_batch = on_batch
        self._interim_max_wait_s = interim_max_wait_s
        self._finals: deque[_Item] = deque()
        self._bulk: deque[_Item] = deque()
        self._interims: deque[_Item] = deque()
        self._last_live_s = -math.inf
        self._changed = asyncio.Condition()
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="engine")
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._running: dict[int, list[_Item]] = {}
        self._clock = clock
        self._calls: set[asyncio.Future[list[Transcript]]] = set()  # in an executor thread now
        self._stuck: dict[int, float] = {}  # worker -> since when its call has been past the timeout
        self._problems: deque[tuple[float, str]] = deque(maxlen=1000)  # (when, what) for health
        self._failed: str | None = None  # why the batcher gave up
        self._on_batch_failures = 0

    @property
    def busy(self) -> bool:
        """An engine call is running."""
        return bool(self._running)

    @property
    def busy_workers(self) -> int:
        """Workers in an engine call now."""
        return len(self._running)

    @property
    def idle_workers(self) -> int:
        """Workers not in an engine call (some may be about to start one from the queue)."""
        return self.workers - len(self._running)

    @property
    def stuck_workers(self) -> int:
        """Workers waiting for a call that ran past ``engine_call_timeout_s`` to return."""
        return len(self._stuck)

    @property
    def health(self) -> BatcherHealth:
        """``ok``, ``degraded`` or ``failed``, with the reason for the log (see :class:`BatcherHealth`)."""
        if self._failed is not None:
            return BatcherHealth("failed", self._failed)
        now = self._clock()
        stuck = ""
        if self._stuck:
            which = ", ".join(f"{w} for {now - since:.0f} s" for w, since in sorted(self._stuck.items()))
            if len(self._stuck) >= self.workers:
                return BatcherHealth("failed", f"every worker is stuck in a call past the timeout ({which})")
            stuck = f"worker(s) stuck in a call past engine_call_timeout_s: {which}"
        counts: dict[str, int] = {}
        for when, what in self._problems:
            if now - when <= HEALTH_WINDOW_S:
                counts[what] = counts.get(what, 0) + 1
        recent = ", ".join(f"{n} {what}" for what, n in counts.items())
        if recent:
            recent = f"in the last {HEALTH_WINDOW_S:.0f} s: {recent}"
        reason = "; ".join(part for part in (stuck, recent) if part)
        return BatcherHealth("degraded", reason) if reason else BatcherHealth("ok")

    def _record(self, problem: str) -> int:
        """Note a problem for :attr:`health`; returns how many of its kind are in the window."""
        now = self._clock()
        self._problems.append((now, problem))
        return sum(1 for when, what in self._problems if what == problem and now - when <= HEALTH_WINDOW_S)

    # ------------------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._finals) + len(self._bulk) + len(self._interims)

    @property
    def finals_waiting(self) -> int:
        """Live and speculative finals waiting."""
        return len(self._finals)

    @property
    def bulk_waiting(self) -> int:
        """Finals of faster-than-real-time streams waiting."""
        return len(self._bulk)

    @property
    def interims_waiting(self) -> int:
        return len(self._interims)

    def start(self) -> None:
        """Start the worker tasks on the running loop."""
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._run(i), name=f"batcher-{i}") for i in range(self.workers)]

    async def stop(self) -> None:
        """Stop taking requests, fail what is queued or running and the finals waiting for room (with
        BatcherClosed), stop the workers, and wait for the calls in progress to return (at most
        ``engine_call_timeout_s``, or ``STOP_WAIT_S`` without one) without blocking the event loop."""
        self._closed = True
        self._fail_everything(lambda: BatcherClosed("The server is shutting down."))
        await self._notify()  # the finals waiting for room see _closed
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)  # (a cancellation of stop itself still goes through)
        self._tasks = []
        if self._calls:
            wait_s = self.config.engine_call_timeout_s or STOP_WAIT_S
            _, running = await asyncio.wait(set(self._calls), timeout=wait_s)
            if running:
                logger.warning(
                    "%d engine call(s) still running %.0f s after stop; their threads end when they return",
                    len(running),
                    wait_s,
                )
        self._executor.shutdown(wait=False)  # the threads are idle or past saving: never join on the loop

    def _fail_everything(self, error: Callable[[], Exception]) -> None:
        """Fail every queued and running request with a fresh ``error()`` and empty the queues."""
        running = [item for batch in self._running.values() for item in batch]
        for item in [*self._finals, *self._bulk, *self._interims, *running]:
            if not item.future.done():
                item.future.set_exception(error())
        self._finals.clear()
        self._bulk.clear()
        self._interims.clear()

    @property
    def _accepting(self) -> bool:
        return not self._closed and self._failed is None

    def _refusal(self) -> Exception | None:
        """Why no request is taken now, or None."""
        if self._closed:
            return BatcherClosed("The server is shutting down.")
        if self._failed is not None:
            return BatcherFailed("The server cannot transcribe any more (its log says why).")
        return None

    async def submit_final(self, request: TranscribeRequest, *, bulk: bool = False) -> Transcript:
        """Queue a final request, waiting for room when the queue is full.

        Args:
            request: the segment.
            bulk: it belongs to a stream sent faster than real time: it runs after live finals.

        Returns:
            The transcript.

        Raises:
            Exception: whatever the engine raised for the batch; EngineTimeout when the call ran past
                ``engine_call_timeout_s``; BatcherFailed when a worker failed outside the engine (or the
                batcher gave up); BatcherClosed when stopping.
        """
        async with self._changed:
            await self._changed.wait_for(
                lambda: not self._accepting or self.queue_depth < self.config.max_queue
            )
            refusal = self._refusal()
            if refusal is not None:
                raise refusal
            item = _Item(request, asyncio.get_running_loop().create_future(), interim=False, bulk=bulk)
            if bulk:
                self._bulk.append(item)
            else:
                self._finals.append(item)
                self._last_live_s = time.monotonic()
            self._changed.notify_all()
        return await item.future

    def submit_speculative(self, request: TranscribeRequest) -> asyncio.Future[Transcript] | None:
        """Queue a final started early (the speaker paused) unless it would wait behind another final.

        It waits with the finals (it is likely to become one) but, unlike a final, it is refused when the
        finals already waiting fill every idle worker: so speculation never delays a real final and is
        the second thing shed under load (after interims).

        Returns:
            A future for the transcript, or None when refused.
        """
        if (
            not self._accepting
            or len(self._finals) >= max(1, self.idle_workers)
            or self.queue_depth >= self._interim_limit()
        ):
            return None
        item = _Item(request, asyncio.get_running_loop().create_future(), interim=False, speculative=True)
        self._finals.append(item)
        asyncio.get_running_loop().create_task(self._notify())
        return item.future

    def submit_interim(self, request: TranscribeRequest) -> asyncio.Future[Transcript] | None:
        """Queue an interim request unless a final is waiting or, with several workers, it would take the
        worker kept free for finals.

        Returns:
            A future for the transcript (it may fail with InterimSkipped later), or None when refused.
        """
        if (
            not self._accepting
            or self._finals
            or (self.workers > 1 and self.idle_workers < 1 + self._reserve())
            or self.queue_depth >= self._interim_limit()
        ):
            return None
        item = _Item(request, asyncio.get_running_loop().create_future(), interim=True)
        self._interims.append(item)
        asyncio.get_running_loop().create_task(self._notify())
        return item.future

    def _interim_limit(self) -> int:
        return max(1, int(self.config.max_queue * self.config.interim_queue_fraction))

    def _reserve(self) -> int:
        """Workers an interim must leave idle for finals: one when there are several."""
        return 1 if self.workers > 1 else 0

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # ------------------------------------------------------------------------------------------

    async def _run(self, worker: int) -> None:
        """One worker, supervised: an exception outside the engine call fails the requests it held and
        restarts the loop, until the failures repeat too often. It also ends once the batcher stops taking
        requests, should a cancellation be lost (``asyncio.wait_for`` before 3.12 drops one that arrives
        as its awaitable completes)."""
        while self._accepting:
            held: list[_Item] = []  # what this worker took from the queues and has not resolved yet
            try:
                while self._accepting:
                    held.clear()
                    batch = await self._next_batch(held)
                    try:
                        await self._execute(batch, worker)
                    finally:
                        await self._notify()  # a worker is free: waiting interims may now run
            except Exception as exc:  # CancelledError (stop) is not one: it ends the worker
                await self._worker_failed(worker, exc, held)

    async def _worker_failed(self, worker: int, exc: Exception, held: list[_Item]) -> None:
        """Log a worker's failure once, with its traceback, fail what it held, and give up when the
        failures repeat."""
        logger.error("batcher worker %d failed outside the engine call; restarting it", worker, exc_info=exc)
        for item in held:
            if not item.future.done():
                item.future.set_exception(
                    BatcherFailed("The server failed on this segment; its log says why.")
                )
        restarts = self._record("worker restart(s)")
        if restarts > MAX_RESTARTS:
            self._failed = (
                f"batcher workers failed {restarts} times in {HEALTH_WINDOW_S:.0f} s, last with {exc!r}: "
                "no more requests are taken"
            )
            logger.error("batcher failed: %s", self._failed)
            self._fail_everything(
                lambda: BatcherFailed("The server cannot transcribe any more (its log says why).")
            )
            current = asyncio.current_task()
            for task in self._tasks:
                if task is not current:
                    task.cancel()
        await self._notify()  # the finals waiting for room (room was made, or the batcher failed)

    def _prune(self) -> None:
        """Forget requests whose sessions went away; skip interims that waited too long."""
        now = time.monotonic()
        for queue in (self._finals, self._bulk, self._interims):
            if any(item.future.done() for item in queue):
                kept = [item for item in queue if not item.future.done()]
                queue.clear()
                queue.extend(kept)
        while self._interims and now - self._interims[0].enqueued_s > self._interim_max_wait_s:
            self._interims.popleft().future.set_exception(InterimSkipped())

    async def _next_batch(self, held: list[_Item]) -> list[_Item]:
        """The next batch for an idle worker; every item taken from a queue is also put in ``held``."""
        async with self._changed:
            while True:
                if not self._accepting:
                    return []
                self._prune()
                if self._finals or self._may_run_bulk() or (self._interims and self._may_run_interim()):
                    break
                await self._changed.wait()
            # Wait a little for company unless a full batch is already waiting.
            deadline = time.monotonic() + self.config.max_wait_ms / 1000
            while self._finals and len(self._finals) < self.max_batch_size and self._accepting:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
                    break
            self._prune()
            if self._finals:
                # Share waiting finals out between the workers not in a call (this one included).
                share = -(-len(self._finals) // max(1, self.idle_workers))
                batch = self._take(self._finals, held, limit=share)
            elif self._may_run_bulk():
                batch = self._take(self._bulk, held, limit=1)
            elif self._interims and self._may_run_interim():
                batch = self._take(self._interims, held)
            else:
                batch = []
            self._changed.notify_all()  # room in the queue for waiting finals
            return batch

    def _may_run_interim(self) -> bool:
        """The asking (idle) worker may start an interim: the other idle workers cover the reserve."""
        return self.idle_workers - 1 >= self._reserve()

    def _may_run_bulk(self) -> bool:
        """The asking (idle) worker may start a bulk final: keeping the reserve while live finals are
        recent."""
        if not self._bulk:
            return False
        live = time.monotonic() - self._last_live_s < LIVE_RECENT_S
        return not live or self.idle_workers - 1 >= self._reserve()

    def _take(self, queue: deque[_Item], held: list[_Item], *, limit: int | None = None) -> list[_Item]:
        """The oldest item plus the closest-length items with the same batch key (``limit`` in all),
        each also appended to ``held`` as it leaves the queue."""
        if not queue:
            return []
        size = min(self.max_batch_size, limit or self.max_batch_size)
        first = queue.popleft()
        held.append(first)
        key, length = first.request.batch_key, len(first.request.audio)
        same = [item for item in queue if item.request.batch_key == key]
        same.sort(key=lambda item: abs(len(item.request.audio) - length))
        chosen = same[: size - 1]
        for item in chosen:
            queue.remove(item)
            held.append(item)
        return [first, *chosen]

    async def _call(self, batch: list[_Item], worker: int) -> CallOutcome:
        """One engine call: ``"ok"`` (every future resolved), ``"failed"`` (the exception set on the
        future only when the batch has one request: callers retry bigger ones), ``"aborted"`` (every
        request was cancelled while it ran, and the engine stopped the call) or ``"timeout"`` (past
        ``engine_call_timeout_s``: every future failed, and this returns once the call has)."""
        loop = asyncio.get_running_loop()
        requests = [item.request for item in batch]
        unwatch = self._abort_when_unwanted(batch, requests)
        call = loop.run_in_executor(self._executor, self.engine.transcribe, requests)
        self._calls.add(call)
        call.add_done_callback(self._call_returned)
        try:
            # asyncio.wait, not wait_for: a timeout (or stop cancelling this worker) leaves the call's
            # future alone, so stop can still wait for the thread to return.
            await asyncio.wait({call}, timeout=self.config.engine_call_timeout_s or None)
            if not call.done():
                await self._call_timed_out(batch, requests, call, worker)
                return "timeout"
            transcripts = call.result()
            if len(transcripts) != len(batch):
                raise EngineError(f"engine returned {len(transcripts)} transcripts for {len(batch)} requests")
        except CallAborted:
            logger.debug("call of %d aborted: every request was cancelled", len(batch))
            return "aborted"
        except Exception as exc:
            logger.error("batch of %d failed: %s", len(batch), exc, exc_info=not isinstance(exc, EngineError))
            self._record("failed call(s)")
            if len(batch) == 1 and not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return "failed"
        finally:
            unwatch()
        for item, transcript in zip(batch, transcripts, strict=True):
            if not item.future.done():
                item.future.set_result(transcript)
        return "ok"

    def _call_returned(self, call: asyncio.Future[list[Transcript]]) -> None:
        self._calls.discard(call)
        if not call.cancelled():
            call.exception()  # retrieved: no "never retrieved" warning for a call nobody waits for

    async def _call_timed_out(
        self,
        batch: list[_Item],
        requests: list[TranscribeRequest],
        call: asyncio.Future[list[Transcript]],
        worker: int,
    ) -> None:
        """Fail a call's requests with EngineTimeout, abort it when the engine can, and hold the worker
        (counted as stuck) until the call returns."""
        timeout_s = self.config.engine_call_timeout_s
        self._record("timed-out call(s)")
        for item in batch:
            if not item.future.done():
                item.future.set_exception(EngineTimeout(f"The model took longer than {timeout_s:g} s."))
        engine = self.engine
        aborted = False
        if isinstance(engine, AbortableEngine):
            try:
                aborted = engine.abort(requests)
            except Exception:
                logger.exception("worker %d: aborting the timed-out call failed", worker)
        logger.error(
            "worker %d: a call of %d request(s) (%.1f s of audio) ran past engine_call_timeout_s (%g s); "
            "its requests failed; %s",
            worker,
            len(batch),
            sum(r.duration_s for r in requests),
            timeout_s,
            "aborting it" if aborted else "the worker is stuck until it returns (a thread cannot be stopped)",
        )
        since = self._clock()
        self._stuck[worker] = since
        try:
            await asyncio.wait({call})
        finally:
            del self._stuck[worker]
        logger.warning(
            "worker %d is back: its timed-out call returned after %.1f s", worker, self._clock() - since
        )

    def _abort_when_unwanted(
        self, batch: list[_Item], requests: list[TranscribeRequest]
    ) -> Callable[[], None]:
        """While the call runs, stop it once every one of its futures is cancelled (the engine permitting).

        Returns:
            What removes the watch (when the call is over).
        """
        engine = self.engine
        if not isinstance(engine, AbortableEngine):
            return lambda: None

        def check(_: object) -> None:
            if all(item.future.cancelled() for item in batch):
                engine.abort(requests)

        for item in batch:
            item.future.add_done_callback(check)

        def unwatch() -> None:
            for item in batch:
                item.future.remove_done_callback(check)

        return unwatch

    async def _execute(self, batch: list[_Item], worker: int) -> None:
        batch = [item for item in batch if not item.future.done()]
        if not batch:
            return
        requests = [item.request for item in batch]
        started = time.monotonic()
        wait_s = started - min(item.enqueued_s for item in batch)
        self._running[worker] = batch
        try:
            outcome = await self._call(batch, worker)
            if outcome == "failed" and len(batch) > 1:
                # Isolate the request that broke the batch (or a batch too big for memory): run each alone.
                logger.warning("retrying the %d requests of the failed batch one by one", len(batch))
                for item in batch:
                    if not item.future.done():
                        await self._call([item], worker)
        finally:
            del self._running[worker]
        self._report(
            BatchReport(
                size=len(batch),
                interim=batch[0].interim,
                audio_s=sum(r.duration_s for r in requests),
                inference_s=time.monotonic() - started,
                queue_wait_s=wait_s,
                failed=outcome in ("failed", "timeout"),
                speculative=sum(1 for item in batch if item.speculative),
                worker=worker,
                aborted=outcome == "aborted",
                timed_out=outcome == "timeout",
            )
        )

    def _report(self, report: BatchReport) -> None:
        """Hand a report to ``on_batch``; a hook that raises is logged (with its traceback the first
        time) and never stops the worker."""
        if self._on_batch is None:
            return
        try:
            self._on_batch(report)
        except Exception as exc:
            self._on_batch_failures += 1
            self._record("on_batch error(s)")
            if self._on_batch_failures == 1:
                logger.error("the batcher's on_batch hook failed", exc_info=exc)
            else:
                logger.error(
                    "the batcher's on_batch hook failed again (%d times): %r", self._on_batch_failures, exc
                )
