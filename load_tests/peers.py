"""Side by side: the same workload against this server and WhisperLive, both on faster-whisper tiny.en.

Both servers run as subprocesses on 127.0.0.1 (free ports, bounded waits, stopped at the end), one after
the other in the same run, and get exactly the same workload: for each N (default 1, 2, 4), N concurrent
sessions stream the same speech material at real-time pace in 100 ms chunks, session ``i`` starting
``i * stagger`` seconds after the first (the stagger spreads the N sessions over one mean sentence
period, so they do not all stop talking at the same instant). The material ends with ``--tail-s`` (4 s)
of silence, streamed by both. WhisperLive drops its unfinished last segment when the stream ends, and
completes a segment only when the next speech starts or after ``same_output_threshold`` identical
re-decodes, so its sessions then go on sending silence (real-time pace, at most ``--flush-max-s``, 30 s)
until the last sentence has its final; how long that took is printed.

* **Ours**: ``python -m stream_server --model tiny.en ...`` (``common.ServerProcess``), measured by
  ``common.stream_session`` as the other load tests do.
* **WhisperLive 0.10.0** (``whisper-live`` on PyPI) in its own virtual environment outside the
  repository (``--venv``, default ``/work/peers/whisperlive-venv``; created when missing, see
  :func:`install_whisperlive`), started as ``TranscriptionServer().run(host, port,
  backend="faster_whisper", faster_whisper_custom_model_path=<our tiny.en folder>, single_model=True,
  max_clients=16, max_connection_time=3600)`` with ``HF_HUB_OFFLINE=1``. It loads the model on the first
  connection, so one warm-up session runs before anything is measured (ours gets one too).
  :func:`whisperlive_session` is its client: a JSON options message (the values WhisperLive's own client
  sends by default: VAD on, ``send_last_n_segments`` 10, ``no_speech_thresh`` 0.45,
  ``same_output_threshold`` 10), ``SERVER_READY``, float32 frames, ``END_OF_AUDIO``, then it reads until
  the server closes.

Both sides measure the **same** end-of-speech-to-final latency from ground truth: a final is matched to
the material's sentences whose midpoints lie inside its ``[start, end]`` (stream seconds on both sides);
its latency is its arrival time minus the wall time the client sent the chunk holding the last speech
sample of the last of those sentences; a final whose last sentence runs past its end (by more than
``--tolerance-s``) is not an end of speech and has no latency. The tolerance is 0.5 s here (0.05 s in
``common.stream_session``'s default): WhisperLive's segment ends are Whisper's timestamp tokens, which
often fall 0.1-0.3 s before the true end of speech; ours include 300 ms of post-roll, so the value
changes nothing on our side as long as pauses are longer than it. On our side only finals that ended
on a pause (``speech_final``) count. WhisperLive has no such flag; its final is a segment that arrives with
``completed: true`` for the first time, at or after the end of the previous one (the rule of
WhisperLive's own client: it re-sends its last segments with every update). The WER of each system's
finals (in arrival order) against the sentences sent is printed where the material has text.

Per system and N it prints finals, sentences matched, p50/p95/p99/max latency, WER, the server
process's CPU (100 % = one core) and RSS (mean / max) while the step ran, and errors; then the ratios
ours/theirs of p50 and p95. The load generator runs in this process on the same machine and competes
for the same cores. Typical runs::

    python load_tests/peers.py --install                 # only create the WhisperLive venv (PyPI)
    python load_tests/peers.py                           # N = 1, 2, 4, both systems (~14 min)
    python load_tests/peers.py --ns 1,2,4,8 --sentences 30
    python load_tests/peers.py --quick --only ours       # smoke test without WhisperLive (~30 s)

``--material NAME`` picks the speech (``conversation``: espeak-ng sentences with pauses, needs espeak-ng
and sox; ``call``: the first ``--sentences`` utterances of one side of a conversation of real recorded
speech, ``common.recorded_conversation``, with no text, so no WER); ``--material module:function``
takes any callable returning a ``common.Material`` (the function gets the ``count`` (``--sentences``)
and ``seed`` keyword arguments it accepts).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import importlib
import inspect
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from stream_server.compat import timeout  # noqa: E402
from stream_server.testing.speech import normalize_text, word_error_rate  # noqa: E402

# --------------------------------------------------------------------------------------------------
# WhisperLive: where it lives and how it is installed

PEERS_DIR = Path(os.environ.get("STREAM_SERVER_PEERS_DIR", "/work/peers"))
"""Where peer servers are installed, outside the repository (``STREAM_SERVER_PEERS_DIR`` overrides)."""
DEFAULT_VENV = PEERS_DIR / "whisperlive-venv"

WHISPERLIVE_VERSION = "0.10.0"
WHISPERLIVE_PACKAGES: tuple[str, ...] = (
    "torch==2.13.0",
    "numpy",
    "scipy",
    "websockets",
    "ctranslate2",
    "onnxruntime",
    "tokenizers",
    "huggingface-hub",
    "av",
    "soundfile",
    "faster-whisper==1.2.0",
    "fastapi",
    "starlette",
    "uvicorn",
    "python-multipart",
    "prometheus-client",
    "requests",
)
"""What WhisperLive's faster_whisper server path imports. Its declared dependencies (openai-whisper,
openvino, a CUDA torch, an old tokenizers...) are not installed: ``whisper-live`` goes in with
``--no-deps``. ``torch==2.13.0`` is pinned because an unpinned torch pulls gigabytes of CUDA wheels;
faster-whisper 1.2.0 imports ``requests`` without declaring it."""

OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "PYTHONUNBUFFERED": "1",
}
"""No model hub is reachable: nothing may try to download anything."""

WHISPERLIVE_LAUNCHER = """\
import sys
from whisper_live.server import TranscriptionServer

