"""Incremental endpointing: turns per-frame speech flags into speech segments. No I/O, no audio.

Fed one frame at a time (its speech flag and its level), the :class:`Segmenter` decides where speech
segments start and end, in absolute sample positions (README, "How audio becomes segments"):

- **start**: ``start_voiced_frames`` speech frames within the last ``start_window_frames`` frames;
  the segment begins ``pre_roll`` before the first of them (never before the previous segment's end),
  so first syllables are not clipped.
- **end on a pause**: ``endpoint_frames`` consecutive non-speech frames; the segment ends ``post_roll``
  (at most the pause itself) after the last speech frame, so last syllables are not clipped.
- **too short**: a segment with fewer than ``min_speech_frames`` speech frames that ended on a pause is
  discarded (a click, a cough).
- **maximum length**: a segment reaching ``max_segment_samples`` is cut at the quietest point of its last
  ``cut_search_frames`` frames; the rest continues as the next segment, starting exactly at the cut, so
  nothing is lost or doubled. A cut may land in a pause: the pause goes on counting from the last speech
  frame (it ends the continuation when it would have ended the segment), and the continuation's speech
  end is never before its start. A continuation with no speech frame at all says so
  (``SegmentEnded.speech_frames`` is 0).
- **finalize**: on request (client ``Finalize``, end of stream) the open segment ends at once.

Everything it keeps is bounded by the settings: a deque of the last ``cut_search_frames`` frames and a
few counters.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum


class EndReason(Enum):
    """Why a segment ended."""

    PAUSE = "pause"
    MAX_LENGTH = "max_length"
    FINALIZE = "finalize"
    END_OF_STREAM = "end_of_stream"


@dataclass(frozen=True)
class SegmentStarted:
    """A segment opened.

    Attributes:
        segment_id: increasing per session, from 1.
        start_sample: first sample of the segment (pre-roll included).
        speech_sample: first sample of the first speech frame (for ``SpeechStarted``).
        continuation: the segment continues one that was cut at the maximum length.
    """

    segment_id: int
    start_sample: int
    speech_sample: int
    continuation: bool


@dataclass(frozen=True)
class SegmentEnded:
    """A segment closed and should be transcribed.

    Attributes:
        segment_id: the segment's id.
        start_sample: first sample.
        end_sample: one past the last sample.
        reason: why it ended.
        last_speech_sample: one past the last speech frame within it (at least ``start_sample``).
        speech_frames: speech frames within it; 0 only for a continuation cut in a pause that the pause
            then ended (nothing in it to transcribe).
    """

    segment_id: int
    start_sample: int
    end_sample: int
    reason: EndReason
    last_speech_sample: int
    speech_frames: int


@dataclass(frozen=True)
class SegmentDiscarded:
    """A segment closed with too little speech to transcribe."""

    segment_id: int
    start_sample: int
    end_sample: int


SegmenterEvent = SegmentStarted | SegmentEnded | SegmentDiscarded


@dataclass(frozen=True)
class SegmenterSettings:
    """Endpointing settings in frames and samples (the session derives them from milliseconds).

    Attributes:
        frame_samples: samples per VAD frame.
        start_window_frames: frames looked at to decide speech has started.
        start_voiced_frames: speech frames needed within that window.
        pre_roll_frames: audio kept before the first speech frame.
        post_roll_frames: audio kept after the last speech frame (capped by the pause).
        endpoint_frames: consecutive non-speech frames that end a segment.
        min_speech_frames: fewer speech frames than this and a paused segment is discarded.
        max_segment_samples: no segment is longer than this.
        cut_search_frames: how far back from the limit to look for the quietest cut point.
    """

    frame_samples: int = 480
    start_window_frames: int = 5
    start_voiced_frames: int = 3
    pre_roll_frames: int = 10
    post_roll_frames: int = 10
    endpoint_frames: int = 17
    min_speech_frames: int = 7
    max_segment_samples: int = 20 * 16000
    cut_search_frames: int = 100

    def __post_init__(self) -> None:
        if self.frame_samples <= 0:
            raise ValueError("frame_samples must be positive")
        if not 1 <= self.start_voiced_frames <= self.start_window_frames:
            raise ValueError("start_voiced_frames must be within 1..start_window_frames")
        if self.endpoint_frames < 1:
            raise ValueError("endpoint_frames must be at least 1")
        search = (
            self.cut_search_frames + self.pre_roll_frames + self.start_window_frames + 2
        ) * self.frame_samples
        if self.max_segment_samples <= search:
            raise ValueError("max_segment_samples must exceed the cut search window plus pre-roll")


class Segmenter:
    """The endpointing state machine; see the module docstring.

    Args:
        settings: frame counts and limits.
    """

    def __init__(self, settings: SegmenterSettings) -> None:
        self.settings = settings
        self.frames_seen = 0
        """Frames classified so far; frame ``i`` covers samples ``[i*F, (i+1)*F)``."""
        self._window: deque[bool] = deque(maxlen=settings.start_window_frames)
        # (frame index, speech flag, level) of the newest frames, for choosing a cut point.
        self._recent: deque[tuple[int, bool, float]] = deque(maxlen=settings.cut_search_frames + 1)
        self._next_id = 1
        self._segment_id = 0
        self._segment_start = 0
        self._continuation = False
        self._voiced_frames = 0
        self._trailing_unvoiced = 0
        self._last_speech_end = 0
        self.previous_end_sample = 0
        """End of the last closed segment; the next one never starts before it."""
        self.last_speech_end_sample = 0
        """One past the newest speech frame seen in any segment."""

    @property
    def in_segment(self) -> bool:
        return self._segment_id != 0

    @property
    def segment_id(self) -> int:
        """The open segment's id, 0 when none is open."""
        return self._segment_id

    @property
    def segment_start_sample(self) -> int:
        return self._segment_start

    @property
    def trailing_silence_frames(self) -> int:
        """Non-speech frames since the open segment's last speech frame (0 while speech goes on)."""
        return self._trailing_unvoiced if self.in_segment else 0

    @property
    def segment_would_be_kept(self) -> bool:
        """Ending the open segment on a pause now would transcribe it (it is not a short blip, nor a
        continuation without speech)."""
        if not self.in_segment:
            return False
        if self._continuation:
            return self._voiced_frames > 0
        return self._voiced_frames >= self.settings.min_speech_frames

    @property
    def segment_speech_end_sample(self) -> int:
        """One past the open segment's last speech frame."""
        return self._last_speech_end

    @property
    def position_sample(self) -> int:
        """One past the last classified sample."""
        return self.frames_seen * self.settings.frame_samples

    def push(self, is_speech: bool, level_dbfs: float) -> list[SegmenterEvent]:
        """Take the next frame's flag and level.

        Returns:
            What happened at this frame: at most one start and one end (a cut gives both).
        """
        s = self.settings
        index = self.frames_seen
        self.frames_seen += 1
        self._recent.append((index, is_speech, level_dbfs))
        events: list[SegmenterEvent] = []

        if not self.in_segment:
            self._window.append(is_speech)
            if sum(self._window) >= s.start_voiced_frames:
                first_voiced = index - len(self._window) + 1 + list(self._window).index(True)
                speech_sample = first_voiced * s.frame_samples
                start = max(self.previous_end_sample, speech_sample - s.pre_roll_frames * s.frame_samples, 0)
                voiced = sum(self._window)
                self._window.clear()
                events.append(self._open(start, speech_sample, voiced, continuation=False))
                self._last_speech_end = self.position_sample
                self.last_speech_end_sample = self._last_speech_end
            return events

        if is_speech:
            self._voiced_frames += 1
            self._trailing_unvoiced = 0
            self._last_speech_end = self.position_sample
            self.last_speech_end_sample = self._last_speech_end
        else:
            self._trailing_unvoiced += 1

        if self._trailing_unvoiced >= s.endpoint_frames:
            pad = min(s.post_roll_frames, self._trailing_unvoiced) * s.frame_samples
            end = min(self._last_speech_end + pad, self.position_sample)
            if end <= self._segment_start:  # a continuation cut in this pause, and no post-roll
                end = self.position_sample
            if self._voiced_frames < s.min_speech_frames and not self._continuation:
                events.append(self._discard(end))
            else:
                events.extend(self._end(end, EndReason.PAUSE))
            return events

        if self.position_sample - self._segment_start >= s.max_segment_samples:
            # The latest frame's middle can lie past the limit (a continuation starts mid-frame).
            cut = self._choose_cut(highest=self._segment_start + s.max_segment_samples)
            events.append(self._close(cut, EndReason.MAX_LENGTH))
            events.append(self._continue_from(cut))
        return events

    def finalize(self, end_sample: int, reason: EndReason) -> list[SegmenterEvent]:
        """End the open segment now.

        Args:
            end_sample: one past the last sample received (may lie beyond the classified frames).
            reason: FINALIZE or END_OF_STREAM.

        Returns:
            The segment's end, or nothing when no segment was open.
        """
        self._window.clear()
        if not self.in_segment:
            return []
        s = self.settings
        end = max(end_sample, self._segment_start)
        # Trim a long trailing silence to the post-roll: nothing is spoken in it.
        trimmed = self._last_speech_end + s.post_roll_frames * s.frame_samples
        if self._trailing_unvoiced > s.post_roll_frames and self._segment_start < trimmed < end:
            end = trimmed
        return self._end(end, reason)

    # ----------------------------------------------------------------------------------------------

    def _open(self, start: int, speech_sample: int, voiced: int, *, continuation: bool) -> SegmentStarted:
        self._segment_id = self._next_id
        self._next_id += 1
        self._segment_start = start
        self._continuation = continuation
        self._voiced_frames = voiced
        self._trailing_unvoiced = 0
        return SegmentStarted(self._segment_id, start, speech_sample, continuation)

    def _end(self, end: int, reason: EndReason) -> list[SegmenterEvent]:
        """Close the open segment at ``end``, never longer than ``max_segment_samples`` (the engine
        refuses longer clips, issue 8).

        A segment is at most a frame short of the limit when a pause, a Finalize or the end of the stream
        arrives, but the audio up to ``end`` can reach past it (the frame that ends the pause, the part
        of a frame not yet classified). Beyond the last speech frame a pause's end is only silence, so
        it is trimmed; otherwise the segment is cut at its quietest point as at the limit, and the rest
        closes as a continuation for ``reason``: split, never dropped.
        """
        s = self.settings
        limit = s.max_segment_samples
        events: list[SegmenterEvent] = []
        while end - self._segment_start > limit:
            if reason is EndReason.PAUSE and self._last_speech_end <= self._segment_start + limit:
                end = self._segment_start + limit
                break
            cut = self._choose_cut(lowest=end - limit, highest=self._segment_start + limit)
            events.append(self._close(cut, EndReason.MAX_LENGTH))
            events.append(self._continue_from(cut))
        events.append(self._close(end, reason))
        return events

    def _continue_from(self, cut: int) -> SegmentStarted:
        """Open the continuation of a segment just cut at ``cut``.

        The cut may lie in a pause (issue 8): the pause keeps its length so far, so it still ends
        ``endpoint_frames`` after the last speech frame, and the continuation's speech end moves up to
        the cut, so its post-roll and any trim are measured from inside it, never before its start.
        """
        s = self.settings
        # Frames overlapping the continuation (the one the cut splits counts for both halves).
        voiced = sum(1 for (i, flag, _) in self._recent if flag and (i + 1) * s.frame_samples > cut)
        trailing = self._trailing_unvoiced
        started = self._open(cut, cut, voiced, continuation=True)
        self._trailing_unvoiced = trailing
        self._last_speech_end = max(self._last_speech_end, cut)
        return started

    def _close(self, end: int, reason: EndReason) -> SegmentEnded:
        event = SegmentEnded(
            self._segment_id,
            self._segment_start,
            end,
            reason,
            min(self._last_speech_end, end),
            self._voiced_frames,
        )
        self._reset(end)
        return event

    def _discard(self, end: int) -> SegmentDiscarded:
        event = SegmentDiscarded(self._segment_id, self._segment_start, end)
        self._reset(end)
        return event

    def _reset(self, end: int) -> None:
        self._segment_id = 0
        self._continuation = False
        self.previous_end_sample = end
        self._window.clear()

    def _choose_cut(self, *, lowest: int = 0, highest: int | None = None) -> int:
        """The middle of the quietest frame among the last ``cut_search_frames`` (levels smoothed over
        three frames so a single quiet frame inside a word does not win; the latest wins ties), among
        those whose middle lies within ``[lowest, highest]`` (clamped there when none does)."""
        s = self.settings
        half = s.frame_samples // 2
        first = self._segment_start + s.frame_samples
        low = max(lowest, first)
        high = highest if highest is not None else self.position_sample
        frames = list(self._recent)[-s.cut_search_frames :]
        levels = [level for (_, _, level) in frames]
        best_cut: int | None = None
        best_level = float("inf")
        for k in range(len(frames)):
            cut = frames[k][0] * s.frame_samples + half
            if not low <= cut <= high:
                continue
            window = levels[max(0, k - 1) : k + 2]
            smoothed = sum(window) / len(window)
            if smoothed <= best_level:
                best_level = smoothed
                best_cut = cut
        if best_cut is None:
            best_cut = min(max(frames[-1][0] * s.frame_samples + half, low), high)
        return best_cut
