"""stream-client: reading audio files and streaming them to a real server."""

from __future__ import annotations

import asyncio
import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from stream_server.client import AudioFileError, listen_url, main, read_audio, stream_audio

from .conftest import scaled
from .fakes import FakeEngine
from .serving import running_server
from .synth import silence, tone


def write_wav(path: Path, samples: np.ndarray, rate: int, channels: int = 1, width: int = 2) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        if width == 2:
            w.writeframes((np.clip(samples, -1, 1 - 1 / 32768) * 32768).astype("<i2").tobytes())
        elif width == 1:
            w.writeframes((np.clip(samples, -1, 1) * 127 + 128).astype(np.uint8).tobytes())
        else:
            ints = (np.clip(samples, -1, 1 - 2**-23) * 2**23).astype(np.int32)
            w.writeframes(b"".join(struct.pack("<i", int(v))[:3] for v in ints))
    return path


def float_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    body = (
        b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    )
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


@pytest.mark.parametrize("width", [1, 2, 3])
def test_reads_pcm_wav_of_each_width(tmp_path: Path, width: int) -> None:
    """8-, 16- and 24-bit PCM WAV files are read as the same mono int16 signal."""
    signal = tone(200)
    pcm, rate = read_audio(write_wav(tmp_path / "a.wav", signal, 22050, width=width))
    assert rate == 22050 and len(pcm) == len(signal)
    tolerance = 0.02 if width == 1 else 0.001
    assert np.max(np.abs(pcm / 32768 - signal)) < tolerance


def test_stereo_is_mixed_to_mono(tmp_path: Path) -> None:
    """A stereo file with opposite channels mixes to silence, proving the channels are averaged."""
    left = tone(100)
    interleaved = np.stack([left, -left], axis=1).reshape(-1)
    pcm, _ = read_audio(write_wav(tmp_path / "s.wav", interleaved, 16000, channels=2))
    assert len(pcm) == len(left) and np.max(np.abs(pcm)) <= 1


def test_float_wav(tmp_path: Path) -> None:
    """32-bit float WAV (format 3), which the stdlib wave module refuses, is read."""
    pcm, rate = read_audio(float_wav(tmp_path / "f.wav", tone(100), 48000))
    assert rate == 48000 and abs(int(np.max(pcm)) - int(0.3 * 32768)) < 700


def test_not_a_wav_is_a_clear_error(tmp_path: Path) -> None:
    """A file that is not WAV is refused with a message naming the file and the fix."""
    bad = tmp_path / "song.mp3"
    bad.write_bytes(b"ID3\x03\x00" + b"\x00" * 100)
    with pytest.raises(AudioFileError, match="not a WAV file"):
        read_audio(bad)
    raw = tmp_path / "odd.raw"
    raw.write_bytes(b"\x00\x01\x02")
    with pytest.raises(AudioFileError, match="even number"):
        read_audio(raw, raw_sample_rate_hz=16000)


def test_listen_url_encodes_params() -> None:
    """Query parameters are added with booleans lower-cased and None left out."""
    url = listen_url("ws://h/v1/listen", {"a": True, "b": None, "c": 8000})
    assert url == "ws://h/v1/listen?a=true&c=8000"
    assert listen_url("ws://h/v1/listen?x=1", {"y": 2}) == "ws://h/v1/listen?x=1&y=2"


@pytest.mark.e2e
async def test_stream_audio_reports_finals_and_latency() -> None:
    """Streaming at 4x real time yields every final, a normal close and one latency per final."""
    audio = np.concatenate([silence(500), tone(1000), silence(700), tone(800), silence(800)])
    pcm = (audio * 32767).astype(np.int16)
    async with running_server(FakeEngine()) as (_, url):
        report = await stream_audio(f"{url}/v1/listen", pcm, 16000, speed=4.0)
    assert report.close_code == 1000 and len(report.finals()) == 2
    assert len(report.latencies_s) == 2 and all(0 <= x < scaled(5) for x in report.latencies_s)
    assert report.wall_s >= report.audio_s / 4 * 0.9


@pytest.mark.e2e
async def test_cli_prints_finals_and_exits_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI prints one timed line per final and exits 0 after a normal close."""
    audio = np.concatenate([silence(300, rate=8000), tone(900, rate=8000), silence(800, rate=8000)])
    path = write_wav(tmp_path / "t.wav", audio, 8000)
    async with running_server(FakeEngine()) as (_, url):
        code = await asyncio.to_thread(main, [str(path), "--url", f"{url}/v1/listen", "--speed", "0"])
    out = capsys.readouterr()
    assert code == 0
    assert out.out.startswith("[00:00.") and "clip" in out.out
    assert "1 final(s)" in out.err


@pytest.mark.e2e
async def test_cli_reports_refused_handshake(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A refused handshake is reported with the server's reason and a non-zero exit."""
    path = write_wav(tmp_path / "t.wav", tone(300), 16000)
    async with running_server(FakeEngine()) as (_, url):
        code = await asyncio.to_thread(
            main, [str(path), "--url", f"{url}/v1/listen", "--language", "klingon", "--speed", "0"]
        )
    assert code == 1
    assert "UNSUPPORTED_LANGUAGE" in capsys.readouterr().err


@pytest.mark.e2e
async def test_cli_sends_its_api_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On a server with keys, the CLI without a key is refused with AUTH_REQUIRED, with --api-key it
    streams."""
    from dataclasses import replace

    from stream_server.config import AuthConfig, Config

    key = "cli-key-0123456789abcdef"
    path = write_wav(tmp_path / "t.wav", np.concatenate([silence(300), tone(900), silence(800)]), 16000)
    config = replace(Config(), auth=AuthConfig(api_keys=(key,)))
    async with running_server(FakeEngine(), config) as (_, url):
        refused = await asyncio.to_thread(main, [str(path), "--url", f"{url}/v1/listen", "--speed", "0"])
        assert refused == 1 and "AUTH_REQUIRED" in capsys.readouterr().err
        code = await asyncio.to_thread(
            main, [str(path), "--url", f"{url}/v1/listen", "--speed", "0", "--api-key", key]
        )
    assert code == 0 and "clip" in capsys.readouterr().out


def test_cli_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing file is a clear error with exit code 2, before any connection."""
    assert main([str(tmp_path / "missing.wav")]) == 2
    assert "missing.wav" in capsys.readouterr().err