host, port, model_dir, max_clients, max_connection_time = sys.argv[1:6]
TranscriptionServer().run(
    host,
    int(port),
    backend="faster_whisper",
    faster_whisper_custom_model_path=model_dir,
    single_model=True,
    max_clients=int(max_clients),
    max_connection_time=int(max_connection_time),
)
"""
"""Run with ``python -c`` inside the WhisperLive venv: ``HOST PORT MODEL_DIR MAX_CLIENTS MAX_CONN_S``."""


def venv_python(venv: Path) -> Path:
    """The interpreter of a virtual environment."""
    return venv / "bin" / "python"


def installed_whisperlive_version(venv: Path) -> str | None:
    """The ``whisper-live`` version installed in ``venv`` (None when the venv or the package is missing)."""
    python = venv_python(venv)
    if not python.exists():
        return None
    probe = "import importlib.metadata as m; print(m.version('whisper-live'))"
    try:
        done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _run_logged(command: Sequence[str], timeout_s: float) -> None:
    """Run an install step, echoing the command; raises RuntimeError when it fails."""
    print("+ " + " ".join(command), flush=True)
    done = subprocess.run(list(command), timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"install step failed ({done.returncode}): {' '.join(command)}")


def install_whisperlive(venv: Path = DEFAULT_VENV, *, force: bool = False, timeout_s: float = 1800) -> Path:
    """Create WhisperLive's own virtual environment (outside the repository) when it is missing.

    The steps, reproducible on a fresh machine with PyPI access::

        python3.11 -m venv VENV
        VENV/bin/python -m pip install torch==2.13.0 numpy scipy websockets ctranslate2 onnxruntime \\
            tokenizers huggingface-hub av soundfile faster-whisper==1.2.0 fastapi starlette uvicorn \\
            python-multipart prometheus-client requests
        VENV/bin/python -m pip install --no-deps whisper-live==0.10.0
        VENV/bin/python -c "import whisper_live.server"

    Args:
        venv: where to create it.
        force: delete an existing one first.
        timeout_s: bound on each pip step.

    Returns:
        The venv's interpreter.

    Raises:
        RuntimeError: a step failed.
    """
    if force and venv.exists():
        shutil.rmtree(venv)
    if installed_whisperlive_version(venv) == WHISPERLIVE_VERSION:
        return venv_python(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    if not venv_python(venv).exists():
        base = shutil.which("python3.11") or sys.executable
        _run_logged([base, "-m", "venv", str(venv)], timeout_s=300)
    pip = [str(venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check"]
    _run_logged([*pip, *WHISPERLIVE_PACKAGES], timeout_s=timeout_s)
    _run_logged([*pip, "--no-deps", f"whisper-live=={WHISPERLIVE_VERSION}"], timeout_s=timeout_s)
    check = "import whisper_live.server, faster_whisper; print('whisper_live imports')"
    env = {**os.environ, **OFFLINE_ENV}
    print(f"+ {venv_python(venv)} -c {check!r}", flush=True)
    done = subprocess.run([str(venv_python(venv)), "-c", check], env=env, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError("whisper_live does not import in " + str(venv))
    return venv_python(venv)


# --------------------------------------------------------------------------------------------------
# The WhisperLive server process


class WhisperLiveProcess:
    """WhisperLive's ``TranscriptionServer`` on 127.0.0.1 as a subprocess of its own venv's python.

    Args:
        venv: the WhisperLive virtual environment.
        model_dir: the CTranslate2 tiny.en folder (ours).
        max_clients: WhisperLive refuses more concurrent clients than this (its default is 4).
        max_connection_time_s: WhisperLive disconnects a client after this long (its default is 600).
        ready_timeout_s: bound on the port opening.
        log_path: where its output goes (default: a temporary file, deleted unless something failed).
    """

    def __init__(
        self,
        venv: Path,
        model_dir: Path,
        *,
        max_clients: int = 16,
        max_connection_time_s: int = 3600,
        ready_timeout_s: float = 180.0,
        log_path: Path | None = None,
    ) -> None:
        self.venv = venv
        self.model_dir = model_dir
        self.max_clients = max_clients
        self.max_connection_time_s = max_connection_time_s
        self.ready_timeout_s = ready_timeout_s
        self.port = common.free_port()
        self._own_log = log_path is None
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="whisperlive-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None
        self.failed = False

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def command(self) -> list[str]:
        """The exact command line."""
        return [
            str(venv_python(self.venv)),
            "-c",
            WHISPERLIVE_LAUNCHER,
            "127.0.0.1",
            str(self.port),
            str(self.model_dir),
            str(self.max_clients),
            str(self.max_connection_time_s),
        ]

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def start(self) -> WhisperLiveProcess:
        """Start it and wait (bounded) until its port accepts connections.

        Raises:
            common.ServerError: it exited or its port did not open in time.
        """
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **OFFLINE_ENV},
                cwd=tempfile.gettempdir(),
            )
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return self
            time.sleep(0.3)
        self.failed = True
        self.stop()
        raise common.ServerError(f"WhisperLive's port did not open in {self.ready_timeout_s:.0f} s")

    def check_alive(self) -> None:
        """Raises common.ServerError when the process has exited."""
        if self.popen is not None and self.popen.poll() is not None:
            self.failed = True
            raise common.ServerError(
                f"WhisperLive exited with {self.popen.returncode}:\n{self.log_tail()}\nlog: {self.log_path}"
            )

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL. Returns the exit status.

        A temporary log is deleted unless something failed (then its path is printed)."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        if self._own_log and not self.failed:
            self.log_path.unlink(missing_ok=True)
        elif self.failed:
            print(f"WhisperLive's log: {self.log_path}", file=sys.stderr)
        return self.popen.returncode

    def __enter__(self) -> WhisperLiveProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------
# The WhisperLive client


@dataclass
class PeerSessionResult(common.SessionResult):
    """``common.SessionResult`` plus what only WhisperLive's protocol shows.

    Attributes:
        ready_s: seconds from connecting to ``SERVER_READY``.
        overlapping_finals: completed segments never seen before that start before the end of the
            previous final (WhisperLive's own client ignores them, and so does this one).
        early_end_finals: finals whose last sentence ends more than the tolerance after the final's end
            (matched, but no latency).
        future_finals: finals that end more than 0.5 s after the audio sent when they arrived: the
            server's stream clock ran ahead (then the midpoint rule matches them wrongly, or not at all).
        updates: transcription messages received.
        flush_s: silence sent after the material until the last sentence's final came.
        last_final: whether the last sentence got its final before ``END_OF_AUDIO``.
    """

    ready_s: float = math.nan
    overlapping_finals: int = 0
    early_end_finals: int = 0
    future_finals: int = 0
    updates: int = 0
    flush_s: float = 0.0
    last_final: bool = False


def whisperlive_options(use_vad: bool = True) -> dict[str, Any]:
    """The options message, with the values WhisperLive's own ``Client`` sends by default."""
    return {
        "uid": str(uuid.uuid4()),
        "language": "en",
        "task": "transcribe",
        "model": "tiny.en",  # replaced server-side by faster_whisper_custom_model_path
        "use_vad": use_vad,
        "send_last_n_segments": 10,
        "no_speech_thresh": 0.45,
        "clip_audio": False,
        "same_output_threshold": 10,
    }


async def whisperlive_session(
    url: str,
    material: common.Material,
    *,
    duration_s: float,
    speed: float = 1.0,
    chunk_ms: int = 100,
    start_at: float | None = None,
    keep_text: bool = False,
    use_vad: bool = True,
    ready_timeout_s: float = 120.0,
    timeout_s: float = 600.0,
    tolerance_s: float = 0.5,
    flush_max_s: float = 0.0,
    trace: list[dict[str, Any]] | None = None,
) -> PeerSessionResult:
    """Stream ``duration_s`` of the material (from its start) through one WhisperLive session and measure
    it by the rules of ``common.stream_session``.

    Args:
        url: ``ws://127.0.0.1:PORT``.
        material: what to stream (looped if ``duration_s`` is longer).
        duration_s: audio to send, then ``END_OF_AUDIO``.
        speed: times real time (> 0).
        chunk_ms: audio per WebSocket frame.
        start_at: monotonic time to connect at; None: now.
        keep_text: keep the transcript and the reference text (for WER).
        use_vad: WhisperLive's ``use_vad`` option (faster-whisper's Silero VAD filter).
        ready_timeout_s: bound on the wait for ``SERVER_READY``.
        timeout_s: give up after this long (recorded as an error).
        tolerance_s: a sentence counts as ended inside a final when it ends at most this much after
            the final's end.
        flush_max_s: after the material, go on sending silence (real-time pace, at most this long)
            until the last sentence has its final: WhisperLive completes a segment only when the next
            speech starts or after ``same_output_threshold`` identical re-decodes, and drops the
            unfinished one at ``END_OF_AUDIO``.
        trace: when given, every server message is appended to it with ``t`` (seconds since the
            first audio chunk was due) and ``sent_s`` (audio sent by then).

    Returns:
        The measurements; failures are in ``errors``, never raised.
    """
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    assert speed > 0, "WhisperLive is streamed at a real-time multiple"
    result = PeerSessionResult()
    if start_at is not None:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    rate = common.SAMPLE_RATE_HZ
    total = int(duration_s * rate)
    chunk = max(1, rate * chunk_ms // 1000)
    spans = common.loop_spans(material, 0.0, total / rate)
    mids = [s.mid_s for s in spans]
    matched = [False] * len(spans)
    texts: list[str] = []
    sent_samples: list[int] = []
    sent_at: list[float] = []
    last_final_end = -math.inf
    seen: set[tuple[str, str, str]] = set()
    ready = asyncio.Event()

    def sent_time(t_s: float) -> float | None:
        """When the chunk holding the sample just before stream time t_s was sent."""
        i = bisect.bisect_left(sent_samples, round(t_s * rate))
        return sent_at[i] if i < len(sent_at) else None

    def on_final(start: float, end: float, text: str, now: float) -> None:
        result.finals += 1
        if keep_text and text:
            texts.append(text)
        i0, i1 = bisect.bisect_left(mids, start), bisect.bisect_right(mids, end)
        inside = range(i0, i1)
        for i in inside:
            matched[i] = True
        if not inside:
            if text:
                result.unmatched_finals += 1
            return
        speech_end = spans[i1 - 1].end_s
        if speech_end > end + tolerance_s:
            result.early_end_finals += 1
            return  # the last sentence runs past the final: not an end of speech
        sent = sent_time(speech_end)
        if sent is not None:
            result.final_latencies_s.append(now - sent)
            result.final_speech_end_wall_s.append(sent)

    def on_segments(segments: list[dict[str, Any]], now: float) -> None:
        nonlocal last_final_end
        result.updates += 1
        for seg in segments:
            if not seg.get("completed"):
                continue
            key = (str(seg.get("start")), str(seg.get("end")), str(seg.get("text")))
            if key in seen:
                continue
            seen.add(key)
            start, end = float(seg["start"]), float(seg["end"])
            if start < last_final_end:
                result.overlapping_finals += 1
                continue
            last_final_end = end
            if end > position / rate + 0.5:
                result.future_finals += 1
            on_final(start, end, str(seg.get("text", "")).strip(), now)

    started = time.monotonic()
    paced_from = started
    position = 0
    try:
        async with timeout(timeout_s):
            async with connect(url, max_size=None, open_timeout=30, ping_interval=20.0) as ws:

                async def receive() -> None:
                    with contextlib.suppress(ConnectionClosed):
                        async for raw in ws:
                            now = time.monotonic()
                            message = json.loads(raw)
                            if trace is not None:
                                trace.append(
                                    {"t": round(now - paced_from, 3), "sent_s": position / rate, **message}
                                )
                            if "segments" in message:
                                on_segments(list(message["segments"]), now)
                            elif message.get("message") == "SERVER_READY":
                                result.ready_s = now - started
                                ready.set()
                            elif message.get("status") in ("WAIT", "ERROR"):
                                result.errors.append(f"{message['status']}: {message.get('message')}")
                                ready.set()
                            elif message.get("message") == "DISCONNECT":
                                result.errors.append("DISCONNECT")

                await ws.send(json.dumps(whisperlive_options(use_vad)))
                reader = asyncio.ensure_future(receive())
                try:
                    with contextlib.suppress(asyncio.TimeoutError):
                        async with timeout(ready_timeout_s):
                            await asyncio.wait(
                                [reader, asyncio.ensure_future(ready.wait())],
                                return_when=asyncio.FIRST_COMPLETED,
                            )
                    if not ready.is_set() or result.errors:
                        if not result.errors:
                            result.errors.append(f"no SERVER_READY in {ready_timeout_s:.0f} s")
                        return result
                    paced_from = time.monotonic()
                    while position < total:
                        n = min(chunk, total - position)
                        piece = common.looped_pcm(material, 0.0, position, n)
                        due = paced_from + (position + n) / rate / speed
                        delay = due - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)
                        await ws.send((piece.astype(np.float32) / 32768.0).astype("<f4").tobytes())
                        position += n
                        sent_samples.append(position)
                        sent_at.append(time.monotonic())
                    silence = np.zeros(chunk, dtype="<f4").tobytes()
                    flush_end = position + int(flush_max_s * rate)
                    while spans and not matched[-1] and position < flush_end:
                        due = paced_from + (position + chunk) / rate / speed
                        delay = due - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)
                        await ws.send(silence)
                        position += chunk
                        sent_samples.append(position)
                        sent_at.append(time.monotonic())
                    result.flush_s = (position - total) / rate
                    result.last_final = bool(spans) and matched[-1]
                    await ws.send(b"END_OF_AUDIO")
                    await reader
                finally:
                    if not reader.done():
                        reader.cancel()
                result.close_code = ws.close_code
                if ws.close_code != 1000:
                    result.errors.append(f"close {ws.close_code} {ws.close_reason}")
    except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
        result.errors.append(f"timeout after {timeout_s:.0f} s")
    except InvalidStatus as exc:
        result.errors.append(f"refused: HTTP {exc.response.status_code}")
    except (OSError, ConnectionClosed) as exc:
        result.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        result.wall_s = time.monotonic() - started
        result.audio_s = position / rate
        complete = [i for i, s in enumerate(spans) if s.end_s <= result.audio_s]
        result.sentences_sent = len(complete)
        result.sentences_matched = sum(1 for i in complete if matched[i])
        if keep_text:
            result.transcript = " ".join(texts)
            result.reference = " ".join(spans[i].text for i in complete)
    return result


