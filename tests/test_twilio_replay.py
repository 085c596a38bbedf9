"""The Twilio Media Streams replay client (``stream_server.testing.twilio_replay``), without the server's
Twilio endpoint: the mu-law encoder against the server's decoder table, the message sequence against the
shapes of https://www.twilio.com/docs/voice/media-streams/websocket-messages, and ``replay_call`` against
a tiny WebSocket server written here that records what it receives."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from twilio.request_validator import RequestValidator
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from stream_server.audio import MULAW_TO_FLOAT
from stream_server.testing.speech import read_wav, recorded_speech
from stream_server.testing.twilio_replay import (
    MULAW_SILENCE,
    TwilioCallAudio,
    main,
    mulaw_encode,
    replay_call,
    stereo_wav,
    to_8k,
    two_track_call,
)
from tests.conftest import scaled

SIDS = ("CA" + "1" * 32, "MZ" + "2" * 32, "AC" + "3" * 32)


def decode(payload: bytes) -> np.ndarray[Any, np.dtype[np.float32]]:
    return MULAW_TO_FLOAT[np.frombuffer(payload, dtype=np.uint8)]


def noise(samples: int, seed: int = 0, level: float = 0.3) -> np.ndarray[Any, np.dtype[np.float32]]:
    return (np.random.default_rng(seed).uniform(-level, level, samples)).astype(np.float32)


def parsed(audio: TwilioCallAudio, **kwargs: Any) -> list[tuple[float, dict[str, Any]]]:
    return [(at, json.loads(text)) for at, text in audio.messages(*SIDS, {"lang": "en"}, **kwargs)]


def media_of(messages: list[tuple[float, dict[str, Any]]], track: str) -> list[dict[str, Any]]:
    return [m["media"] for _, m in messages if m["event"] == "media" and m["media"]["track"] == track]


# --------------------------------------------------------------------------------------------------
# mu-law


def test_mulaw_round_trip_is_within_half_a_quantisation_step() -> None:
    """Encoding then decoding with the server's table returns each sample to within half its G.711 step."""
    samples = np.concatenate([noise(20000, level=0.99), np.linspace(-0.99, 0.99, 5001, dtype=np.float32)])
    encoded = mulaw_encode(samples)
    assert len(encoded) == len(samples)
    codes = np.frombuffer(encoded, dtype=np.uint8).astype(np.int32)
    segment = ((~codes) >> 4) & 0x07
    half_step = 2.0 ** (segment + 2) / 32768  # step 2**(segment + 3) in 16-bit units
    error = np.abs(decode(encoded).astype(np.float64) - samples)
    assert np.all(error <= half_step + 0.5 / 32768), float(np.max(error / half_step))
    assert float(np.max(error)) < 0.016  # and it is a real encoder: not all zeros, not another law


def test_mulaw_encodes_every_decoded_level_back_to_its_byte() -> None:
    """Each of the 256 levels of the decoder table encodes to its own byte (negative zero 0x7F to 0xFF)."""
    codes = np.arange(256, dtype=np.uint8)
    again = np.frombuffer(mulaw_encode(MULAW_TO_FLOAT[codes]), dtype=np.uint8)
    expected = codes.copy()
    expected[0x7F] = 0xFF
    assert np.array_equal(again, expected)


def test_mulaw_zero_is_ff_and_out_of_range_clips() -> None:
    """0.0 encodes to 0xFF (mu-law silence); values beyond [-1, 1] clip to the loudest codes."""
    assert mulaw_encode(np.zeros(3, dtype=np.float32)) == bytes([MULAW_SILENCE]) * 3
    assert mulaw_encode([5.0, -5.0]) == mulaw_encode([1.0, -1.0]) == bytes([0x80, 0x00])


def test_mulaw_rejects_nan() -> None:
    """A NaN sample is refused rather than encoded as some arbitrary byte."""
    with pytest.raises(ValueError, match="finite"):
        mulaw_encode([0.0, float("nan")])


def test_to_8k_halves_the_rate_and_keeps_a_tone_at_its_frequency() -> None:
    """A 1 kHz tone at 16 kHz comes out at 8 kHz, half as many samples, still peaking at 1 kHz."""
    t = np.arange(16000) / 16000
    out = to_8k((0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32))
    assert out.dtype == np.float32 and len(out) == 8000
    spectrum = np.abs(np.fft.rfft(out))
    assert int(np.argmax(spectrum)) == 1000  # 1 Hz bins over one second
    assert 0.3 < float(np.max(np.abs(out[100:-100]))) < 0.6


