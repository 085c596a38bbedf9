"""Frame classifiers: is this frame of 16 kHz audio speech?

A classifier is fed one frame at a time and answers with flags for zero or more of the oldest frames
it has not yet answered for, in order: webrtcvad answers every frame at once; FunASR's FSMN-VAD and
Silero VAD decide in chunks of their own and so answer later (``max_lag_frames`` bounds how much later).
``flush`` answers the rest at once, at the end of a stream and on every ``Finalize``.
The segmenter consumes the flags; it never sees audio.

:class:`NoiseGate` wraps any classifier with an **adaptive noise floor**: it tracks the stream's
background level (:class:`NoiseFloor`, the quietest frame of the last few seconds) and calls a frame
speech only when the inner classifier says so *and* the frame stands ``margin_db`` above that floor. On
recordings with room noise, webrtcvad keeps saying "speech" through breath, hum and reverberation tails
after the talker stops; the gate ends speech where the level falls back to the room's.

:class:`MinSpeechRun` wraps any classifier and drops runs of speech frames shorter than ``min_frames``
that come after at least ``quiet_frames`` non-speech frames (a click, a breath, a frame of typing that
webrtcvad calls speech, in a pause). In a pause, each such blip would restart the segmenter's
endpointing count and hold the segment open for another ``endpointing`` ms. Short runs between short
gaps (noisy speech comes out of webrtcvad as ``SS.SS.SSS``) are kept. It answers a frame as soon as its
run is known to be long enough or over, so non-speech after speech, and so the end of a segment, is not
delayed at all; only speech after a pause waits up to ``min_frames - 1`` frames (the pre-roll keeps that
audio).
"""

from __future__ import annotations

import math
from collections import deque
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
        """End of stream or a client's ``Finalize``: flags for every frame not yet answered.

        The classifier then carries on with the next frame as if the stream had just begun (the
        session flushes on every ``Finalize``, so speech in the lag reaches the from_finalize final).
        """
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


class NoiseFloor:
    """The background level of a stream: the quietest frame of the last ``window_ms``.

    A sliding minimum over frame levels (a monotonic deque, so each frame costs O(1) amortised and
    memory is bounded by the window). Speech always leaves gaps between words within a few seconds, so
    the minimum finds the room's level under it and follows the room when it gets noisier or quieter,
    within one window. Until a whole window has been seen, ``initial_dbfs`` also counts as a level in
    it, so a stream that opens mid-sentence is not taken for a loud room.

    Args:
        frame_ms: length of the frames pushed.
        window_ms: how far back the minimum looks.
        initial_dbfs: the floor assumed before a whole window has been seen (an upper bound on it).

    Raises:
        ValueError: a length is not positive, or the window is shorter than a frame.
    """

    def __init__(self, *, frame_ms: int = 30, window_ms: int = 3000, initial_dbfs: float = -70.0) -> None:
        if frame_ms <= 0 or window_ms < frame_ms:
            raise ValueError(f"need 0 < frame_ms <= window_ms, not frame_ms={frame_ms} window_ms={window_ms}")
        self.window_frames = window_ms // frame_ms
        self.initial_dbfs = initial_dbfs
        self._frames = 0
        self._mins: deque[tuple[int, float]] = deque()  # (frame index, level), levels increasing

    @property
    def floor_dbfs(self) -> float:
        """The current floor (``initial_dbfs`` before any frame)."""
        floor = self._mins[0][1] if self._mins else self.initial_dbfs
        if self._frames < self.window_frames:
            floor = min(floor, self.initial_dbfs)
        return floor

    def push(self, level_dbfs: float) -> float:
        """Take the next frame's level.

        Args:
            level_dbfs: the frame's RMS level (:func:`frame_energy_dbfs`).

        Returns:
            The floor including this frame.
        """
        index = self._frames
        self._frames += 1
        mins = self._mins
        while mins and mins[-1][1] >= level_dbfs:
            mins.pop()
        mins.append((index, level_dbfs))
        while mins[0][0] <= index - self.window_frames:
            mins.popleft()
        return self.floor_dbfs


