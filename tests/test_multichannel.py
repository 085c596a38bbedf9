"""Multichannel streams in the sans-I/O core (``multichannel=true&channels=N``): each channel is
segmented and transcribed on its own; no loop, no model."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from stream_server.capacity import CapacityModel, CapacitySettings
from stream_server.errors import BadRequest
from stream_server.protocol import Error, Metadata, Results, StreamOptions, UtteranceEnd, parse_options
from stream_server.session import JobKind

from .synth import Driver, check_segments, make_session, silence, tone


def interleave(*channels: np.ndarray) -> bytes:
    """Channels of float samples (padded to one length) as interleaved 16-bit PCM."""
    n = max(len(c) for c in channels)
    stacked = np.stack([np.pad(c, (0, n - len(c))) for c in channels], axis=1)
    return (np.clip(stacked, -1, 1 - 1 / 32768) * 32768).astype("<i2").tobytes()


def stereo(channels: int = 2, **extra: object) -> StreamOptions:
    return StreamOptions(channels=channels, multichannel=True, **extra)  # type: ignore[arg-type]


LEFT = np.concatenate([silence(500), tone(1500), silence(3000)])  # speech 0.5-2.0 s
RIGHT = np.concatenate([silence(2500), tone(1000, freq_hz=330), silence(1500)])  # speech 2.5-3.5 s


def spans(d: Driver, channel: int) -> list[tuple[float, float]]:
    return [
        (f["start"], f["start"] + f["duration"])  # type: ignore[operator]
        for f in d.finals()
        if f["channel_index"] == [channel, 2] and f["segment_id"]
    ]


def test_each_channel_gets_its_own_finals_on_its_own_channel_index() -> None:
    """A stereo stream's speech on the left comes back on channel_index [0, 2] and the right's on
    [1, 2], each at its own time, and neither channel's audio reaches the other's final."""
    d = Driver(make_session(stereo()))
    d.audio(interleave(LEFT, RIGHT), frame_bytes=6400)
    d.text('{"type": "CloseStream"}')
    left, right = spans(d, 0), spans(d, 1)
    assert len(left) == 1 and len(right) == 1
    assert left[0][0] < 0.5 < 2.0 < left[0][1] < 2.5, left
    assert right[0][0] < 2.5 < 3.5 < right[0][1], right
    for job in d.jobs:
        if job.kind is JobKind.FINAL:
            source = LEFT if job.channel == 0 else RIGHT
            other = RIGHT if job.channel == 0 else LEFT
            piece = source[job.start_sample : job.end_sample]
            np.testing.assert_allclose(job.request.audio, piece, atol=1 / 16384)
            assert np.abs(other[job.start_sample : job.end_sample]).max() == 0.0, "the other side leaked"
    check_segments(d)


def test_a_channel_is_not_held_back_by_the_others_pending_final() -> None:
    """While channel 0's final waits for the model, channel 1's final leaves as soon as it is answered."""
    d = Driver(make_session(stereo()), answer=None)
    d.audio(interleave(LEFT, RIGHT), frame_bytes=6400)
    # a final asked for early (speculative, adopted when the pause ran out) or at the pause
    held = {job.channel: job for job in d.held if job.kind is not JobKind.INTERIM}
    assert set(held) == {0, 1}
    d.session.receive_result(held[1].job_id, _transcript("right"))
    d.pump()
    assert [f["channel_index"] for f in d.finals()] == [[1, 2]]
    d.session.receive_result(held[0].job_id, _transcript("left"))
    d.pump()
    assert [f["channel_index"] for f in d.finals()] == [[1, 2], [0, 2]]


def _transcript(text: str):  # type: ignore[no-untyped-def]
    from stream_server.engines.base import Transcript

    return Transcript(text=text, confidence=0.9)


def test_metadata_waits_for_every_channels_finals_and_counts_the_channels() -> None:
    """CloseStream's Metadata leaves after the finals of every channel, and reports channels: N."""
    d = Driver(make_session(stereo(3)), answer=None)
    third = np.concatenate([silence(1000), tone(800), silence(2000)])
    d.audio(interleave(LEFT, RIGHT, third), frame_bytes=9600)
    d.text('{"type": "CloseStream"}')
    assert not [e for e in d.events if isinstance(e, Metadata)]
    for job in list(d.held):
        d.session.receive_result(job.job_id, _transcript(f"ch{job.channel}"))
    d.held.clear()
    d.pump()
    kinds = [type(e).__name__ for e in d.events]
    assert kinds[-1] == "Metadata" and kinds.count("Metadata") == 1
    metadata = [e for e in d.events if isinstance(e, Metadata)][0]
    assert metadata.channels == 3
    assert {tuple(f["channel_index"]) for f in d.finals()} == {(0, 3), (1, 3), (2, 3)}  # type: ignore[arg-type]
    assert d.session.close is not None


