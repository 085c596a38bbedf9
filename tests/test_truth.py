"""Ground truth from levels (``stream_server.testing.truth``), on synthetic signals with known answers."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from stream_server.testing.truth import (
    SpeechRun,
    frame_levels_db,
    loud_frames,
    runs_from_loud_frames,
    spans_mask,
    speech_runs,
)

RATE = 16000


def tone(ms: int, dbfs: float) -> npt.NDArray[np.float64]:
    """A 250 Hz sine lasting ``ms`` whose RMS is ``dbfs`` (whole half-periods in every 10 ms frame)."""
    t = np.arange(RATE * ms // 1000) / RATE
    return np.sin(2 * np.pi * 250.0 * t) * math.sqrt(2) * 10 ** (dbfs / 20)


def quiet(ms: int, dbfs: float | None = None) -> npt.NDArray[np.float64]:
    """Digital silence, or white noise with RMS ``dbfs``."""
    n = RATE * ms // 1000
    if dbfs is None:
        return np.zeros(n)
    noise = np.random.default_rng(1).standard_normal(n)
    return noise / np.sqrt(np.mean(noise**2)) * 10 ** (dbfs / 20)


def test_frame_levels_are_rms_dbfs_per_10_ms() -> None:
    """Each whole 10 ms frame gets its RMS in dBFS; digital silence is -inf; a short tail is ignored."""
    audio = np.concatenate([tone(20, -10.0), quiet(10), tone(10, -30.0), quiet(5)])
    levels = frame_levels_db(audio)
    assert len(levels) == 4
    np.testing.assert_allclose(levels[[0, 1, 3]], [-10.0, -10.0, -30.0], atol=0.01)
    assert levels[2] == -math.inf


def test_int16_and_float_give_the_same_levels() -> None:
    """int16 input is scaled by 1/32768, so it measures like the same float signal."""
    audio = tone(50, -20.0)
    pcm = np.round(audio * 32768).astype(np.int16)
    np.testing.assert_allclose(frame_levels_db(pcm), frame_levels_db(audio), atol=0.01)


def test_loud_means_within_35_db_of_the_loudest_frame() -> None:
    """Frames 30 dB below the loudest are loud, 40 dB below are not, and silence never is."""
    audio = np.concatenate([tone(100, -10.0), tone(100, -40.0), tone(100, -50.0), quiet(100)])
    loud = loud_frames(audio)
    assert loud.tolist() == [True] * 20 + [False] * 20


def test_loudness_is_relative_to_the_recording() -> None:
    """The same shape at a 30 dB lower gain gives the same loud frames."""
    audio = np.concatenate([tone(100, -10.0), tone(100, -40.0), tone(100, -50.0), quiet(100, -70.0)])
    np.testing.assert_array_equal(loud_frames(audio), loud_frames(audio * 10 ** (-30 / 20)))


def test_range_db_sets_how_far_below_counts() -> None:
    """With a 45 dB range the frame 40 dB down becomes loud too."""
    audio = np.concatenate([tone(100, -10.0), tone(100, -50.0)])
    assert loud_frames(audio, range_db=45.0).all()
    assert not loud_frames(audio, range_db=35.0)[10:].any()


def test_digital_silence_and_empty_input_have_no_loud_frame() -> None:
    """All-zero audio, or audio shorter than a frame, has no loud frame (and no runs)."""
    assert not loud_frames(np.zeros(16000, dtype=np.int16)).any()
    assert len(loud_frames(np.zeros(100, dtype=np.int16))) == 0
    assert speech_runs(np.zeros(16000, dtype=np.int16), min_pause_ms=500) == []


def test_runs_split_only_at_pauses_of_min_pause_or_more() -> None:
    """A 300 ms gap stays inside a run; a 600 ms gap ends it; the end is the last loud frame's end."""
    audio = np.concatenate(
        [quiet(200), tone(500, -10.0), quiet(300), tone(400, -12.0), quiet(600), tone(250, -15.0), quiet(400)]
    )
    runs = speech_runs(audio, min_pause_ms=500)
    assert [(r.start_s, r.end_s, r.loud_s) for r in runs] == [
        pytest.approx((0.2, 1.4, 0.9)),
        pytest.approx((2.0, 2.25, 0.25)),
    ]
    assert runs[0].duration_s == pytest.approx(1.2)