# --------------------------------------------------------------------------------------------------
# The message sequence


def test_messages_follow_twilios_documented_order_and_shapes() -> None:
    """connected, start, interleaved 160-byte media of both tracks in 20 ms steps, stop: fields as
    documented, numbers as strings, sequence numbers 1, 2, 3... from start."""
    audio = TwilioCallAudio(inbound=noise(8000), outbound=noise(4000, seed=1))  # 1 s and 0.5 s
    messages = parsed(audio)
    events = [m["event"] for _, m in messages]
    assert events[:2] == ["connected", "start"] and events[-1] == "stop"
    assert set(events[2:-1]) == {"media"}
    assert messages[0][1] == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    call_sid, stream_sid, account_sid = SIDS
    start = messages[1][1]
    assert start == {
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": stream_sid,
        "start": {
            "accountSid": account_sid,
            "streamSid": stream_sid,
            "callSid": call_sid,
            "tracks": ["inbound", "outbound"],
            "customParameters": {"lang": "en"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    }
    assert messages[-1][1] == {
        "event": "stop",
        "sequenceNumber": str(len(messages) - 1),
        "streamSid": stream_sid,
        "stop": {"accountSid": account_sid, "callSid": call_sid},
    }
    assert [m["sequenceNumber"] for _, m in messages[1:]] == [str(n) for n in range(1, len(messages))]
    for _, message in messages[2:-1]:
        assert set(message) == {"event", "sequenceNumber", "media", "streamSid"}
        assert message["streamSid"] == stream_sid
        media = message["media"]
        assert set(media) == {"track", "chunk", "timestamp", "payload"}
        assert all(isinstance(media[k], str) for k in media)
        assert len(base64.b64decode(media["payload"], validate=True)) == 160
    inbound, outbound = media_of(messages, "inbound"), media_of(messages, "outbound")
    assert len(inbound) == len(outbound) == 50  # the shorter track padded to the longer
    for track in (inbound, outbound):
        assert [m["chunk"] for m in track] == [str(n) for n in range(1, 51)]
        assert [m["timestamp"] for m in track] == [str(20 * n) for n in range(50)]
    assert [m["media"]["track"] for _, m in messages[2:-1]] == ["inbound", "outbound"] * 50
    times = [at for at, _ in messages]
    assert times == sorted(times) and times[0] == 0.0 and times[-1] == pytest.approx(1.0)
    assert [at for at, m in messages if m["event"] == "media"][::2] == pytest.approx(
        [0.02 * n for n in range(1, 51)]
    )


def test_payloads_carry_the_audio_and_pad_with_mulaw_silence() -> None:
    """The inbound payloads joined are the encoded audio; the shorter outbound track ends in 0xFF bytes."""
    inbound, outbound = noise(8000), noise(3000, seed=1)
    messages = parsed(TwilioCallAudio(inbound=inbound, outbound=outbound))
    joined = {
        track: b"".join(base64.b64decode(m["payload"]) for m in media_of(messages, track))
        for track in ("inbound", "outbound")
    }
    assert joined["inbound"] == mulaw_encode(inbound)
    assert joined["outbound"][:3000] == mulaw_encode(outbound)
    assert joined["outbound"][3000:] == bytes([MULAW_SILENCE]) * 5000


def test_single_track_call_streams_inbound_only_with_a_padded_last_chunk() -> None:
    """Without an outbound track, start lists only inbound, and 170 samples become two full chunks."""
    messages = parsed(TwilioCallAudio(inbound=noise(170)))
    assert messages[1][1]["start"]["tracks"] == ["inbound"]
    media = [m["media"] for _, m in messages if m["event"] == "media"]
    assert [m["track"] for m in media] == ["inbound", "inbound"]
    last = base64.b64decode(media[1]["payload"])
    assert len(last) == 160 and last[10:] == bytes([MULAW_SILENCE]) * 150


def test_dropped_chunks_leave_a_timestamp_gap_but_no_chunk_number_gap() -> None:
    """Dropping inbound chunks 3 and 4 skips timestamps 40 and 60 ms; chunk numbers stay consecutive, as
    Twilio's "increment with each subsequent message", and the outbound track is untouched."""
    messages = parsed(
        TwilioCallAudio(inbound=noise(1600), outbound=noise(1600, seed=1)),
        drop_chunks=[("inbound", 3), ("inbound", 4)],
    )
    inbound, outbound = media_of(messages, "inbound"), media_of(messages, "outbound")
    assert [m["timestamp"] for m in inbound] == ["0", "20", "80", "100", "120", "140", "160", "180"]
    assert [m["chunk"] for m in inbound] == [str(n) for n in range(1, 9)]
    assert [m["timestamp"] for m in outbound] == [str(20 * n) for n in range(10)]
    sequence = [int(m["sequenceNumber"]) for _, m in messages[1:]]
    assert sequence == list(range(1, len(sequence) + 1))


def test_dtmf_and_marks_go_out_at_their_times_in_documented_shapes() -> None:
    """A key press at 0.05 s follows the chunks sent by then, on inbound_track; a mark carries its name."""
    messages = parsed(TwilioCallAudio(inbound=noise(1600)), dtmf=[(0.05, "7")], marks=[(0.2, "done")])
    events = [m["event"] for _, m in messages]
    dtmf_at = events.index("dtmf")
    assert events[2:dtmf_at] == ["media", "media"]  # chunks sent at 0.02 and 0.04 s
    at, dtmf = messages[dtmf_at]
    assert at == 0.05
    assert dtmf == {
        "event": "dtmf",
        "sequenceNumber": str(dtmf_at),
        "streamSid": SIDS[1],
        "dtmf": {"track": "inbound_track", "digit": "7"},
    }
    assert events[-2:] == ["mark", "stop"]
    assert messages[-2][1]["mark"] == {"name": "done"} and messages[-2][1]["streamSid"] == SIDS[1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"drop_chunks": [("outbound", 1)]}, "no 'outbound' track"),
        ({"drop_chunks": [("inbound", 11)]}, "outside 1..10"),
        ({"dtmf": [(0.1, "x")]}, "not a key"),
        ({"dtmf": [(5.0, "1")]}, "outside the call"),
        ({"marks": [(-1.0, "m")]}, "outside the call"),
        ({"chunk_ms": 0}, "chunk_ms"),
    ],
)
def test_bad_message_arguments_are_refused_when_called(kwargs: dict[str, Any], match: str) -> None:
    """A typo in drop_chunks, dtmf, marks or chunk_ms raises at once, not silently or halfway through."""
    with pytest.raises(ValueError, match=match):
        TwilioCallAudio(inbound=noise(1600)).messages(*SIDS, {}, **kwargs)