# --------------------------------------------------------------------------------------------------
# Material

QUICK_SENTENCES = ("Good morning everyone.", "Can you hear me now?", "Thank you all for coming today.")

MATERIALS: dict[str, Callable[..., common.Material]] = {
    "conversation": lambda count, seed: common.conversation(count=count, seed=seed),
    "call": lambda count, seed: common.first_utterances(common.recorded_conversation(seed=seed), count),
}
"""Named materials: ``builder(count=K, seed=S) -> common.Material`` (K sentences or utterances)."""


def resolve_material(name: str) -> Callable[..., common.Material]:
    """A named material from :data:`MATERIALS`, or ``module:function`` (``common:recorded_conversation``).

    A ``module:function`` builder gets the ``count`` and ``seed`` keyword arguments it accepts (as
    ``common.conversation`` does); one that takes neither is called with no arguments.
    """
    if name in MATERIALS:
        return MATERIALS[name]
    module_name, sep, attr = name.partition(":")
    if not sep:
        raise SystemExit(f"unknown material {name!r}: one of {sorted(MATERIALS)} or module:function")
    builder = getattr(importlib.import_module(module_name), attr)
    accepted = set(inspect.signature(builder).parameters)

    def call(count: int, seed: int) -> common.Material:
        kwargs = {k: v for k, v in (("count", count), ("seed", seed)) if k in accepted}
        material = builder(**kwargs)
        assert isinstance(material, common.Material), f"{name} returned {type(material).__name__}"
        return material

    return call


