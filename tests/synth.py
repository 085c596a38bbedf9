"""Synthetic audio and a tiny driver for session-core tests (no loop, no model)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from stream_server.config import InterimConfig, SegmenterConfig
from stream_server.engines.base import Transcript, Word
from stream_server.protocol import Error, ModelInfo, Results, ServerEvent, StreamOptions
from stream_server.ring import Int16Array
from stream_server.session import Job, Session, SessionIdentity, SessionSettings
from stream_server.vad import EnergyVad, FrameVad

RATE = 16000


def tone(ms: int, *, level: float = 0.3, freq_hz: float = 220.0, rate: int = RATE) -> np.ndarray:
    """A voiced-like harmonic tone, loud enough for the energy VAD."""
    t = np.arange(rate * ms // 1000) / rate
    wave = sum(np.sin(2 * np.pi * freq_hz * k * t) / k for k in range(1, 5))
    return (level * wave / 1.6).astype(np.float32)


def silence(ms: int, *, level: float = 0.0, rate: int = RATE, seed: int = 0) -> np.ndarray:
    n = rate * ms // 1000
    if level == 0.0:
        return np.zeros(n, dtype=np.float32)
    return (np.random.default_rng(seed).standard_normal(n) * level).astype(np.float32)


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1 - 1 / 32768) * 32768).astype("<i2").tobytes()


def chunks(data: bytes, size: int) -> Iterable[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


IDENTITY = SessionIdentity(
    request_id="test-request",
    created="2026-01-01T00:00:00Z",
    model=ModelInfo(name="fake", version="0", arch="fake", uuid="fake-uuid"),
)


class LaggingVad:
    """The energy VAD answering every frame ``lag_frames`` frames late, as FSMN-VAD and Silero do; a
    flush answers the rest at once.

    Attributes:
        flushes: how many times it was flushed.
    """

    def __init__(self, frame_ms: int = 30, lag_frames: int = 10, threshold_dbfs: float = -40.0) -> None:
        self._inner = EnergyVad(frame_ms, threshold_dbfs)
        self.frame_samples = self._inner.frame_samples
        self.max_lag_frames = lag_frames
        self._held: deque[bool] = deque()
        self.flushes = 0

    def classify(self, frame: Int16Array) -> Sequence[bool]:
        self._held.extend(self._inner.classify(frame))
        out: list[bool] = []
        while len(self._held) > self.max_lag_frames:
            out.append(self._held.popleft())
        return out

    def flush(self) -> Sequence[bool]:
        self.flushes += 1
        out = list(self._held)
        self._held.clear()
        return out


def make_session(
    options: StreamOptions | None = None,
    *,
    segmenter: SegmenterConfig | None = None,
    interim: InterimConfig | None = None,
    max_client_errors: int = 16,
    max_session_s: float = 0.0,
    vad: FrameVad | None = None,
    vad_factory: Callable[[], FrameVad] | None = None,
    max_finalize_per_s: float = 5.0,
    finalize_burst: int = 10,
) -> Session:
    seg = segmenter or SegmenterConfig()
    settings = SessionSettings(
        segmenter=seg,
        interim=interim or InterimConfig(),
        max_client_errors=max_client_errors,
        max_session_s=max_session_s,
        max_finalize_per_s=max_finalize_per_s,
        finalize_burst=finalize_burst,
    )

    def energy_vad() -> FrameVad:
        return EnergyVad(seg.frame_ms, -40.0)

    return Session(
        options or StreamOptions(),
        settings,
        vad or energy_vad(),
        IDENTITY,
        vad_factory=vad_factory or energy_vad,
    )


def describe(job: Job) -> Transcript:
    """A transcript naming the job's span, with one word over its whole length."""
    duration = len(job.request.audio) / RATE
    text = f"{job.kind.value} {job.start_sample} {job.end_sample}"
    return Transcript(
        text=text,
        confidence=0.9,
        words=(Word(text.split()[0], text.split()[0], 0.0, duration, 0.9),)
        if job.request.word_timestamps
        else (),
        language="en",
        emotion="neutral",
        audio_event="speech",
    )


class Driver:
    """Feeds a session and answers its jobs at once (or holds them), collecting events."""

    def __init__(self, session: Session, answer: Callable[[Job], Transcript] | None = describe) -> None:
        self.session = session
        self.answer = answer
        self.events: list[ServerEvent] = []
        self.jobs: list[Job] = []
        self.held: list[Job] = []

    def pump(self) -> None:
        while True:
            jobs = self.session.jobs_to_run()
            if not jobs:
                break
            self.jobs.extend(jobs)
            for job in jobs:
                if self.answer is None:
                    self.held.append(job)
                else:
                    self.session.receive_result(job.job_id, self.answer(job))
        self.events.extend(self.session.events_to_send())

    def audio(self, data: bytes, frame_bytes: int = 3200) -> None:
        for piece in chunks(data, frame_bytes):
            self.session.receive_audio(piece)
            self.pump()

    def text(self, message: str) -> None:
        self.session.receive_text(message)
        self.pump()

    def of_type(self, kind: str) -> list[dict[str, object]]:
        return [e.to_json() for e in self.events if e.to_json()["type"] == kind]

    def finals(self) -> list[dict[str, object]]:
        return [r for r in self.of_type("Results") if r["is_final"]]


def check_segments(d: Driver) -> list[Results]:
    """Assert the session's promise about segments and return the finals that close one.

    Every segment the session closed got exactly one final ``Results`` or one ``Error`` on its channel;
    no ``INTERNAL_ERROR``; a channel's finals start at or after 0, last longer than 0 and follow each
    other without overlapping. Call it once, at the end (it drains ``segments_closed``).
    """
    closed = d.session.segments_closed()
    assert not [e for e in d.events if isinstance(e, Error) and e.code == "INTERNAL_ERROR"], d.events
    finals = [e for e in d.events if isinstance(e, Results) and e.is_final and e.segment_id]
    failed = [
        (e.channel_index[0] if e.channel_index else 0, e.segment_id)
        for e in d.events
        if isinstance(e, Error) and e.segment_id is not None
    ]
    answered = [(e.channel_index[0], e.segment_id) for e in finals] + failed
    assert sorted(answered) == sorted(closed), "one final or Error each"
    previous_end: dict[int, float] = {}
    for final in finals:
        channel = final.channel_index[0]
        assert final.start_s >= 0 and final.duration_s > 0, final
        assert final.start_s >= previous_end.get(channel, 0.0) - 1e-9, f"{final} overlaps the final before it"
        previous_end[channel] = final.start_s + final.duration_s
    return finals