def test_audio_must_be_float32_mono() -> None:
    """An int16 or two-dimensional track is refused: the class holds 8 kHz float32 mono only."""
    with pytest.raises(ValueError, match="float32"):
        TwilioCallAudio(inbound=np.zeros(160, dtype=np.int16))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="float32"):
        TwilioCallAudio(inbound=noise(160), outbound=np.zeros((160, 2), dtype=np.float32))


# --------------------------------------------------------------------------------------------------
# replay_call against a tiny server


@dataclass
class Recorder:
    """What the tiny server saw and how it behaves."""

    close_after_stop: bool = True
    close_early_code: int | None = None  # close right after start with this code
    path: str = ""
    signature: str | None = None
    frames: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def tiny_server(recorder: Recorder) -> AsyncIterator[str]:
    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        recorder.path = ws.request.path
        recorder.signature = ws.request.headers.get("X-Twilio-Signature")
        try:
            async for frame in ws:
                assert isinstance(frame, str)
                recorder.frames.append(frame)
                event = json.loads(frame)["event"]
                if event == "start" and recorder.close_early_code is not None:
                    await ws.close(recorder.close_early_code, "go away")
                    return
                if event == "stop":
                    await ws.send(json.dumps({"type": "Results", "transcript": "hello"}))
                    await ws.send(b"\x00\x01")
                    if recorder.close_after_stop:
                        await ws.close(1000, "call over")
                        return
        except ConnectionClosed:
            pass

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/v1/twilio"