def with_tail(material: common.Material, tail_s: float) -> common.Material:
    """The material followed by ``tail_s`` of digital silence (same spans)."""
    tail = np.zeros(round(tail_s * common.SAMPLE_RATE_HZ), dtype=np.int16)
    return common.Material(
        np.concatenate([material.pcm, tail]).astype(np.int16),
        list(material.spans),
        list(material.pause_mids_s),
    )


def has_text(material: common.Material) -> bool:
    """Every utterance has its text (a WER over part of the speech would mean nothing)."""
    return bool(material.spans) and all(s.text.strip() for s in material.spans)


# --------------------------------------------------------------------------------------------------
# Steps


@dataclass
class StepResult:
    """One system at one N."""

    system: str
    n: int
    latencies_s: list[float] = field(default_factory=list)
    finals: int = 0
    sentences_sent: int = 0
    sentences_matched: int = 0
    unmatched_finals: int = 0
    overlapping_finals: int = 0
    early_end_finals: int = 0
    future_finals: int = 0
    flush_s: list[float] = field(default_factory=list)
    last_final_missing: int = 0
    wer: float = math.nan
    cpu: float = math.nan
    rss_mean_mb: float = math.nan
    rss_max_mb: float = math.nan
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    load_after: str = ""

    def p(self, q: float) -> float:
        return common.percentile(self.latencies_s, q)

    def as_dict(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "n": self.n,
            "latencies_s": [round(x, 4) for x in self.latencies_s],
            "p50": self.p(50),
            "p95": self.p(95),
            "p99": self.p(99),
            "finals": self.finals,
            "sentences_sent": self.sentences_sent,
            "sentences_matched": self.sentences_matched,
            "unmatched_finals": self.unmatched_finals,
            "overlapping_finals": self.overlapping_finals,
            "early_end_finals": self.early_end_finals,
            "future_finals": self.future_finals,
            "flush_s": self.flush_s,
            "last_final_missing": self.last_final_missing,
            "wer": self.wer,
            "cpu_percent": self.cpu,
            "rss_mean_mb": self.rss_mean_mb,
            "rss_max_mb": self.rss_max_mb,
            "errors": self.errors,
            "wall_s": self.wall_s,
            "load_after": self.load_after,
        }


