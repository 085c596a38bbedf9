"""Silero VAD as a :class:`~stream_server.vad.FrameVad`, through ONNX Runtime.

The weights come from the ``silero-vad`` PyPI package (``silero_vad/data/silero_vad.onnx``, MIT). Install
it without its declared dependencies (``pip install --no-deps silero-vad==6.2.3``): they would pull torch
and, through extras, torchaudio; the ONNX model needs only ``onnxruntime`` and numpy. Its folder is found
with :func:`importlib.util.find_spec`; the package is never imported (importing it imports torch and sets
torch's thread count for the whole process).

How the package's own ``OnnxWrapper`` runs the model, and what is done the same way here:

- 16 kHz audio in chunks of exactly 512 samples (32 ms), float32 in [-1, 1];
- each call gets the chunk **with the previous chunk's last 64 samples in front** (zeros before the
  first), 576 samples in all, plus the recurrent state (2 x 1 x 128, zeros at first) and the rate; it
  returns the probability that the chunk is speech and the next state.

One ONNX Runtime session per process (:class:`SileroVadModel`, one intra-op and one inter-op thread;
``run`` is thread-safe) serves every stream; each stream's :class:`SileroFrameVad` holds its own state,
context and pending samples: about 5 KB, whatever the stream's length.

**From chunks to frames.** The segmenter works in frames of ``frame_ms`` (30 ms); Silero in 32 ms chunks.
Each chunk gets a speech/non-speech state with the hysteresis of Silero's ``get_speech_timestamps``:
speech starts at a chunk whose probability is at least ``threshold`` and ends at the first chunk below
``neg_threshold`` (``threshold - 0.15`` unless given). A frame takes the state of the chunk that holds its
middle sample, and is answered as soon as that chunk has been scored: at most ``max_lag_frames`` frames
late (1 at 30 ms frames). ``get_speech_timestamps`` also waits ``min_silence_duration_ms`` before it ends a
segment and pads segments; here the segmenter does both (endpointing, pre- and post-roll), so neither is
repeated.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .engines.base import SAMPLE_RATE_HZ
from .errors import ConfigError, EngineError

__all__ = [
    "CHUNK_SAMPLES",
    "CONTEXT_SAMPLES",
    "MODEL_FILE",
    "SileroFrameVad",
    "SileroVadModel",
    "packaged_model_path",
]

Int16Array = npt.NDArray[np.int16]
Float32Array = npt.NDArray[np.float32]

CHUNK_SAMPLES = 512
"""Samples Silero scores per call at 16 kHz (32 ms)."""

CONTEXT_SAMPLES = 64
"""Samples of the previous chunk put in front of each chunk (Silero v5 and later)."""

STATE_SHAPE = (2, 1, 128)
"""Silero's recurrent state for one stream."""

MODEL_FILE = "silero_vad.onnx"
"""The ONNX model inside the package's ``data`` folder (the one ``load_silero_vad(onnx=True)`` uses)."""

PACKAGE = "silero-vad"
MODULE = "silero_vad"