@pytest.mark.e2e
async def test_replay_sends_the_planned_messages_signed_and_records_the_answers() -> None:
    """The server receives exactly the planned frames with a valid X-Twilio-Signature, and the report
    holds its text frame, counts its binary frame and gives its close code and reason."""
    recorder = Recorder()
    audio = TwilioCallAudio(inbound=noise(1600), outbound=noise(1600, seed=1))
    async with tiny_server(recorder) as url:
        report = await asyncio.wait_for(
            replay_call(
                url,
                audio,
                speed=0,
                auth_token="secret-token",
                custom_parameters={"language": "en"},
                call_sid=SIDS[0],
                stream_sid=SIDS[1],
                account_sid=SIDS[2],
            ),
            scaled(30),
        )
    planned = [text for _, text in audio.messages(*SIDS, {"language": "en"})]
    assert recorder.frames == planned
    assert recorder.path == "/v1/twilio"
    assert recorder.signature is not None
    assert RequestValidator("secret-token").validate(url, {}, recorder.signature)
    assert not RequestValidator("other-token").validate(url, {}, recorder.signature)
    assert (report.call_sid, report.stream_sid) == SIDS[:2]
    assert report.received_text == (json.dumps({"type": "Results", "transcript": "hello"}),)
    assert report.binary_frames_received == 1
    assert (report.close_code, report.close_reason) == (1000, "call over")
    assert report.stop_sent and report.closed_by_server
    assert [(c.track, c.chunk, c.timestamp_ms) for c in report.sent_media] == [
        (track, n, 20 * (n - 1)) for n in range(1, 11) for track in ("inbound", "outbound")
    ]
    assert [c.sequence_number for c in report.sent_media] == list(range(2, 22))


@pytest.mark.e2e
async def test_replay_never_sends_a_chunk_before_its_time() -> None:
    """At 20x real time, each chunk leaves no earlier than its audio time divided by the speed (a lower
    bound only: a busy machine may send late, never early)."""
    recorder = Recorder()
    audio = TwilioCallAudio(inbound=noise(8000))  # 1 s: 50 chunks over 50 ms at 20x
    async with tiny_server(recorder) as url:
        report = await asyncio.wait_for(replay_call(url, audio, speed=20), scaled(30))
    assert len(report.sent_media) == 50
    for chunk in report.sent_media:
        due = report.started_at_monotonic + (chunk.timestamp_ms + 20) / 1000 / 20
        assert chunk.sent_at_monotonic >= due
    sent_at = [c.sent_at_monotonic for c in report.sent_media]
    assert sent_at == sorted(sent_at)


@pytest.mark.e2e
async def test_replay_without_a_token_sends_no_signature_and_signs_the_given_url() -> None:
    """No auth_token means no X-Twilio-Signature; with signed_url the signature is for that URL."""
    audio = TwilioCallAudio(inbound=noise(160))
    unsigned = Recorder()
    async with tiny_server(unsigned) as url:
        await asyncio.wait_for(replay_call(url, audio, speed=0), scaled(30))
    assert unsigned.signature is None
    signed = Recorder()
    public = "wss://calls.example.com/v1/twilio"
    async with tiny_server(signed) as url:
        await asyncio.wait_for(
            replay_call(url, audio, speed=0, auth_token="tok", signed_url=public), scaled(30)
        )
    assert signed.signature is not None
    assert RequestValidator("tok").validate(public, {}, signed.signature)
    assert not RequestValidator("tok").validate(url, {}, signed.signature)


@pytest.mark.e2e
async def test_replay_closes_itself_when_the_server_does_not_after_stop() -> None:
    """A server that stays open after stop is closed by the client once close_timeout_s has passed."""
    recorder = Recorder(close_after_stop=False)
    async with tiny_server(recorder) as url:
        report = await asyncio.wait_for(
            replay_call(url, TwilioCallAudio(inbound=noise(320)), speed=0, close_timeout_s=0.2), scaled(30)
        )
    assert report.stop_sent and not report.closed_by_server
    assert report.close_code == 1000  # the server's answer to the client's close
    assert json.loads(recorder.frames[-1])["event"] == "stop"


@pytest.mark.e2e
async def test_replay_stops_sending_when_the_server_closes_early() -> None:
    """A server that closes with 1008 after start gets no stop; the report says so and gives the code."""
    recorder = Recorder(close_early_code=1008)
    audio = TwilioCallAudio(inbound=noise(8000 * 5))
    async with tiny_server(recorder) as url:
        report = await asyncio.wait_for(replay_call(url, audio, speed=1), scaled(30))
    assert (report.close_code, report.close_reason) == (1008, "go away")
    assert not report.stop_sent and report.closed_by_server
    assert len(report.sent_media) < 250
    assert [json.loads(f)["event"] for f in recorder.frames] == ["connected", "start"]


