"""The server with SenseVoice Small's real funasr code path (a random-weight folder), and the real
``stream-server`` / ``stream-client`` commands as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from stream_server.client import stream_audio
from stream_server.config import BatchConfig, Config, EngineConfig, InterimConfig
from stream_server.engines.loader import load_engine
from stream_server.testing.speech import read_wav, speech_with_pauses

from .conftest import scaled
from .serving import running_server

pytestmark = [pytest.mark.model, pytest.mark.e2e]

SENTENCES = ("Good morning everyone.", "The quick brown fox jumps over the lazy dog.")


async def test_sensevoice_through_the_server(small_model_dir: Path) -> None:
    """Through the real loader and funasr's SenseVoice path, each segment gets a final with parsed tags,
    no tag text in the transcript, and word times in session time; interims arrive too."""
    config = Config(batch=BatchConfig(max_batch_size=4), interim=InterimConfig(interval_ms=500))
    engine = load_engine(
        EngineConfig(model=str(small_model_dir), threads=2), max_audio_s=20.0, max_batch_size=4
    )
    assert engine.info.name == "sensevoice-small" and engine.info.fallback_reason is None
    pcm, rate, _ = read_wav(speech_with_pauses(SENTENCES, pause_s=1.0))
    async with running_server(engine, config) as (_, url):
        report = await stream_audio(
            f"{url}/v1/listen",
            pcm,
            rate,
            speed=4.0,
            params={"language": "zh", "interim_results": True, "punctuate": True},
        )
    assert report.close_code == 1000
    finals = report.finals()
    assert len(finals) == 2
    for final in finals:
        alternative = final["channel"]["alternatives"][0]
        assert "<|" not in alternative["transcript"]
        assert set(final["tags"]) == {"language", "emotion", "audio_event"}
        assert final["tags"]["language"] in {"zh", "en", "ja", "ko", "yue"}
        assert 0.0 <= alternative["confidence"] <= 1.0
        end = final["start"] + final["duration"]
        assert all(
            final["start"] - 0.01 <= w["start"] <= w["end"] <= end + 0.01 for w in alternative["words"]
        )
    interims = [m for m in report.messages if m.get("type") == "Results" and not m["is_final"]]
    assert interims, "interim results were asked for"
    meta = [m for m in report.messages if m["type"] == "Metadata"][0]
    assert meta["model_details"]["name"] == "sensevoice-small" and meta["warnings"] == []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_health(port: int, deadline_s: float) -> dict[str, object]:
    deadline = time.monotonic() + deadline_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                return dict(json.loads(response.read()))
        except Exception as exc:  # not up yet, or 503 while loading
            last = exc
            time.sleep(0.5)
    raise AssertionError(f"server not ready in {deadline_s:.0f} s: {last}")


def test_readme_commands_serve_and_transcribe(tmp_path: Path) -> None:
    """`stream-server --model auto` comes up with no manual step (SenseVoice, or the fallback said loudly),
    `stream-client` gets the spoken words back, and SIGTERM shuts the server down cleanly."""
    port = free_port()
    log = tmp_path / "server.log"
    bin_dir = Path(sys.executable).parent
    with log.open("w") as out:
        server = subprocess.Popen(
            [
                str(bin_dir / "stream-server"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--model",
                "auto",
                "--hub-timeout-s",
                "3",
                "--max-batch-size",
                "2",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        health = wait_health(port, scaled(240))
        model = health["model"]
        assert isinstance(model, dict) and health["ready"] is True
        if model["fallback"]:
            assert model["name"] == "faster-whisper-tiny.en" and model["fallback_reason"]
            assert "FALLBACK" in log.read_text()
        speech = speech_with_pauses(SENTENCES, pause_s=0.8)
        client = subprocess.run(
            [
                str(bin_dir / "stream-client"),
                str(speech),
                "--url",
                f"ws://127.0.0.1:{port}/v1/listen",
                "--speed",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=scaled(120),
        )
        assert client.returncode == 0, client.stderr
        if model["fallback"]:  # the English model: the words must come back
            assert "morning" in client.stdout.lower() and "fox" in client.stdout.lower(), client.stdout
        assert client.stdout.count("\n") == 2, client.stdout
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=scaled(60))
        finally:
            if server.poll() is None:
                server.kill()
    assert code == 0, log.read_text()[-3000:]


def test_unloadable_model_exits_non_zero(tmp_path: Path) -> None:
    """`stream-server --model <a folder that is not a model>` logs why and exits 1 instead of serving."""
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    completed = subprocess.run(
        [
            str(Path(sys.executable).parent / "stream-server"),
            "--port",
            str(free_port()),
            "--model",
            str(empty),
        ],
        capture_output=True,
        text=True,
        timeout=scaled(120),
    )
    assert completed.returncode == 1
    assert "could not be loaded" in completed.stderr


def test_bad_flag_is_refused_naming_the_field() -> None:
    """An invalid setting stops the CLI at once with a message naming the field."""
    completed = subprocess.run(
        [str(Path(sys.executable).parent / "stream-server"), "--max-segment-ms", "999999"],
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert completed.returncode == 2 and "max_segment_ms" in completed.stderr