SessionFn = Callable[[float], Any]
"""``start_at -> awaitable SessionResult`` for one session."""


def pooled_wer(results: Sequence[common.SessionResult]) -> float:
    """WER over all sessions: each session's WER weighted by its reference words."""
    words = [len(normalize_text(r.reference)) for r in results]
    if sum(words) == 0:
        return math.nan
    return sum(
        word_error_rate(r.reference, r.transcript) * w for r, w in zip(results, words, strict=True)
    ) / sum(words)


def run_step(system: str, n: int, pid: int, session: SessionFn, stagger_s: float, text: bool) -> StepResult:
    """N sessions of ``session`` staggered by ``stagger_s``, with the server process sampled meanwhile."""
    step = StepResult(system, n)
    sampler = common.ProcessSampler(pid, interval_s=0.5).start()
    t0 = time.monotonic() + 0.5

    async def all_sessions() -> list[common.SessionResult]:
        return list(await asyncio.gather(*(session(t0 + i * stagger_s) for i in range(n))))

    try:
        results = asyncio.run(all_sessions())
    finally:
        t1 = time.monotonic()
        sampler.stop()
    step.wall_s = t1 - t0
    step.cpu, step.rss_mean_mb, step.rss_max_mb = sampler.window(t0, t1)
    for r in results:
        step.latencies_s.extend(r.final_latencies_s)
        step.finals += r.finals
        step.sentences_sent += r.sentences_sent
        step.sentences_matched += r.sentences_matched
        step.unmatched_finals += r.unmatched_finals
        if isinstance(r, PeerSessionResult):
            step.overlapping_finals += r.overlapping_finals
            step.early_end_finals += r.early_end_finals
            step.future_finals += r.future_finals
            step.flush_s.append(r.flush_s)
            step.last_final_missing += 0 if r.last_final else 1
        step.errors.extend(r.errors)
    if text:
        step.wer = pooled_wer(results)
    step.load_after = common.loadavg()
    return step


