"""The one small interface every speech-to-text backend implements.

An engine owns a model and turns a batch of finished audio clips into transcripts, synchronously.
It never sees sockets, sessions or the event loop: the batcher calls :meth:`Engine.transcribe` from its
worker threads, at most :attr:`EngineInfo.max_concurrent_calls` at once (one, unless the engine says it
can run more in parallel on one copy of its weights).

Audio handed to an engine is always 16 kHz mono float32 in [-1, 1], already cut to one speech
segment (or an interim window) whose length the session core bounds by ``max_segment_ms``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

SAMPLE_RATE_HZ = 16000
"""The one sample rate engines are fed with."""

Language = Literal["auto", "zh", "en", "ja", "ko", "yue"]
LANGUAGES: tuple[Language, ...] = ("auto", "zh", "en", "ja", "ko", "yue")


@dataclass(frozen=True)
class TranscribeRequest:
    """One clip to transcribe.

    Attributes:
        audio: 16 kHz mono float32 samples in [-1, 1].
        language: ``"auto"`` to let the model detect it, or a language code.
        use_itn: inverse text normalisation and punctuation (SenseVoice ``withitn``).
        word_timestamps: ask for per-word times; engines that cannot give them return no words.
    """

    audio: npt.NDArray[np.float32]
    language: Language = "auto"
    use_itn: bool = False
    word_timestamps: bool = True

    @property
    def duration_s(self) -> float:
        return len(self.audio) / SAMPLE_RATE_HZ

    @property
    def batch_key(self) -> tuple[str, bool]:
        """Requests may share one model call only when this key is equal (one language query per call)."""
        return (self.language, self.use_itn)


@dataclass(frozen=True)
class Word:
    """One recognised word, times in seconds from the start of the clip.

    Attributes:
        word: the word as recognised, lower-cased, without punctuation.
        punctuated_word: the word as it appears in the transcript (case and punctuation kept).
        start_s: start time relative to the clip start.
        end_s: end time relative to the clip start.
        confidence: 0..1, from the model's own posteriors.
    """

    word: str
    punctuated_word: str
    start_s: float
    end_s: float
    confidence: float


@dataclass(frozen=True)
class Transcript:
    """What an engine returns for one request.

    Attributes:
        text: the transcript, with no model tags (``<|en|>`` and friends never appear here).
        confidence: 0..1 for the whole clip, from the model's own posteriors.
        words: per-word times when asked for and available, else empty.
        language: language the model detected or was told, or None when unknown.
        emotion: SenseVoice emotion tag lower-cased (``"neutral"``, ``"happy"``...), or None.
        audio_event: SenseVoice audio-event tag lower-cased (``"speech"``, ``"bgm"``...), or None.
    """

    text: str
    confidence: float
    words: tuple[Word, ...] = ()
    language: str | None = None
    emotion: str | None = None
    audio_event: str | None = None


@dataclass(frozen=True)
class EngineInfo:
    """What an engine says about itself, for ``/health``, logs and the session ``Metadata``.

    Attributes:
        name: short engine name, e.g. ``"sensevoice-small"`` or ``"faster-whisper-tiny.en"``.
        model: the hub id or folder it was loaded from.
        device: ``"cpu"``, ``"cuda:0"``...
        dtype: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        languages: languages it accepts besides ``"auto"``.
        fallback_reason: None for the engine that was asked for; otherwise why the fallback runs.
        max_batch_size: the largest batch it was warmed up for.
        max_audio_s: the longest clip it was warmed up for.
        max_concurrent_calls: how many :meth:`Engine.transcribe` calls may run at once, each from its
            own thread (1: one at a time, the batcher's single worker thread).
        preferred_batch_size: the batch size the server uses when ``--max-batch-size`` is 0 (what was
            measured best for this engine on this device).
        extras: anything else worth reporting (threads, buckets, versions).
    """

    name: str
    model: str
    device: str
    dtype: str
    languages: tuple[str, ...]
    fallback_reason: str | None = None
    max_batch_size: int = 1
    max_audio_s: float = 30.0
    max_concurrent_calls: int = 1
    preferred_batch_size: int = 8
    extras: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """A loaded model. ``transcribe`` is called from at most ``info.max_concurrent_calls`` threads at once."""

    @property
    def info(self) -> EngineInfo: ...

    def transcribe(self, requests: Sequence[TranscribeRequest]) -> list[Transcript]:
        """Transcribe a batch.

        Args:
            requests: one or more clips; the batcher only groups requests with equal ``batch_key``.

        Returns:
            One transcript per request, in the same order.

        Raises:
            Exception: any failure fails the whole batch; the batcher reports it to every request in it.
        """
        ...

    def warmup(self, max_batch_size: int, max_audio_s: float) -> None:
        """Run the largest batch of the longest clips once, so memory reaches its ceiling at start-up."""
        ...


class CallAborted(Exception):
    """Raised by :meth:`Engine.transcribe` when :meth:`AbortableEngine.abort` stopped the call."""


@runtime_checkable
class AbortableEngine(Protocol):
    """An engine that can stop a call already running (ONNX Runtime's ``RunOptions.terminate``).

    The batcher aborts a call only when no one wants any of its answers any more: a speculative final
    whose segment went on (the speaker resumed). The CPU goes back to other sessions' finals at once
    instead of after the whole call.
    """

    def abort(self, requests: Sequence[TranscribeRequest]) -> bool:
        """Stop the call running ``requests`` (the list given to :meth:`Engine.transcribe`), from any
        thread. That call then raises :class:`CallAborted` soon after.

        Returns:
            True when such a call was running and was told to stop.
        """
        ...
