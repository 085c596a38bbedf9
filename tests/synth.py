"""Synthetic audio and a tiny driver for session-core tests (no loop, no model)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from stream_server.config import InterimConfig, SegmenterConfig
from stream_server.engines.base import Transcript, Word
from stream_server.protocol import ModelInfo, ServerEvent, StreamOptions
from stream_server.session import Job, Session, SessionIdentity, SessionSettings
from stream_server.vad import EnergyVad

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


def make_session(
    options: StreamOptions | None = None,
    *,
    segmenter: SegmenterConfig | None = None,
    interim: InterimConfig | None = None,
    max_client_errors: int = 16,
    max_session_s: float = 0.0,
) -> Session:
    seg = segmenter or SegmenterConfig()
    settings = SessionSettings(
        segmenter=seg,
        interim=interim or InterimConfig(),
        max_client_errors=max_client_errors,
        max_session_s=max_session_s,
    )
    return Session(options or StreamOptions(), settings, EnergyVad(seg.frame_ms, -40.0), IDENTITY)


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
