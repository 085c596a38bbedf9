"""FunASR's WebSocket protocol (docs/funasr.md) end to end with real clients from PyPI: a real server on
127.0.0.1, the bundled faster-whisper tiny.en model and a real recorded lecture for the accuracy tests, a
fake engine for bad input and authentication.

The clients, pinned:

- ``funasr-client`` (module ``funasr_client``), installed in the main venv: its ``async_file_asr`` and
  ``async_file_asr_stream``, and its ``AsyncFunASRClient`` paced at real time. (Its synchronous
  ``file_asr`` cannot finish against any server in 0.1.6: ``FunASRClient.close`` holds its
  ``threading.Lock`` and calls ``signal_close()``, which takes it again.)
- ``funasr-python`` (installs the same module name), in a virtual environment of its own made with uv under
  the test cache and reused between runs; tests/funasr_python_client.py runs in it as a subprocess.
"""

from __future__ import annotations

import asyncio
import fcntl
import importlib.metadata
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from stream_server.compat import timeout
from stream_server.config import AuthConfig, BatchConfig, Config, EngineConfig
from stream_server.engines.base import TranscribeRequest
from stream_server.engines.whisper import WhisperEngine
from stream_server.testing.speech import read_wav, recorded_speech, word_error_rate, write_wav

from .conftest import scaled, skip_unless
from .fakes import FakeEngine
from .serving import running_server
from .synth import pcm16, silence, tone

ROOT = Path(__file__).resolve().parent.parent
FUNASR_CLIENT_VERSION = "0.1.6"  # PyPI funasr-client, in the main venv (pyproject's dev extra)
FUNASR_PYTHON_VERSION = "0.1.5"  # PyPI funasr-python, in a venv of its own (same module name)
CLIP_S = 12
SPEECH = pcm16(np.concatenate([silence(500), tone(1500), silence(1200), tone(1000), silence(1200)]))
KEY = "k3y-for-funasr-tests-0123456789abcdef"


