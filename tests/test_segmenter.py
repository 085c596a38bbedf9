"""The endpointing state machine, fed flags directly."""

from __future__ import annotations

import pytest

from stream_server.segmenter import (
    EndReason,
    SegmentDiscarded,
    SegmentEnded,
    Segmenter,
    SegmenterSettings,
    SegmentStarted,
)

F = 480
SETTINGS = SegmenterSettings(
    frame_samples=F,
    start_window_frames=5,
    start_voiced_frames=3,
    pre_roll_frames=10,
    post_roll_frames=10,
    endpoint_frames=17,
    min_speech_frames=7,
    max_segment_samples=400 * F,
    cut_search_frames=100,
)


def run(seg: Segmenter, pattern: list[tuple[bool, int]], level: float | None = None) -> list[object]:
    events: list[object] = []
    for flag, count in pattern:
        for _ in range(count):
            lvl = level if level is not None else (-10.0 if flag else -80.0)
            events.extend(seg.push(flag, lvl))
    return events


def test_segment_starts_with_pre_roll_and_ends_with_post_roll() -> None:
    """A burst of speech yields one segment padded by pre-roll before and post-roll after."""
    seg = Segmenter(SETTINGS)
    events = run(seg, [(False, 50), (True, 40), (False, 30)])
    started = [e for e in events if isinstance(e, SegmentStarted)]
    ended = [e for e in events if isinstance(e, SegmentEnded)]
    assert len(started) == 1 and len(ended) == 1
    assert started[0].speech_sample == 50 * F
    assert started[0].start_sample == 40 * F
    assert ended[0].end_sample == 100 * F
    assert ended[0].last_speech_sample == 90 * F
    assert ended[0].reason is EndReason.PAUSE


def test_pre_roll_never_reaches_into_previous_segment() -> None:
    """A segment starting soon after another begins at the earlier one's end, not before it."""
    seg = Segmenter(SETTINGS)
    events = run(seg, [(True, 20), (False, 17), (True, 20), (False, 20)])
    ended = [e for e in events if isinstance(e, SegmentEnded)]
    assert len(ended) == 2
    assert ended[1].start_sample == ended[0].end_sample


def test_short_blip_is_discarded() -> None:
    """Fewer speech frames than the minimum, ended by a pause, are dropped rather than transcribed."""
    seg = Segmenter(SETTINGS)
    events = run(seg, [(False, 10), (True, 4), (False, 30)])
    assert any(isinstance(e, SegmentDiscarded) for e in events)
    assert not any(isinstance(e, SegmentEnded) for e in events)


def test_isolated_speech_frames_do_not_open_a_segment() -> None:
    """Two speech frames in a five-frame window are not enough to open a segment."""
    seg = Segmenter(SETTINGS)
    events = run(seg, [(True, 1), (False, 3), (True, 1), (False, 3)] * 10)
    assert events == []


def test_pause_shorter_than_endpointing_keeps_segment_open() -> None:
    """A pause one frame shorter than the endpointing silence does not end the segment."""
    seg = Segmenter(SETTINGS)
    events = run(seg, [(True, 20), (False, 16), (True, 20)])
    assert not any(isinstance(e, SegmentEnded) for e in events)
    assert seg.in_segment


