"""One channel's core: framing, VAD, segments and the model jobs of one audio channel. No I/O.

A :class:`ChannelCore` is fed 16 kHz float32 samples (already decoded and, for a multichannel stream,
demultiplexed by the stream around it, :mod:`stream_server.stream`) and the model's answers; it is
drained of model jobs and of its own events, in the order of its audio (README, "Protocol: ordering"):
``Results`` and ``UtteranceEnd`` leave in audio order whatever order the model answers in;
``SpeechStarted`` leaves at once. Every segment its segmenter closes gets exactly one final ``Results``
or one segment ``Error`` naming its span. Its memory is bounded by the settings (one ring of a segment
plus an interim window and the VAD's lag), not by the stream's length: an N-channel stream holds N of
these.

It knows nothing of the protocol's messages, of other channels or of closing a stream: the stream calls
:meth:`finalize` (a client ``Finalize``), :meth:`end` (the stream ends) and :meth:`disconnect`.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum

import numpy as np

from .audio import FloatArray, float_to_int16
from .config import InterimConfig, SegmenterConfig
from .engines.base import SAMPLE_RATE_HZ, TranscribeRequest, Transcript
from .protocol import (
    Error,
    ModelInfo,
    Results,
    ServerEvent,
    SpeechStarted,
    StreamOptions,
    UtteranceEnd,
    WordTiming,
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


class JobKind(Enum):
    FINAL = "final"
    INTERIM = "interim"
    SPECULATIVE = "speculative"
    """A final started early, during the trailing silence; adopted as the final if no speech follows."""


@dataclass(frozen=True)
class Job:
    """Audio the model must transcribe for this stream.

    Attributes:
        job_id: unique within the stream (across its channels).
        kind: FINAL (one per segment, never dropped), INTERIM (may be skipped under load) or
            SPECULATIVE (a final started early; may be refused, and is cancelled if speech resumes).
        request: what the engine sees.
        segment_id: the segment it belongs to (numbered per channel).
        start_sample: where its audio starts in the channel (16 kHz samples).
        end_sample: one past where its audio ends.
        reason: why the segment ended (finals only).
        channel: the channel it comes from (0 for a mono stream).
    """

    job_id: int
    kind: JobKind
    request: TranscribeRequest
    segment_id: int
    start_sample: int
    end_sample: int
    reason: EndReason | None = None
    channel: int = 0


SegmentKey = tuple[int, int]
"""``(channel, segment_id)``: names a segment within a stream (segment ids are numbered per channel)."""


@dataclass(frozen=True)
class ChannelSettings:
    """What a channel needs from the server's configuration.

    Attributes:
        segmenter: endpointing settings.
        interim: interim-result settings.
        request_id: the stream's id, for the log and the events.
        model: model identity for ``Results.metadata``.
        channel_index: ``(i, N)``: this channel and the stream's channel count, as ``Results`` carry it.
    """

    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    interim: InterimConfig = field(default_factory=InterimConfig)
    request_id: str = ""
    model: ModelInfo = field(default_factory=lambda: ModelInfo("", "", "", ""))
    channel_index: tuple[int, int] = (0, 1)


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


def ring_capacity_samples(seg: SegmenterSettings, interim: InterimConfig, vad_lag_frames: int) -> int:
    """Samples a channel's ring holds: the longest segment or interim window, the pre-roll and start
    window before a segment opens, and the VAD's lag (README, "Memory")."""
    frame = seg.frame_samples
    interim_window = SAMPLE_RATE_HZ * interim.window_ms // 1000
    return (
        max(seg.max_segment_samples, interim_window)
        + (seg.pre_roll_frames + seg.start_window_frames) * frame
        + (vad_lag_frames + 4) * frame
    )


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


