"""Call-centre audio end to end with real recorded speech: a real server on 127.0.0.1, the bundled
faster-whisper tiny.en model, a two-track Twilio call replayed at real time (a different recording on
each track) and a stereo WAV on the live API with ``multichannel=true``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr
from websockets.asyncio.client import connect

from stream_server.config import BatchConfig, CallsConfig, Config, EngineConfig
from stream_server.engines.base import TranscribeRequest
from stream_server.engines.whisper import WhisperEngine
from stream_server.testing.speech import read_wav, word_error_rate
from stream_server.testing.twilio_replay import replay_call, stereo_wav, two_track_call

from .serving import collect, running_server
from .test_calls import finals, wait_for_call, webhook_receiver

pytestmark = [pytest.mark.model, pytest.mark.e2e]

SECONDS = 15.0


@pytest.fixture(scope="module")
def engine() -> Iterator[WhisperEngine]:
    engine = WhisperEngine.load(EngineConfig(device="cpu", threads=2), fallback_reason="test: no hub")
    engine.warmup(2, 20.0)
    yield engine


def reference(engine: WhisperEngine, audio: np.ndarray, rate: int) -> str:
    """The whole clip transcribed at once by the same model: what a channel's finals should say."""
    clip = np.asarray(soxr.resample(audio, rate, 16000, quality="HQ"), dtype=np.float32)
    return engine.transcribe([TranscribeRequest(audio=clip, language="en")])[0].text


def text_of(messages: list[dict[str, Any]], key: Any) -> str:
    return " ".join(m["channel"]["alternatives"][0]["transcript"] for m in finals(messages) if key(m)).strip()


async def test_a_real_two_track_call_comes_back_per_track_on_the_webhook_and_the_follower(
    engine: WhisperEngine,
) -> None:
    """A two-track Twilio call of two different recordings, at real time: each track's words come back
    on its own track (and channel_index) on the webhook and on a follower, and none of them cross over."""
    call = two_track_call("lecture", "news", SECONDS)
    assert call.outbound is not None
    expected = {
        "inbound": reference(engine, call.inbound, 8000),
        "outbound": reference(engine, call.outbound, 8000),
    }
    call_sid = "CA" + "7" * 32
    async with webhook_receiver() as hook:
        config = Config(batch=BatchConfig(max_batch_size=2), calls=CallsConfig(webhook_url=hook.url))
        async with running_server(engine, config) as (_, url):
            replay = asyncio.ensure_future(
                replay_call(f"{url}/v1/twilio", call, speed=1.0, call_sid=call_sid, close_timeout_s=60)
            )
            await wait_for_call(url.replace("ws://", "http://"), call_sid)
            async with connect(f"{url}/v1/calls/{call_sid}") as follower:
                followed = await collect(follower, timeout_s=120)
            report = await replay
            await hook.wait_for(lambda bodies: any(b.get("type") == "Metadata" for b in bodies))
    assert report.close_code == 1000 and report.binary_frames_received == 0 and not report.received_text
    for messages in (hook.bodies, followed.messages):
        for track, channel, other in (("inbound", 0, "outbound"), ("outbound", 1, "inbound")):
            got = text_of(messages, lambda m, t=track: m["twilio"]["track"] == t)
            assert all(
                m["channel_index"] == [channel, 2] for m in finals(messages) if m["twilio"]["track"] == track
            )
            assert word_error_rate(expected[track], got) <= 0.35, (track, expected[track], got)
            assert word_error_rate(expected[other], got) >= 0.8, f"{other}'s words on {track}: {got}"
    assert text_of(hook.bodies, lambda m: True) == text_of(followed.messages, lambda m: True)


async def test_a_stereo_wav_with_multichannel_gives_each_speaker_on_its_channel(
    engine: WhisperEngine, tmp_path: Path
) -> None:
    """A stereo WAV with a different recording on each channel, streamed with multichannel=true: each
    channel's words come back on its own channel_index, and nothing leaks across channels."""
    path = stereo_wav("news", "lecture", SECONDS, tmp_path / "stereo.wav")
    pcm, rate, channels = read_wav(path)
    assert channels == 2
    frames = pcm.reshape(-1, 2)
    expected = [reference(engine, frames[:, c].astype(np.float32) / 32768, rate) for c in (0, 1)]
    async with running_server(engine, Config(batch=BatchConfig(max_batch_size=2))) as (_, url):
        query = f"encoding=linear16&sample_rate={rate}&channels=2&multichannel=true"
        async with connect(f"{url}/v1/listen?{query}") as ws:
            data = frames.astype("<i2").tobytes()
            step = rate // 10 * 4  # 100 ms of two 16-bit channels
            for i in range(0, len(data), step):
                await ws.send(data[i : i + step])
            await ws.send(json.dumps({"type": "CloseStream"}))
            result = await collect(ws, timeout_s=120)
    assert result.close_code == 1000
    metadata = [m for m in result.messages if m["type"] == "Metadata"][0]
    assert metadata["channels"] == 2
    for channel in (0, 1):
        got = text_of(result.messages, lambda m, c=channel: m["channel_index"] == [c, 2])
        assert word_error_rate(expected[channel], got) <= 0.35, (channel, expected[channel], got)
        assert word_error_rate(expected[1 - channel], got) >= 0.8, f"channel {1 - channel} leaked: {got}"
