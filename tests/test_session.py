"""The sans-I/O session core, fed synthetic audio and messages; no loop, no model."""

from __future__ import annotations

import json
import tracemalloc
from dataclasses import replace

import numpy as np
import pytest

from stream_server.config import InterimConfig, SegmenterConfig
from stream_server.errors import CloseCode
from stream_server.protocol import Error, Results, StreamOptions
from stream_server.session import JobKind

from .synth import RATE, Driver, LaggingVad, check_segments, chunks, make_session, pcm16, silence, tone

TWO_SEGMENTS = np.concatenate([silence(1000), tone(2000), silence(1000), tone(1500), silence(1000)])


def test_two_bursts_give_two_finals_with_session_times() -> None:
    """Each burst of speech becomes one final Results whose start and duration are in session time."""
    d = Driver(make_session())
    d.audio(pcm16(TWO_SEGMENTS))
    finals = d.finals()
    assert len(finals) == 2
    first, second = finals
    assert abs(first["start"] - 0.7) < 0.031  # 300 ms pre-roll before the tone at 1.0 s (one frame)
    assert abs(first["start"] + first["duration"] - 3.3) < 0.031  # 300 ms post-roll after 3.0 s
    assert abs(second["start"] - 3.7) < 0.031
    assert all(f["speech_final"] and not f["from_finalize"] for f in finals)
    transcript = first["channel"]["alternatives"][0]["transcript"]  # type: ignore[index]
    assert transcript.split()[0] in ("final", "speculative")
    assert first["tags"] == {"language": "en", "emotion": "neutral", "audio_event": "speech"}


def test_frame_size_does_not_change_segments() -> None:
    """Audio sent in odd-sized frames (samples split across frames) gives the same segments."""
    whole = Driver(make_session())
    whole.audio(pcm16(TWO_SEGMENTS), frame_bytes=32000)
    odd = Driver(make_session())
    odd.audio(pcm16(TWO_SEGMENTS), frame_bytes=777)
    assert [(f["start"], f["duration"]) for f in whole.finals()] == [
        (f["start"], f["duration"]) for f in odd.finals()
    ]
    assert [j.request.audio.tobytes() for j in whole.jobs] == [j.request.audio.tobytes() for j in odd.jobs]


def test_final_audio_is_exactly_the_segment_span() -> None:
    """The audio handed to the model for a final is the input between the segment's start and end."""
    d = Driver(make_session())
    d.audio(pcm16(TWO_SEGMENTS))
    src = np.frombuffer(pcm16(TWO_SEGMENTS), dtype="<i2")
    for job in d.jobs:
        expected = src[job.start_sample : job.end_sample].astype(np.float32) / 32768
        np.testing.assert_array_equal(job.request.audio, expected)


def test_words_are_offset_into_session_time() -> None:
    """Word times from the engine (relative to the clip) are reported in session time."""
    d = Driver(make_session())
    d.audio(pcm16(TWO_SEGMENTS))
    second = d.finals()[1]
    word = second["channel"]["alternatives"][0]["words"][0]  # type: ignore[index]
    assert word["start"] == second["start"]