def test_forced_cut_lands_in_quietest_frame_and_segments_tile() -> None:
    """Non-stop speech is cut at the quietest recent frame; consecutive segments share their boundary."""
    seg = Segmenter(SETTINGS)
    events: list[object] = []
    quiet_frames = set(range(350, 353)) | set(range(700, 703)) | set(range(1050, 1053))
    for i in range(1200):
        events.extend(seg.push(True, -60.0 if i in quiet_frames else -10.0))
    events.extend(seg.finalize(seg.position_sample, EndReason.END_OF_STREAM))
    ended = [e for e in events if isinstance(e, SegmentEnded)]
    assert [e.reason for e in ended[:-1]] == [EndReason.MAX_LENGTH] * (len(ended) - 1)
    for prev, nxt in zip(ended, ended[1:], strict=False):
        assert prev.end_sample == nxt.start_sample
    for e in ended:
        assert e.end_sample - e.start_sample <= SETTINGS.max_segment_samples
    cut_frames = [e.end_sample // F for e in ended[:-1]]
    assert cut_frames == [351, 701, 1051]
    starts = [e for e in events if isinstance(e, SegmentStarted)]
    assert [s.continuation for s in starts] == [False, True, True, True]


def test_finalize_closes_open_segment_and_trims_long_silence() -> None:
    """Finalize ends the open segment at once, trimming trailing silence beyond the post-roll."""
    seg = Segmenter(SETTINGS)
    run(seg, [(True, 20), (False, 15)])
    (ended,) = seg.finalize(seg.position_sample, EndReason.FINALIZE)
    assert isinstance(ended, SegmentEnded)
    assert ended.reason is EndReason.FINALIZE
    assert ended.end_sample == 30 * F
    assert not seg.in_segment
    assert seg.finalize(seg.position_sample, EndReason.FINALIZE) == []


def test_finalize_keeps_short_triggered_speech() -> None:
    """A short word finalized by the client is transcribed, not dropped as a blip."""
    seg = Segmenter(SETTINGS)
    run(seg, [(False, 5), (True, 4)])
    (ended,) = seg.finalize(seg.position_sample, EndReason.FINALIZE)
    assert isinstance(ended, SegmentEnded)


def test_settings_reject_max_segment_smaller_than_search_window() -> None:
    """Settings where the cut search window does not fit inside the maximum segment are refused."""
    with pytest.raises(ValueError, match="max_segment_samples"):
        SegmenterSettings(frame_samples=F, max_segment_samples=50 * F, cut_search_frames=100)


def test_forced_cut_inside_a_pause_leaves_a_continuation_the_pause_ends() -> None:
    """A cut that lands in a pause (past the post-roll) opens a continuation that starts at the cut; the
    pause still ends endpoint_frames after the last speech frame, after the continuation's start."""
    seg = Segmenter(SETTINGS)
    events = run(
        seg, [(True, 387), (False, 60)]
    )  # the limit (400 frames) is reached 13 frames into the pause
    ended = [e for e in events if isinstance(e, SegmentEnded)]
    assert [e.reason for e in ended] == [EndReason.MAX_LENGTH, EndReason.PAUSE]
    cut, rest = ended
    assert cut.end_sample > 397 * F, "the cut lies in the pause, beyond the post-roll"
    assert rest.start_sample == cut.end_sample
    assert all(e.end_sample > e.start_sample for e in ended), ended
    assert rest.end_sample == (387 + SETTINGS.endpoint_frames) * F, "the pause ends on time"
    assert rest.speech_frames == 0 and cut.speech_frames == 387


def test_no_segment_is_longer_than_the_maximum() -> None:
    """Whatever ends it (a pause, a Finalize, the end of the stream), no segment is longer than
    max_segment_samples; the part beyond is cut off as a continuation, never dropped."""
    quick = SegmenterSettings(
        frame_samples=F,
        start_window_frames=5,
        start_voiced_frames=3,
        pre_roll_frames=10,
        post_roll_frames=10,
        endpoint_frames=3,  # shorter than the post-roll: a pause closes at the frame that ends it
        min_speech_frames=7,
        max_segment_samples=400 * F,
        cut_search_frames=100,
    )
    for speech_frames in range(700, 760):
        for ending in ("pause", "finalize"):
            seg = Segmenter(quick)
            events: list[object] = []
            for i in range(speech_frames):  # a dip at frame 350: the first cut is mid-frame there
                events.extend(seg.push(True, -60.0 if i == 350 else -10.0))
            if ending == "pause":
                events.extend(run(seg, [(False, 5)]))
            else:
                events.extend(seg.finalize(seg.position_sample + F - 1, EndReason.FINALIZE))
            ended = [e for e in events if isinstance(e, SegmentEnded)]
            assert all(0 < e.end_sample - e.start_sample <= quick.max_segment_samples for e in ended), (
                speech_frames,
                ending,
                [(e.start_sample, e.end_sample) for e in ended],
            )
            for prev, nxt in zip(ended, ended[1:], strict=False):
                assert prev.end_sample == nxt.start_sample, "the segments tile: nothing dropped"


@pytest.mark.parametrize("ending", ["pause", "finalize"])
def test_cut_in_a_pause_without_post_roll_leaves_no_empty_segment(ending: str) -> None:
    """With no post-roll, a continuation cut in a pause still ends after its start."""
    settings = SegmenterSettings(
        frame_samples=F, post_roll_frames=0, endpoint_frames=17, max_segment_samples=400 * F
    )
    seg = Segmenter(settings)
    events = run(seg, [(True, 390), (False, 12 if ending == "finalize" else 40)])
    if ending == "finalize":
        events.extend(seg.finalize(seg.position_sample, EndReason.FINALIZE))
    ended = [e for e in events if isinstance(e, SegmentEnded)]
    assert len(ended) == 2 and all(e.end_sample > e.start_sample for e in ended), ended


def test_forced_cut_keeps_a_continuation_within_the_maximum() -> None:
    """A continuation starts mid-frame; when it reaches the limit (not a whole number of frames), its cut
    still leaves it no longer than max_segment_samples (found by the fuzz test: 32160 > 32000)."""
    settings = SegmenterSettings(frame_samples=F, max_segment_samples=32000, cut_search_frames=40)
    seg = Segmenter(settings)
    events: list[object] = []
    for i in range(300):  # one dip at frame 33 for the first cut; then flat speech (the latest frame wins)
        events.extend(seg.push(True, -60.0 if i == 33 else -10.0))
    ended = [e for e in events if isinstance(e, SegmentEnded)]
    assert len(ended) >= 3 and ended[0].end_sample % F == F // 2, "the continuation starts mid-frame"
    assert all(e.end_sample - e.start_sample <= 32000 for e in ended), [
        (e.start_sample, e.end_sample) for e in ended
    ]