def installed(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


needs_funasr_client = skip_unless(
    installed("funasr-client") == FUNASR_CLIENT_VERSION, f"needs funasr-client=={FUNASR_CLIENT_VERSION}"
)
UV = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")


def first_message(mode: str = "2pass", wav_name: str = "speech", **fields: Any) -> str:
    return json.dumps(
        {
            "mode": mode,
            "wav_name": wav_name,
            "wav_format": "pcm",
            "audio_fs": 16000,
            "is_speaking": True,
            "chunk_size": [5, 10, 5],
            "chunk_interval": 10,
            "itn": True,
            **fields,
        }
    )


async def read_file_messages(ws: ClientConnection, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Every message of one file, up to and with the one whose ``is_final`` is true."""
    messages: list[dict[str, Any]] = []
    async with timeout(scaled(timeout_s)):
        while not messages or not messages[-1]["is_final"]:
            raw = await ws.recv()
            assert isinstance(raw, str), "the server only sends text frames"
            messages.append(json.loads(raw))
    return messages


async def send_file(
    ws: ClientConnection, audio: bytes, mode: str = "2pass", wav_name: str = "speech"
) -> list[dict[str, Any]]:
    """One file as FunASR's clients send it: first message, PCM, ``is_speaking: false``; its messages."""
    await ws.send(first_message(mode, wav_name))
    for i in range(0, len(audio), 19200):  # 600 ms, the stride of chunk_size [5, 10, 5]
        await ws.send(audio[i : i + 19200])
    await ws.send(json.dumps({"is_speaking": False}))
    return await read_file_messages(ws)


def check_file_messages(messages: list[dict[str, Any]], wav_name: str) -> None:
    """The shapes FunASR's clients read: results labelled as the C++ 2pass server does, a timestamp
    string, and is_final (with is_end) only on the last message."""
    assert messages and messages[-1]["is_final"] is True and messages[-1]["is_end"] is True
    for m in messages:
        assert m["wav_name"] == wav_name and m["mode"] in ("2pass-online", "2pass-offline"), m
    for m in messages[:-1]:
        assert m["is_final"] is False and isinstance(m["text"], str), m
        if m["mode"] == "2pass-offline":
            assert isinstance(m["timestamp"], str) and isinstance(json.loads(m["timestamp"]), list), m


# --------------------------------------------------------------------------------------------------
# The clients against the tiny.en model on real speech


@pytest.fixture(scope="module")
def engine() -> Iterator[WhisperEngine]:
    engine = WhisperEngine.load(EngineConfig(device="cpu", threads=2), fallback_reason="test: no hub")
    engine.warmup(2, 20.0)
    yield engine


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 20 s of the recorded lecture as a 16 kHz mono 16-bit WAV."""
    pcm, rate, channels = read_wav(recorded_speech("lecture"))
    assert (rate, channels) == (16000, 1)
    return write_wav(tmp_path_factory.mktemp("funasr") / "lecture.wav", pcm[: CLIP_S * rate], rate)


@pytest.fixture(scope="module")
def reference(engine: WhisperEngine, clip: Path) -> str:
    """The whole clip transcribed at once by the same model: what the segments together should say."""
    pcm, _, _ = read_wav(clip)
    audio = pcm.astype(np.float32) / 32768
    return engine.transcribe([TranscribeRequest(audio=audio, language="en")])[0].text


def model_config() -> Config:
    return Config(batch=BatchConfig(max_batch_size=2))


async def stream_at_real_time(url: str, clip: Path) -> list[tuple[float, dict[str, Any]]]:
    """The clip through funasr-client's AsyncFunASRClient in 2pass mode at real time, 600 ms a message,
    as FunASR's own client paces 2pass (``sleep(60 * chunk_size[1] / chunk_interval / 1000)``); each
    message with the seconds of audio sent when it arrived (CLIP_S once ``is_speaking: false`` is sent)."""
    from funasr_client import async_funasr_client

    pcm, _, _ = read_wav(clip)
    audio = pcm.tobytes()
    loop = asyncio.get_running_loop()
    received: list[tuple[float, dict[str, Any]]] = []
    client = async_funasr_client(
        url, mode="2pass", wav_name=clip.name, audio_fs=16000, blocking=True, decode=False
    )
    async with client:
        for i in range(0, len(audio), 19200):
            await client.send(audio[i : i + 19200])
            sent_s = (i + 19200) / 32000
            deadline = loop.time() + 0.6
            while (left := deadline - loop.time()) > 0:
                try:
                    message = await client.recv(left)
                except TimeoutError:
                    break
                if message is not None:
                    received.append((min(sent_s, CLIP_S - 0.01), message))
        await client.signal_close()
        while (message := await client.recv(scaled(120))) is not None:
            received.append((CLIP_S, message))
    return received


@pytest.mark.model
@pytest.mark.e2e
@needs_funasr_client
async def test_funasr_client_2pass_gets_interims_then_the_segments_and_a_final(
    engine: WhisperEngine, clip: Path, reference: str
) -> None:
    """funasr-client's AsyncFunASRClient in 2pass mode at real time gets 2pass-online interims while the
    clip is still being sent, 2pass-offline segments whose concatenated text has the clip's words, and an
    is_final message last."""
    from funasr_client import decode_msg, merge_messages

    async with running_server(engine, model_config()) as (_, url):
        async with timeout(scaled(180)):
            received = await stream_at_real_time(f"{url}/v1/funasr", clip)
    messages = [m for _, m in received]
    check_file_messages(messages, clip.name)
    online = [(at_s, m) for at_s, m in received if m["mode"] == "2pass-online"]
    segments = [m for m in messages[:-1] if m["mode"] == "2pass-offline"]
    assert len(segments) >= 2 and online, [m["mode"] for m in messages]
    assert any(at_s < CLIP_S for at_s, _ in online), "no 2pass-online before the clip's end"
    assert all(m["text"] for _, m in online), "a 2pass-online message carries new text"
    # decode_msg parses each timestamp string into [[start_ms, end_ms], ...], within the clip.
    merged = merge_messages(decode_msg(m, None) for m in messages)
    spans = merged["timestamp"]
    assert spans and all(0 <= start <= end <= CLIP_S * 1000 + 100 for start, end in spans)
    assert [s for s, _ in spans] == sorted(s for s, _ in spans)
    assert word_error_rate(reference, merged["text"]) <= 0.35, (reference, merged["text"])


@pytest.mark.model
@pytest.mark.e2e
@needs_funasr_client
async def test_funasr_client_offline_gets_only_segments_with_the_words(
    engine: WhisperEngine, clip: Path, reference: str
) -> None:
    """funasr-client's async_file_asr in offline mode (on the bare host and port, as FunASR's own clients
    connect) gets no interims and merges segments that keep words apart into the clip's words."""
    from funasr_client import async_file_asr, async_file_asr_stream

    async with running_server(engine, model_config()) as (_, url):
        async with timeout(scaled(180)):
            stream = async_file_asr_stream(clip, f"{url}/", mode="offline", decode=False)
            messages = [m async for m in stream]
            merged = await async_file_asr(clip, f"{url}/", mode="offline")
    check_file_messages(messages, clip.name)
    assert {m["mode"] for m in messages} == {"2pass-offline"}
    segments = [m["text"] for m in messages[:-1]]
    assert len(segments) >= 2 and all(t.endswith(" ") for t in segments), segments
    assert merged["is_final"] is True and merged["wav_name"] == clip.name
    assert word_error_rate(reference, merged["text"]) <= 0.35, (reference, merged["text"])


def funasr_python_venv() -> Path:
    """A venv with funasr-python, made once per pinned version under the test cache and then reused
    (a lock file keeps concurrent runs from building it twice; a marker says the install finished)."""
    assert UV is not None
    cache = Path(os.environ.get("STREAM_SERVER_TEST_CACHE") or ROOT / ".cache")
    venv = cache / f"venv-funasr-python-{FUNASR_PYTHON_VERSION}"
    marker = venv / ".installed"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            import subprocess

            shutil.rmtree(venv, ignore_errors=True)
            run = {"check": True, "timeout": scaled(600), "capture_output": True}
            subprocess.run([UV, "venv", "--quiet", "--python", sys.executable, str(venv)], **run)  # type: ignore[call-overload]
            subprocess.run(  # type: ignore[call-overload]
                [
                    UV,
                    "pip",
                    "install",
                    "--quiet",
                    "--python",
                    str(venv / "bin" / "python"),
                    f"funasr-python=={FUNASR_PYTHON_VERSION}",
                ],
                **run,
            )
            marker.write_text(FUNASR_PYTHON_VERSION)
    return venv / "bin" / "python"


async def run_funasr_python(python: Path, url: str, wav: Path, mode: str) -> tuple[int, list[dict[str, Any]]]:
    """Run tests/funasr_python_client.py; its exit status and the JSON lines it printed."""
    process = await asyncio.create_subprocess_exec(
        str(python),
        str(ROOT / "tests" / "funasr_python_client.py"),
        url,
        str(wav),
        mode,
        str(scaled(120)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("FUNASR_")},  # its config's env
    )
    try:
        async with timeout(scaled(240)):
            out, err = await process.communicate()
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        raise
    lines = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    assert process.returncode is not None
    if process.returncode != 0:
        print(err.decode()[-4000:])
    return process.returncode, lines


@pytest.mark.model
@pytest.mark.e2e
@skip_unless(UV is not None, "needs uv (the dev extra installs it)")
async def test_funasr_python_in_its_own_venv_transcribes_the_clip(
    engine: WhisperEngine, clip: Path, reference: str
) -> None:
    """funasr-python (its own venv) gets, in offline mode on /, results whose texts have the clip's words
    and then its final result, and in 2pass mode on /v1/funasr the segments and its final result."""
    python = await asyncio.to_thread(funasr_python_venv)
    async with running_server(engine, model_config()) as (_, url):
        offline_rc, offline = await run_funasr_python(python, f"{url}/", clip, "offline")
        twopass_rc, twopass = await run_funasr_python(python, f"{url}/v1/funasr", clip, "2pass")
    assert offline_rc == 0 and offline[-1]["kind"] == "done", offline[-3:]
    assert [m["kind"] for m in offline].count("final") == 1 and not [
        m for m in offline if m["kind"] == "error"
    ]
    texts = [m["text"] for m in offline if m["kind"] == "partial"]
    assert len(texts) >= 2 and word_error_rate(reference, " ".join(texts)) <= 0.35, (reference, texts)
    assert twopass_rc == 0 and twopass[-1]["kind"] == "done", twopass[-3:]
    assert [m["kind"] for m in twopass].count("final") == 1
    # It sends as fast as it can (10 ms a message), so interims may or may not come: its results are at
    # least the segments.
    assert [m["kind"] for m in twopass].count("partial") >= len(texts), twopass


# --------------------------------------------------------------------------------------------------
# Bad input, files in a row, authentication: a fake engine


async def expect_error(ws: ClientConnection, code: str) -> dict[str, Any]:
    """The error message the server sends, then its close; the message."""
    messages: list[dict[str, Any]] = []
    try:
        async with timeout(scaled(20)):
            async for raw in ws:
                assert isinstance(raw, str)
                messages.append(json.loads(raw))
    except ConnectionClosed:
        pass
    if ws.close_code is None:
        async with timeout(scaled(20)):
            await ws.wait_closed()
    errors = [m for m in messages if m.get("mode") == "error"]
    assert len(errors) == 1 and messages[-1] is errors[0], messages
    error = errors[0]
    assert error["code"] == code and error["is_final"] is True and isinstance(error["wav_name"], str)
    text = error["text"]
    assert len(text.split()) >= 4 and text.endswith("."), text  # a sentence, not a bare code
    assert ws.close_code == 1008, (ws.close_code, ws.close_reason)
    return error


BAD_INPUT = {
    "FIRST_MESSAGE_REQUIRED": (SPEECH[:6400],),
    "INVALID_JSON": ("{mode: 2pass",),
    "INVALID_MESSAGE": ("[1, 2]",),
    "UNKNOWN_MODE": (first_message("3pass"),),
    "UNSUPPORTED_FORMAT": (first_message(wav_format="mp3"),),
    "TEXT_INSTEAD_OF_AUDIO": (first_message(), SPEECH[:6400], json.dumps({"text": "hello"})),
}


@pytest.mark.e2e
@pytest.mark.parametrize("code", sorted(BAD_INPUT))
async def test_bad_input_gets_an_error_and_a_close_and_leaves_another_stream_alone(code: str) -> None:
    """Bad input gets one mode-error message with its code and a sentence, then a 1008 close, while a
    stream running at the same time still gets its results."""
    async with running_server(FakeEngine()) as (_, url):
        async with connect(f"{url}/v1/funasr", subprotocols=["binary"]) as good:  # type: ignore[list-item]
            await good.send(first_message(wav_name="good"))
            await good.send(SPEECH[: len(SPEECH) // 2])
            async with connect(f"{url}/", subprotocols=["binary"]) as bad:  # type: ignore[list-item]
                for message in BAD_INPUT[code]:
                    await bad.send(message)
                await expect_error(bad, code)
            await good.send(SPEECH[len(SPEECH) // 2 :])
            await good.send(json.dumps({"is_speaking": False}))
            messages = await read_file_messages(good)
    check_file_messages(messages, "good")
    segments = [m["text"] for m in messages if m["mode"] == "2pass-offline" and not m["is_final"]]
    assert len(segments) == 2 and all(t.startswith("clip ") for t in segments), messages


@pytest.mark.e2e
async def test_files_follow_one_another_on_one_socket_with_the_binary_subprotocol() -> None:
    """The server selects the binary subprotocol, and a second first message after a file's is_final
    starts the next file, whose results carry its own wav_name and times from its own start."""
    async with running_server(FakeEngine()) as (_, url):
        async with connect(f"{url}/", subprotocols=["binary"]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "binary"
            first = await send_file(ws, SPEECH, "offline", "one")
            second = await send_file(ws, SPEECH, "2pass", "two")
    check_file_messages(first, "one")
    check_file_messages(second, "two")
    starts = []
    for messages in (first, second):
        segments = [m for m in messages[:-1] if m["mode"] == "2pass-offline"]
        assert len(segments) == 2 and all(m["text"].endswith(" ") for m in segments), messages
        starts.append([m["stamp_sents"][0]["start"] for m in segments])
    # SPEECH's tones start at 500 and 3200 ms; each file's times count from its own first sample.
    assert starts[0][0] <= 500 and 2500 <= starts[0][1] <= 3200, starts
    assert all(abs(a - b) <= 50 for a, b in zip(starts[0], starts[1], strict=True)), starts
    assert all(m["mode"] == "2pass-offline" for m in first)


@pytest.mark.e2e
async def test_a_key_in_the_token_query_parameter_is_accepted_and_none_is_refused() -> None:
    """On a server with API keys, ?token=KEY streams; no token or a wrong one gets 401 at the handshake."""
    config = Config(auth=AuthConfig(api_keys=(f"funasr:{KEY}",)))
    async with running_server(FakeEngine(), config) as (_, url):
        for refused in (f"{url}/v1/funasr", f"{url}/?token=not-{KEY}"):
            with pytest.raises(InvalidStatus) as info:
                async with connect(refused, subprotocols=["binary"]):  # type: ignore[list-item]
                    pass
            assert info.value.response.status_code == 401, refused
        async with connect(f"{url}/?token={KEY}", subprotocols=["binary"]) as ws:  # type: ignore[list-item]
            messages = await send_file(ws, SPEECH, "offline", "keyed")
    check_file_messages(messages, "keyed")
    assert len([m for m in messages if m["text"]]) == 2
