"""A fake engine for the layers below the model: records batches, can be slow, can fail."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from stream_server.engines.base import EngineInfo, TranscribeRequest, Transcript, Word


class FakeEngine:
    """Transcribes a clip as ``"clip <seconds>"`` with one word spanning it.

    Args:
        delay_s: sleep this long per batch (plus ``per_item_s`` per request) to mimic compute.
        fail_when: raise for a batch when this returns True for any of its requests.
        languages: what ``info`` claims to support.
    """

    def __init__(
        self,
        *,
        delay_s: float = 0.0,
        per_item_s: float = 0.0,
        fail_when: Callable[[TranscribeRequest], bool] | None = None,
        languages: tuple[str, ...] = ("zh", "en", "ja", "ko", "yue"),
        fallback_reason: str | None = None,
    ) -> None:
        self.delay_s = delay_s
        self.per_item_s = per_item_s
        self.fail_when = fail_when
        self.batches: list[list[TranscribeRequest]] = []
        self.lock = threading.Lock()
        self.threads: set[str] = set()
        self._info = EngineInfo(
            name="fake-engine",
            model="fake",
            device="cpu",
            dtype="fp32",
            languages=languages,
            fallback_reason=fallback_reason,
        )

    @property
    def info(self) -> EngineInfo:
        return self._info

    def transcribe(self, requests: Sequence[TranscribeRequest]) -> list[Transcript]:
        with self.lock:
            self.batches.append(list(requests))
            self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s + self.per_item_s * len(requests))
        if self.fail_when is not None and any(self.fail_when(r) for r in requests):
            raise RuntimeError("fake engine failure")
        out = []
        for r in requests:
            seconds = len(r.audio) / 16000
            peak = float(np.max(np.abs(r.audio))) if len(r.audio) else 0.0
            text = f"clip {seconds:.2f}"
            words = (Word("clip", "clip", 0.0, seconds, 0.8),) if r.word_timestamps else ()
            out.append(Transcript(text, 0.8 if peak > 0 else 0.0, words, "en", "neutral", "speech"))
        return out

    def warmup(self, max_batch_size: int, max_audio_s: float) -> None:
        pass