def peer_note(step: StepResult) -> str:
    """What only WhisperLive's side shows: the flush silence, and finals it never sent or mis-timed."""
    flush = step.flush_s or [0.0]
    return (
        f"flush silence after the material: mean {np.mean(flush):.1f} s, max {max(flush):.1f} s; "
        f"last sentence never final in {step.last_final_missing}/{step.n} sessions; "
        f"finals ending before their sentence: {step.early_end_finals}; "
        f"finals timed after the audio sent: {step.future_finals}; "
        f"overlapping completed segments ignored: {step.overlapping_finals}"
    )


HEADER = (
    f"{'system':<12} {'N':>2} {'finals':>6} {'matched':>9} {'lat n':>5} {'p50':>6} {'p95':>6} {'p99':>6} "
    f"{'max':>6} {'WER %':>6} {'CPU %':>6} {'RSS MB mean/max':>15}  errors"
)


def row(step: StepResult) -> str:
    lat = step.latencies_s
    wer = "-" if math.isnan(step.wer) else f"{100 * step.wer:.1f}"
    cpu = "-" if math.isnan(step.cpu) else f"{step.cpu:.0f}"
    rss = "-" if math.isnan(step.rss_mean_mb) else f"{step.rss_mean_mb:.0f}/{step.rss_max_mb:.0f}"
    errors = "none" if not step.errors else f"{len(step.errors)}: " + "; ".join(sorted(set(step.errors))[:3])
    return (
        f"{step.system:<12} {step.n:>2} {step.finals:>6} "
        f"{step.sentences_matched:>4}/{step.sentences_sent:<4} "
        f"{len(lat):>5} {common.fmt_s(step.p(50)):>6} {common.fmt_s(step.p(95)):>6} "
        f"{common.fmt_s(step.p(99)):>6} {common.fmt_s(max(lat) if lat else math.nan):>6} {wer:>6} "
        f"{cpu:>6} {rss:>15}  {errors}"
    )


# --------------------------------------------------------------------------------------------------
# The two systems


def run_ours(
    args: argparse.Namespace, material: common.Material, warmup: common.Material
) -> list[StepResult]:
    """Our server (``--model tiny.en``) through every N."""
    # Admission by measured capacity off, as WhisperLive has none (max_clients only): every N is admitted.
    server_args = common.server_args(
        args, "tiny.en", "--admission", "false", "--max-sessions", str(max(args.ns) + 4)
    )
    server = common.ServerProcess(server_args, env=dict(OFFLINE_ENV))
    print("ours: " + " ".join(server.command()))
    steps: list[StepResult] = []
    params: dict[str, Any] = {"punctuate": True}
    if args.endpointing is not None:
        params["endpointing"] = args.endpointing
    timeout_s = material.duration_s + args.stagger_max_s + 180
    with server:
        info = server.health.get("model", {})
        warm = asyncio.run(
            common.stream_session(server.ws_url, warmup, duration_s=warmup.duration_s, params=params)
        )
        print(
            f"  ready in {server.ready_s:.1f} s: {info.get('name')} {info.get('dtype')} on "
            f"{info.get('device')}, "
            f"{info.get('threads', '?')} threads; warm-up session: {warm.finals} finals, errors "
            f"{warm.errors or 'none'}; idle RSS {common.rss_mb(server.pid):.0f} MB; its own capacity "
            f"estimate: {server.health.get('capacity', {}).get('capacity_sessions', '?')} sessions "
            "(admission by capacity off here)"
        )
        for n in args.ns:

            def session(start_at: float) -> Any:
                return common.stream_session(
                    server.ws_url,
                    material,
                    duration_s=material.duration_s,
                    chunk_ms=args.chunk_ms,
                    params=params,
                    start_at=start_at,
                    keep_text=True,
                    timeout_s=timeout_s,
                    tolerance_s=args.tolerance_s,
                )

            step = run_step("ours", n, server.pid, session, stagger(args, material, n), has_text(material))
            server.check_alive()
            print(row(step), flush=True)
            steps.append(step)
            time.sleep(args.settle_s)
    return steps


