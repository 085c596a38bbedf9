"""Ground truth for when speech ends, taken from a recording that has no labels.

A recording's speech is found from its level alone, the same way for every recording, so a VAD (or the
whole server) can be scored against it:

* the recording is cut into frames of ``frame_ms`` (10 ms); a trailing part shorter than a frame is
  ignored;
* a frame is **loud** when its RMS level is within ``range_db`` (35 dB) of the recording's loudest frame
  (digital silence is never loud, and a recording of nothing but digital silence has no loud frame);
* loud frames form **runs**: two loud frames belong to the same run unless at least ``min_pause_ms`` of
  frames that are not loud lie between them;
* a run's **true end of speech** is the end of its last loud frame, its start the start of its first.

Where a recording comes with annotated speech (speaker turns, say), pass them as ``within``: only frames
inside them can be loud, and the loudest frame is looked for inside them too. The annotation then says
*which* sounds are speech (a door, typing or a beep within 35 dB of the talker is not), and the level
still says where speech ends: annotated boundaries are too loose for that (in the AMI clips they are off
by a few hundred milliseconds either way), so pad them a little.

The level is relative to the recording's own loudest frame, so the gain it was recorded at does not
matter; what a 35 dB range leaves out is the room: noise, hum, breath and reverberation tails lie further
below the talker's peaks. Use a ``min_pause_ms`` equal to the endpointing under test: then every run end
is a point where an ideal endpointer closes a segment exactly ``min_pause_ms`` later.

Nothing in the server imports this module (``load_tests/`` and the tests do).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_FRAME_MS",
    "DEFAULT_RANGE_DB",
    "SpeechRun",
    "frame_levels_db",
    "loud_frames",
    "runs_from_loud_frames",
    "spans_mask",
    "speech_runs",
]

DEFAULT_FRAME_MS = 10
"""Frame length of the ground truth."""

DEFAULT_RANGE_DB = 35.0
"""How far below the loudest frame a frame may be and still count as loud."""

Samples = npt.NDArray[np.int16] | npt.NDArray[np.float32] | npt.NDArray[np.float64]

Spans = Sequence[tuple[float, float]]
"""``(start_s, end_s)`` pairs, seconds from the start of the recording; they may overlap."""


@dataclass(frozen=True)
class SpeechRun:
    """One stretch of speech: loud frames with no pause of ``min_pause_ms`` or more between them.

    Attributes:
        start_s: start of its first loud frame, seconds from the start of the recording.
        end_s: end of its last loud frame (the true end of speech), seconds from the start.
        loud_s: how much of it is loud, in seconds (``frame_ms`` per loud frame).
    """

    start_s: float
    end_s: float
    loud_s: float

    @property
    def duration_s(self) -> float:
        """``end_s - start_s``."""
        return self.end_s - self.start_s


def _frame_samples(sample_rate_hz: int, frame_ms: int) -> int:
    if sample_rate_hz <= 0:
        raise ValueError(f"sample_rate_hz must be positive, not {sample_rate_hz}")
    if frame_ms <= 0:
        raise ValueError(f"frame_ms must be positive, not {frame_ms}")
    size = sample_rate_hz * frame_ms // 1000
    if size * 1000 != sample_rate_hz * frame_ms:
        raise ValueError(f"{frame_ms} ms is not a whole number of samples at {sample_rate_hz} Hz")
    return size


def frame_levels_db(
    samples: Samples, *, sample_rate_hz: int = 16000, frame_ms: int = DEFAULT_FRAME_MS
) -> npt.NDArray[np.float64]:
    """RMS level of each frame in dB relative to full scale.

    Args:
        samples: mono audio, int16 or float in [-1, 1] (int16 is divided by 32768).
        sample_rate_hz: its sample rate.
        frame_ms: frame length; frame ``i`` covers samples ``[i*F, (i+1)*F)``.

    Returns:
        One level per whole frame; ``-inf`` for a frame of digital silence.

    Raises:
        ValueError: ``samples`` is not 1-D, or the frame is not a positive whole number of samples.
    """
    size = _frame_samples(sample_rate_hz, frame_ms)
    array = np.asarray(samples)
    if array.ndim != 1:
        raise ValueError(f"samples must be 1-D (mono), not {array.ndim}-D")
    scale = 1.0 / 32768.0 if array.dtype == np.int16 else 1.0
    count = len(array) // size
    frames = array[: count * size].astype(np.float64).reshape(count, size) * scale
    mean_square = np.mean(np.square(frames), axis=1)
    with np.errstate(divide="ignore"):
        levels: npt.NDArray[np.float64] = 10.0 * np.log10(mean_square)
    return levels


def spans_mask(spans: Spans, frame_count: int, *, frame_ms: int = DEFAULT_FRAME_MS) -> npt.NDArray[np.bool_]:
    """Which frames overlap any of ``spans``.

    Args:
        spans: ``(start_s, end_s)`` pairs (an empty or reversed pair covers nothing).
        frame_count: how many frames there are.
        frame_ms: frame length.

    Returns:
        One flag per frame: True when some span covers part of it.
    """
    mask = np.zeros(frame_count, dtype=np.bool_)
    for start_s, end_s in spans:
        first = max(0, math.floor(start_s * 1000 / frame_ms))
        last = min(frame_count, math.ceil(end_s * 1000 / frame_ms))
        if last > first:
            mask[first:last] = True
    return mask


def loud_frames(
    samples: Samples,
    *,
    sample_rate_hz: int = 16000,
    frame_ms: int = DEFAULT_FRAME_MS,
    range_db: float = DEFAULT_RANGE_DB,
    within: Spans | None = None,
) -> npt.NDArray[np.bool_]:
    """Which frames are loud: within ``range_db`` of the recording's loudest frame.

    Args:
        samples: mono audio, int16 or float in [-1, 1].
        sample_rate_hz: its sample rate.
        frame_ms: frame length.
        range_db: how far below the loudest frame a loud frame may be (positive).
        within: annotated speech, if any: frames outside these spans are never loud, and the loudest
            frame is the loudest inside them.

    Returns:
        One flag per whole frame (all False when the recording, or what ``within`` leaves of it, is
        digital silence or shorter than a frame).

    Raises:
        ValueError: bad ``samples``, frame length or range.
    """
    if not range_db > 0 or math.isinf(range_db):
        raise ValueError(f"range_db must be a positive number, not {range_db}")
    levels = frame_levels_db(samples, sample_rate_hz=sample_rate_hz, frame_ms=frame_ms)
    if within is not None:
        levels = np.where(spans_mask(within, len(levels), frame_ms=frame_ms), levels, -np.inf)
    if len(levels) == 0 or not np.isfinite(levels.max()):
        return np.zeros(len(levels), dtype=np.bool_)
    loud: npt.NDArray[np.bool_] = levels >= levels.max() - range_db
    return loud


def runs_from_loud_frames(
    loud: npt.NDArray[np.bool_], *, min_pause_ms: int, frame_ms: int = DEFAULT_FRAME_MS
) -> list[SpeechRun]:
    """Group loud frames into runs separated by pauses of at least ``min_pause_ms``.

    Args:
        loud: one flag per frame, as :func:`loud_frames` gives.
        min_pause_ms: frames that are not loud, this long or longer, end a run (positive).
        frame_ms: frame length of ``loud``.

    Returns:
        The runs in order.

    Raises:
        ValueError: ``min_pause_ms`` or ``frame_ms`` is not positive.
    """
    if min_pause_ms <= 0:
        raise ValueError(f"min_pause_ms must be positive, not {min_pause_ms}")
    if frame_ms <= 0:
        raise ValueError(f"frame_ms must be positive, not {frame_ms}")
    pause_frames = math.ceil(min_pause_ms / frame_ms)
    indices = np.flatnonzero(np.asarray(loud, dtype=np.bool_))
    if len(indices) == 0:
        return []
    gaps = np.diff(indices) - 1
    breaks = np.flatnonzero(gaps >= pause_frames)
    firsts = np.concatenate([indices[:1], indices[breaks + 1]])
    lasts = np.concatenate([indices[breaks], indices[-1:]])
    bounds = np.concatenate([[0], breaks + 1, [len(indices)]])
    seconds = frame_ms / 1000.0
    return [
        SpeechRun(
            start_s=int(first) * seconds,
            end_s=(int(last) + 1) * seconds,
            loud_s=int(bounds[k + 1] - bounds[k]) * seconds,
        )
        for k, (first, last) in enumerate(zip(firsts, lasts, strict=True))
    ]


def speech_runs(
    samples: Samples,
    *,
    min_pause_ms: int,
    sample_rate_hz: int = 16000,
    frame_ms: int = DEFAULT_FRAME_MS,
    range_db: float = DEFAULT_RANGE_DB,
    within: Spans | None = None,
) -> list[SpeechRun]:
    """The runs of speech in a recording and where each truly ends (see the module docstring).

    Args:
        samples: mono audio, int16 or float in [-1, 1].
        min_pause_ms: pauses at least this long separate runs (use the endpointing under test).
        sample_rate_hz: its sample rate.
        frame_ms: frame length.
        range_db: how far below the loudest frame a loud frame may be.
        within: annotated speech, if any (see :func:`loud_frames`).

    Returns:
        The runs in order (none for digital silence).

    Raises:
        ValueError: bad ``samples``, frame length, range or pause.
    """
    loud = loud_frames(
        samples, sample_rate_hz=sample_rate_hz, frame_ms=frame_ms, range_db=range_db, within=within
    )
    return runs_from_loud_frames(loud, min_pause_ms=min_pause_ms, frame_ms=frame_ms)