def test_monologue_is_cut_below_max_segment_without_losing_audio() -> None:
    """Speech with no pause is cut at quiet points; the cuts tile the audio with nothing lost or doubled."""
    cfg = SegmenterConfig(max_segment_ms=5000, cut_search_ms=2500)
    parts = []
    for _ in range(8):  # 2.4 s "words" separated by 60 ms dips: never a pause long enough to end a segment
        parts += [tone(2400), silence(60, level=0.001)]
    audio = np.concatenate([silence(500), *parts, silence(1500)])
    d = Driver(make_session(segmenter=cfg))
    d.audio(pcm16(audio))
    finals = [j for j in d.jobs if j.kind is JobKind.FINAL]
    assert len(finals) >= 4
    for a, b in zip(finals, finals[1:], strict=False):
        assert a.end_sample == b.start_sample, "segments must tile: nothing lost, nothing doubled"
    assert all(j.end_sample - j.start_sample <= 5000 * RATE // 1000 for j in finals)
    # Every cut except the last pause-end lies inside a dip (the quietest point).
    dips = []
    t = 500 * RATE // 1000
    for _ in range(8):
        t += 2400 * RATE // 1000
        dips.append((t, t + 60 * RATE // 1000))
        t += 60 * RATE // 1000
    for job in finals[:-1]:
        assert any(lo <= job.end_sample <= hi for lo, hi in dips), job.end_sample
    results = d.finals()
    assert [r["speech_final"] for r in results[:-1]] == [False] * (len(results) - 1)
    assert results[-1]["speech_final"] is True


def test_finalize_mid_speech_sends_from_finalize_final() -> None:
    """Finalize while someone speaks ends the segment now, marked from_finalize."""
    d = Driver(make_session())
    d.audio(pcm16(np.concatenate([silence(500), tone(1000)])))
    assert d.finals() == []
    d.text('{"type": "Finalize"}')
    (final,) = d.finals()
    assert final["from_finalize"] is True and final["speech_final"] is False
    assert abs(final["start"] + final["duration"] - 1.5) < 0.001


def test_finalize_with_nothing_open_is_acknowledged() -> None:
    """Finalize during silence answers with an empty final so the client knows the flush is done."""
    d = Driver(make_session())
    d.audio(pcm16(silence(1000)))
    d.text('{"type": "Finalize"}')
    (final,) = d.finals()
    assert final["from_finalize"] is True
    assert final["channel"]["alternatives"][0]["transcript"] == ""  # type: ignore[index]


def test_an_acknowledgement_is_told_apart_from_a_segment_final() -> None:
    """A Finalize acknowledgement says it closes no segment (segment_id 0), so the transport does not
    count it as a finalized segment; a segment's final says which segment it closes."""
    d = Driver(make_session())
    d.audio(pcm16(np.concatenate([silence(500), tone(1000)])))
    d.text('{"type": "Finalize"}')
    d.text('{"type": "Finalize"}')
    segment_final, ack = [e for e in d.events if isinstance(e, Results)]
    assert not segment_final.is_acknowledgement and segment_final.segment_id == 1
    assert ack.is_acknowledgement and ack.is_final and ack.from_finalize and ack.segment_id == 0
    assert d.session.segments_finalized == 1


def test_close_stream_flushes_then_metadata_then_close() -> None:
    """CloseStream finalizes the open segment, then sends Metadata, then the session asks to close 1000."""
    d = Driver(make_session())
    d.audio(pcm16(np.concatenate([silence(500), tone(1000)])))
    d.text('{"type": "CloseStream"}')
    kinds = [e.to_json()["type"] for e in d.events]
    assert kinds == ["Results", "Metadata"]
    meta = d.of_type("Metadata")[0]
    assert meta["duration"] == 1.5 and meta["segments"] == 1
    assert d.session.close is not None and d.session.close.code == CloseCode.NORMAL


def test_empty_binary_frame_means_close_stream() -> None:
    """An empty binary frame closes the stream like CloseStream (Deepgram's legacy signal)."""
    d = Driver(make_session())
    d.audio(pcm16(tone(500)))
    d.session.receive_audio(b"")
    d.pump()
    assert [e.to_json()["type"] for e in d.events][-1] == "Metadata"
    assert d.session.close is not None and d.session.close.code == CloseCode.NORMAL


def test_results_leave_in_audio_order_when_model_answers_out_of_order() -> None:
    """Finals answered in reverse order still reach the client in the order of their audio."""
    d = Driver(make_session(), answer=None)
    d.audio(pcm16(TWO_SEGMENTS))
    d.text('{"type": "CloseStream"}')
    assert len(d.held) == 2 and d.events == []
    assert d.session.close is None, "must not close while finals are owed"
    from .synth import describe

    for job in reversed(d.held):
        d.session.receive_result(job.job_id, describe(job))
    d.pump()
    starts = [e["start"] for e in d.finals()]
    assert starts == sorted(starts) and len(starts) == 2
    assert d.session.close is not None


def test_failed_final_becomes_error_with_its_time_span() -> None:
    """A segment the model failed on yields an Error naming its time span, in place of its final."""
    d = Driver(make_session(), answer=None)
    d.audio(pcm16(TWO_SEGMENTS))
    first, second = d.held
    d.session.receive_failure(first.job_id, "TRANSCRIPTION_FAILED", "The model failed on this segment.")
    from .synth import describe

    d.session.receive_result(second.job_id, describe(second))
    d.pump()
    kinds = [e.to_json()["type"] for e in d.events]
    assert kinds == ["Error", "Results"]
    error = d.of_type("Error")[0]
    assert error["code"] == "TRANSCRIPTION_FAILED" and error["fatal"] is False
    assert abs(error["start"] - 0.7) < 0.031 and error["duration"] > 2
    assert error["segment_id"] == first.segment_id, "the transport matches it to the segment it ends"
    (event,) = [e for e in d.events if isinstance(e, Error)]
    assert event.segment_id == first.segment_id


def test_bad_text_frames_get_specific_errors_and_stream_continues() -> None:
    """Malformed JSON, non-objects and unknown types each get their own error code; audio still flows."""
    d = Driver(make_session())
    d.text("hello, this is not json")
    d.text("[1, 2, 3]")
    d.text('{"type": "Shout"}')
    d.text("x" * 5000)
    d.text('{"type": "Finalize", "channel": 3}')
    codes = [e["code"] for e in d.of_type("Error")]
    assert codes == [
        "INVALID_JSON",
        "INVALID_MESSAGE",
        "UNKNOWN_MESSAGE_TYPE",
        "MESSAGE_TOO_LONG",
        "INVALID_MESSAGE",
    ]
    assert all(e["fatal"] is False for e in d.of_type("Error"))
    d.audio(pcm16(TWO_SEGMENTS))
    assert len(d.finals()) == 2
    assert d.session.close is None


def test_too_many_errors_closes_with_policy_violation_after_delivering_finals() -> None:
    """After the error budget is spent the stream closes 1008, but audio already sent is still transcribed."""
    d = Driver(make_session(max_client_errors=3))
    d.audio(pcm16(np.concatenate([silence(300), tone(1000)])))
    for _ in range(3):
        d.text("{")
    errors = d.of_type("Error")
    assert [e["code"] for e in errors] == ["INVALID_JSON"] * 3 + ["TOO_MANY_ERRORS"]
    assert errors[-1]["fatal"] is True
    assert len(d.finals()) == 1, "the open segment is finalized before closing"
    assert d.events[-1].to_json()["code"] == "TOO_MANY_ERRORS", "the final owed goes before the fatal Error"
    assert d.session.close is not None and d.session.close.code == CloseCode.POLICY_VIOLATION


def test_audio_after_close_is_reported_once() -> None:
    """Audio sent after CloseStream is reported as not transcribed, once."""
    d = Driver(make_session())
    d.text('{"type": "CloseStream"}')
    d.audio(pcm16(tone(100)))
    d.audio(pcm16(tone(100)))
    assert [e["code"] for e in d.of_type("Error")] == ["AUDIO_AFTER_CLOSE"]


def test_dangling_byte_at_end_is_reported() -> None:
    """A stream ending in half a sample says so instead of dropping it silently."""
    d = Driver(make_session())
    d.audio(pcm16(tone(200)) + b"\x01")
    d.text('{"type": "CloseStream"}')
    (error,) = d.of_type("Error")
    assert error["code"] == "INCOMPLETE_SAMPLE" and "1 byte" in str(error["description"])


def test_idle_timeout_finalizes_then_closes() -> None:
    """An idle timeout still delivers the open segment's final, then reports IDLE_TIMEOUT (finals owed
    go first, issue 8), then closes 1008."""
    d = Driver(make_session())
    d.audio(pcm16(np.concatenate([silence(300), tone(800)])))
    d.session.receive_idle_timeout()
    d.pump()
    assert [e.to_json()["type"] for e in d.events] == ["Results", "Error"]
    assert d.events[-1].to_json()["code"] == "IDLE_TIMEOUT"
    assert d.session.close is not None and d.session.close.code == CloseCode.POLICY_VIOLATION


def test_session_length_limit() -> None:
    """A stream longer than the configured limit is closed with SESSION_TOO_LONG."""
    d = Driver(make_session(max_session_s=1.0))
    d.audio(pcm16(silence(1500)))
    assert d.of_type("Error")[0]["code"] == "SESSION_TOO_LONG"
    assert d.session.close is not None and d.session.close.code == CloseCode.POLICY_VIOLATION


def test_shutdown_finalizes_and_closes_going_away() -> None:
    """On server shutdown the open segment is finalized, its final goes before the SERVER_SHUTTING_DOWN
    Error (issue 8), Metadata last, and the stream closes with 1012 (service restart)."""
    d = Driver(make_session())
    d.audio(pcm16(np.concatenate([silence(300), tone(800)])))
    d.session.receive_shutdown()
    d.pump()
    assert [e.to_json()["type"] for e in d.events] == ["Results", "Error", "Metadata"]
    assert d.events[1].to_json()["code"] == "SERVER_SHUTTING_DOWN"
    assert d.session.close is not None and d.session.close.code == CloseCode.SERVICE_RESTART


def test_disconnect_returns_jobs_to_cancel_and_goes_quiet() -> None:
    """A vanished client's in-flight jobs are handed back for cancelling and later answers are ignored."""
    d = Driver(make_session(), answer=None)
    d.audio(pcm16(TWO_SEGMENTS))
    abandoned = d.session.receive_disconnect()
    assert sorted(abandoned) == sorted(j.job_id for j in d.held)
    from .synth import describe

    d.session.receive_result(d.held[0].job_id, describe(d.held[0]))
    assert d.session.events_to_send() == []


def test_internal_error_closes_1011_without_leaking_details() -> None:
    """An unexpected exception inside the session becomes INTERNAL_ERROR and close 1011, nothing more."""
    d = Driver(make_session())

    def boom(_: bytes) -> object:
        raise RuntimeError("secret internals")

    d.session._decoder.decode = boom  # type: ignore[method-assign,assignment]
    d.session.receive_audio(b"\x00\x00")
    events = d.session.events_to_send()
    assert [e.to_json()["code"] for e in events] == ["INTERNAL_ERROR"]  # type: ignore[union-attr]
    assert "secret" not in json.dumps(events[0].to_json())
    assert d.session.close is not None and d.session.close.code == CloseCode.INTERNAL_ERROR


def test_speech_started_when_vad_events() -> None:
    """With vad_events=true a SpeechStarted event gives the time speech began."""
    d = Driver(make_session(StreamOptions(vad_events=True)))
    d.audio(pcm16(TWO_SEGMENTS))
    times = [e["timestamp"] for e in d.of_type("SpeechStarted")]
    assert len(times) == 2
    assert abs(times[0] - 1.0) < 0.031 and abs(times[1] - 4.0) < 0.031


def test_utterance_end_after_gap() -> None:
    """With utterance_end_ms, UtteranceEnd follows the final once that much silence has passed."""
    d = Driver(make_session(StreamOptions(utterance_end_ms=1000)))
    d.audio(pcm16(np.concatenate([silence(300), tone(1000), silence(1500), tone(1000), silence(800)])))
    kinds = [e.to_json()["type"] for e in d.events]
    assert kinds == ["Results", "UtteranceEnd", "Results"]
    ue = d.of_type("UtteranceEnd")[0]
    final = d.finals()[0]
    assert ue["last_word_end"] == final["channel"]["alternatives"][0]["words"][-1]["end"]  # type: ignore[index]


def test_endpointing_option_changes_pause_needed() -> None:
    """A 300 ms pause ends a segment with endpointing=200 but not with the 500 ms default."""
    audio = np.concatenate([silence(300), tone(1000), silence(300), tone(1000), silence(1000)])
    short = Driver(make_session(StreamOptions(endpointing_ms=200)))
    short.audio(pcm16(audio))
    default = Driver(make_session())
    default.audio(pcm16(audio))
    assert len(short.finals()) == 2 and len(default.finals()) == 1


def test_endpointing_false_never_sets_speech_final() -> None:
    """With endpointing=false pauses do not set speech_final, and a long silence still finalizes."""
    d = Driver(make_session(StreamOptions(endpointing_disabled=True)))
    d.audio(pcm16(np.concatenate([silence(300), tone(1000), silence(800), tone(1000), silence(2500)])))
    finals = d.finals()
    assert len(finals) == 1
    assert finals[0]["speech_final"] is False


def test_interims_are_bounded_and_never_follow_their_final() -> None:
    """Interims come at the configured cadence over a bounded window and never after their segment's final."""
    interim = InterimConfig(interval_ms=500, window_ms=2000, min_audio_ms=300)
    d = Driver(make_session(StreamOptions(interim_results=True), interim=interim))
    d.audio(pcm16(np.concatenate([silence(300), tone(5000), silence(1000)])), frame_bytes=1600)
    interim_jobs = [j for j in d.jobs if j.kind is JobKind.INTERIM]
    assert len(interim_jobs) >= 6
    assert all(len(j.request.audio) <= 2000 * RATE // 1000 for j in interim_jobs)
    assert all(not j.request.word_timestamps for j in interim_jobs)
    kinds = [(r["is_final"]) for r in d.of_type("Results")]
    assert kinds[-1] is True and kinds.count(True) == 1 and kinds[:-1] == [False] * (len(kinds) - 1)


def test_one_interim_in_flight_and_stale_interims_dropped() -> None:
    """Only one interim is in flight per session; one answered after its segment closed is dropped."""
    d = Driver(make_session(StreamOptions(interim_results=True)), answer=None)
    d.audio(pcm16(np.concatenate([silence(300), tone(4000)])))
    interims = [j for j in d.held if j.kind is JobKind.INTERIM]
    assert len(interims) == 1
    d.audio(pcm16(silence(1000)))
    finals = [j for j in d.held if j.kind in (JobKind.FINAL, JobKind.SPECULATIVE)]
    assert len(finals) == 1
    from .synth import describe

    d.session.receive_result(interims[0].job_id, describe(interims[0]))
    d.session.receive_result(finals[0].job_id, describe(finals[0]))
    d.pump()
    assert [r["is_final"] for r in d.of_type("Results")] == [True]


def test_skipped_interims_back_off() -> None:
    """When the batcher skips interims, the session asks for them less often."""
    d = Driver(make_session(StreamOptions(interim_results=True)), answer=None)
    d.audio(pcm16(np.concatenate([silence(300), tone(1600)])), frame_bytes=640)
    first = [j for j in d.held if j.kind is JobKind.INTERIM]
    assert len(first) == 1
    d.session.receive_skipped(first[0].job_id)
    d.audio(pcm16(tone(1000)), frame_bytes=640)  # 2.9 s: past 1 s + 1 s, short of 1 s + 2 s
    assert len([j for j in d.held if j.kind is JobKind.INTERIM]) == 1, "backed off to 2 s: none yet"
    d.audio(pcm16(tone(300)), frame_bytes=640)
    assert len([j for j in d.held if j.kind is JobKind.INTERIM]) == 2


def lin2ulaw(pcm: np.ndarray) -> bytes:
    """G.711 mu-law, byte for byte what ``audioop.lin2ulaw(pcm, 2)`` gave (audioop is gone from Python
    3.13)."""
    value = pcm.astype(np.int32) >> 2
    mask = np.where(value < 0, 0x7F, 0xFF)
    value = np.minimum(np.abs(value), 8159) + 33
    segment = np.searchsorted(np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF]), value)
    code = np.where(segment >= 8, 0x7F, (segment << 4) | ((value >> (segment + 1)) & 0xF))
    return (code ^ mask).astype(np.uint8).tobytes()


def test_mulaw_8k_input_is_resampled_to_session_time() -> None:
    """8 kHz mu-law audio is decoded and resampled; segment times stay in seconds of the client's audio."""
    audio8k = np.concatenate(
        [silence(1000, rate=8000), tone(1500, rate=8000, freq_hz=200), silence(1000, rate=8000)]
    )
    data = lin2ulaw(np.frombuffer(pcm16(audio8k), dtype="<i2"))
    d = Driver(make_session(StreamOptions(encoding="mulaw", sample_rate_hz=8000)))
    d.audio(data, frame_bytes=160)
    d.text('{"type": "CloseStream"}')
    (final,) = d.finals()
    assert abs(final["start"] - 0.7) < 0.035
    assert abs(final["start"] + final["duration"] - 2.8) < 0.035
    assert d.of_type("Metadata")[0]["duration"] == 3.5


def test_memory_is_flat_over_a_long_stream() -> None:
    """Twenty minutes of speech and pauses leave the session holding no more memory than after one."""
    d = Driver(make_session(StreamOptions(interim_results=True, utterance_end_ms=1000)))
    minute = pcm16(np.concatenate([np.concatenate([tone(4000), silence(1000)]) for _ in range(12)]))
    d.audio(minute, frame_bytes=16000)
    d.events.clear()
    d.jobs.clear()
    tracemalloc.start()
    d.audio(minute, frame_bytes=16000)
    d.events.clear()
    d.jobs.clear()
    after_one, _ = tracemalloc.get_traced_memory()
    for _ in range(19):
        d.audio(minute, frame_bytes=16000)
        d.events.clear()
        d.jobs.clear()
    after_twenty, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert after_twenty - after_one < 64 * 1024, (after_one, after_twenty)
    assert d.session.segments_finalized == 21 * 12
    assert d.session.channels[0].drained and d.session.events_waiting == 0 and d.session.pending_finals == 0


NO_SPECULATION = SegmenterConfig(speculative_final_ms=0)


def test_speculative_final_is_used_when_no_speech_follows() -> None:
    """A pause starts the final early; when the pause then ends the segment, that result is the final."""
    d = Driver(make_session())
    d.audio(pcm16(TWO_SEGMENTS))
    assert [j.kind for j in d.jobs] == [JobKind.SPECULATIVE, JobKind.SPECULATIVE]
    finals = d.finals()
    assert [f["channel"]["alternatives"][0]["transcript"].split()[0] for f in finals] == ["speculative"] * 2
    # The final still spans the whole segment (post-roll included), not just the speculative audio.
    assert abs(finals[0]["start"] + finals[0]["duration"] - 3.3) < 0.031
    assert d.session.speculations_used == 2 and d.session.speculations_wasted == 0


def test_speculation_gives_way_when_speech_resumes() -> None:
    """Speech after the early start cancels the speculative job; the segment's final covers all its speech."""
    d = Driver(make_session(), answer=None)
    d.audio(pcm16(np.concatenate([silence(300), tone(1000), silence(300)])))
    (first,) = d.held
    assert first.kind is JobKind.SPECULATIVE
    d.audio(pcm16(np.concatenate([tone(1000), silence(1000)])))
    assert first.job_id in d.session.jobs_to_cancel(), "the stale speculation is cancelled"
    second = d.held[1]
    assert second.kind is JobKind.SPECULATIVE and len(second.request.audio) > len(first.request.audio)
    from .synth import describe

    d.session.receive_result(first.job_id, describe(first))  # a late answer to the cancelled job is ignored
    d.session.receive_result(second.job_id, describe(second))
    d.pump()
    (final,) = d.finals()
    assert (
        final["channel"]["alternatives"][0]["transcript"]
        == f"speculative {second.start_sample} {second.end_sample}"
    )
    assert d.session.speculations_wasted == 1 and d.session.speculations_used == 1


def test_refused_speculation_falls_back_to_an_ordinary_final() -> None:
    """When the batcher refuses the early start, the segment's end asks for an ordinary final."""
    d = Driver(make_session(), answer=None)
    d.audio(pcm16(np.concatenate([silence(300), tone(1000), silence(300)])))
    (spec,) = d.held
    d.session.receive_skipped(spec.job_id)
    d.audio(pcm16(silence(500)))
    assert [j.kind for j in d.held] == [JobKind.SPECULATIVE, JobKind.FINAL]
    final_job = d.held[1]
    assert final_job.end_sample > spec.end_sample


def test_speculation_waits_when_segment_ends_before_its_answer() -> None:
    """A segment that ends while its speculative job still runs waits for that job, asking for nothing new."""
    d = Driver(make_session(), answer=None)
    d.audio(pcm16(np.concatenate([silence(300), tone(1000), silence(1000)])))
    (spec,) = d.held
    assert d.session.pending_finals == 1 and d.finals() == []
    from .synth import describe

    d.session.receive_result(spec.job_id, describe(spec))
    d.pump()
    assert len(d.finals()) == 1 and d.session.pending_finals == 0


def test_speculation_adopted_before_hand_out_comes_out_as_final() -> None:
    """A segment that starts speculating and ends within one frame of audio hands out one FINAL job."""
    d = Driver(make_session(), answer=None)
    d.audio(pcm16(np.concatenate([silence(300), tone(1000), silence(1000)])), frame_bytes=10**6)
    assert [j.kind for j in d.held] == [JobKind.FINAL]


def test_speculation_can_be_turned_off() -> None:
    """With speculative_final_ms=0 every segment gets an ordinary final job."""
    d = Driver(make_session(segmenter=NO_SPECULATION))
    d.audio(pcm16(TWO_SEGMENTS))
    assert [j.kind for j in d.jobs] == [JobKind.FINAL, JobKind.FINAL]
    assert d.session.speculations_used == 0


def test_no_interims_during_a_pause() -> None:
    """Interims are asked for only while speech arrives, not during the pause before a final."""
    interim = InterimConfig(interval_ms=200, window_ms=2000, min_audio_ms=100)
    d = Driver(make_session(StreamOptions(interim_results=True), interim=interim), answer=None)
    from .synth import describe

    def answer_all() -> None:
        for job in d.held:
            d.session.receive_result(job.job_id, describe(job))

    d.audio(pcm16(np.concatenate([silence(300), tone(1000)])), frame_bytes=640)
    speech_end = len(np.concatenate([silence(300), tone(1000)]))
    for _ in range(22):  # a 440 ms pause, shorter than the endpointing, answered as it goes
        answer_all()
        d.audio(pcm16(silence(20)), frame_bytes=640)
    interims = [j for j in d.held if j.kind is JobKind.INTERIM]
    assert len(interims) >= 2
    assert all(j.end_sample <= speech_end + 2 * 480 for j in interims), [j.end_sample for j in interims]


# A forced cut inside a pause (issue 8): the segment reaches max_segment_ms 380 ms into a pause, shorter
# than the 500 ms endpointing, so the quietest point (the latest, on digital silence) is in that pause,
# beyond the 300 ms post-roll; the pause then runs on and ends the continuation.
CUT_IN_PAUSE = SegmenterConfig(max_segment_ms=4000, cut_search_ms=1500)
CUT_IN_PAUSE_AUDIO = np.concatenate([silence(500), tone(3300), silence(1500), tone(1000), silence(1000)])


def test_forced_cut_inside_a_pause_without_speculation() -> None:
    """A forced cut that lands in a pause leaves a continuation the pause can end: no error, every
    segment positive and answered by one final."""
    d = Driver(make_session(segmenter=replace(CUT_IN_PAUSE, speculative_final_ms=0)))
    d.audio(pcm16(CUT_IN_PAUSE_AUDIO))
    d.text('{"type": "CloseStream"}')
    jobs = [j for j in d.jobs if j.kind is JobKind.FINAL]
    assert all(j.end_sample > j.start_sample for j in jobs), [(j.start_sample, j.end_sample) for j in jobs]
    finals = check_segments(d)
    assert len(finals) == 3 and finals[0].start_s + finals[0].duration_s > 4.1  # the cut in the pause
    assert finals[1].speech_final, "the pause after the cut still ends the utterance"
    assert finals[1].transcript == "" and len(jobs) == 2, "the silent continuation costs no model call"
    assert d.session.close is not None and d.session.close.code == CloseCode.NORMAL


def test_forced_cut_inside_a_pause_with_speculation() -> None:
    """With speculative finals, a forced cut in a pause gives no negative-duration final and one final
    per segment."""
    d = Driver(make_session(segmenter=CUT_IN_PAUSE))
    d.audio(pcm16(CUT_IN_PAUSE_AUDIO))
    d.text('{"type": "CloseStream"}')
    finals = check_segments(d)
    assert len(finals) >= 2
    assert d.session.close is not None and d.session.close.code == CloseCode.NORMAL


def test_forced_cut_inside_a_pause_then_finalize() -> None:
    """Finalize on the continuation of a cut made in a pause closes it with a positive length."""
    d = Driver(make_session(segmenter=replace(CUT_IN_PAUSE, speculative_final_ms=0)))
    d.audio(pcm16(np.concatenate([silence(500), tone(3300), silence(750)])))
    d.text('{"type": "Finalize"}')
    d.text('{"type": "CloseStream"}')
    check_segments(d)


@pytest.mark.parametrize(
    "audio",
    [
        # The segment closed on the pause; speech resumes inside the VAD's lag.
        np.concatenate([silence(300), tone(1000), silence(900), tone(200)]),
        # The segment is open in a pause longer than the post-roll; speech resumes inside the lag.
        np.concatenate([silence(300), tone(1000), silence(500), tone(200)]),
    ],
    ids=["after-a-closed-segment", "in-an-open-pause"],
)
def test_finalize_flushes_the_vad_lag(audio: np.ndarray) -> None:
    """Finalize flushes the VAD first, so speech still in its lag lands in the from_finalize final and a
    client that leaves after that final loses none of it."""
    vad = LaggingVad(lag_frames=10)
    d = Driver(make_session(segmenter=NO_SPECULATION, vad=vad))
    d.audio(pcm16(audio))
    d.text('{"type": "Finalize"}')
    d.session.receive_disconnect()
    (last,) = [f for f in check_segments(d) if f.from_finalize]
    resumed_s = (len(audio) - 200 * RATE // 1000) / RATE
    assert last.start_s <= resumed_s and last.start_s + last.duration_s == len(audio) / RATE, last
    assert vad.flushes == 1


@pytest.mark.parametrize("ending", ["finalize", "close", "shutdown"])
@pytest.mark.parametrize("lag_frames", [0, 10])
def test_no_request_is_longer_than_max_segment(ending: str, lag_frames: int) -> None:
    """Finalize, CloseStream or shutdown at max_segment_ms of continuous speech submits no audio longer
    than max_segment_ms (the engine's limit: it refuses longer clips), and every sample from the first
    segment's start to the last one received gets a final."""
    cfg = SegmenterConfig(max_segment_ms=4000, cut_search_ms=1500, speculative_final_ms=0)
    limit = 4000 * RATE // 1000
    for total_ms in range(4100, 4560, 7):  # the segment (from 0.18 s) reaches its limit at 4.2 s
        d = Driver(make_session(segmenter=cfg, vad=LaggingVad(lag_frames=lag_frames)))
        d.audio(pcm16(np.concatenate([silence(500), tone(total_ms - 500)])))
        if ending == "finalize":
            d.text('{"type": "Finalize"}')
        elif ending == "close":
            d.text('{"type": "CloseStream"}')
        else:
            d.session.receive_shutdown()
            d.pump()
        lengths = [len(j.request.audio) for j in d.jobs]
        assert max(lengths) <= limit, (total_ms, lengths)
        finals = check_segments(d)
        assert finals[0].start_s == 0.18
        for prev, nxt in zip(finals, finals[1:], strict=False):
            assert prev.start_s + prev.duration_s == nxt.start_s, "the finals tile: no audio dropped"
        assert abs(finals[-1].start_s + finals[-1].duration_s - total_ms / 1000) < 1e-9


# Finalize rate limiting (issue 8): speech with short pauses, as a client would stream it.
CHATTER = np.concatenate([silence(300), *[np.concatenate([tone(1700), silence(300)]) for _ in range(3)]])
FINALIZE = '{"type": "Finalize"}'


def finalize_after_every_chunk(d: Driver, audio: np.ndarray, chunk_ms: int) -> int:
    """Stream ``audio`` in ``chunk_ms`` chunks with a Finalize after each; returns how many were sent."""
    sent = 0
    for piece in chunks(pcm16(audio), RATE * chunk_ms // 1000 * 2):
        d.session.receive_audio(piece)
        d.pump()
        d.text(FINALIZE)
        sent += 1
    return sent


def test_finalize_needs_new_audio_to_force_model_work() -> None:
    """A Finalize after every 100 ms chunk ends a segment only once min_finalize_audio_ms came since the
    last one that did; the rest are acknowledged without model work, and no audio is dropped."""
    d = Driver(make_session(segmenter=NO_SPECULATION, max_finalize_per_s=0))
    sent = finalize_after_every_chunk(d, CHATTER, 100)
    acknowledged = sum(1 for e in d.events if isinstance(e, Results) and e.from_finalize)
    d.text('{"type": "CloseStream"}')
    audio_s = len(CHATTER) / RATE
    finals = [j for j in d.jobs if j.kind is JobKind.FINAL]
    assert len(finals) <= audio_s * 1000 / 250 + 1, f"{len(finals)} model calls for {sent} Finalize"
    assert all(j.end_sample - j.start_sample >= 250 * RATE // 1000 for j in finals[:-1])
    assert acknowledged == sent, "every Finalize is answered by a from_finalize final"
    assert not d.of_type("Error")
    segment_finals = check_segments(d)
    for prev, nxt in zip(segment_finals, segment_finals[1:], strict=False):  # speech never pauses long
        assert abs(prev.start_s + prev.duration_s - nxt.start_s) < 1e-9, "no audio dropped between them"
    assert segment_finals[-1].start_s + segment_finals[-1].duration_s >= audio_s - 0.3, "up to the last word"


def test_finalize_flood_is_rate_limited() -> None:
    """Finalize after every 20 ms chunk soon gets RATE_LIMITED errors (non-fatal, counted towards
    max_client_errors) instead of a flush each; the audio still reaches its finals."""
    d = Driver(make_session(max_client_errors=1000))
    sent = finalize_after_every_chunk(d, CHATTER, 20)
    audio_s = len(CHATTER) / RATE
    limited = [e for e in d.events if isinstance(e, Error) and e.code == "RATE_LIMITED"]
    acknowledged = [e for e in d.events if isinstance(e, Results) and e.from_finalize]
    assert len(acknowledged) <= 10 + 5 * audio_s + 1 and len(acknowledged) + len(limited) == sent
    assert all(e.close_code is None for e in limited)
    d.text('{"type": "CloseStream"}')
    check_segments(d)
    assert d.session.close is not None and d.session.close.code == CloseCode.NORMAL


def test_finalize_flood_closes_the_stream_after_max_client_errors() -> None:
    """RATE_LIMITED counts towards max_client_errors: a client that keeps flooding is closed with 1008,
    after the finals it is owed."""
    d = Driver(make_session(max_client_errors=16))
    finalize_after_every_chunk(d, CHATTER, 20)
    codes = [e["code"] for e in d.of_type("Error") if e["code"] != "AUDIO_AFTER_CLOSE"]
    assert codes == ["RATE_LIMITED"] * 16 + ["TOO_MANY_ERRORS"]
    assert d.session.close is not None and d.session.close.code == CloseCode.POLICY_VIOLATION
    check_segments(d)