def run_whisperlive(
    args: argparse.Namespace, material: common.Material, warmup: common.Material
) -> list[StepResult]:
    """WhisperLive (same tiny.en folder) through every N."""
    from stream_server.engines.whisper import bundled_model_dir

    if installed_whisperlive_version(args.venv) != WHISPERLIVE_VERSION:
        if args.no_install:
            raise SystemExit(f"WhisperLive {WHISPERLIVE_VERSION} is not installed in {args.venv} (--install)")
        print(f"installing WhisperLive {WHISPERLIVE_VERSION} into {args.venv} (PyPI)")
        install_whisperlive(args.venv)
    if max(args.ns) > args.whisperlive_max_clients:
        raise SystemExit(f"N={max(args.ns)} exceeds --whisperlive-max-clients {args.whisperlive_max_clients}")
    model_dir = bundled_model_dir()
    server = WhisperLiveProcess(
        args.venv, model_dir, max_clients=args.whisperlive_max_clients, log_path=args.whisperlive_log
    )
    print("whisperlive: " + " ".join(server.command()[:2]) + " <launcher> " + " ".join(server.command()[3:]))
    steps: list[StepResult] = []
    timeout_s = material.duration_s + args.stagger_max_s + 180
    use_vad = not args.whisperlive_no_vad
    with server:
        started = time.monotonic()
        warm = asyncio.run(
            whisperlive_session(
                server.url, warmup, duration_s=warmup.duration_s, use_vad=use_vad, ready_timeout_s=300
            )
        )
        server.check_alive()
        if warm.errors:
            server.failed = True
            raise common.ServerError(f"WhisperLive warm-up failed: {warm.errors}\n{server.log_tail()}")
        print(
            f"  port open, then model loaded at the first connection in {warm.ready_s:.1f} s "
            f"(warm-up session {time.monotonic() - started:.1f} s, {warm.finals} finals); "
            f"VAD {'on' if use_vad else 'off'}; idle RSS {common.rss_mb(server.pid):.0f} MB"
        )
        time.sleep(args.settle_s)
        for n in args.ns:
            traces: list[list[dict[str, Any]]] = []

            def session(start_at: float, traces: list[list[dict[str, Any]]] = traces) -> Any:
                traces.append([])
                return whisperlive_session(
                    server.url,
                    material,
                    duration_s=material.duration_s,
                    chunk_ms=args.chunk_ms,
                    start_at=start_at,
                    keep_text=True,
                    use_vad=use_vad,
                    timeout_s=timeout_s,
                    tolerance_s=args.tolerance_s,
                    flush_max_s=args.flush_max_s,
                    trace=traces[-1] if args.trace else None,
                )

            step = run_step(
                "whisperlive", n, server.pid, session, stagger(args, material, n), has_text(material)
            )
            if args.trace:
                write_trace(args.trace, n, traces, material)
            server.check_alive()
            print(row(step), flush=True)
            print("             " + peer_note(step), flush=True)
            steps.append(step)
            time.sleep(args.settle_s)
    return steps


