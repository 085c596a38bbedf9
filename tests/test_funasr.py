"""FunASR's protocol in the sans-I/O front end (``stream_server/funasr.py``): no loop, no model."""

from __future__ import annotations

import io
import json
import wave

import numpy as np
import pytest

from stream_server.errors import ProtocolViolation
from stream_server.funasr import FunasrSession, parse_first_message
from stream_server.stream import SessionSettings
from stream_server.vad import EnergyVad

from .synth import IDENTITY, describe, pcm16, silence, tone

SPEECH = pcm16(np.concatenate([silence(500), tone(1500), silence(1200), tone(1000), silence(1200)]))


def session() -> FunasrSession:
    return FunasrSession(
        SessionSettings(), EnergyVad(30, -40.0), IDENTITY, vad_factory=lambda: EnergyVad(30, -40.0)
    )


def run(s: FunasrSession, *messages: str | bytes) -> list[dict[str, object]]:
    """Feed messages (answering every job at once) and return the FunASR JSON sent back."""
    out: list[dict[str, object]] = []

    def pump() -> None:
        while True:
            jobs = s.jobs_to_run()
            if not jobs:
                break
            for job in jobs:
                s.receive_result(job.job_id, describe(job))
        for event in s.events_to_send():
            text = s.to_text(event)
            if text is not None:
                out.append(json.loads(text))

    for message in messages:
        if isinstance(message, bytes):
            for i in range(0, len(message), 3200):
                s.receive_audio(message[i : i + 3200])
                pump()
        else:
            s.receive_text(message)
            pump()
    return out


FIRST = json.dumps({"mode": "2pass", "wav_name": "demo", "is_speaking": True, "chunk_size": [5, 10, 5]})
END = json.dumps({"is_speaking": False})


def test_2pass_gives_online_deltas_one_offline_result_per_segment_and_is_final_last() -> None:
    """In 2pass mode interims are 2pass-online, each segment one 2pass-offline with a timestamp string,
    and only the last message, after is_speaking false, has is_final true (with is_end)."""
    out = run(session(), FIRST, SPEECH, END)
    offline = [m for m in out if m["mode"] == "2pass-offline" and m["text"]]
    assert len(offline) == 2 and all(m["wav_name"] == "demo" for m in out)
    assert all(
        isinstance(m["timestamp"], str) and isinstance(json.loads(m["timestamp"]), list) for m in offline
    )
    assert [m["is_final"] for m in out] == [False] * (len(out) - 1) + [True]
    assert out[-1]["is_end"] is True
    assert any(m["mode"] == "2pass-online" for m in out)


def test_offline_mode_sends_no_interims() -> None:
    """offline mode gives one 2pass-offline result per segment and no 2pass-online message."""
    first = json.dumps({"mode": "offline", "wav_name": "f", "is_speaking": True})
    out = run(session(), first, SPEECH, END)
    assert {m["mode"] for m in out} == {"2pass-offline"}
    assert len([m for m in out if m["text"]]) == 2


def test_a_second_file_on_the_same_socket_starts_at_zero() -> None:
    """After a file's is_final message a new first message starts the next file, with times from 0."""
    s = session()
    first = run(s, FIRST, SPEECH, END)
    second = run(s, FIRST.replace("demo", "next"), SPEECH, END)
    stamps = [
        json.loads(m["timestamp"]) for m in first + second if m["mode"] == "2pass-offline" and m["text"]
    ]  # type: ignore[arg-type]
    assert stamps[0] == stamps[2] and stamps[1] == stamps[3]
    assert second[-1]["is_final"] is True and second[-1]["wav_name"] == "next"
    assert s.close is None, "the socket stays open for more files"


def test_a_wav_header_is_skipped() -> None:
    """wav_format wav: the RIFF header is dropped and the samples give the same results as PCM."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(SPEECH)
    first = json.dumps({"mode": "offline", "wav_name": "w", "wav_format": "wav", "is_speaking": True})
    pcm_first = json.dumps({"mode": "offline", "wav_name": "w", "is_speaking": True})
    assert run(session(), first, buf.getvalue(), END) == run(session(), pcm_first, SPEECH, END)


@pytest.mark.parametrize(
    ("messages", "code"),
    [
        ((SPEECH[:3200],), "FIRST_MESSAGE_REQUIRED"),
        (("{not json",), "INVALID_JSON"),
        (("[1, 2]",), "INVALID_MESSAGE"),
        ((json.dumps({"mode": "fast", "is_speaking": True}),), "UNKNOWN_MODE"),
        ((json.dumps({"mode": "2pass", "wav_format": "mp3", "is_speaking": True}),), "UNSUPPORTED_FORMAT"),
        ((FIRST, SPEECH[:32000], json.dumps({"hello": 1})), "TEXT_INSTEAD_OF_AUDIO"),
    ],
)
def test_bad_input_gets_an_error_message_then_a_close(messages: tuple[str | bytes, ...], code: str) -> None:
    """Each kind of bad input gets a mode "error" message with its code and a sentence, then the close."""
    s = session()
    out = run(s, *messages)
    errors = [m for m in out if m["mode"] == "error"]
    assert [m["code"] for m in errors] == [code] and errors[0]["is_final"] is True and errors[0]["text"]
    assert s.close is not None


def test_first_message_fields_map_to_stream_options() -> None:
    """audio_fs, svs_lang and svs_itn become the stream's sample rate, language and punctuation."""
    config = parse_first_message({"mode": "online", "audio_fs": 8000, "svs_lang": "en", "svs_itn": False})
    assert config.options.sample_rate_hz == 8000 and config.options.language == "en"
    assert not config.options.punctuate and config.options.interim_results
    assert not parse_first_message({"mode": "offline"}).options.interim_results
    with pytest.raises(ProtocolViolation):
        parse_first_message({"mode": "2pass", "audio_fs": "16k"})