def packaged_model_path() -> Path:
    """Where the installed ``silero-vad`` package keeps its ONNX model.

    Returns:
        The path of ``silero_vad/data/silero_vad.onnx``.

    Raises:
        EngineError: the package is not installed, or has no such file.
    """
    spec = importlib.util.find_spec(MODULE)  # a top-level package: found without importing it
    if spec is None or not spec.submodule_search_locations:
        raise EngineError(
            f"Silero VAD needs the {PACKAGE} package: pip install --no-deps {PACKAGE}==6.2.3 "
            "(its declared dependencies would pull torch; only onnxruntime is needed)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / MODEL_FILE
    if not path.is_file():
        raise EngineError(f"the {PACKAGE} package at {path.parent.parent} has no data/{MODEL_FILE}")
    return path


class SileroVadModel:
    """Silero VAD loaded once per process; :meth:`session_vad` gives each stream its own state.

    Build it with :meth:`load`.

    Args:
        session: an ``onnxruntime.InferenceSession`` (or anything with its ``get_inputs`` and ``run``)
            of a model with Silero's inputs.
        path: where it was loaded from.
        threads: its intra-op threads.

    Attributes:
        path: the ONNX file loaded.
        threads: ONNX Runtime intra-op threads.

    Raises:
        EngineError: the model does not take Silero's inputs.
    """

    def __init__(self, session: Any, path: Path, *, threads: int) -> None:
        self._session = session
        self.path = path
        self.threads = threads
        self._rate = np.array(SAMPLE_RATE_HZ, dtype=np.int64)
        names = {i.name for i in session.get_inputs()}
        if names != {"input", "state", "sr"}:
            raise EngineError(f"{path} takes inputs {sorted(names)}, not Silero's input, state and sr")

    @classmethod
    def load(cls, *, model_path: str | Path | None = None, threads: int = 1) -> SileroVadModel:
        """Open the ONNX model on the CPU.

        Args:
            model_path: an ONNX file with Silero's inputs (``input``, ``state``, ``sr``); default the
                one in the ``silero-vad`` package.
            threads: ONNX Runtime intra-op threads (1: a call takes ~0.25 ms; more only adds overhead).

        Returns:
            The loaded model.

        Raises:
            ConfigError: ``threads`` is not positive.
            EngineError: the package or file is missing, or ONNX Runtime could not load it.
        """
        if threads < 1:
            raise ConfigError(f"threads: must be at least 1, not {threads}")
        path = Path(model_path) if model_path is not None else packaged_model_path()
        if not path.is_file():
            raise EngineError(f"Silero VAD model {path} does not exist")
        try:
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3  # errors only: the model's unused initializers are not news
            session = onnxruntime.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise EngineError(
                f"ONNX Runtime could not load Silero VAD from {path}: {type(exc).__name__}: {exc}"
            ) from exc
        return cls(session, path, threads=threads)

    def session_vad(
        self, *, frame_ms: int = 30, threshold: float = 0.5, neg_threshold: float | None = None
    ) -> SileroFrameVad:
        """A classifier for one stream.

        Args:
            frame_ms: the session's frame length (the segmenter's ``frame_ms``).
            threshold: probability at or above which speech starts (Silero's default 0.5).
            neg_threshold: probability below which speech ends; default ``max(threshold - 0.15, 0.01)``,
                as ``get_speech_timestamps`` does.

        Returns:
            The stream's :class:`SileroFrameVad`.

        Raises:
            ConfigError: a setting is out of range.
        """
        return SileroFrameVad(self, frame_ms=frame_ms, threshold=threshold, neg_threshold=neg_threshold)

    def run(self, window: Float32Array, state: Float32Array) -> tuple[float, Float32Array]:
        """Score one chunk.

        Args:
            window: shape (1, 576): the previous 64 samples, then the 512-sample chunk, in [-1, 1].
            state: the stream's state, shape (2, 1, 128).

        Returns:
            The chunk's speech probability and the next state.
        """
        probability, next_state = self._session.run(None, {"input": window, "state": state, "sr": self._rate})
        return float(probability[0, 0]), np.asarray(next_state, dtype=np.float32)


class SileroFrameVad:
    """One stream's Silero VAD, answering frames once the chunk holding their middle has been scored.

    See the module docstring. Build it with :meth:`SileroVadModel.session_vad`.

    Attributes:
        frame_samples: samples per frame.
        max_lag_frames: frames :meth:`classify` may hold back.
        threshold: probability that starts speech.
        neg_threshold: probability below which speech ends.
    """

    def __init__(
        self, model: SileroVadModel, *, frame_ms: int, threshold: float, neg_threshold: float | None
    ) -> None:
        if not 1 <= frame_ms <= 1000:
            raise ConfigError(f"frame_ms: must be 1..1000, not {frame_ms}")
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"threshold: must be within (0, 1), not {threshold}")
        negative = max(threshold - 0.15, 0.01) if neg_threshold is None else neg_threshold
        if not 0.0 < negative <= threshold:
            raise ConfigError(f"neg_threshold: must be within (0, threshold], not {negative}")
        self._model = model
        self.threshold = threshold
        self.neg_threshold = negative
        self.frame_samples = SAMPLE_RATE_HZ * frame_ms // 1000
        # The chunk holding a frame's middle ends at most CHUNK_SAMPLES after that middle, so at most
        # CHUNK_SAMPLES - (frame_samples - frame_samples // 2) after the frame's own end.
        after_end = CHUNK_SAMPLES - (self.frame_samples - self.frame_samples // 2)
        self.max_lag_frames = max(0, math.ceil(after_end / self.frame_samples))
        self._reset()

    def _reset(self) -> None:
        self._state = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._window = np.zeros((1, CONTEXT_SAMPLES + CHUNK_SAMPLES), dtype=np.float32)
        self._pending = np.zeros(CHUNK_SAMPLES, dtype=np.float32)  # samples of the chunk being filled
        self._pending_count = 0
        self._triggered = False
        self._chunk_speech: list[bool] = []  # states of scored chunks from _first_chunk on
        self._first_chunk = 0
        self._received_frames = 0
        self._answered_frames = 0

    def classify(self, frame: Int16Array) -> Sequence[bool]:
        """Take the next frame; return flags for the oldest frames not yet answered (maybe none).

        Raises:
            ValueError: the frame is not ``frame_samples`` long.
        """
        if len(frame) != self.frame_samples:
            raise ValueError(f"Silero VAD frames must be {self.frame_samples} samples, not {len(frame)}")
        self._received_frames += 1
        samples = frame.astype(np.float32) * np.float32(1.0 / 32768.0)
        position = 0
        while position < len(samples):
            take = min(CHUNK_SAMPLES - self._pending_count, len(samples) - position)
            self._pending[self._pending_count : self._pending_count + take] = samples[
                position : position + take
            ]
            self._pending_count += take
            position += take
            if self._pending_count == CHUNK_SAMPLES:
                self._score_pending()
        return self._answer()

    def flush(self) -> Sequence[bool]:
        """End of stream: the last partial chunk is scored padded with zeros (as Silero pads the end of a
        file); flags for every frame not yet answered.

        The classifier is then as new: the stream's next frame (after a ``Finalize``) starts it afresh.
        """
        if self._pending_count:
            self._pending[self._pending_count :] = 0.0
            self._score_pending()
        flags = self._answer()
        self._reset()
        return flags

    # ----------------------------------------------------------------------------------------------

    def _scored_samples(self) -> int:
        return (self._first_chunk + len(self._chunk_speech)) * CHUNK_SAMPLES

    def _score_pending(self) -> None:
        window = self._window
        window[0, CONTEXT_SAMPLES:] = self._pending
        probability, self._state = self._model.run(window, self._state)
        window[0, :CONTEXT_SAMPLES] = window[0, -CONTEXT_SAMPLES:]  # the next chunk's context
        self._pending_count = 0
        # get_speech_timestamps' hysteresis: start at >= threshold, end below neg_threshold.
        if probability >= self.threshold:
            self._triggered = True
        elif probability < self.neg_threshold:
            self._triggered = False
        self._chunk_speech.append(self._triggered)

    def _answer(self) -> list[bool]:
        """Flags for the frames not yet answered whose middle lies in a scored chunk."""
        flags: list[bool] = []
        f = self.frame_samples
        scored = self._scored_samples()
        while self._answered_frames < self._received_frames:
            middle = self._answered_frames * f + f // 2
            if middle >= scored:
                break
            flags.append(self._chunk_speech[middle // CHUNK_SAMPLES - self._first_chunk])
            self._answered_frames += 1
        # Forget chunks no later frame can fall in.
        next_middle = self._answered_frames * f + f // 2
        drop = next_middle // CHUNK_SAMPLES - self._first_chunk
        if drop > 0:
            del self._chunk_speech[:drop]
            self._first_chunk += drop
        return flags