class NoiseGate:
    """A classifier whose "speech" also needs the frame to stand ``margin_db`` above the noise floor.

    Wraps any :class:`FrameVad` (lagging ones too: the gate's verdicts wait in a queue until the inner
    classifier answers for their frames, so flags keep their order and lag). The floor follows the
    stream's own background (see :class:`NoiseFloor`); digital silence has a floor of -120 dBFS, so on
    clean audio the gate lets everything the inner classifier calls speech through.

    Args:
        inner: the classifier that decides what sounds like speech.
        margin_db: how far above the floor a speech frame must be.
        window_ms: the floor's look-back (:class:`NoiseFloor`).
        initial_floor_dbfs: the floor assumed during the first window.

    Raises:
        ValueError: a negative margin, or bad lengths.
    """

    def __init__(
        self,
        inner: FrameVad,
        *,
        margin_db: float = 15.0,
        window_ms: int = 3000,
        initial_floor_dbfs: float = -70.0,
    ) -> None:
        if not margin_db >= 0:
            raise ValueError(f"margin_db must be >= 0, not {margin_db}")
        self.inner = inner
        self.margin_db = margin_db
        self.frame_samples = inner.frame_samples
        self.max_lag_frames = inner.max_lag_frames
        frame_ms = max(1, 1000 * inner.frame_samples // SAMPLE_RATE_HZ)
        self._floor = NoiseFloor(frame_ms=frame_ms, window_ms=window_ms, initial_dbfs=initial_floor_dbfs)
        self._verdicts: deque[bool] = deque()  # gate verdicts of frames the inner VAD has not answered

    @property
    def floor_dbfs(self) -> float:
        """The noise floor now."""
        return self._floor.floor_dbfs

    def classify(self, frame: Int16Array) -> Sequence[bool]:
        """Take the next frame; return flags for the oldest frames not yet answered (maybe none)."""
        level = frame_energy_dbfs(frame)
        floor = self._floor.push(level)
        self._verdicts.append(level >= floor + self.margin_db)
        return self._combine(self.inner.classify(frame))

    def flush(self) -> Sequence[bool]:
        """End of stream: flags for every frame not yet answered."""
        flags = self._combine(self.inner.flush())
        self._verdicts.clear()
        return flags

    def _combine(self, flags: Sequence[bool]) -> list[bool]:
        out: list[bool] = []
        for flag in flags:
            loud_enough = self._verdicts.popleft() if self._verdicts else False
            out.append(flag and loud_enough)
        return out


class MinSpeechRun:
    """A classifier that drops runs of fewer than ``min_frames`` speech frames that follow a pause.

    See the module docstring. A run still short when the stream ends is kept (the stream cut it, not a
    pause). The stream starts as if after a pause.

    Args:
        inner: the classifier whose flags are filtered.
        min_frames: the shortest run kept after a pause (1 keeps everything).
        quiet_frames: how many non-speech frames (as ``inner`` said) make a pause; 0 filters every run.

    Raises:
        ValueError: ``min_frames`` is below 1 or ``quiet_frames`` below 0.
    """

    def __init__(self, inner: FrameVad, *, min_frames: int = 3, quiet_frames: int = 5) -> None:
        if min_frames < 1 or quiet_frames < 0:
            raise ValueError(f"need min_frames >= 1 and quiet_frames >= 0, not {min_frames}, {quiet_frames}")
        self.inner = inner
        self.min_frames = min_frames
        self.quiet_frames = quiet_frames
        self.frame_samples = inner.frame_samples
        self.max_lag_frames = inner.max_lag_frames + min_frames - 1
        self._pending = 0  # speech frames of a run not yet long enough, held back
        self._confirmed = False  # the current run of speech is kept
        self._quiet = quiet_frames  # non-speech frames (as inner said) before the current run

    def classify(self, frame: Int16Array) -> Sequence[bool]:
        """Take the next frame; return flags for the oldest frames not yet answered (maybe none)."""
        return self._filter(self.inner.classify(frame))

    def flush(self) -> Sequence[bool]:
        """End of stream: flags for every frame not yet answered."""
        out = self._filter(self.inner.flush())
        out += [True] * self._pending
        self._pending = 0
        self._confirmed = False
        self._quiet = self.quiet_frames
        return out

    def _filter(self, flags: Sequence[bool]) -> list[bool]:
        out: list[bool] = []
        for flag in flags:
            if flag and self._confirmed:
                out.append(True)
            elif flag:
                if self._pending == 0 and self._quiet < self.quiet_frames:
                    self._confirmed = True  # after a short gap: part of the speech around it
                    out.append(True)
                    continue
                self._pending += 1
                if self._pending >= self.min_frames:
                    out += [True] * self._pending
                    self._pending = 0
                    self._confirmed = True
            else:
                if self._pending:  # a blip after a pause: dropped (the pause goes on)
                    out += [False] * self._pending
                    self._pending = 0
                elif self._confirmed:
                    self._quiet = 0
                self._confirmed = False
                self._quiet = min(self._quiet + 1, self.quiet_frames)
                out.append(False)
        return out
