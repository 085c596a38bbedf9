"""The sans-I/O heart: one :class:`Session` per stream, fed bytes and results, drained of events and jobs.

It imports no asyncio, aiohttp, torch or funasr (README, "Architecture"). The transport feeds it:

- ``receive_audio(bytes)`` and ``receive_text(str)`` for every WebSocket message,
- ``receive_result(job_id, transcript)`` / ``receive_failure(job_id, code, description)`` /
  ``receive_skipped(job_id)`` when the batcher answers a job,
- ``receive_idle_timeout()``, ``receive_shutdown()``, ``receive_disconnect()`` for what happens around it;

and drains it with ``jobs_to_run()`` (audio for the model), ``events_to_send()`` (JSON events for the
client, in order) and ``close`` (set once everything owed to the client has been sent).

Ordering (README, "Protocol: ordering"): ``Results``, ``UtteranceEnd``, per-segment ``Error`` and
``Metadata`` leave in the order of the audio they describe, whatever order the model answers in.
``SpeechStarted`` and protocol ``Error`` events leave at once.

Guarantees: every segment the segmenter closes gets exactly one final ``Results`` or one ``Error``
naming its time span; no ``receive_*`` raises (bad input becomes an ``Error`` event, an unexpected
exception becomes ``INTERNAL_ERROR`` and close 1011); memory is bounded by the settings, not the
stream's length.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Concatenate, ParamSpec

import numpy as np

from .audio import AudioDecoder, FloatArray, float_to_int16
from .config import InterimConfig, SegmenterConfig
from .engines.base import SAMPLE_RATE_HZ, TranscribeRequest, Transcript
from .errors import ClientError, CloseCode, ProtocolViolation
from .protocol import (
    CloseStream,
    Error,
    Finalize,
    KeepAlive,
    Metadata,
    ModelInfo,
    Results,
    ServerEvent,
    SpeechStarted,
    StreamOptions,
    UtteranceEnd,
    WordTiming,
    parse_client_message,
)
from .ring import Int16Array, SampleRing
from .segmenter import (
    EndReason,
    SegmentDiscarded,
    SegmentEnded,
    Segmenter,
    SegmenterEvent,
    SegmenterSettings,
    SegmentStarted,
)
from .vad import SILENCE_DBFS, FrameVad, frame_energy_dbfs

logger = logging.getLogger(__name__)

P = ParamSpec("P")


class JobKind(Enum):
    FINAL = "final"
    INTERIM = "interim"
    SPECULATIVE = "speculative"
    """A final started early, during the trailing silence; adopted as the final if no speech follows."""


@dataclass(frozen=True)
class Job:
    """Audio the model must transcribe for this session.

    Attributes:
        job_id: unique within the session.
        kind: FINAL (one per segment, never dropped), INTERIM (may be skipped under load) or
            SPECULATIVE (a final started early; may be refused, and is cancelled if speech resumes).
        request: what the engine sees.
        segment_id: the segment it belongs to.
        start_sample: where its audio starts in the session (16 kHz samples).
        end_sample: one past where its audio ends.
        reason: why the segment ended (finals only).
    """

    job_id: int
    kind: JobKind
    request: TranscribeRequest
    segment_id: int
    start_sample: int
    end_sample: int
    reason: EndReason | None = None


@dataclass(frozen=True)
class CloseRequest:
    """The stream should now be closed with this code and reason."""

    code: CloseCode
    reason: str


@dataclass(frozen=True)
class SessionIdentity:
    """What the session reports about itself and the model.

    Attributes:
        request_id: unique id of this stream (also sent as the ``dg-request-id`` header).
        created: ISO 8601 time the stream opened.
        model: model identity for ``Results.metadata``.
        model_details: engine details for ``Metadata`` (device, dtype, fallback reason...).
        warnings: said once in ``Metadata`` (e.g. that a fallback model is running).
    """

    request_id: str
    created: str
    model: ModelInfo
    model_details: Mapping[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class SessionSettings:
    """Server-side settings a session needs (from :class:`~stream_server.config.Config`; the limits
    as in :class:`~stream_server.config.LimitsConfig`)."""

    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    interim: InterimConfig = field(default_factory=InterimConfig)
    max_client_errors: int = 16
    max_session_s: float = 0.0
    max_frame_bytes: int = 1 << 20
    max_finalize_per_s: float = 5.0
    finalize_burst: int = 10


def segmenter_settings(options: StreamOptions, seg: SegmenterConfig) -> SegmenterSettings:
    """Turn millisecond settings and the client's endpointing choice into frame counts."""
    frame_samples = SAMPLE_RATE_HZ * seg.frame_ms // 1000

    def frames(ms: int) -> int:
        return max(1, math.ceil(ms / seg.frame_ms))

    if options.endpointing_disabled:
        endpoint_ms = seg.no_endpointing_silence_ms
    elif options.endpointing_ms is not None:
        endpoint_ms = options.endpointing_ms
    else:
        endpoint_ms = seg.endpointing_ms
    return SegmenterSettings(
        frame_samples=frame_samples,
        start_window_frames=frames(seg.speech_start_window_ms),
        start_voiced_frames=min(frames(seg.speech_start_ms), frames(seg.speech_start_window_ms)),
        pre_roll_frames=seg.pre_roll_ms // seg.frame_ms,
        post_roll_frames=seg.post_roll_ms // seg.frame_ms,
        endpoint_frames=frames(endpoint_ms),
        min_speech_frames=seg.min_speech_ms // seg.frame_ms,
        max_segment_samples=SAMPLE_RATE_HZ * seg.max_segment_ms // 1000,
        cut_search_frames=frames(seg.cut_search_ms),
    )