def test_finalize_with_a_channel_ends_only_that_channels_segment() -> None:
    """Finalize with "channel": 1 ends channel 1's open segment; channel 0's stays open."""
    d = Driver(make_session(stereo()))
    both = np.concatenate([silence(500), tone(2000)])
    d.audio(interleave(both, both))
    d.text('{"type": "Finalize", "channel": 1}')
    assert [f["channel_index"] for f in d.finals() if f["from_finalize"]] == [[1, 2]]
    d.text('{"type": "Finalize"}')
    assert sorted(f["channel_index"][0] for f in d.finals() if f["from_finalize"]) == [0, 1, 1]  # type: ignore[index]


def test_finalize_of_a_channel_that_does_not_exist_is_an_error() -> None:
    """Finalize naming channel 2 of a stereo stream gets INVALID_MESSAGE and finalizes nothing."""
    d = Driver(make_session(stereo()))
    d.audio(interleave(np.concatenate([silence(500), tone(1000)]), silence(1500)))
    d.text('{"type": "Finalize", "channel": 2}')
    errors = [e for e in d.events if isinstance(e, Error)]
    assert [e.code for e in errors] == ["INVALID_MESSAGE"] and "0 to 1" in errors[0].description
    assert not [f for f in d.finals() if f["from_finalize"]]
    d.text('{"type": "Finalize", "channel": "left"}')
    assert [e.code for e in d.events if isinstance(e, Error)] == ["INVALID_MESSAGE"] * 2


def test_utterance_end_and_speech_started_name_their_channel() -> None:
    """UtteranceEnd carries channel [i, N] and SpeechStarted channel [i] of the channel that spoke."""
    d = Driver(make_session(stereo(vad_events=True, utterance_end_ms=1000)))
    d.audio(interleave(silence(4000), RIGHT))
    ends = d.of_type("UtteranceEnd")
    started = d.of_type("SpeechStarted")
    assert [e["channel"] for e in ends] == [[1, 2]]
    assert [e["channel"] for e in started] == [[1]]
    assert all(isinstance(e, UtteranceEnd) for e in d.events if getattr(e, "last_word_end_s", None))


def test_channels_without_multichannel_are_mixed_down_to_one() -> None:
    """channels=2 without multichannel transcribes one mixed channel: channel_index [0, 1]."""
    d = Driver(make_session(StreamOptions(channels=2)))
    d.audio(interleave(LEFT, RIGHT))
    d.text('{"type": "CloseStream"}')
    finals = [f for f in d.finals() if f["segment_id"]]
    assert finals and all(f["channel_index"] == [0, 1] for f in finals)
    assert len(d.session.channels) == 1