class ChannelCore:
    """One channel's state; see the module docstring.

    Args:
        options: the client's validated options (language, interims, endpointing, words...).
        settings: server-side settings and this channel's identity.
        vad: this channel's frame classifier.
        new_job_id: gives a job id unique within the stream (channels share it).
    """

    def __init__(
        self,
        options: StreamOptions,
        settings: ChannelSettings,
        vad: FrameVad,
        new_job_id: Callable[[], int],
    ) -> None:
        self.options = options
        self.settings = settings
        self.channel = settings.channel_index[0]
        self._new_job_id = new_job_id
        self._vad = vad
        self._seg_settings = segmenter_settings(options, settings.segmenter)
        if vad.frame_samples != self._seg_settings.frame_samples:
            raise ValueError("VAD frame size does not match the segmenter's")
        self._segmenter = Segmenter(self._seg_settings)
        self._ring = SampleRing(
            ring_capacity_samples(self._seg_settings, settings.interim, vad.max_lag_frames)
        )
        self._partial = np.zeros(0, dtype=np.int16)  # < one frame, waiting to be classified
        self._pending_levels: deque[float] = deque(maxlen=vad.max_lag_frames + 2)

        self._immediate: list[ServerEvent] = []
        self._slots: deque[_Slot] = deque()
        self._jobs: dict[int, Job] = {}
        self._new_jobs: list[Job] = []
        self._ended = False

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

        # Finalize (README, "Protocol"): a model call needs some new audio since the last forced end.
        self._min_finalize_samples = SAMPLE_RATE_HZ * settings.segmenter.min_finalize_audio_ms // 1000
        self._last_forced_sample: int | None = None  # where the last Finalize that ended a segment was

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
    # What the stream reads

    @property
    def drained(self) -> bool:
        """Nothing is owed any more: every segment's final (or error) has been drained."""
        return not (
            self._slots or self._immediate or any(j.kind is JobKind.FINAL for j in self._jobs.values())
        )

    @property
    def pending_finals(self) -> int:
        """Final jobs handed out and not yet answered."""
        return sum(1 for j in self._jobs.values() if j.kind is JobKind.FINAL)

    @property
    def events_waiting(self) -> int:
        """Events held, ready or not."""
        return len(self._slots) + len(self._immediate)

    @property
    def segments_finalized(self) -> int:
        return self._segments_finalized

    @property
    def in_segment(self) -> bool:
        return self._segmenter.in_segment

    @property
    def samples_received(self) -> int:
        """16 kHz samples this channel has been fed."""
        return self._ring.end_index

    def owns(self, job_id: int) -> bool:
        return job_id in self._jobs

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
        """This channel's events ready to leave, in the order they must be sent."""
        out = self._immediate
        self._immediate = []
        while self._slots and self._slots[0].ready:
            slot = self._slots.popleft()
            event = slot.event
            if slot.utterance_end_fallback_s is not None:
                last = self._last_word_end_s
                event = UtteranceEnd(
                    last if last is not None else slot.utterance_end_fallback_s, self.settings.channel_index
                )
            if event is None:
                continue
            if isinstance(event, Results) and event.is_final:
                # UtteranceEnd reports the last finalized word; without word times, the speech end.
                self._last_word_end_s = event.words[-1].end_s if event.words else None
            out.append(event)
        return out

    # ------------------------------------------------------------------------------------------
    # Inputs

    def receive_samples(self, samples: FloatArray) -> None:
        """Take 16 kHz float32 samples (any number)."""
        if self._ended or len(samples) == 0:
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

    def receive_result(self, job_id: int, transcript: Transcript) -> None:
        """The model answered a job."""
        job = self._jobs.pop(job_id, None)
        if job is None:
            return
        if job.kind is JobKind.INTERIM:
            self._interim_in_flight = False
            self._interim_backoff = 1
            if job.segment_id == self._segmenter.segment_id and not self._ended:
                self._slots.append(_Slot(event=self._results(job, transcript)))
            return
        if job.kind is JobKind.SPECULATIVE:
            # Kept until the segment ends: adopted then if no speech came after it.
            self._speculation_result = (job_id, transcript)
            return
        self._fill(job_id, self._results(job, transcript))

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

    def finalize(self) -> None:
        """A client ``Finalize``: the VAD answers every frame it holds, and the open segment ends."""
        if self._ended:
            return
        self._flush_vad()
        self._finalize(EndReason.FINALIZE)

    def end(self) -> None:
        """The stream ends: what was received is finalized; nothing more is taken."""
        if self._ended:
            return
        self._flush_vad()
        self._finalize(EndReason.END_OF_STREAM)
        self._ended = True

    def disconnect(self) -> list[int]:
        """Nobody will read this channel: forget everything. Returns the ids of jobs in flight."""
        abandoned = list(self._jobs)
        self.clear()
        return abandoned

    def clear(self) -> None:
        """Forget every job and event (the stream is dead)."""
        self._ended = True
        self._jobs.clear()
        self._new_jobs.clear()
        self._slots.clear()
        self._immediate.clear()

    # ------------------------------------------------------------------------------------------
    # Audio path

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
                    self._immediate.append(
                        SpeechStarted(event.speech_sample / SAMPLE_RATE_HZ, self.settings.channel_index)
                    )
                self._next_interim_sample = event.start_sample + self._interim_interval_samples()
            elif isinstance(event, SegmentEnded):
                self._final_job(event)
            elif isinstance(event, SegmentDiscarded):
                logger.debug(
                    "stream %s channel %d: dropped a %d-sample blip",
                    self.settings.request_id,
                    self.channel,
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
        job = Job(self._new_job_id(), kind, request, segment_id, start, end, reason, self.channel)
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
            and not self._ended
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
        if not self.options.interim_results or self._interim_in_flight or self._ended:
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
            request_id=self.settings.request_id,
            model=self.settings.model,
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
            channel_index=self.settings.channel_index,
        )

    def _empty_final(self, start: int, end: int, reason: EndReason, segment_id: int) -> Results:
        """A final with no words, answered without the model (``segment_id`` 0: no segment)."""
        return Results(
            request_id=self.settings.request_id,
            model=self.settings.model,
            start_s=start / SAMPLE_RATE_HZ,
            duration_s=max(0, end - start) / SAMPLE_RATE_HZ,
            is_final=True,
            speech_final=reason is EndReason.PAUSE and not self.options.endpointing_disabled,
            from_finalize=reason in (EndReason.FINALIZE, EndReason.END_OF_STREAM),
            transcript="",
            confidence=0.0,
            segment_id=segment_id,
            channel_index=self.settings.channel_index,
        )

    def _segment_error(self, job: Job, code: str, description: str) -> Error:
        """The Error that ends a segment in place of its final: its span, its id and its channel."""
        start_s = job.start_sample / SAMPLE_RATE_HZ
        duration_s = (job.end_sample - job.start_sample) / SAMPLE_RATE_HZ
        return Error(
            code, description, None, start_s, duration_s, job.segment_id, self.settings.channel_index
        )

    def _fill(self, job_id: int, event: ServerEvent) -> None:
        for slot in self._slots:
            if slot.job_id == job_id:
                slot.event = event
                slot.job_id = None
                return

    # ------------------------------------------------------------------------------------------
    # Ending segments

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