@pytest.mark.e2e
async def test_cli_replays_wav_files_and_prints_what_came_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command line reads two WAV files, sends both tracks with the --param, prints the server's
    frames and close, and exits 1 because the server sent a binary frame."""
    t = np.arange(3200) / 16000
    for name, hz in (("a.wav", 440), ("b.wav", 880)):
        with wave.open(str(tmp_path / name), "wb") as writer:
            writer.setnchannels(1)
            writer.setsampwidth(2)
            writer.setframerate(16000)
            writer.writeframes((8000 * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes())
    recorder = Recorder()
    async with tiny_server(recorder) as url:
        argv = [url, "--inbound", str(tmp_path / "a.wav"), "--outbound", str(tmp_path / "b.wav")]
        argv += ["--speed", "0", "--param", "language=en", "--auth-token", "t"]
        status = await asyncio.wait_for(asyncio.to_thread(main, argv), scaled(30))
    assert status == 1
    out = capsys.readouterr().out
    assert "10 inbound chunk(s), 10 outbound chunk(s)" in out
    assert '"transcript": "hello"' in out and "1 binary frame(s)" in out and "1000 'call over'" in out
    start = json.loads(recorder.frames[1])["start"]
    assert start["customParameters"] == {"language": "en"} and start["tracks"] == ["inbound", "outbound"]
    assert recorder.signature is not None and RequestValidator("t").validate(url, {}, recorder.signature)


def test_cli_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A --param without '=' or a missing file exits 2 with a message, before connecting anywhere."""
    assert main(["ws://127.0.0.1:9/x", "--inbound", str(tmp_path / "missing.wav")]) == 2
    assert "missing.wav" in capsys.readouterr().err
    audio = tmp_path / "a.wav"
    with wave.open(str(audio), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(8000)
        writer.writeframes(b"\x00\x00" * 160)
    assert main(["ws://127.0.0.1:9/x", "--inbound", str(audio), "--param", "novalue"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Real recorded speech


def test_two_track_call_holds_two_different_recordings_at_8k() -> None:
    """The default call is 20 s of the lecture inbound and 20 s of the news outbound, both 8 kHz and
    loud, and not the same audio."""
    call = two_track_call()
    assert call.outbound is not None
    assert len(call.inbound) == len(call.outbound) == 20 * 8000
    assert call.tracks == ("inbound", "outbound")
    for track in (call.inbound, call.outbound):
        assert track.dtype == np.float32 and float(np.max(np.abs(track))) > 0.2
    correlation = np.corrcoef(call.inbound, call.outbound)[0, 1]
    assert abs(correlation) < 0.1
    lecture = read_wav(recorded_speech("lecture"))[0][: 20 * 16000].astype(np.float32) / 32768
    assert np.corrcoef(to_8k(lecture), call.inbound)[0, 1] > 0.999


def test_two_track_call_refuses_more_than_a_recording_holds() -> None:
    """Asking for 100 s of the 60 s lecture raises instead of returning a short track."""
    with pytest.raises(ValueError, match="lecture"):
        two_track_call(seconds=100)


def test_stereo_wav_puts_one_recording_on_each_channel(tmp_path: Path) -> None:
    """Channel 0 holds the lecture's own samples and channel 1 the news's, 5 s each, 16-bit stereo."""
    path = stereo_wav("lecture", "news", 5.0, tmp_path / "two.wav")
    samples, rate_hz, channels = read_wav(path)
    assert (rate_hz, channels) == (16000, 2)
    frames = samples.reshape(-1, 2)
    assert len(frames) == 5 * 16000
    assert np.array_equal(frames[:, 0], read_wav(recorded_speech("lecture"))[0][: 5 * 16000])
    assert np.array_equal(frames[:, 1], read_wav(recorded_speech("news"))[0][: 5 * 16000])
    resampled = stereo_wav("lecture", "news", 5.0, tmp_path / "two8k.wav", sample_rate_hz=8000)
    samples8k, rate8k, channels8k = read_wav(resampled)
    assert (rate8k, channels8k, len(samples8k)) == (8000, 2, 2 * 5 * 8000)
