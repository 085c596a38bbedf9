"""One batching worker shared by every session (README, "Batching").

Requests wait in a bounded queue with their futures. The worker takes the oldest final (or, when no
final waits, the oldest interim), waits up to ``max_wait_ms`` for company, fills the batch up to
``max_batch_size`` with requests of the same ``batch_key`` and the closest lengths, runs the engine in
its one worker thread, and resolves *every* future: with a transcript, or with the batch's exception
when the engine raises. The worker itself never dies of a batch's failure.

Finals are never dropped: ``submit_final`` waits for room, and that wait is the back-pressure the
transport passes on to the client's socket. Interims are optional: ``submit_interim`` refuses them
when the queue is busy, they never share a batch with finals, and they are skipped when they have
waited too long.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .config import BatchConfig
from .engines.base import Engine, TranscribeRequest, Transcript
from .errors import BatcherClosed, EngineError, InterimSkipped

logger = logging.getLogger(__name__)


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
    """

    size: int
    interim: bool
    audio_s: float
    inference_s: float
    queue_wait_s: float
    failed: bool


@dataclass(eq=False)
class _Item:
    request: TranscribeRequest
    future: asyncio.Future[Transcript]
    interim: bool
    enqueued_s: float = field(default_factory=time.monotonic)


class Batcher:
    """Batches transcription requests from all sessions onto one engine.

    Args:
        engine: the loaded model; called from one worker thread only.
        config: batch size, wait, queue bounds.
        on_batch: called on the event loop after every engine call (metrics).
    """

    def __init__(
        self,
        engine: Engine,
        config: BatchConfig,
        *,
        on_batch: Callable[[BatchReport], None] | None = None,
        interim_max_wait_s: float = 2.0,
    ) -> None:
        self.engine = engine
        self.config = config
        self._on_batch = on_batch
        self._interim_max_wait_s = interim_max_wait_s
        self._finals: deque[_Item] = deque()
        self._interims: deque[_Item] = deque()
        self._changed = asyncio.Condition()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._running: list[_Item] = []

    @property
    def busy(self) -> bool:
        """An engine call is running."""
        return bool(self._running)

    # ------------------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._finals) + len(self._interims)

    @property
    def finals_waiting(self) -> int:
        return len(self._finals)

    @property
    def interims_waiting(self) -> int:
        return len(self._interims)

    def start(self) -> None:
        """Start the worker task on the running loop."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        """Stop taking requests, fail what is queued, finish the call in progress, stop the worker."""
        self._closed = True
        for item in [*self._finals, *self._interims, *self._running]:
            if not item.future.done():
                item.future.set_exception(BatcherClosed("The server is shutting down."))
        self._finals.clear()
        self._interims.clear()
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        self._executor.shutdown(wait=True)

    async def submit_final(self, request: TranscribeRequest) -> Transcript:
        """Queue a final request, waiting for room when the queue is full.

        Returns:
            The transcript.

        Raises:
            Exception: whatever the engine raised for the batch; BatcherClosed when stopping.
        """
        async with self._changed:
            await self._changed.wait_for(lambda: self._closed or self.queue_depth < self.config.max_queue)
            if self._closed:
                raise BatcherClosed("The server is shutting down.")
            item = _Item(request, asyncio.get_running_loop().create_future(), interim=False)
            self._finals.append(item)
            self._changed.notify_all()
        return await item.future

    def submit_speculative(self, request: TranscribeRequest) -> asyncio.Future[Transcript] | None:
        """Queue a final started early (the speaker paused) unless the model is backlogged.

        It waits with the finals (it is likely to become one) but, like an interim, is refused when
        finals are already waiting or the queue is busy, so speculation never delays a real final.

        Returns:
            A future for the transcript, or None when refused.
        """
        if self._refuses_optional_work():
            return None
        item = _Item(request, asyncio.get_running_loop().create_future(), interim=False)
        self._finals.append(item)
        asyncio.get_running_loop().create_task(self._notify())
        return item.future

    def submit_interim(self, request: TranscribeRequest) -> asyncio.Future[Transcript] | None:
        """Queue an interim request unless the model is busy.

        Returns:
            A future for the transcript (it may fail with InterimSkipped later), or None when refused.
        """
        if self._refuses_optional_work():
            return None
        item = _Item(request, asyncio.get_running_loop().create_future(), interim=True)
        self._interims.append(item)
        asyncio.get_running_loop().create_task(self._notify())
        return item.future

    def _refuses_optional_work(self) -> bool:
        """Interims and speculative finals are refused when closed, when finals are waiting, or when
        the queue is more than its interim share full."""
        limit = max(1, int(self.config.max_queue * self.config.interim_queue_fraction))
        return self._closed or self.queue_depth >= limit or bool(self._finals)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # ------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            await self._execute(batch)

    def _prune(self) -> None:
        """Forget requests whose sessions went away; skip interims that waited too long."""
        now = time.monotonic()
        for queue in (self._finals, self._interims):
            if any(item.future.done() for item in queue):
                kept = [item for item in queue if not item.future.done()]
                queue.clear()
                queue.extend(kept)
        while self._interims and now - self._interims[0].enqueued_s > self._interim_max_wait_s:
            self._interims.popleft().future.set_exception(InterimSkipped())

    async def _next_batch(self) -> list[_Item]:
        async with self._changed:
            while True:
                self._prune()
                if self._finals or self._interims:
                    break
                await self._changed.wait()
            # Wait a little for company unless a full batch is already waiting.
            deadline = time.monotonic() + self.config.max_wait_ms / 1000
            while len(self._finals) < self.config.max_batch_size and not self._closed:
                if not self._finals and len(self._interims) >= self.config.max_batch_size:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    break
            self._prune()
            queue = self._finals if self._finals else self._interims
            batch = self._take(queue)
            self._changed.notify_all()  # room in the queue for waiting finals
            return batch

    def _take(self, queue: deque[_Item]) -> list[_Item]:
        """The oldest item plus the closest-length items with the same batch key."""
        if not queue:
            return []
        first = queue.popleft()
        key, length = first.request.batch_key, len(first.request.audio)
        same = [item for item in queue if item.request.batch_key == key]
        same.sort(key=lambda item: abs(len(item.request.audio) - length))
        chosen = same[: self.config.max_batch_size - 1]
        for item in chosen:
            queue.remove(item)
        return [first, *chosen]

    async def _call(self, batch: list[_Item]) -> bool:
        """One engine call. On success resolve every future and return True; on failure set the
        exception on every future only when the batch has one request (callers retry bigger ones)."""
        loop = asyncio.get_running_loop()
        requests = [item.request for item in batch]
        try:
            transcripts = await loop.run_in_executor(self._executor, self.engine.transcribe, requests)
            if len(transcripts) != len(batch):
                raise EngineError(f"engine returned {len(transcripts)} transcripts for {len(batch)} requests")
        except Exception as exc:
            logger.error("batch of %d failed: %s", len(batch), exc, exc_info=not isinstance(exc, EngineError))
            if len(batch) == 1 and not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return False
        for item, transcript in zip(batch, transcripts, strict=True):
            if not item.future.done():
                item.future.set_result(transcript)
        return True

    async def _execute(self, batch: list[_Item]) -> None:
        batch = [item for item in batch if not item.future.done()]
        if not batch:
            return
        requests = [item.request for item in batch]
        started = time.monotonic()
        wait_s = started - min(item.enqueued_s for item in batch)
        failed = False
        self._running = batch
        try:
            failed = not await self._call(batch)
            if failed and len(batch) > 1:
                # Isolate the request that broke the batch (or a batch too big for memory): run each alone.
                logger.warning("retrying the %d requests of the failed batch one by one", len(batch))
                for item in batch:
                    if not item.future.done():
                        await self._call([item])
        finally:
            self._running = []
        if self._on_batch is not None:
            self._on_batch(
                BatchReport(
                    size=len(batch),
                    interim=batch[0].interim,
                    audio_s=sum(r.duration_s for r in requests),
                    inference_s=time.monotonic() - started,
                    queue_wait_s=wait_s,
                    failed=failed,
                )
            )
