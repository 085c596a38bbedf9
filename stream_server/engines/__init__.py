"""Speech-to-text backends behind one interface (see ``base``)."""

from __future__ import annotations

from .base import (
    LANGUAGES,
    SAMPLE_RATE_HZ,
    Engine,
    EngineInfo,
    Language,
    TranscribeRequest,
    Transcript,
    Word,
)

__all__ = [
    "LANGUAGES",
    "SAMPLE_RATE_HZ",
    "Engine",
    "EngineInfo",
    "Language",
    "TranscribeRequest",
    "Transcript",
    "Word",
]
