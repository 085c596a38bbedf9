"""End to end with real speech: a real server on 127.0.0.1, a real WebSocket client, the bundled
faster-whisper tiny.en model (the one a machine with no model hub runs), espeak-ng speech and a real
recorded lecture."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator

import numpy as np
import pytest

from stream_server.client import stream_audio
from stream_server.config import BatchConfig, Config, EngineConfig
from stream_server.engines.whisper import WhisperEngine, bundled_model_dir
from stream_server.testing.speech import (
    read_wav,
    recorded_speech,
    sentence_spans,
    speech_with_pauses,
    word_error_rate,
)

from .conftest import skip_unless
from .serving import running_server

pytestmark = [
    pytest.mark.model,
    pytest.mark.e2e,
    skip_unless(
        shutil.which("espeak-ng") is not None and shutil.which("sox") is not None, "needs espeak-ng, sox"
    ),
]

SENTENCES = (
    "Good morning everyone.",
    "Please remember to bring your notebooks to the meeting on Friday afternoon.",
    "The quick brown fox jumps over the lazy dog.",
)


@pytest.fixture(scope="module")
def engine() -> Iterator[WhisperEngine]:
    engine = WhisperEngine.load(EngineConfig(device="cpu", threads=2), fallback_reason="test: no hub")
    engine.warmup(2, 20.0)
    yield engine


async def test_spoken_sentences_come_back_as_one_final_each(engine: WhisperEngine) -> None:
    """Three spoken sentences with pauses give three finals, in order, with the right words and times."""
    path = speech_with_pauses(SENTENCES, pause_s=1.2)
    pcm, rate, _ = read_wav(path)
    async with running_server(engine, Config(batch=BatchConfig(max_batch_size=2))) as (_, url):
        report = await stream_audio(f"{url}/v1/listen", pcm, rate, speed=0, params={"punctuate": True})
    assert report.close_code == 1000
    finals = [f for f in report.finals() if f["channel"]["alternatives"][0]["transcript"]]
    assert len(finals) == 3
    for final, span in zip(finals, sentence_spans(path), strict=True):
        text = final["channel"]["alternatives"][0]["transcript"]
        assert word_error_rate(span.text, text) <= 0.15, (span.text, text)
        # The segment covers the sentence (pre-roll before, post-roll after) and not much more.
        assert final["start"] <= span.start_s <= final["start"] + 0.4
        end = final["start"] + final["duration"]
        assert span.end_s <= end <= span.end_s + 0.7
        words = final["channel"]["alternatives"][0]["words"]
        assert words and all(final["start"] <= w["start"] <= w["end"] <= end + 0.01 for w in words)
        assert final["tags"]["language"] == "en"
    meta = [m for m in report.messages if m["type"] == "Metadata"][0]
    assert meta["model_details"]["fallback"] is True and meta["warnings"]


async def test_streaming_a_recording_matches_whole_file_transcription(engine: WhisperEngine) -> None:
    """The 60 s recorded lecture streamed through the server gives (nearly) the words of transcribing the
    whole file at once with the same model."""
    path = recorded_speech("lecture")
    pcm, rate, _ = read_wav(path)
    async with running_server(engine, Config(batch=BatchConfig(max_batch_size=4))) as (_, url):
        report = await stream_audio(f"{url}/v1/listen", pcm, rate, speed=0, params={"punctuate": True})
    assert report.close_code == 1000 and len(report.finals()) >= 4
    streamed = report.transcript()

    def whole_file() -> str:
        from faster_whisper import WhisperModel

        model = WhisperModel(str(bundled_model_dir()), device="cpu", compute_type="int8", cpu_threads=2)
        segments, _ = model.transcribe(
            pcm.astype(np.float32) / 32768, language="en", beam_size=5, vad_filter=False
        )
        return " ".join(s.text.strip() for s in segments)

    reference = await asyncio.to_thread(whole_file)
    wer = word_error_rate(reference, streamed)
    print(f"\nWER streamed vs whole file: {wer:.3f} ({len(reference.split())} reference words)")
    assert wer <= 0.10, (reference, streamed)