def test_interleaved_mulaw_at_8khz_is_split_per_channel() -> None:
    """Interleaved 8 kHz mu-law with multichannel is decoded, resampled and split per channel."""
    from stream_server.audio import MULAW_TO_FLOAT

    # mu-law codes for each float sample: the nearest entry of the decoder's table
    table = MULAW_TO_FLOAT

    def mulaw(x: np.ndarray) -> np.ndarray:
        return np.abs(table[None, :] - x[:, None]).argmin(axis=1).astype(np.uint8)

    left = np.concatenate([silence(500, rate=8000), tone(1500, rate=8000), silence(2500, rate=8000)])
    right = silence(len(left) * 1000 // 8000, rate=8000)
    data = np.stack([mulaw(left), mulaw(right)], axis=1).tobytes()
    d = Driver(make_session(stereo(encoding="mulaw", sample_rate_hz=8000)))
    d.audio(data, frame_bytes=320)
    d.text('{"type": "CloseStream"}')
    assert [f["channel_index"] for f in d.finals() if f["segment_id"]] == [[0, 2]]
    assert d.session.audio_duration_s == pytest.approx(len(left) / 8000)


def test_memory_is_bounded_per_channel_over_a_long_stream() -> None:
    """An 8-channel stream of alternating speech holds no more memory after 20 rounds than after one."""
    d = Driver(make_session(stereo(8)))
    burst = [np.concatenate([silence(300), tone(600, freq_hz=200 + 40 * i), silence(900)]) for i in range(8)]
    round_bytes = interleave(*burst)
    d.audio(round_bytes, frame_bytes=16000)
    tracemalloc.start()
    d.audio(round_bytes, frame_bytes=16000)
    d.events.clear()
    d.jobs.clear()
    after_one, _ = tracemalloc.get_traced_memory()
    for _ in range(20):
        d.audio(round_bytes, frame_bytes=16000)
        d.events.clear()
        d.jobs.clear()
    after_twenty, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert d.session.segments_finalized == 22 * 8
    assert after_twenty - after_one < 128 * 1024, (after_one, after_twenty)


def test_options_parse_multichannel_and_refuse_too_many_channels() -> None:
    """multichannel=true&channels=8 parses; channels above the limit are UNSUPPORTED_CHANNELS."""
    options = parse_options({"multichannel": ["true"], "channels": ["8"]})
    assert options.multichannel and options.channels == 8 and options.transcribed_channels == 8
    assert parse_options({"channels": ["2"]}).transcribed_channels == 1
    with pytest.raises(BadRequest) as refused:
        parse_options({"multichannel": ["true"], "channels": ["21"]})
    assert refused.value.code == "UNSUPPORTED_CHANNELS"


def test_a_segment_error_names_its_channel() -> None:
    """A final that fails becomes an Error with the segment's id and channel_index."""
    d = Driver(make_session(stereo()), answer=None)
    d.audio(interleave(silence(3000), RIGHT))
    (job,) = [j for j in d.held if j.kind is not JobKind.INTERIM]
    d.session.receive_failure(job.job_id, "TRANSCRIPTION_FAILED", "the model failed")
    d.pump()
    (error,) = [e for e in d.events if isinstance(e, Error)]
    payload = json.loads(json.dumps(error.to_json()))
    assert payload["channel_index"] == [1, 2] and payload["segment_id"] == job.segment_id
    assert not [e for e in d.events if isinstance(e, Results) and e.is_final and e.segment_id]


def test_an_n_channel_stream_counts_as_n_streams_for_admission() -> None:
    """Admission weighs a stream by its channels: room for one stream is no room for a stereo one."""
    model = CapacityModel(CapacitySettings(workers=1, target_latency_s=1.0))
    model.calibrate([(1.0, 0.05), (5.0, 0.25), (10.0, 0.5)] * 10)
    state = model.state(0.0)
    room = state.sessions_left
    assert room >= 2
    model.open("wide", 0.0, weight=room - 1)
    assert model.state(0.0).accepting
    assert model.state(0.0, weight=1).accepting
    assert not model.state(0.0, weight=2).accepting
    assert model.state(0.0).sessions == room - 1
