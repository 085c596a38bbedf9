"""Frame classifiers: is this frame of 16 kHz audio speech?

A classifier is fed one frame at a time and answers with flags for zero or more of the oldest frames
it has not yet answered for, in order: webrtcvad answers every frame at once; FunASR's FSMN-VAD
decides in chunks and so answers later (``max_lag_frames`` bounds how much later). The segmenter
consumes the flags; it never sees audio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from .engines.base import SAMPLE_RATE_HZ

Int16Array = npt.NDArray[np.int16]

SILENCE_DBFS = -120.0


def frame_energy_dbfs(frame: Int16Array) -> float:
    """RMS level of a frame in dB relative to full scale (-120 for digital silence)."""
    if len(frame) == 0:
        return SILENCE_DBFS
    mean_square = float(np.mean(np.square(frame, dtype=np.float64))) / (32768.0 * 32768.0)
    if mean_square <= 1e-12:
        return SILENCE_DBFS
    return 10.0 * math.log10(mean_square)


class FrameVad(Protocol):
    """Per-session voice-activity classifier over fixed-size 16 kHz frames."""

    frame_samples: int
    max_lag_frames: int

    def classify(self, frame: Int16Array) -> Sequence[bool]:
        """Take the next frame; return flags for the oldest frames not yet answered (maybe none)."""
        ...

    def flush(self) -> Sequence[bool]:
        """End of stream: flags for every frame not yet answered."""
        ...


class WebRtcVad:
    """Google's WebRTC VAD (``webrtcvad-wheels``), one flag per frame, no lag.

    Args:
        aggressiveness: 0 (lets most through) .. 3 (strictest about what is speech).
        frame_ms: 10, 20 or 30 (webrtcvad's only frame sizes).
        min_energy_dbfs: frames quieter than this are never speech, whatever webrtcvad says
            (it reports speech in faint hiss; real speech is far louder).
    """

    def __init__(self, aggressiveness: int = 2, frame_ms: int = 30, min_energy_dbfs: float = -55.0) -> None:
        import webrtcvad  # C extension, no I/O; imported here so the module loads without it for tests

        if frame_ms not in (10, 20, 30):
            raise ValueError(f"frame_ms must be 10, 20 or 30 for webrtcvad, not {frame_ms}")
        self._vad = webrtcvad.Vad(aggressiveness)
        self.frame_samples = SAMPLE_RATE_HZ * frame_ms // 1000
        self.max_lag_frames = 0
        self.min_energy_dbfs = min_energy_dbfs

    def classify(self, frame: Int16Array) -> Sequence[bool]:
        if frame_energy_dbfs(frame) < self.min_energy_dbfs:
            return (False,)
        return (bool(self._vad.is_speech(frame.tobytes(), SAMPLE_RATE_HZ)),)

    def flush(self) -> Sequence[bool]:
        return ()


class EnergyVad:
    """A plain level threshold; deterministic, for tests and as a last resort.

    Args:
        frame_ms: frame length.
        threshold_dbfs: frames at least this loud are speech.
    """

    def __init__(self, frame_ms: int = 30, threshold_dbfs: float = -40.0) -> None:
        self.frame_samples = SAMPLE_RATE_HZ * frame_ms // 1000
        self.max_lag_frames = 0
        self.threshold_dbfs = threshold_dbfs

    def classify(self, frame: Int16Array) -> Sequence[bool]:
        return (frame_energy_dbfs(frame) >= self.threshold_dbfs,)

    def flush(self) -> Sequence[bool]:
        return ()
