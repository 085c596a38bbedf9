"""SenseVoice Small through funasr: batched, padded to fixed lengths, with confidences and word times.

The model runs through funasr's own code: ``funasr.AutoModel`` loads the folder (tokenizer, frontend,
weights) and every batch goes through ``SenseVoiceSmall.inference``. What this module adds around it:

- **Real batches.** On CPU ``AutoModel.generate`` forces batch size 1, so the model's ``inference`` is
  called directly with the frontend and tokenizer AutoModel built: one call per (language, use_itn).
- **Flat memory by construction.** Features are extracted per clip with funasr's ``WavFrontend``, then
  every batch is zero-padded to the frame count of a fixed *length bucket* (the smallest bucket that
  holds the longest clip; :func:`default_length_buckets_s`) and passed as ``data_type="fbank"`` with
  the true lengths. The encoder masks padded frames out of attention and of the FSMN memory, so
  padding changes no output (the tests prove it); and since a batch can only have a few shapes, the
  allocator reuses the same blocks and :meth:`SenseVoiceEngine.warmup` with the largest bucket reaches
  the ceiling at start-up.
- **Tags.** ``<|en|><|NEUTRAL|><|Speech|><|woitn|>text`` becomes ``language="en"``,
  ``emotion="neutral"``, ``audio_event="speech"`` and ``text="text"``; tags never remain in the text
  (funasr's ``rich_transcription_postprocess`` would turn them into emoji instead).
- **Confidence** from the model's own CTC posteriors, captured with a forward hook on the CTC output
  layer: the mean, over speech frames whose best token is not blank, of that token's posterior.
  0.0 for an empty transcript.
- **Words** by funasr's timestamp algorithm (``output_timestamp=True``): CTC forced alignment
  (``ctc_forced_align``, with funasr's trick of zeroing blank's cost where blank wins) of the emitted
  tokens against the speech frames, 60 ms per frame with funasr's -30 ms offset, pieces grouped into
  words as ``SenseVoiceSmall.post`` does. It runs per clip on the posteriors captured from the one
  batched call, so one clip's alignment failure leaves that clip without words instead of failing the
  batch, and the encoder never runs twice. Word confidence is the mean posterior of the word's own
  tokens over the frames the alignment gave them.
- **Deterministic features.** funasr's frontend dithers by default (random noise of about one LSB);
  here dither is 0, so the same audio always gives the same transcript (as sherpa-onnx does).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import re
import unicodedata
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
import torch

from ..config import EngineConfig
from ..errors import ConfigError, EngineError
from ..memory import trim
from . import hub
from .base import SAMPLE_RATE_HZ, EngineInfo, TranscribeRequest, Transcript, Word
from .funasr_loading import load_automodel

logger = logging.getLogger(__name__)

Dtype = Literal["fp32", "fp16", "int8"]

ENGINE_NAME = "sensevoice-small"
SENSEVOICE_LANGUAGES: tuple[str, ...] = ("zh", "en", "ja", "ko", "yue")

CPU_BATCH_SIZE = 1
"""Batch size on CPU when not set: mixed lengths padded into one call made finals slower under load on 2
cores than separate calls on parallel workers (load_tests/scheduling.py; README, Measurements)."""
CUDA_BATCH_SIZE = 8
"""Batch size on CUDA when not set: a GPU runs a batch nearly as fast as one clip."""

QUERY_FRAMES = 4
"""SenseVoice prepends four query frames (language, event, emotion, text norm); speech starts after them."""

_TAG_RE = re.compile(r"<\|([^<>|]*)\|>")
_EMOTIONS = {"HAPPY", "SAD", "ANGRY", "NEUTRAL", "FEARFUL", "DISGUSTED", "SURPRISED", "EMO_UNKNOWN"}
_EVENTS = {"Speech", "BGM", "Applause", "Laughter", "Cry", "Sneeze", "Breath", "Cough", "Event_UNK"}
_TEXT_NORMS = {"withitn", "woitn"}
_UNKNOWN_TAGS = {"EMO_UNKNOWN": "unknown", "Event_UNK": "unknown"}
_WORD_BOUNDARY = "\u2581"  # sentencepiece's space marker


def default_length_buckets_s(max_audio_s: float) -> tuple[float, ...]:
    """The default length buckets: 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24... seconds, then ``max_audio_s``.

    Powers of two and their halfway points (ratio 1.5 then 1.33): a clip is padded by at most half its
    length, a third above 2 s, and a batch takes one of about ten shapes (for 30 s: 1, 1.5, 2, 3, 4, 6,
    8, 12, 16, 24, 30). Padding costs compute on CPU (measured on 2 cores: a 20 s clip padded to 30 s
    took 1.5x as long), so the series is finer than plain doubling; every shape is still few enough for
    the allocator to keep reusing the blocks the warm-up reserved. A series value within 20 % of
    ``max_audio_s`` is left out (``max_audio_s`` itself takes those clips).

    Args:
        max_audio_s: the longest clip; always the last bucket.

    Returns:
        Bucket lengths in seconds, ascending.
    """
    series = sorted({m * 2.0**k for k in range(12) for m in (1.0, 1.5)})
    return (*(b for b in series if b * 1.2 <= max_audio_s), max_audio_s)


def fine_length_buckets_s(max_audio_s: float, step_s: float = 0.5) -> tuple[float, ...]:
    """Buckets every ``step_s`` seconds up to ``max_audio_s`` (the ONNX Runtime backend's default).

    On CPU with one clip per call (the default there) padding is pure waste: the coarse series pads a
    clip by a fifth of its length on average. ONNX Runtime's CPU arena serves the few dozen shapes of a
    half-second grid from the blocks the warm-up at the largest one reserved, so the grid costs at most
    ``step_s`` of padding per call and no memory beyond the ceiling.
    """
    count = max(1, int(math.ceil(max_audio_s / step_s - 1e-9)))
    return (*(round(step_s * k, 6) for k in range(1, count) if step_s * k < max_audio_s - 1e-9), max_audio_s)


@dataclass(frozen=True)
class ParsedText:
    """SenseVoice's raw output split into tags and text.

    Attributes:
        text: the text with every ``<|...|>`` tag removed and whitespace normalised.
        language: the first language tag, lower-cased (``"en"``, ``"nospeech"``...), or None.
        emotion: the first emotion tag, lower-cased (``EMO_UNKNOWN`` becomes ``"unknown"``), or None.
        audio_event: the first audio-event tag, lower-cased (``Event_UNK`` becomes ``"unknown"``), or None.
    """

    text: str
    language: str | None
    emotion: str | None
    audio_event: str | None


def parse_sensevoice_text(raw: str) -> ParsedText:
    """Split ``<|en|><|NEUTRAL|><|Speech|><|woitn|>hello`` into tags and text.

    Tags may appear anywhere (an untrained or confused model puts them mid-text); all are removed from
    the text, and the first of each kind is kept. Unknown tags are dropped.

    Args:
        raw: a text as ``SenseVoiceSmall.inference`` returns it.

    Returns:
        The parsed text and tags.
    """
    language: str | None = None
    emotion: str | None = None
    audio_event: str | None = None
    for match in _TAG_RE.finditer(raw):
        tag = match.group(1)
        if tag in _EMOTIONS:
            emotion = emotion or _UNKNOWN_TAGS.get(tag, tag.lower())
        elif tag in _EVENTS:
            audio_event = audio_event or _UNKNOWN_TAGS.get(tag, tag.lower())
        elif tag in _TEXT_NORMS:
            continue
        elif tag.isalpha() and tag.islower():
            language = language or tag
    text = " ".join(_TAG_RE.sub(" ", raw).split())
    return ParsedText(text=text, language=language, emotion=emotion, audio_event=audio_event)


@dataclass(frozen=True)
class _Piece:
    """One aligned token: its sentencepiece text, first and last+1 speech frame, mean posterior."""

    text: str
    start_frame: int
    end_frame: int
    posterior_sum: float
    frames: int


def group_words(pieces: Sequence[_Piece], *, frame_s: float, total_frames: int) -> tuple[Word, ...]:
    """Group aligned sentencepiece tokens into words, as ``SenseVoiceSmall.post`` does.

    funasr's rules: a piece starting with the space marker starts a word, a lone marker is skipped, and
    an ASCII piece continues an ASCII word; anything else (a CJK character...) is a word of its own.
    Two differences: ASCII digits continue words like letters do (``20`` + ``24``), and a piece made of
    punctuation only joins the previous word's ``punctuated_word`` instead of becoming a word.
    Times follow funasr: ``start = max(frame * frame_s - frame_s / 2, 0)``, and likewise for the end,
    capped at the last speech frame.

    Args:
        pieces: aligned tokens in order.
        frame_s: seconds per encoder frame (0.06).
        total_frames: speech frames in the clip (for the cap on end times).

    Returns:
        The words, times relative to the clip start.
    """

    def seconds(frame: int) -> float:
        return max(min(frame, total_frames) * frame_s - frame_s / 2, 0.0)

    groups: list[list[_Piece]] = []
    texts: list[str] = []
    for piece in pieces:
        if not piece.text or piece.text == _WORD_BOUNDARY:
            continue
        starts_word = piece.text.startswith(_WORD_BOUNDARY)
        text = piece.text.lstrip(_WORD_BOUNDARY)
        continues = bool(groups) and (
            _is_punctuation(text) or (not starts_word and _is_ascii_word(texts[-1]) and _is_ascii_word(text))
        )
        if continues:
            groups[-1].append(piece)
            texts[-1] += text
        else:
            groups.append([piece])
            texts.append(text)

    words: list[Word] = []
    for group, punctuated in zip(groups, texts, strict=True):
        bare = "".join(ch for ch in punctuated if not unicodedata.category(ch).startswith("P")).lower()
        if not bare:
            if words:  # punctuation at the start of a word group: attach to the previous word
                last = words[-1]
                words[-1] = Word(
                    last.word, last.punctuated_word + punctuated, last.start_s, last.end_s, last.confidence
                )
            continue
        frames = sum(p.frames for p in group)
        confidence = sum(p.posterior_sum for p in group) / frames if frames else 0.0
        start_s = seconds(group[0].start_frame)
        end_s = max(seconds(group[-1].end_frame), start_s)
        words.append(Word(bare, punctuated, round(start_s, 3), round(end_s, 3), _clamp01(confidence)))
    return tuple(words)


def _is_punctuation(text: str) -> bool:
    return bool(text) and all(unicodedata.category(ch).startswith("P") for ch in text)


def _is_ascii_word(text: str) -> bool:
    stripped = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return bool(stripped) and stripped.isascii() and stripped.isalnum()


def _clamp01(value: float) -> float:
    return 0.0 if not math.isfinite(value) else min(max(value, 0.0), 1.0)


class SenseVoiceCore:
    """What every SenseVoice backend shares: features, length buckets, greedy CTC decoding, tags,
    confidences and word times. A backend only supplies :meth:`_forward` (padded LFR features in, CTC
    logits out) and how it loads.

    ``transcribe`` may run in several threads at once when the backend allows it
    (:attr:`max_concurrent_calls`): nothing here keeps per-call state on the object.
    """

    backend = ""
    """``"torch"`` or ``"onnxruntime"``: the runtime behind :meth:`_forward`."""

    def __init__(
        self,
        *,
        frontend: Any,
        sentencepiece: Any,
        model_name: str,
        device: torch.device,
        dtype: Dtype,
        threads: int,
        max_audio_s: float,
        length_buckets_s: Sequence[float],
        max_concurrent_calls: int = 1,
        blank_id: int = 0,
    ) -> None:
        """Shared state of a loaded SenseVoice model.

        Args:
            frontend: funasr's ``WavFrontend`` (fbank, LFR, CMVN) built from the model's config.
            sentencepiece: the model's ``sentencepiece.SentencePieceProcessor``.
            model_name: the hub id or folder it came from, for ``info``.
            device: where the model runs.
            dtype: ``fp32``, ``fp16`` (CUDA) or ``int8``.
            threads: CPU threads per model call.
            max_audio_s: the longest clip accepted.
            length_buckets_s: ascending bucket lengths; the last is at least ``max_audio_s``.
            max_concurrent_calls: how many ``transcribe`` calls may run at once in different threads.
            blank_id: the CTC blank token.
        """
        self._frontend = frontend
        self._sp = sentencepiece
        self._model_name = model_name
        self._device = device
        self._dtype: Dtype = dtype
        self._threads = threads
        self._max_audio_s = max_audio_s
        self._buckets_s = tuple(length_buckets_s)
        self._max_batch_size = 1
        self._max_concurrent_calls = max(1, max_concurrent_calls)
        self._blank_id = blank_id
        self._frame_s: float = frontend.frame_shift * frontend.lfr_n / 1000.0
        self._skip_ids = frozenset(
            i
            for i in range(int(sentencepiece.get_piece_size()))
            if sentencepiece.is_control(i)
            or sentencepiece.is_unknown(i)
            or _TAG_RE.fullmatch(str(sentencepiece.id_to_piece(i)))
        )

    # -- Engine protocol ----------------------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        """What this engine is, for ``/health``, logs and the session metadata."""
        return EngineInfo(
            name=ENGINE_NAME,
            model=self._model_name,
            device=str(self._device),
            dtype=self._dtype,
            languages=SENSEVOICE_LANGUAGES,
            fallback_reason=None,
            max_batch_size=self._max_batch_size,
            max_audio_s=self._max_audio_s,
            max_concurrent_calls=self._max_concurrent_calls,
            preferred_batch_size=CUDA_BATCH_SIZE if self._device.type == "cuda" else CPU_BATCH_SIZE,
            extras={
                "backend": self.backend,
                "threads": str(self._threads),
                "length_buckets_s": ",".join(f"{b:g}" for b in self._buckets_s),
                **self._backend_extras(),
            },
        )

    @property
    def length_buckets_s(self) -> tuple[float, ...]:
        """The lengths batches are padded to, ascending."""
        return self._buckets_s

    def transcribe(self, requests: Sequence[TranscribeRequest]) -> list[Transcript]:
        """Transcribe a batch: one model call per (language, use_itn) group, padded to a length bucket.

        Args:
            requests: the clips; they may mix batch keys (each key gets its own model call).

        Returns:
            One transcript per request, in order.

        Raises:
            EngineError: a clip is longer than ``max_audio_s`` or is not mono audio.
        """
        self._prepare_thread()
        audios = [self._check_audio(i, r) for i, r in enumerate(requests)]
        results: list[Transcript | None] = [None] * len(requests)
        groups: dict[tuple[str, bool], list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(request.batch_key, []).append(index)
        for (language, use_itn), indices in groups.items():
            transcripts = self._run_batch(
                [audios[i] for i in indices],
                language=language,
                use_itn=use_itn,
                word_timestamps=[requests[i].word_timestamps for i in indices],
            )
            for index, transcript in zip(indices, transcripts, strict=True):
                results[index] = transcript
        missing = [i for i, t in enumerate(results) if t is None]
        if missing:  # pragma: no cover - every index belongs to exactly one group
            raise EngineError(f"no transcript for request(s) {missing}")
        return cast(list[Transcript], results)

    def warmup(self, max_batch_size: int, max_audio_s: float) -> None:
        """Run one batch of ``max_batch_size`` clips of the largest bucket in use, with word times, in
        each of the ``max_concurrent_calls`` workers at once.

        Memory (GPU reserved memory, CPU RSS) reaches its ceiling here, before any client connects: the
        batcher never runs more at once than this.

        Args:
            max_batch_size: the largest batch the batcher will send.
            max_audio_s: the longest clip the session core will send (at most the engine's).

        Raises:
            ConfigError: ``max_audio_s`` above the engine's, or ``max_batch_size`` below 1.
        """
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size: must be at least 1, not {max_batch_size}")
        if max_audio_s > self._max_audio_s:
            raise ConfigError(f"max_audio_s: {max_audio_s} s is above the engine's {self._max_audio_s} s")
        bucket_s = self._bucket_for(max_audio_s)
        samples = min(int(round(bucket_s * SAMPLE_RATE_HZ)), int(self._max_audio_s * SAMPLE_RATE_HZ))
        rng = np.random.default_rng(0)
        audio = (0.05 * rng.standard_normal(samples)).astype(np.float32)

        def one_batch() -> None:
            self._prepare_thread()
            self._run_batch(
                [audio] * max_batch_size,
                language="auto",
                use_itn=True,
                word_timestamps=[True] * max_batch_size,
            )

        if self._max_concurrent_calls > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=self._max_concurrent_calls) as pool:
                for done in [pool.submit(one_batch) for _ in range(self._max_concurrent_calls)]:
                    done.result()
        else:
            one_batch()
        self._max_batch_size = max(self._max_batch_size, max_batch_size)
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            logger.info(
                "warm-up %d x %.1f s: %.0f MiB reserved on %s",
                max_batch_size,
                bucket_s,
                torch.cuda.memory_reserved(self._device) / 2**20,
                self._device,
            )
        else:
            logger.info(
                "warm-up %d x %.1f s done (%d at once)", max_batch_size, bucket_s, self._max_concurrent_calls
            )

    # -- Internals ----------------------------------------------------------------------------------

    # -- Internals ----------------------------------------------------------------------------------

    def _check_audio(self, index: int, request: TranscribeRequest) -> npt.NDArray[np.float32]:
        audio = np.asarray(request.audio, dtype=np.float32)
        if audio.ndim != 1:
            raise EngineError(f"request {index}: audio must be mono (one dimension), not shape {audio.shape}")
        if len(audio) > round(self._max_audio_s * SAMPLE_RATE_HZ):
            raise EngineError(
                f"request {index}: clip is {len(audio) / SAMPLE_RATE_HZ:.2f} s, longer than max_audio_s "
                f"({self._max_audio_s:g} s); the session core must cut segments shorter"
            )
        return audio

    def _bucket_for(self, duration_s: float) -> float:
        for bucket in self._buckets_s:
            if bucket >= duration_s - 1e-9:
                return bucket
        return self._buckets_s[-1]

    def _frames_for(self, num_samples: int) -> int:
        """Encoder frames funasr's frontend makes of ``num_samples`` (Kaldi fbank, then LFR)."""
        frontend = self._frontend
        window = int(frontend.frame_length * frontend.fs / 1000)
        shift = int(frontend.frame_shift * frontend.fs / 1000)
        fbank_frames = 1 + (num_samples - window) // shift if num_samples >= window else 1
        return int(math.ceil(fbank_frames / frontend.lfr_n))

    def _features(self, audio: npt.NDArray[np.float32]) -> torch.Tensor:
        """LFR + CMVN features of one clip, ``(frames, 560)``, by funasr's frontend.

        A clip shorter than one 25 ms analysis window is zero-padded to one window: funasr shrinks the
        window to the clip, and below about 20 ms the FFT is too short for 80 mel bins and fbank raises.
        """
        window = int(self._frontend.frame_length * self._frontend.fs / 1000)
        if len(audio) < window:
            audio = np.concatenate([audio, np.zeros(window - len(audio), dtype=np.float32)])
        waveform = torch.from_numpy(audio)[None, :]
        feats, _ = self._frontend(waveform, [waveform.shape[1]])
        return cast(torch.Tensor, feats[0])

    # -- What a backend supplies -------------------------------------------------------------------

    def _forward(
        self, batch: torch.Tensor, lengths: Sequence[int], *, language: str, use_itn: bool
    ) -> torch.Tensor:
        """Run the model on padded LFR features.

        Args:
            batch: ``(B, frames, 560)`` features, zero-padded past each clip's length, on the device.
            lengths: each clip's true frame count.
            language: ``auto`` or a SenseVoice language code, for the language query.
            use_itn: the text-norm query (``withitn`` or ``woitn``).

        Returns:
            ``(B, frames + 4, vocab)`` CTC logits (before softmax); the first four frames answer the
            queries (language, emotion, event, text norm).
        """
        raise NotImplementedError

    def _backend_extras(self) -> dict[str, str]:
        """Backend details for ``info.extras``."""
        return {}

    def _prepare_thread(self) -> None:
        """Called at the start of every ``transcribe``, in the thread that runs it."""

    def _greedy_text(self, best_ids: torch.Tensor) -> str:
        """funasr's greedy CTC decoding: collapse repeats, drop blanks, detokenize (tags included).

        Args:
            best_ids: the best token of each frame, query frames included, up to the clip's length.
        """
        ids = torch.unique_consecutive(best_ids)
        return str(self._sp.DecodeIds([int(i) for i in ids.tolist() if i != self._blank_id]))

    def _run_batch(
        self,
        audios: Sequence[npt.NDArray[np.float32]],
        *,
        language: str,
        use_itn: bool,
        word_timestamps: Sequence[bool],
    ) -> list[Transcript]:
        """One model call for clips sharing (language, use_itn), padded to a bucket's frame count."""
        empty = [i for i, a in enumerate(audios) if len(a) == 0]
        run = [i for i, a in enumerate(audios) if len(a) > 0]
        out: list[Transcript] = [Transcript(text="", confidence=0.0) for _ in audios]
        if not run:
            return out
        if empty:
            logger.debug("%d empty clip(s) answered without running the model", len(empty))

        with torch.inference_mode():
            feats = [self._features(audios[i]) for i in run]
            lengths = [int(f.shape[0]) for f in feats]
            longest_s = max(len(audios[i]) for i in run) / SAMPLE_RATE_HZ
            bucket_frames = self._frames_for(int(round(self._bucket_for(longest_s) * SAMPLE_RATE_HZ)))
            frames = max(bucket_frames, *lengths)
            model_dtype = torch.float16 if self._dtype == "fp16" else torch.float32
            batch = torch.zeros((len(run), frames, feats[0].shape[1]), dtype=model_dtype)
            for row, f in enumerate(feats):
                batch[row, : f.shape[0]] = f
            batch = batch.to(self._device)
            logits = self._forward(batch, lengths, language=language, use_itn=use_itn).float()
            # Per frame: log of the softmax denominator, best token and its log-posterior.
            log_norm = torch.logsumexp(logits, dim=-1)
            best_logit, best_id = logits.max(dim=-1)
            best_logp = (best_logit - log_norm).cpu()
            best_id = best_id.cpu()

            for row, index in enumerate(run):
                n = lengths[row] + QUERY_FRAMES
                parsed = parse_sensevoice_text(self._greedy_text(best_id[row, :n]))
                speech_ids = best_id[row, QUERY_FRAMES:n]
                speech_logp = best_logp[row, QUERY_FRAMES:n]
                emitted = speech_ids != self._blank_id
                confidence = (
                    float(speech_logp[emitted].exp().mean()) if parsed.text and bool(emitted.any()) else 0.0
                )
                words: tuple[Word, ...] = ()
                if word_timestamps[index] and parsed.text:
                    try:
                        words = self._align_words(
                            logits[row, QUERY_FRAMES:n], log_norm[row, QUERY_FRAMES:n], speech_ids
                        )
                    except Exception:  # noqa: BLE001 (one clip's alignment must not fail the batch)
                        logger.debug(
                            "word alignment failed for clip %d; returning it without words",
                            index,
                            exc_info=True,
                        )
                told = language if language != "auto" else None
                detected = parsed.language if parsed.language in SENSEVOICE_LANGUAGES else None
                out[index] = Transcript(
                    text=parsed.text,
                    confidence=_clamp01(confidence),
                    words=words,
                    language=detected or told,
                    emotion=parsed.emotion,
                    audio_event=parsed.audio_event,
                )
            del logits, log_norm
        return out

    def _align_words(
        self, logits: torch.Tensor, log_norm: torch.Tensor, best_ids: torch.Tensor
    ) -> tuple[Word, ...]:
        """funasr's timestamp algorithm on one clip's speech frames (see the module docstring).

        Args:
            logits: ``(frames, vocab)`` CTC logits of the speech frames.
            log_norm: ``(frames,)`` their log-softmax denominators.
            best_ids: ``(frames,)`` the best token of each frame (CPU).

        Returns:
            The clip's words.
        """
        from funasr.models.sense_voice.utils.ctc_alignment import ctc_forced_align

        collapsed = torch.unique_consecutive(best_ids).tolist()
        targets = [t for t in collapsed if t != self._blank_id and t not in self._skip_ids]
        if not targets:
            return ()
        total_frames = int(best_ids.shape[0])
        # Only blank's and the targets' columns matter to the alignment: gather them (a few KB, not the
        # whole vocabulary), blank as class 0 and target k as class k + 1.
        columns = torch.tensor([self._blank_id, *targets], device=logits.device)
        emission = (logits.index_select(-1, columns) - log_norm[:, None]).cpu()
        emission[best_ids == self._blank_id, 0] = 0.0  # funasr: blank costs nothing where blank wins
        align = ctc_forced_align(
            emission[None],
            torch.arange(1, len(targets) + 1)[None],
            torch.tensor([total_frames]),
            torch.tensor([len(targets)]),
            blank=0,
            ignore_id=-1,
        )[0].tolist()

        pieces: list[_Piece] = []
        frame = 0
        while frame < total_frames:
            cls = align[frame]
            run_end = frame
            while run_end < total_frames and align[run_end] == cls:
                run_end += 1
            if cls != 0:
                # A repeated token is separated by blank in the alignment; each run is one token.
                posterior = float(emission[frame:run_end, cls].exp().sum())
                piece = str(self._sp.id_to_piece(targets[cls - 1]))
                pieces.append(_Piece(piece, frame, run_end, posterior, run_end - frame))
            frame = run_end
        return group_words(pieces, frame_s=self._frame_s, total_frames=total_frames)


class SenseVoiceEngine(SenseVoiceCore):
    """SenseVoice Small loaded through funasr and run by torch (CPU fp32/int8, CUDA fp16).

    Use :meth:`load`; one ``transcribe`` at a time (the CTC hook keeps state on the object).
    """

    backend = "torch"

    def __init__(
        self,
        *,
        auto_model: Any,
        model_name: str,
        device: torch.device,
        dtype: Dtype,
        threads: int,
        max_audio_s: float,
        length_buckets_s: Sequence[float],
    ) -> None:
        """Wrap an ``AutoModel`` holding a SenseVoiceSmall (already moved to ``device`` and ``dtype``).

        Args:
            auto_model: the ``funasr.AutoModel``.
            model_name: the hub id or folder it came from, for ``info``.
            device: where the model runs.
            dtype: ``fp32``, ``fp16`` (CUDA) or ``int8`` (CPU, already quantized).
            threads: torch intra-op threads set at load.
            max_audio_s: the longest clip accepted.
            length_buckets_s: ascending bucket lengths; the last is at least ``max_audio_s``.
        """
        self._auto_model = auto_model
        self._model: Any = auto_model.model
        self._tokenizer: Any = auto_model.kwargs["tokenizer"]
        super().__init__(
            frontend=auto_model.kwargs["frontend"],
            sentencepiece=self._tokenizer.sp,
            model_name=model_name,
            device=device,
            dtype=dtype,
            threads=threads,
            max_audio_s=max_audio_s,
            length_buckets_s=length_buckets_s,
            blank_id=int(self._model.blank_id),
        )
        self._captured: list[torch.Tensor] | None = None
        self._model.ctc.ctc_lo.register_forward_hook(self._capture_ctc_logits)

    # -- Loading ------------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        config: EngineConfig,
        *,
        model: str | None = None,
        max_audio_s: float = 30.0,
        length_buckets_s: Sequence[float] | None = None,
    ) -> SenseVoiceEngine:
        """Load SenseVoice Small through ``funasr.AutoModel``.

        Args:
            config: device, dtype, threads and hub settings.
            model: a hub id (``iic/SenseVoiceSmall`` on ModelScope, ``FunAudioLLM/SenseVoiceSmall`` with
                ``config.hub == "hf"``) or a local folder; default ``config.model``. ``auto`` must be
                resolved first (:func:`stream_server.engines.hub.resolve_model`).
            max_audio_s: the longest clip :meth:`transcribe` accepts.
            length_buckets_s: lengths batches are padded to; default :func:`default_length_buckets_s`.

        Returns:
            The loaded engine (not yet warmed up).

        Raises:
            ConfigError: a setting that cannot work here (int8 on CUDA, fp16 on CPU, CUDA absent,
                buckets shorter than ``max_audio_s``, ``model`` left at ``auto``).
            hub.ModelDownloadError: a hub id could not be downloaded (an :class:`EngineError`).
            EngineError: the folder is missing, incomplete or not a SenseVoice model, or funasr failed.
        """
        name = (model if model is not None else config.model).strip()
        if name in ("auto", hub.WHISPER_BUNDLED):
            raise ConfigError(
                f"model: {name!r} is not a SenseVoice model; resolve it with engines.hub.resolve_model first"
            )
        if not max_audio_s > 0:
            raise ConfigError(f"max_audio_s: must be positive, not {max_audio_s}")
        buckets = _check_buckets(length_buckets_s, max_audio_s)
        device = _resolve_device(config.device)
        dtype = _resolve_dtype(config.dtype, device)
        threads = config.resolved_threads
        folder = _resolve_folder(name, config)

        # ncpu makes funasr call torch.set_num_threads; set it here too so the intent is explicit.
        torch.set_num_threads(threads)
        try:
            from funasr.models.sense_voice.model import SenseVoiceSmall

            auto_model = load_automodel(folder, threads=threads, device=str(device))
        except Exception as exc:
            raise EngineError(
                f"funasr could not load SenseVoice from {folder}: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(auto_model.model, SenseVoiceSmall):
            raise EngineError(
                f"{folder} holds a {type(auto_model.model).__name__} model, not SenseVoiceSmall: "
                "pass a SenseVoice folder"
            )
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

        auto_model.kwargs["frontend"].dither = 0.0  # deterministic features (see module docstring)
        net = auto_model.model
        if dtype == "int8":
            with warnings.catch_warnings():
                # torch 2.13 deprecates the eager quantization API but it still works (and is 2x faster).
                warnings.simplefilter("ignore")
                quantize_dynamic: Any = torch.ao.quantization.quantize_dynamic  # untyped in torch
                net = quantize_dynamic(net, {torch.nn.Linear}, dtype=torch.qint8)
            auto_model.model = net
        elif dtype == "fp16":
            net.half()
        net.eval()
        _release_freed_memory()
        engine = cls(
            auto_model=auto_model,
            model_name=name,
            device=device,
            dtype=dtype,
            threads=threads,
            max_audio_s=max_audio_s,
            length_buckets_s=buckets,
        )
        logger.info(
            "loaded SenseVoice Small from %s on %s (%s, %d threads, buckets %s s)",
            folder,
            device,
            dtype,
            threads,
            ", ".join(f"{b:g}" for b in buckets),
        )
        return engine

    # -- Engine protocol ----------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        """The funasr ``SenseVoiceSmall`` module itself (quantized for int8), for inspection and tests."""
        return cast(torch.nn.Module, self._model)

    def _backend_extras(self) -> dict[str, str]:
        return {"torch": torch.__version__}

    def _prepare_thread(self) -> None:
        # torch's thread count is per OS thread once that thread has used torch: set it in the thread
        # that runs the model (the batcher's worker), whatever another thread set since loading.
        if torch.get_num_threads() != self._threads:
            torch.set_num_threads(self._threads)

    def _forward(
        self, batch: torch.Tensor, lengths: Sequence[int], *, language: str, use_itn: bool
    ) -> torch.Tensor:
        """funasr's own ``SenseVoiceSmall.inference`` on the features; the logits come from a hook on
        the CTC output layer (inference itself returns only texts)."""
        # inference() adds the query frames to the lengths in place: hand it its own tensor.
        speech_lengths = torch.tensor(list(lengths), dtype=torch.int32)
        with self._capturing() as captured, self._autocast():
            self._model.inference(
                data_in=batch,
                data_lengths=speech_lengths,
                key=[f"clip{i}" for i in range(len(lengths))],
                tokenizer=self._tokenizer,
                frontend=self._frontend,
                data_type="fbank",
                device=str(self._device),
                language=language,
                use_itn=use_itn,
                output_timestamp=False,
            )
        if not captured:
            raise EngineError("SenseVoice ran but its CTC layer was not observed: funasr's model changed?")
        return captured[0]

    def _capture_ctc_logits(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if self._captured is not None and not self._captured:
            self._captured.append(output)

    @contextlib.contextmanager
    def _capturing(self) -> Iterator[list[torch.Tensor]]:
        self._captured = []
        try:
            yield self._captured
        finally:
            self._captured = None

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._dtype == "fp16":
            return torch.autocast(device_type=self._device.type, dtype=torch.float16)
        return contextlib.nullcontext()


def _release_freed_memory() -> None:
    """Hand memory freed during loading back to the OS, so steady RSS shows what the model really holds.

    funasr's loader deep-copies the checkpoint (peak about twice the weights) and int8 quantization
    copies the model; glibc keeps those freed pages (measured: int8 RSS 1.78 GB before, 0.75 GB after).
    No-op where ``malloc_trim`` does not exist (not glibc).
    """
    gc.collect()
    trim()


def _check_buckets(length_buckets_s: Sequence[float] | None, max_audio_s: float) -> tuple[float, ...]:
    if length_buckets_s is None:
        return default_length_buckets_s(max_audio_s)
    buckets = tuple(sorted({float(b) for b in length_buckets_s}))
    if not buckets or buckets[0] <= 0:
        raise ConfigError(
            f"length_buckets_s: must be positive lengths in seconds, not {list(length_buckets_s)}"
        )
    if buckets[-1] < max_audio_s:
        raise ConfigError(
            f"length_buckets_s: the largest bucket ({buckets[-1]:g} s) "
            f"must hold max_audio_s ({max_audio_s:g} s)"
        )
    return buckets


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device: {device!r} asked for, but torch sees no CUDA device; use --device cpu"
            )
        resolved = torch.device(device)
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device: {device!r} does not exist ({torch.cuda.device_count()} CUDA device(s))"
            )
        return resolved
    return torch.device(device)


def _resolve_dtype(dtype: str, device: torch.device) -> Dtype:
    on_cuda = device.type == "cuda"
    if dtype == "auto":
        return "fp16" if on_cuda else "fp32"
    if dtype == "int8" and on_cuda:
        raise ConfigError("dtype: int8 (dynamic quantization) runs on CPU only; use fp16 on CUDA")
    if dtype == "fp16" and not on_cuda:
        raise ConfigError("dtype: fp16 needs a CUDA device; use fp32 or int8 on CPU")
    if dtype == "fp32":
        return "fp32"
    return "fp16" if dtype == "fp16" else "int8"


def _resolve_folder(name: str, config: EngineConfig) -> Path:
    """The local folder to hand to AutoModel: the folder itself, or the hub id downloaded (or cached)."""
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise EngineError(
                f"model: {local} is a file; pass the SenseVoice folder (with config.yaml and model.pt)"
            )
        missing = [f for f in ("config.yaml", "model.pt") if not (local / f).is_file()]
        if missing:
            raise EngineError(
                f"model: folder {local} has no {' or '.join(missing)}; pass a SenseVoice Small "
                "folder as downloaded from ModelScope (iic/SenseVoiceSmall) "
                "or Hugging Face (FunAudioLLM/SenseVoiceSmall)"
            )
        return local
    if hub.is_hub_id(name):
        return hub.download_model(name, config.hub)
    raise EngineError(
        f"model: folder {local} does not exist (and {name!r} is not a hub id such as iic/SenseVoiceSmall)"
    )