def test_a_pause_of_exactly_min_pause_separates() -> None:
    """A gap of exactly min_pause_ms splits; 10 ms less does not."""
    for gap_ms, expected in ((500, 2), (490, 1)):
        audio = np.concatenate([tone(100, -10.0), quiet(gap_ms), tone(100, -10.0)])
        assert len(speech_runs(audio, min_pause_ms=500)) == expected, gap_ms


def test_quiet_noise_in_pauses_does_not_extend_runs() -> None:
    """Room noise 45 dB below the speech is not loud, so the run ends where the tone does."""
    audio = np.concatenate([quiet(300, -55.0), tone(700, -10.0), quiet(800, -55.0)])
    (run,) = speech_runs(audio, min_pause_ms=300)
    assert (run.start_s, run.end_s) == (pytest.approx(0.3), pytest.approx(1.0))


def test_a_fading_tail_ends_where_it_falls_35_db_below_the_peak() -> None:
    """A tone decaying 1 dB per 10 ms after its peak ends 350 ms into the decay (at -45 dBFS)."""
    decay = np.concatenate([tone(10, -10.5 - k) for k in range(60)])
    (run,) = speech_runs(np.concatenate([tone(200, -10.0), decay, quiet(500)]), min_pause_ms=300)
    assert run.end_s == pytest.approx(0.2 + 0.35)


def test_runs_from_loud_frames_counts_loud_time() -> None:
    """loud_s counts loud frames, not the span; frames are frame_ms long."""
    loud = np.array([True, False, True, True] + [False] * 10 + [True], dtype=np.bool_)
    runs = runs_from_loud_frames(loud, min_pause_ms=50, frame_ms=10)
    assert all(isinstance(r, SpeechRun) for r in runs)
    assert [(r.start_s, r.end_s, r.loud_s) for r in runs] == [
        pytest.approx((0.0, 0.04, 0.03)),
        pytest.approx((0.14, 0.15, 0.01)),
    ]
    assert runs_from_loud_frames(np.zeros(5, dtype=np.bool_), min_pause_ms=50) == []


def test_within_ignores_loud_sounds_outside_annotated_speech() -> None:
    """A loud bang outside the annotated spans is not speech and does not set the reference level."""
    audio = np.concatenate([tone(200, -6.0), quiet(600), tone(500, -36.0), tone(200, -66.0), quiet(500)])
    without = speech_runs(audio, min_pause_ms=500)
    assert [(r.start_s, r.end_s) for r in without] == [(0.0, pytest.approx(0.2)), (0.8, pytest.approx(1.3))]
    (run,) = speech_runs(audio, min_pause_ms=500, within=[(0.7, 1.6)])
    # Relative to the -36 dBFS speech, the -66 dBFS tail is within 35 dB: it is loud now.
    assert (run.start_s, run.end_s) == (pytest.approx(0.8), pytest.approx(1.5))


def test_spans_mask_covers_frames_that_overlap() -> None:
    """A span marks every frame it touches; spans outside the recording are clipped."""
    mask = spans_mask([(0.015, 0.031), (-1.0, 0.001), (0.09, 5.0)], 10)
    assert mask.tolist() == [True, True, True, True, False, False, False, False, False, True]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_pause_ms": 0}, "min_pause_ms"),
        ({"min_pause_ms": 500, "range_db": 0.0}, "range_db"),
        ({"min_pause_ms": 500, "range_db": math.nan}, "range_db"),
        ({"min_pause_ms": 500, "frame_ms": 0}, "frame_ms"),
        ({"min_pause_ms": 500, "sample_rate_hz": 22050, "frame_ms": 10}, "whole number"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, float], message: str) -> None:
    """Settings that make no sense raise ValueError naming the setting."""
    with pytest.raises(ValueError, match=message):
        speech_runs(tone(100, -10.0), **kwargs)  # type: ignore[arg-type]


def test_stereo_is_refused() -> None:
    """Interleaved or 2-D audio is refused: the truth is for one channel."""
    with pytest.raises(ValueError, match="1-D"):
        frame_levels_db(np.zeros((2, 160)))