def _guarded(method: Callable[Concatenate[Session, P], None]) -> Callable[Concatenate[Session, P], None]:
    """``receive_*`` never raises: an unexpected exception is logged once with its traceback, the
    client gets ``INTERNAL_ERROR`` (no internals), and the stream closes with 1011."""

    def wrapper(self: Session, /, *args: P.args, **kwargs: P.kwargs) -> None:
        if self._dead:
            return
        try:
            method(self, *args, **kwargs)
        except Exception:
            logger.exception("session %s: internal error in %s", self.identity.request_id, method.__name__)
            self._internal_error()

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


class _Slot:
    """A place in the ordered output: filled now (an event) or later (a job's answer)."""

    __slots__ = ("event", "job_id", "utterance_end_fallback_s")

    def __init__(
        self,
        event: ServerEvent | None = None,
        job_id: int | None = None,
        utterance_end_fallback_s: float | None = None,
    ) -> None:
        self.event = event
        self.job_id = job_id
        self.utterance_end_fallback_s = utterance_end_fallback_s

    @property
    def ready(self) -> bool:
        return self.job_id is None


class Session:
    """One stream's state; see the module docstring.

    Args:
        options: the client's validated query options.
        settings: server-side endpointing and interim settings.
        vad: this session's frame classifier.
        identity: request id, creation time and model identity for the events.
    """

    def __init__(
        self,
        options: StreamOptions,
        settings: SessionSettings,
        vad: FrameVad,
        identity: SessionIdentity,
    ) -> None:
        self.options = options
        self.settings = settings
        self.identity = identity
        self._vad = vad
        self._seg_settings = segmenter_settings(options, settings.segmenter)
        if vad.frame_samples != self._seg_settings.frame_samples:
            raise ValueError("VAD frame size does not match the segmenter's")
        self._segmenter = Segmenter(self._seg_settings)
        self._decoder = AudioDecoder(options.encoding, options.sample_rate_hz, options.channels)
        frame = self._seg_settings.frame_samples
        interim_window = SAMPLE_RATE_HZ * settings.interim.window_ms // 1000
        capacity = (
            max(self._seg_settings.max_segment_samples, interim_window)
            + (self._seg_settings.pre_roll_frames + self._seg_settings.start_window_frames) * frame
            + (vad.max_lag_frames + 4) * frame
        )
        self._ring = SampleRing(capacity)
        self._partial = np.zeros(0, dtype=np.int16)  # < one frame, waiting to be classified
        self._pending_levels: deque[float] = deque(maxlen=vad.max_lag_frames + 2)

        self._immediate: list[ServerEvent] = []
        self._slots: deque[_Slot] = deque()
        self._jobs: dict[int, Job] = {}
        self._new_jobs: list[Job] = []
        self._next_job_id = 1

        self._closing: CloseRequest | None = None
        self._dead = False
        self._client_errors = 0
        self._warned_audio_after_close = False

        self._segments_finalized = 0
        self._last_final_end_sample = 0
        self._last_word_end_s: float | None = None
        self._utterance_pending = False
        self._utterance_end_samples = (
            SAMPLE_RATE_HZ * options.utterance_end_ms // 1000 if options.utterance_end_ms else 0
        )

        self._interim_in_flight = False
        self._interim_backoff = 1
        self._next_interim_sample = 0

        # Finalize limits (README, "Protocol"): model work needs new audio, messages a token bucket
        # refilled by the audio received (no clock: the core stays pure).
        self._min_finalize_samples = SAMPLE_RATE_HZ * settings.segmenter.min_finalize_audio_ms // 1000
        self._last_forced_sample: int | None = None  # where the last Finalize that ended a segment was
        self._finalize_tokens = float(settings.finalize_burst)
        self._finalize_refilled_s = 0.0

        seg = settings.segmenter
        speculate = math.ceil(seg.speculative_final_ms / seg.frame_ms) if seg.speculative_final_ms else 0
        self._speculate_frames = speculate if 0 < speculate < self._seg_settings.endpoint_frames else 0
        self._speculation: Job | None = None  # the open segment's early final, while it may be adopted
        self._speculation_speech_end = 0
        self._speculation_result: tuple[int, Transcript] | None = None
        self._cancelled: list[int] = []
        self._closed_segments: list[int] = []
        self.speculations_used = 0
        """Finals delivered from a speculative job (the model had started before the pause ran out)."""
        self.speculations_wasted = 0
        """Speculative jobs thrown away because speech resumed."""

    # ------------------------------------------------------------------------------------------
    # What the transport reads

    @property
    def close(self) -> CloseRequest | None:
        """Set once the stream should be closed and everything owed to the client has been drained."""
        if self._closing is None:
            return None
        if self._dead:
            return self._closing
        if self._slots or self._immediate or any(j.kind is JobKind.FINAL for j in self._jobs.values()):
            return None
        return self._closing

    @property
    def closing(self) -> bool:
        """CloseStream, a fatal error or shutdown was received; no more audio is taken."""
        return self._closing is not None

    @property
    def pending_finals(self) -> int:
        """Final jobs handed out and not yet answered (the transport stops reading above a limit)."""
        return sum(1 for j in self._jobs.values() if j.kind is JobKind.FINAL)

    @property
    def audio_duration_s(self) -> float:
        """Seconds of audio received, at the client's sample rate."""
        return self._decoder.input_duration_s

    @property
    def segments_finalized(self) -> int:
        return self._segments_finalized

    def jobs_to_run(self) -> list[Job]:
        """Jobs created since the last call; each must be answered with exactly one ``receive_*``.

        A speculative job adopted before it was handed out comes out as the FINAL it became; one
        abandoned before it was handed out does not come out at all.
        """
        jobs, self._new_jobs = self._new_jobs, []
        return [self._jobs[job.job_id] for job in jobs if job.job_id in self._jobs]

    def jobs_to_cancel(self) -> list[int]:
        """Ids of handed-out jobs whose answers are no longer wanted (speculation that speech overtook)."""
        cancelled, self._cancelled = self._cancelled, []
        return cancelled

    def segments_closed(self) -> list[int]:
        """Ids of segments whose end was decided since the last call (for the latency metric)."""
        closed, self._closed_segments = self._closed_segments, []
        return closed

    def events_to_send(self) -> list[ServerEvent]:
        """Events ready for the client, in the order they must be sent."""
        out = self._immediate
        self._immediate = []
        while self._slots and self._slots[0].ready:
            slot = self._slots.popleft()
            event = slot.event
            if slot.utterance_end_fallback_s is not None:
                last = self._last_word_end_s
                event = UtteranceEnd(last if last is not None else slot.utterance_end_fallback_s)
            if event is None:
                continue
            if isinstance(event, Results) and event.is_final:
                # UtteranceEnd reports the last finalized word; without word times, the speech end.
                self._last_word_end_s = event.words[-1].end_s if event.words else None
            out.append(event)
        return out

    # ------------------------------------------------------------------------------------------
    # Inputs

    @_guarded
    def receive_audio(self, data: bytes) -> None:
        """Take one binary frame (any size; a sample may straddle frames). An empty frame means
        CloseStream, as in Deepgram's API."""
        if self._closing is not None:
            if not self._warned_audio_after_close:
                self._warned_audio_after_close = True
                self._client_error(
                    ProtocolViolation(
                        "AUDIO_AFTER_CLOSE",
                        "Audio arrived after CloseStream (or after a fatal error) and was not transcribed.",
                    )
                )
            return
        if len(data) == 0:
            self._close_stream(CloseRequest(CloseCode.NORMAL, "CloseStream"), metadata=True)
            return
        if len(data) > self.settings.max_frame_bytes:
            self.receive_frame_too_large(len(data))
            return
        samples = self._decoder.decode(data)
        self._ingest(samples)
        limit = self.settings.max_session_s
        if limit and self._decoder.input_duration_s > limit:
            self.receive_session_too_long()

    @_guarded
    def receive_text(self, text: str) -> None:
        """Take one text frame: a JSON control message."""
        if self._closing is not None:
            return  # the stream is ending; late messages change nothing and need no answer
        try:
            message = parse_client_message(text)
        except ClientError as exc:
            self._client_error(exc)
            return
        if isinstance(message, KeepAlive):
            return
        if isinstance(message, Finalize):
            if not self._take_finalize_token():
                self._client_error(
                    ProtocolViolation(
                        "RATE_LIMITED",
                        f"More than {self.settings.finalize_burst} Finalize messages at once, or more than "
                        f"{self.settings.max_finalize_per_s:g} per second of audio; this one was ignored "
                        "(its audio stays in the open segment). Send Finalize when speech ends, not with "
                        "every chunk.",
                    )
                )
                return
            self._flush_vad()
            self._finalize(EndReason.FINALIZE)
        elif isinstance(message, CloseStream):
            self._close_stream(CloseRequest(CloseCode.NORMAL, "CloseStream"), metadata=True)

    @_guarded
    def receive_result(self, job_id: int, transcript: Transcript) -> None:
        """The model answered a job."""
        job = self._jobs.pop(job_id, None)
        if job is None:
            return
        if job.kind is JobKind.INTERIM:
            self._interim_in_flight = False
            self._interim_backoff = 1
            if job.segment_id == self._segmenter.segment_id and self._closing is None:
                self._slots.append(_Slot(event=self._results(job, transcript)))
            return
        if job.kind is JobKind.SPECULATIVE:
            # Kept until the segment ends: adopted then if no speech came after it.
            self._speculation_result = (job_id, transcript)
            return
        self._fill(job_id, self._results(job, transcript))

    @_guarded
    def receive_failure(self, job_id: int, code: str, description: str) -> None:
        """A job could not be transcribed (the model failed, or the server is shutting down)."""
        job = self._jobs.pop(job_id, None)
        if job is None:
            return
        if job.kind is JobKind.INTERIM:
            self._interim_back_off(job)
            return
        if job.kind is JobKind.SPECULATIVE:
            self._drop_speculation()  # the segment's end will ask for an ordinary final
            return
        self._fill(job_id, self._segment_error(job, code, description))

    @_guarded
    def receive_skipped(self, job_id: int) -> None:
        """An interim or speculative job was refused because the model is busy: interims back off, and
        the segment's final is asked for the ordinary way when it ends."""
        job = self._jobs.pop(job_id, None)
        if job is None:
            return
        if job.kind is JobKind.FINAL:  # never happens: finals are never skipped
            self._fill(job_id, self._segment_error(job, "INTERNAL_ERROR", "A final transcript was skipped."))
            return
        if job.kind is JobKind.SPECULATIVE:
            self._drop_speculation()  # the model is busy: the segment's end asks for an ordinary final
            return
        self._interim_back_off(job)

    @_guarded
    def receive_idle_timeout(self) -> None:
        """Neither audio nor KeepAlive arrived for the idle timeout."""
        self._fatal(
            ProtocolViolation(
                "IDLE_TIMEOUT",
                'No audio or KeepAlive arrived in time; send {"type": "KeepAlive"} every few seconds '
                "while there is no audio.",
                CloseCode.POLICY_VIOLATION,
            )
        )

    @_guarded
    def receive_no_audio_timeout(self) -> None:
        """The stream has sent no audio since it opened, for the no-audio timeout (KeepAlive alone does
        not hold a stream that never sent audio, as in Deepgram's API)."""
        self._fatal(
            ProtocolViolation(
                "NO_AUDIO",
                "No audio arrived since the stream opened; send audio within a few seconds of "
                "connecting (KeepAlive alone does not hold a stream that has sent none).",
                CloseCode.POLICY_VIOLATION,
            )
        )

    @_guarded
    def receive_frame_too_large(self, nbytes: int | None = None) -> None:
        """A message over ``max_frame_bytes`` arrived (the transport calls this itself for one it
        refused to read at all; ``nbytes`` None when its size is not known)."""
        size = "A message" if nbytes is None else f"A message of {nbytes} bytes"
        self._fatal(
            ProtocolViolation(
                "FRAME_TOO_LARGE",
                f"{size} exceeds this server's limit of {self.settings.max_frame_bytes} bytes; send "
                "audio in smaller frames (20-250 ms each).",
                CloseCode.MESSAGE_TOO_BIG,
            )
        )

    @_guarded
    def receive_session_too_long(self) -> None:
        """The stream reached ``max_session_s``, in audio or on the wall clock."""
        self._fatal(
            ProtocolViolation(
                "SESSION_TOO_LONG",
                f"This server limits a stream to {self.settings.max_session_s:g} s of audio or of "
                "connection time; open a new stream to continue.",
                CloseCode.POLICY_VIOLATION,
            )
        )

    @property
    def events_waiting(self) -> int:
        """Events held for the client, ready or not (the transport closes a client too slow to read)."""
        return len(self._slots) + len(self._immediate)

    @_guarded
    def receive_shutdown(self) -> None:
        """The server is going away: finalize what was received, then close with 1001."""
        if self._closing is None:
            # The finals still owed go first, then this Error, then Metadata (issue 8: a client that
            # stops at the first fatal error must not lose them).
            self._close_stream(CloseRequest(CloseCode.GOING_AWAY, "server shutting down"), metadata=False)
            self._slots.append(
                _Slot(
                    event=Error(
                        "SERVER_SHUTTING_DOWN",
                        "The server is shutting down; what this stream sent has been transcribed. "
                        "Reconnect to continue.",
                        CloseCode.GOING_AWAY,
                    )
                )
            )
            self._slots.append(_Slot(event=self._metadata()))

    def receive_disconnect(self) -> list[int]:
        """The client vanished. Returns the ids of jobs whose answers nobody will read."""
        if self._dead:
            return []
        self._dead = True
        abandoned = list(self._jobs)
        open_segment = self._segmenter.in_segment
        if abandoned or open_segment:
            logger.info(
                "session %s: client went away with %d job(s) in flight%s",
                self.identity.request_id,
                len(abandoned),
                " and a segment open" if open_segment else "",
            )
        self._jobs.clear()
        self._new_jobs.clear()
        self._slots.clear()
        self._immediate.clear()
        if self._closing is None:
            self._closing = CloseRequest(CloseCode.GOING_AWAY, "client went away")
        return abandoned

    # ------------------------------------------------------------------------------------------
    # Audio path

    def _ingest(self, samples: FloatArray) -> None:
        if len(samples) == 0:
            return
        pcm = float_to_int16(samples)
        frame = self._seg_settings.frame_samples
        pos = 0
        # First complete the frame left over from the last call, then whole frames, then keep the rest.
        if len(self._partial):
            need = frame - len(self._partial)
            head = pcm[:need]
            self._ring.write(head)
            pos = len(head)
            if len(self._partial) + len(head) < frame:
                self._partial = np.concatenate([self._partial, head])
                return
            self._classify(np.concatenate([self._partial, head]))
            self._partial = np.zeros(0, dtype=np.int16)
        while len(pcm) - pos >= frame:
            chunk = pcm[pos : pos + frame]
            self._ring.write(chunk)
            self._classify(chunk)
            pos += frame
        if pos < len(pcm):
            rest = pcm[pos:]
            self._ring.write(rest)
            self._partial = rest.copy()
        self._maybe_interim()

    def _classify(self, frame: Int16Array) -> None:
        self._pending_levels.append(frame_energy_dbfs(frame))
        for flag in self._vad.classify(frame):
            self._push(flag, self._pending_levels.popleft())

    def _flush_vad(self) -> None:
        """Have the VAD answer every frame it holds back (FSMN-VAD and Silero answer late), so a
        Finalize or the end of the stream covers speech still in the VAD's lag (issue 8)."""
        for flag in self._vad.flush():
            self._push(flag, self._pending_levels.popleft() if self._pending_levels else SILENCE_DBFS)

    def _push(self, flag: bool, level: float) -> None:
        self._handle(self._segmenter.push(flag, level))
        self._maybe_speculate()
        if (
            self._utterance_pending
            and not self._segmenter.in_segment
            and self._segmenter.position_sample - self._segmenter.last_speech_end_sample
            >= self._utterance_end_samples
        ):
            self._utterance_pending = False
            self._slots.append(
                _Slot(utterance_end_fallback_s=self._segmenter.last_speech_end_sample / SAMPLE_RATE_HZ)
            )

    def _handle(self, events: list[SegmenterEvent]) -> None:
        for event in events:
            if isinstance(event, SegmentStarted):
                if self.options.vad_events and not event.continuation:
                    self._immediate.append(SpeechStarted(event.speech_sample / SAMPLE_RATE_HZ))
                self._next_interim_sample = event.start_sample + self._interim_interval_samples()
            elif isinstance(event, SegmentEnded):
                self._final_job(event)
            elif isinstance(event, SegmentDiscarded):
                logger.debug(
                    "session %s: dropped a %d-sample blip",
                    self.identity.request_id,
                    event.end_sample - event.start_sample,
                )

    def _final_job(self, event: SegmentEnded) -> None:
        self._closed_segments.append(event.segment_id)
        spec = self._speculation
        if (
            spec is not None
            and spec.segment_id == event.segment_id
            and self._speculation_speech_end == event.last_speech_sample
        ):
            # No speech after the speculative job began: its transcript is this segment's final.
            self._speculation = None
            self.speculations_used += 1
            final = replace(spec, kind=JobKind.FINAL, end_sample=event.end_sample, reason=event.reason)
            self._slots.append(_Slot(job_id=spec.job_id))
            result = self._speculation_result
            self._speculation_result = None
            if result is not None and result[0] == spec.job_id:
                self._fill(spec.job_id, self._results(final, result[1]))
            else:
                self._jobs[spec.job_id] = final
        elif event.speech_frames == 0:
            # A continuation cut in a pause that the pause then ended: silence only, so its final is
            # empty and costs no model call (it still carries speech_final for that pause).
            if spec is not None:
                self._abandon_speculation()
            self._slots.append(
                _Slot(
                    event=self._empty_final(
                        event.start_sample, event.end_sample, event.reason, event.segment_id
                    )
                )
            )
        else:
            if spec is not None:
                self._abandon_speculation()
            audio = self._ring.read(event.start_sample, event.end_sample)
            job = self._new_job(
                JobKind.FINAL,
                event.segment_id,
                event.start_sample,
                event.end_sample,
                audio,
                reason=event.reason,
            )
            self._slots.append(_Slot(job_id=job.job_id))
        self._segments_finalized += 1
        self._last_final_end_sample = event.end_sample
        if self._utterance_end_samples:
            self._utterance_pending = True

    def _new_job(
        self,
        kind: JobKind,
        segment_id: int,
        start: int,
        end: int,
        audio: Int16Array,
        *,
        reason: EndReason | None = None,
    ) -> Job:
        request = TranscribeRequest(
            audio=audio.astype(np.float32) * np.float32(1.0 / 32768.0),
            language=self.options.language,
            use_itn=self.options.punctuate,
            word_timestamps=self.options.words and kind is not JobKind.INTERIM,
        )
        job = Job(self._next_job_id, kind, request, segment_id, start, end, reason)
        self._next_job_id += 1
        self._jobs[job.job_id] = job
        self._new_jobs.append(job)
        return job

    def _maybe_speculate(self) -> None:
        """Start the final early once the pause reaches ``speculative_final_ms``; give it up as soon as
        speech resumes or the segment changes under it."""
        seg = self._segmenter
        spec = self._speculation
        if spec is not None and (
            not seg.in_segment
            or spec.segment_id != seg.segment_id
            or seg.segment_speech_end_sample != self._speculation_speech_end
        ):
            self._abandon_speculation()
        if (
            self._speculate_frames
            and self._speculation is None
            and self._closing is None
            and seg.segment_would_be_kept
            and seg.trailing_silence_frames == self._speculate_frames
        ):
            start, end = seg.segment_start_sample, seg.position_sample
            self._speculation = self._new_job(
                JobKind.SPECULATIVE, seg.segment_id, start, end, self._ring.read(start, end)
            )
            self._speculation_speech_end = seg.segment_speech_end_sample
            self._speculation_result = None

    def _abandon_speculation(self) -> None:
        spec = self._speculation
        if spec is None:
            return
        self.speculations_wasted += 1
        self._drop_speculation()
        if self._jobs.pop(spec.job_id, None) is not None:
            self._cancelled.append(spec.job_id)

    def _drop_speculation(self) -> None:
        self._speculation = None
        self._speculation_result = None

    def _interim_back_off(self, job: Job) -> None:
        """An interim was skipped or failed: double the interval, counted from the skipped one's end."""
        self._interim_in_flight = False
        self._interim_backoff = min(self._interim_backoff * 2, self.settings.interim.max_backoff)
        self._next_interim_sample = max(
            self._next_interim_sample, job.end_sample + self._interim_interval_samples()
        )

    def _interim_interval_samples(self) -> int:
        return SAMPLE_RATE_HZ * self.settings.interim.interval_ms * self._interim_backoff // 1000

    def _maybe_interim(self) -> None:
        if not self.options.interim_results or self._interim_in_flight or self._closing is not None:
            return
        if not self._segmenter.in_segment or self._segmenter.trailing_silence_frames > 1:
            return  # in a pause nothing new can be heard, and the final may be moments away
        now = self._ring.end_index
        start = self._segmenter.segment_start_sample
        interim = self.settings.interim
        if now < self._next_interim_sample or now - start < SAMPLE_RATE_HZ * interim.min_audio_ms // 1000:
            return
        window = SAMPLE_RATE_HZ * interim.window_ms // 1000
        begin = max(start, now - window, self._ring.start_index)
        self._new_job(JobKind.INTERIM, self._segmenter.segment_id, begin, now, self._ring.read(begin, now))
        self._interim_in_flight = True
        self._next_interim_sample = now + self._interim_interval_samples()

    # ------------------------------------------------------------------------------------------
    # Results

    def _results(self, job: Job, transcript: Transcript) -> Results:
        offset_s = job.start_sample / SAMPLE_RATE_HZ
        words = tuple(
            WordTiming(w.word, w.punctuated_word, offset_s + w.start_s, offset_s + w.end_s, w.confidence)
            for w in transcript.words
        )
        final = job.kind is JobKind.FINAL
        reason = job.reason
        return Results(
            request_id=self.identity.request_id,
            model=self.identity.model,
            start_s=offset_s,
            duration_s=(job.end_sample - job.start_sample) / SAMPLE_RATE_HZ,
            is_final=final,
            speech_final=reason is EndReason.PAUSE and not self.options.endpointing_disabled,
            from_finalize=reason in (EndReason.FINALIZE, EndReason.END_OF_STREAM),
            transcript=transcript.text,
            confidence=transcript.confidence,
            words=words,
            language=transcript.language,
            emotion=transcript.emotion,
            audio_event=transcript.audio_event,
            segment_id=job.segment_id,
        )

    def _empty_final(self, start: int, end: int, reason: EndReason, segment_id: int) -> Results:
        """A final with no words, answered without the model (``segment_id`` 0: no segment)."""
        return Results(
            request_id=self.identity.request_id,
            model=self.identity.model,
            start_s=start / SAMPLE_RATE_HZ,
            duration_s=max(0, end - start) / SAMPLE_RATE_HZ,
            is_final=True,
            speech_final=reason is EndReason.PAUSE and not self.options.endpointing_disabled,
            from_finalize=reason in (EndReason.FINALIZE, EndReason.END_OF_STREAM),
            transcript="",
            confidence=0.0,
            segment_id=segment_id,
        )

    def _segment_error(self, job: Job, code: str, description: str) -> Error:
        """The Error that ends a segment in place of its final: its span and its id."""
        start_s = job.start_sample / SAMPLE_RATE_HZ
        duration_s = (job.end_sample - job.start_sample) / SAMPLE_RATE_HZ
        return Error(code, description, None, start_s, duration_s, job.segment_id)

    def _fill(self, job_id: int, event: ServerEvent) -> None:
        for slot in self._slots:
            if slot.job_id == job_id:
                slot.event = event
                slot.job_id = None
                return

    # ------------------------------------------------------------------------------------------
    # Ending segments and streams

    def _take_finalize_token(self) -> bool:
        """Whether a Finalize is within ``max_finalize_per_s`` per second of audio (after a burst of
        ``finalize_burst``); takes its token if so."""
        rate = self.settings.max_finalize_per_s
        if rate <= 0:
            return True
        audio_s = self._decoder.input_duration_s
        refill = (audio_s - self._finalize_refilled_s) * rate
        self._finalize_tokens = min(float(self.settings.finalize_burst), self._finalize_tokens + refill)
        self._finalize_refilled_s = audio_s
        if self._finalize_tokens < 1.0:
            return False
        self._finalize_tokens -= 1.0
        return True

    def _finalize(self, reason: EndReason) -> None:
        now = self._ring.end_index
        seg = self._segmenter
        forced = self._last_forced_sample
        if (
            reason is EndReason.FINALIZE
            and seg.in_segment
            and forced is not None
            and now - forced < self._min_finalize_samples
        ):
            # Too little audio since the last Finalize that ended a segment to be worth a model call (a
            # client finalizing every chunk): acknowledged at once, and the audio stays in the open
            # segment for its final later. The acknowledgement spans only the gap before the segment, so
            # it never overlaps that final.
            start = self._last_final_end_sample
            end = max(start, seg.segment_start_sample)
            self._slots.append(_Slot(event=self._empty_final(start, end, EndReason.FINALIZE, 0)))
            self._last_final_end_sample = end
            return
        events = seg.finalize(now, reason)
        if events and reason is EndReason.FINALIZE:
            self._last_forced_sample = now
        if events:
            self._handle(events)
        elif reason is EndReason.FINALIZE:
            # Nothing open: acknowledge with an empty final so the client knows the flush is done.
            start = self._last_final_end_sample
            self._slots.append(_Slot(event=self._empty_final(start, now, EndReason.FINALIZE, 0)))
            self._last_final_end_sample = now

    def _close_stream(self, close: CloseRequest, *, metadata: bool) -> None:
        if self._closing is not None:
            return
        tail = self._decoder.flush()
        if len(tail):
            self._ingest(tail)
        self._flush_vad()
        self._finalize(EndReason.END_OF_STREAM)
        dangling = self._decoder.pending_bytes
        if dangling:
            self._immediate.append(
                Error(
                    "INCOMPLETE_SAMPLE",
                    f"The stream ended with {dangling} byte(s) that do not form a whole sample "
                    f"({self._decoder.bytes_per_frame} bytes each); they were ignored.",
                )
            )
        self._closing = close
        if metadata:
            self._slots.append(_Slot(event=self._metadata()))

    def _metadata(self) -> Metadata:
        return Metadata(
            request_id=self.identity.request_id,
            created=self.identity.created,
            duration_s=self._decoder.input_duration_s,
            channels=self.options.channels,
            model=self.identity.model,
            model_details=self.identity.model_details,
            warnings=self.identity.warnings,
            ignored_params=self.options.ignored_params,
            segments=self._segments_finalized,
        )

    def _client_error(self, exc: ClientError) -> None:
        if exc.close_code is not None:
            self._fatal(exc)
            return
        self._client_errors += 1
        logger.info("session %s: %s", self.identity.request_id, exc)
        self._immediate.append(Error(exc.code, exc.description))
        if self._client_errors >= self.settings.max_client_errors:
            self._fatal(
                ProtocolViolation(
                    "TOO_MANY_ERRORS",
                    f"{self._client_errors} invalid messages on this stream; closing it. "
                    "Check the client against the README's protocol section.",
                    CloseCode.POLICY_VIOLATION,
                )
            )

    def _fatal(self, exc: ClientError) -> None:
        if self._closing is not None:
            return
        assert exc.close_code is not None
        logger.info("session %s: closing: %s", self.identity.request_id, exc)
        # Audio already accepted is still transcribed, and its finals go out before the fatal Error: a
        # client that stops reading at the first fatal error must not lose the finals it is owed.
        self._close_stream(CloseRequest(exc.close_code, exc.code), metadata=False)
        self._slots.append(_Slot(event=Error(exc.code, exc.description, exc.close_code)))

    def _internal_error(self) -> None:
        self._dead = True
        self._jobs.clear()
        self._slots.clear()
        self._immediate = [
            Error(
                "INTERNAL_ERROR",
                "The server failed on this stream; it has been logged.",
                CloseCode.INTERNAL_ERROR,
            )
        ]
        self._closing = CloseRequest(CloseCode.INTERNAL_ERROR, "INTERNAL_ERROR")