def write_trace(
    path: Path, n: int, traces: Sequence[list[dict[str, Any]]], material: common.Material
) -> None:
    """Append one JSON line per session (WhisperLive's messages, and the sentences' true times)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    spans = [{"text": s.text, "start": round(s.start_s, 3), "end": round(s.end_s, 3)} for s in material.spans]
    with path.open("a") as out:
        for i, messages in enumerate(traces):
            out.write(json.dumps({"n": n, "session": i, "spans": spans, "messages": messages}) + "\n")


def stagger(args: argparse.Namespace, material: common.Material, n: int) -> float:
    """Seconds between session starts: one mean sentence period (or ``--stagger-max-s``) spread over N."""
    period = material.duration_s / max(1, len(material.spans))
    return min(period, args.stagger_max_s) / n if n > 1 else 0.0


# --------------------------------------------------------------------------------------------------
# The command line


def parse_ns(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ns", type=parse_ns, default=[1, 2, 4], help="concurrent sessions per step (1,2,4)")
    parser.add_argument("--only", choices=("both", "ours", "whisperlive"), default="both")
    parser.add_argument("--material", default="conversation", help="a name, or module:function")
    parser.add_argument("--sentences", type=int, default=14, help="sentences each session streams")
    parser.add_argument("--seed", type=int, default=3, help="the material's seed")
    parser.add_argument("--tail-s", type=float, default=4.0, help="silence after the material (both systems)")
    parser.add_argument("--chunk-ms", type=int, default=100, help="audio per WebSocket frame")
    parser.add_argument(
        "--stagger-max-s", type=float, default=8.0, help="cap on the spread of session starts"
    )
    parser.add_argument("--tolerance-s", type=float, default=0.5, help="a final may end this early (s)")
    parser.add_argument("--settle-s", type=float, default=3.0, help="pause between steps")
    parser.add_argument(
        "--quick", action="store_true", help="N=1, three sentences (smoke test, ~30 s per system)"
    )
    parser.add_argument("--out", type=Path, default=common.OUT_DIR / "peers.json", help="raw results (JSON)")
    ours = parser.add_argument_group("our server")
    ours.add_argument("--dtype", default="auto", choices=("auto", "fp32", "int8"))
    ours.add_argument("--threads", type=int, default=0, help="model threads (0: every core)")
    ours.add_argument("--max-batch-size", type=int, default=0, help="0: the server's default")
    ours.add_argument("--endpointing", type=int, default=None, help="client endpointing in ms (default: 500)")
    ours.add_argument("--server-arg", action="append", default=[], help="another server flag (repeat)")
    peer = parser.add_argument_group("WhisperLive")
    peer.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="its virtual environment")
    peer.add_argument("--install", action="store_true", help="create the venv when missing, then exit")
    peer.add_argument("--reinstall", action="store_true", help="delete and re-create the venv, then exit")
    peer.add_argument("--no-install", action="store_true", help="fail instead of installing when missing")
    peer.add_argument("--whisperlive-max-clients", type=int, default=16)
    peer.add_argument(
        "--flush-max-s",
        type=float,
        default=30.0,
        help="more silence (at most this long) until WhisperLive finalizes the last sentence",
    )
    peer.add_argument("--whisperlive-log", type=Path, default=None, help="keep its log here")
    peer.add_argument("--trace", type=Path, default=None, help="append its messages to this JSONL file")
    peer.add_argument("--whisperlive-no-vad", action="store_true", help="send use_vad false")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress in logs
    if args.install or args.reinstall:
        python = install_whisperlive(args.venv, force=args.reinstall)
        print(f"WhisperLive {installed_whisperlive_version(args.venv)} ready: {python}")
        return 0
    if args.quick:
        args.ns = [1]
        body = common.conversation(QUICK_SENTENCES, pauses_s=(1.0,), seed=1)
    else:
        body = resolve_material(args.material)(count=args.sentences, seed=args.seed)
    material = with_tail(body, args.tail_s)
    warmup = with_tail(common.conversation(QUICK_SENTENCES[:1], pauses_s=(0.5,), seed=0), 2.5)
    print(f"machine: {common.machine_line()}")
    load_before = common.loadavg()
    endpointing = f"{args.endpointing} ms (client)" if args.endpointing else "500 ms (server default)"
    print(
        f"material: {args.material if not args.quick else 'quick'}: {len(body.spans)} sentences, "
        f"{body.duration_s:.1f} s (speech {100 * body.speech_ratio:.0f} %) + {args.tail_s:g} s of silence; "
        f"real-time pace, {args.chunk_ms} ms chunks; N = {', '.join(map(str, args.ns))}; "
        f"sessions staggered over {stagger(args, material, 2) * 2:.1f} s; ours: endpointing {endpointing}"
    )
    steps: list[StepResult] = []
    print(HEADER)
    if args.only in ("both", "ours"):
        steps += run_ours(args, material, warmup)
        print(f"load average after ours: {common.loadavg()}")
    if args.only in ("both", "whisperlive"):
        steps += run_whisperlive(args, material, warmup)
        print(f"load average after whisperlive: {common.loadavg()}")
    print(f"\nload average: before {load_before}; after {common.loadavg()}")
    print(HEADER)
    for step in steps:
        print(row(step))
    by_key = {(s.system, s.n): s for s in steps}
    for n in args.ns:
        a, b = by_key.get(("ours", n)), by_key.get(("whisperlive", n))
        if a is None or b is None:
            continue
        ratios = [a.p(q) / b.p(q) if b.p(q) > 0 else math.nan for q in (50, 95)]
        print(f"ratio ours/whisperlive, N={n}: p50 {ratios[0]:.2f}, p95 {ratios[1]:.2f}")
    with contextlib.suppress(OSError):
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "machine": common.machine_line(),
                    "argv": sys.argv[1:] if argv is None else list(argv),
                    "material_s": material.duration_s,
                    "steps": [s.as_dict() for s in steps],
                },
                indent=1,
                default=str,
            )
        )
        print(f"raw results: {args.out}")
    ok = all(not s.errors and s.latencies_s for s in steps)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
