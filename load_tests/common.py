"""What every load test shares: a real server subprocess, process sampling, /metrics, speech material
with known sentence times, and a streaming client that measures latency from ground truth.

* :class:`ServerProcess` starts ``python -m stream_server --host 127.0.0.1 --port <free> ...`` as a real
  subprocess, waits for ``/health`` to say ready (bounded), and stops it (SIGTERM, bounded wait, kill).
* :class:`ProcessSampler` samples a process's CPU time and RSS in a thread; :func:`peak_rss_reset` and
  :func:`peak_rss_mb` read and reset the kernel's own high-water mark (``VmHWM``), which misses nothing.
* :func:`scrape_metrics` reads ``/metrics`` (Prometheus text) into a dict.
* :class:`Material` is looped speech: espeak-ng sentences (``speech_with_pauses``, trimmed to the
  sample) joined by pauses this module chooses, with every sentence's exact start and end.
* :func:`stream_session` streams material through one WebSocket session, at real-time pace or as fast
  as the server takes it, and measures

  - **end-of-speech-to-final latency** from ground truth: a final is matched to the sentences whose
    midpoints lie inside its span; the end of speech is the end of the last of them; the latency is the
    final's arrival time minus the wall time the client sent the chunk holding that last speech sample.
    Only finals that ended on a pause (``speech_final``) count; the model's own word times are never
    used (a random-weight model's words are meaningless). It includes the endpointing silence by
    definition.
  - **interim latency**: the interim's arrival time minus the time the client sent the chunk holding
    the end of its window (``start + duration``).

Everything talks to 127.0.0.1 only, and every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import psutil

from stream_server.client import listen_url
from stream_server.compat import timeout
from stream_server.testing.speech import (
    MEETING_CLIPS,
    RECORDED_SPEECH,
    read_wav,
    recorded_speaker_turns,
    recorded_speech,
    recorded_transcript,
    sentence_spans,
    speech_with_pauses,
)
from stream_server.testing.truth import frame_levels_db, speech_runs

SAMPLE_RATE_HZ = 16000
OUT_DIR = Path(__file__).resolve().parent / "out"
"""Where logs, CSV files and plots go (git-ignored)."""

Int16Array = npt.NDArray[np.int16]

# Plain sentences without commas (espeak pauses at commas), 100 words per minute: 1.5-5 s each.
SENTENCES: tuple[str, ...] = (
    "Good morning everyone.",
    "Please remember to bring your notebooks to the meeting on Friday afternoon.",
    "The quick brown fox jumps over the lazy dog.",
    "We should finish the report before the end of the week.",
    "Can you hear me now?",
    "The weather today is sunny with a light breeze from the west.",
    "Let us look at the numbers from the last quarter.",
    "I think we need more time to test the new release.",
    "Thank you all for coming today.",
    "The train to the city leaves every twenty minutes.",
    "She opened the window and let the fresh air into the room.",
    "Our team will present the results next Monday.",
    "Does anyone have a question about the budget?",
    "The library closes at nine in the evening.",
    "He bought a loaf of bread and a bottle of milk.",
    "Please send me the slides after the call.",
    "The children played in the park until it got dark.",
    "We moved the server to a bigger machine last night.",
    "That sounds like a good plan to me.",
    "The museum has a new exhibition about the ocean.",
    "I will call the customer back in the morning.",
    "The coffee machine on the second floor is broken again.",
    "Let me share my screen so everyone can see the chart.",
    "The meeting is over and we can all go home.",
    "Our new office has a view of the river.",
    "The package should arrive before noon tomorrow.",
    "Turn left at the next corner and walk two blocks.",
    "Most people prefer to work from home on Fridays.",
)


def add_engine_arguments(parser: argparse.ArgumentParser, default_model: str) -> None:
    """The engine flags of the scripts that start a server with :func:`server_args` and let the user
    pick backend and workers: model, dtype, backend, workers, threads, max batch size."""
    parser.add_argument("--model", default=default_model, help="a SenseVoice folder, or tiny.en")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "int8"))
    parser.add_argument("--backend", default=None, choices=("auto", "onnx", "torch"), help="server default")
    parser.add_argument("--workers", type=int, default=None, help="engine workers (server default)")
    parser.add_argument("--threads", type=int, default=0, help="threads per worker (0: the server default)")
    parser.add_argument("--max-batch-size", type=int, default=0, help="0: the server's default")


def server_args(args: Any, model: str, *extra: str) -> list[str]:
    """The server's command-line flags shared by the scripts (model, dtype, threads, batch, and backend
    and workers when the script has them), then ``extra``, then the user's ``--server-arg`` flags."""
    return [
        "--model",
        model,
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
        "--max-batch-size",
        str(args.max_batch_size),
        *(["--backend", args.backend] if getattr(args, "backend", None) else []),
        *(["--workers", str(args.workers)] if getattr(args, "workers", None) else []),
        *extra,
        "--log-level",
        "warning",
        *args.server_arg,
    ]


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, as ``/proc/loadavg`` gives them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_line() -> str:
    """One line about this machine: cores, memory, load."""
    mem_gb = psutil.virtual_memory().total / 2**30
    return f"{os.cpu_count()} cores, {mem_gb:.0f} GB RAM; load average {loadavg()}"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (linear interpolation between closest ranks), NaN when empty."""
    if not values:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def fmt_s(value: float) -> str:
    """Seconds as ``0.412`` (or ``-`` when NaN)."""
    return "-" if math.isnan(value) else f"{value:.3f}"


# --------------------------------------------------------------------------------------------------
# The server process


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """GET a 127.0.0.1 URL; returns (status, body), also for HTTP error statuses."""
    assert url.startswith("http://127.0.0.1:"), url
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


class ServerError(RuntimeError):
    """The server did not start, or died."""


class ServerProcess:
    """``python -m stream_server`` on 127.0.0.1 as a real subprocess.

    Args:
        args: server flags after host and port (``--model PATH --dtype int8 ...``).
        ready_timeout_s: how long to wait for ``/health`` to report ready.
        log_path: where the server's output goes (default: a temporary file).
        env: more environment variables for it.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        ready_timeout_s: float = 600.0,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = list(args)
        self.env = dict(env or {})
        self.ready_timeout_s = ready_timeout_s
        self.port = free_port()
        self._own_log = log_path is None
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="stream-server-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None
        self.health: dict[str, Any] = {}
        self.ready_s = math.nan

    @property
    def base_http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/listen"

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def command(self) -> list[str]:
        """The exact command line."""
        return [sys.executable, "-m", "stream_server", "--host", "127.0.0.1", "--port", str(self.port)] + [
            *self.args
        ]

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def start(self) -> ServerProcess:
        """Start it and wait until ``/health`` says ready.

        Raises:
            ServerError: it exited or did not become ready in time (with its log's tail).
        """
        started = time.monotonic()
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )
        deadline = started + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise ServerError(f"server exited with {self.popen.returncode}:\n{self.log_tail()}")
            try:
                status, body = http_get(self.base_http + "/health", timeout_s=2.0)
            except OSError:
                status, body = 0, b""
            if status == 200:
                self.health = json.loads(body)
                self.ready_s = time.monotonic() - started
                return self
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"server not ready in {self.ready_timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL. Returns the exit status.

        A temporary log is deleted after a clean exit (0) and kept (and named) otherwise.
        """
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        code = self.popen.returncode
        if self._own_log and code == 0:
            self.log_path.unlink(missing_ok=True)
        elif code != 0:
            print(f"server exited with {code}; its log: {self.log_path}", file=sys.stderr)
        return code

    def check_alive(self) -> None:
        """Raises ServerError when the process has exited."""
        if self.popen is not None and self.popen.poll() is not None:
            raise ServerError(f"server died with {self.popen.returncode}:\n{self.log_tail()}")

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def scrape_metrics(server: ServerProcess) -> dict[str, float]:
    """``/metrics`` as ``{"name{labels}": value}`` (label text kept verbatim)."""
    status, body = http_get(server.base_http + "/metrics")
    if status != 200:
        raise ServerError(f"/metrics answered {status}")
    values: dict[str, float] = {}
    for line in body.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            values[key] = float(value)
    return values


def metric(values: dict[str, float], name: str, default: float = math.nan, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (``default`` when absent)."""
    found = math.nan
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if any(f'{k}="{v}"' not in rest for k, v in labels.items()):
            continue
        found = value if math.isnan(found) else found + value
    return default if math.isnan(found) else found


# --------------------------------------------------------------------------------------------------
# Sampling a process


def peak_rss_reset(pid: int) -> bool:
    """Reset the kernel's RSS high-water mark of ``pid`` (``echo 5 > /proc/PID/clear_refs``).

    Returns:
        False where that is not allowed (then :func:`peak_rss_mb` includes earlier peaks).
    """
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb(pid: int) -> float:
    """The kernel's RSS high-water mark of ``pid`` (``VmHWM``) since start or the last reset, in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else math.nan


@dataclass(frozen=True)
class Sample:
    """One reading of a process: monotonic time, CPU seconds (user + system), RSS bytes."""

    t_s: float
    cpu_s: float
    rss_bytes: int


class ProcessSampler:
    """Samples a process every ``interval_s`` in a daemon thread (bounded: at most ``max_samples``)."""

    def __init__(self, pid: int, interval_s: float = 1.0, max_samples: int = 100_000) -> None:
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.max_samples = max_samples
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="sampler")

    def sample(self) -> Sample | None:
        try:
            with self.process.oneshot():
                times = self.process.cpu_times()
                rss = self.process.memory_info().rss
        except psutil.Error:
            return None
        return Sample(time.monotonic(), times.user + times.system, rss)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.samples) < self.max_samples:
            reading = self.sample()
            if reading is not None:
                self.samples.append(reading)
            self._stop.wait(self.interval_s)

    def start(self) -> ProcessSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def window(self, t0: float, t1: float) -> tuple[float, float, float]:
        """(CPU % over [t0, t1] (100 = one core), mean RSS MB, max RSS MB) from the samples inside."""
        inside = [s for s in self.samples if t0 <= s.t_s <= t1]
        if len(inside) < 2:
            return math.nan, math.nan, math.nan
        cpu = 100 * (inside[-1].cpu_s - inside[0].cpu_s) / (inside[-1].t_s - inside[0].t_s)
        rss = [s.rss_bytes / 2**20 for s in inside]
        return cpu, float(np.mean(rss)), max(rss)


def rss_mb(pid: int) -> float:
    """Current RSS of ``pid`` in MB."""
    return float(psutil.Process(pid).memory_info().rss) / 2**20


# --------------------------------------------------------------------------------------------------
# Speech material


@dataclass(frozen=True)
class Span:
    """A sentence's speech in a material (seconds from its start), and its text."""

    text: str
    start_s: float
    end_s: float

    @property
    def mid_s(self) -> float:
        return (self.start_s + self.end_s) / 2


@dataclass
class Material:
    """Mono 16 kHz speech and the exact place of every sentence in it.

    Attributes:
        pcm: the samples.
        spans: every sentence, in order.
        pause_mids_s: the middle of every pause (good places to start a session in the loop).
    """

    pcm: Int16Array
    spans: list[Span]
    pause_mids_s: list[float] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / SAMPLE_RATE_HZ

    @property
    def speech_ratio(self) -> float:
        return sum(s.end_s - s.start_s for s in self.spans) / self.duration_s

    def start_offset_s(self, fraction: float) -> float:
        """The pause middle nearest to ``fraction`` of the way through (0 for none)."""
        if not self.pause_mids_s:
            return 0.0
        target = (fraction % 1.0) * self.duration_s
        return min(self.pause_mids_s, key=lambda m: abs(m - target))


def sentence_audio(text: str) -> Int16Array:
    """One espeak sentence, trimmed to its first and last non-silent sample (via ``speech_with_pauses``)."""
    path = speech_with_pauses([text], pause_s=0.0)
    samples, rate_hz, channels = read_wav(path)
    assert rate_hz == SAMPLE_RATE_HZ and channels == 1, path
    (span,) = sentence_spans(path)
    return samples[round(span.start_s * SAMPLE_RATE_HZ) : round(span.end_s * SAMPLE_RATE_HZ)]


class MaterialBuilder:
    """Appends sentences and silences, tracking every sentence's span."""

    def __init__(self) -> None:
        self._pieces: list[Int16Array] = []
        self._samples = 0
        self.spans: list[Span] = []
        self.pause_mids_s: list[float] = []

    def silence(self, seconds: float) -> None:
        n = round(seconds * SAMPLE_RATE_HZ)
        if n <= 0:
            return
        self.pause_mids_s.append((self._samples + n / 2) / SAMPLE_RATE_HZ)
        self._pieces.append(np.zeros(n, dtype=np.int16))
        self._samples += n

    def sentence(self, text: str) -> None:
        audio = sentence_audio(text)
        start = self._samples
        self._pieces.append(audio)
        self._samples += len(audio)
        self.spans.append(Span(text, start / SAMPLE_RATE_HZ, self._samples / SAMPLE_RATE_HZ))

    def recorded(self, pcm: Int16Array, spans: Sequence[Span]) -> None:
        """Append a piece of a recording whose speech runs (in its own seconds) are ``spans``."""
        offset_s = self._samples / SAMPLE_RATE_HZ
        previous_end = None
        for span in spans:
            if previous_end is not None:
                self.pause_mids_s.append(offset_s + (previous_end + span.start_s) / 2)
            self.spans.append(Span(span.text, offset_s + span.start_s, offset_s + span.end_s))
            previous_end = span.end_s
        self._pieces.append(pcm.astype(np.int16))
        self._samples += len(pcm)

    def noise(self, bed: Int16Array, seconds: float, rng: random.Random) -> None:
        """Append ``seconds`` of a noise bed from a random place in it (looped), as a pause."""
        n = round(seconds * SAMPLE_RATE_HZ)
        if n <= 0 or len(bed) == 0:
            return
        start = rng.randrange(len(bed))
        self.pause_mids_s.append((self._samples + n / 2) / SAMPLE_RATE_HZ)
        self._pieces.append(bed[(np.arange(n) + start) % len(bed)])
        self._samples += n

    def build(self) -> Material:
        pcm = np.concatenate(self._pieces) if self._pieces else np.zeros(0, dtype=np.int16)
        return Material(pcm.astype(np.int16), list(self.spans), list(self.pause_mids_s))


def conversation(
    sentences: Sequence[str] = SENTENCES,
    *,
    pauses_s: Sequence[float] = (0.8, 1.0, 1.5, 2.0, 3.0),
    seed: int = 0,
    count: int | None = None,
) -> Material:
    """Sentences in a seeded random order, each followed by a pause drawn from ``pauses_s``.

    Every pause must exceed the endpointing used, so every sentence is its own segment.
    """
    rng = random.Random(seed)
    order = list(sentences)
    rng.shuffle(order)
    if count is not None:
        order = (order * (count // len(order) + 1))[:count]
    builder = MaterialBuilder()
    builder.silence(rng.choice(pauses_s))
    for text in order:
        builder.sentence(text)
        builder.silence(rng.choice(pauses_s))
    return builder.build()


def meeting(
    *,
    speech_ratio: float = 0.25,
    monologue_sentences: int = 9,
    seed: int = 0,
) -> Material:
    """One participant's microphone in a meeting, about 10 minutes, looped by the soak.

    Turns of one to three sentences with short pauses (0.8-1.5 s), long stretches of listening
    (silence), and two monologues of ``monologue_sentences`` sentences joined by 0.12 s gaps (shorter
    than any endpointing), over 30 s each, so they hit the ``--max-segment-ms`` cut (20 s by default).
    Silence is added until speech makes up about ``speech_ratio`` of the whole.
    """
    rng = random.Random(seed)
    builder = MaterialBuilder()
    pool = list(SENTENCES)
    turns: list[list[str]] = []
    for _ in range(2):
        rng.shuffle(pool)
        turns.append(pool[:monologue_sentences])  # a monologue
        for i in range(monologue_sentences, len(pool) - 2, 3):
            turns.append(pool[i : i + rng.choice((1, 2, 3))])
    speech_s = sum(len(sentence_audio(t)) for turn in turns for t in turn) / SAMPLE_RATE_HZ
    total_s = speech_s / max(0.05, min(1.0, speech_ratio))
    # Silence to spread between turns, beyond the short pauses inside turns.
    inner = sum(len(turn) - 1 for turn in turns)
    listening_s = max(0.0, total_s - speech_s - inner * 1.0)
    weights = [rng.uniform(0.2, 1.8) for _ in turns]
    for turn, weight in zip(turns, weights, strict=True):
        builder.silence(max(0.8, listening_s * weight / sum(weights)))
        monologue = len(turn) == monologue_sentences
        for j, text in enumerate(turn):
            if j:
                builder.silence(0.12 if monologue else rng.uniform(0.8, 1.5))
            builder.sentence(text)
    builder.silence(1.0)
    return builder.build()


# Real recordings (fetched from PyPI by stream_server.testing.speech; never committed).

RECORDED_NAMES: tuple[str, ...] = ("dialogue", *MEETING_CLIPS, "lecture", "news")
"""Every real recording the load tests use: a telephone call, 15 AMI meeting clips, a lecture, a news clip."""

TURN_PAD_S = 0.25
"""Annotated speaker turns are loose: a loud frame this far outside one still counts as speech."""

MIN_RUN_LOUD_S = 0.2
"""A run with less loud sound than this is a click or a breath, not an utterance (the server drops
segments with under 200 ms of speech too)."""

CONVERSATION_NAMES: tuple[str, ...] = ("dialogue", *MEETING_CLIPS)
"""The conversational recordings: the telephone call and the meeting clips (no monologues)."""

MATERIALS = ("call", "mix", "espeak")
"""``call``: one side of a conversation of real recorded utterances (:func:`recorded_conversation`);
``mix``: the real recordings as they are (:func:`recorded_material`); ``espeak``: synthetic sentences
with digital silence between them (:func:`conversation`)."""


@dataclass(frozen=True)
class Recording:
    """One real recording and its true runs of speech (``stream_server.testing.truth``)."""

    name: str
    pcm: Int16Array
    runs: list[Span]


def load_recording(name: str, *, min_pause_ms: int) -> Recording:
    """A recording and its runs of speech separated by pauses of ``min_pause_ms`` or more.

    Where the recording has annotated speaker turns, only loud frames inside them (padded by
    ``TURN_PAD_S``) count as speech, so a beep or a door is not taken for a talker. The dialogue's runs
    carry the transcript lines whose middle lies inside them (for WER).
    """
    samples, rate_hz, channels = read_wav(recorded_speech(name))
    assert rate_hz == SAMPLE_RATE_HZ and channels == 1, name
    within = None
    if RECORDED_SPEECH[name].turns_member is not None:
        within = [(t.start_s - TURN_PAD_S, t.end_s + TURN_PAD_S) for t in recorded_speaker_turns(name)]
    runs = [
        r
        for r in speech_runs(samples, min_pause_ms=min_pause_ms, within=within)
        if r.loud_s >= MIN_RUN_LOUD_S
    ]
    lines = recorded_transcript(name) if RECORDED_SPEECH[name].transcript_member is not None else []
    spans = []
    for run in runs:
        text = " ".join(
            line.text for line in lines if run.start_s <= (line.start_s + line.end_s) / 2 <= run.end_s
        )
        spans.append(Span(text, run.start_s, run.end_s))
    return Recording(name, samples, spans)


def recorded_material(names: Sequence[str] = RECORDED_NAMES, *, min_pause_ms: int = 500) -> Material:
    """The recordings as they are, one after another (0.5 s of the next one's own lead-in between): what
    a room microphone or a mixed call sends, speech and natural pauses."""
    builder = MaterialBuilder()
    for name in names:
        rec = load_recording(name, min_pause_ms=min_pause_ms)
        builder.recorded(rec.pcm, rec.runs)
    return builder.build()


def noise_bed(pcm: Int16Array, *, below_db: float = 45.0, frame_ms: int = 10) -> Int16Array:
    """The recording's own background: its frames at least ``below_db`` under its loudest, joined."""
    levels = frame_levels_db(pcm, frame_ms=frame_ms)
    frame = SAMPLE_RATE_HZ * frame_ms // 1000
    quiet = np.flatnonzero(levels <= levels.max() - below_db)
    if len(quiet) < 10:  # hardly any background: the quietest tenth instead
        quiet = np.argsort(levels)[: max(10, len(levels) // 10)]
    return np.concatenate([pcm[i * frame : (i + 1) * frame] for i in sorted(quiet)]).astype(np.int16)


def recorded_conversation(
    *,
    seed: int = 0,
    names: Sequence[str] = CONVERSATION_NAMES,
    min_pause_ms: int = 500,
    listen_s: tuple[float, float] = (1.0, 4.0),
    context_s: float = 0.25,
) -> Material:
    """One side of a conversation made of real recorded speech: every run of speech of the recordings
    (with ``context_s`` of its own room sound either side), in a seeded order, each followed by a pause
    of ``listen_s`` while the other party talks, filled with that recording's own background noise (never
    digital silence). About half of it is speech, as for one party of a call (58 % with the defaults:
    64 utterances, median 2.4 s, 90th percentile 9.6 s, 442 s in all)."""
    rng = random.Random(seed)
    utterances: list[tuple[Int16Array, Span, Int16Array]] = []
    for name in names:
        rec = load_recording(name, min_pause_ms=min_pause_ms)
        bed = noise_bed(rec.pcm)
        n = len(rec.pcm)
        for run in rec.runs:
            a = max(0, round((run.start_s - context_s) * SAMPLE_RATE_HZ))
            b = min(n, round((run.end_s + context_s) * SAMPLE_RATE_HZ))
            span = Span(run.text, run.start_s - a / SAMPLE_RATE_HZ, run.end_s - a / SAMPLE_RATE_HZ)
            utterances.append((rec.pcm[a:b], span, bed))
    rng.shuffle(utterances)
    builder = MaterialBuilder()
    for pcm, span, bed in utterances:
        builder.recorded(pcm, [span])
        builder.noise(bed, rng.uniform(*listen_s), rng)
    return builder.build()


def first_utterances(material: Material, count: int) -> Material:
    """The material up to the middle of the pause after its ``count``-th utterance."""
    if count >= len(material.spans):
        return material
    end_s = material.spans[count - 1].end_s
    cut_s = min((m for m in material.pause_mids_s if m > end_s), default=material.duration_s)
    pcm = material.pcm[: round(cut_s * SAMPLE_RATE_HZ)]
    return Material(pcm, material.spans[:count], [m for m in material.pause_mids_s if m < cut_s])


def material(kind: str, *, seed: int = 0, min_pause_ms: int = 500) -> Material:
    """The named material (:data:`MATERIALS`) for one session; ``seed`` varies its order."""
    if kind == "call":
        return recorded_conversation(seed=seed, min_pause_ms=min_pause_ms)
    if kind == "mix":
        return recorded_material(min_pause_ms=min_pause_ms)
    if kind == "espeak":
        return conversation(seed=seed)
    raise ValueError(f"material must be one of {', '.join(MATERIALS)}, not {kind!r}")


def loop_spans(material: Material, offset_s: float, duration_s: float) -> list[Span]:
    """The sentences of ``material`` looped from ``offset_s``, in session time, wholly inside
    ``[0, duration_s]``."""
    length = material.duration_s
    spans: list[Span] = []
    loops = int(math.ceil((duration_s + offset_s) / length)) + 1
    for k in range(min(loops, 1_000_000)):
        shift = k * length - offset_s
        for s in material.spans:
            start, end = s.start_s + shift, s.end_s + shift
            if start >= 0 and end <= duration_s:
                spans.append(Span(s.text, start, end))
    return spans


def looped_pcm(material: Material, offset_s: float, start_sample: int, count: int) -> Int16Array:
    """``count`` samples of the material looped from ``offset_s``, beginning at session sample
    ``start_sample``."""
    n = len(material.pcm)
    begin = (round(offset_s * SAMPLE_RATE_HZ) + start_sample) % n
    idx = (np.arange(count) + begin) % n
    return material.pcm[idx]


# --------------------------------------------------------------------------------------------------
# One streaming session


@dataclass
class SessionResult:
    """What one session measured.

    Attributes:
        final_latencies_s: end-of-speech-to-final latency per final that ended on a pause.
        final_speech_end_wall_s: for each of those, when (monotonic) its last speech sample was sent.
        interim_latencies_s: per interim: arrival minus the send time of its window end.
        interim_end_wall_s: for each of those, when its window end was sent.
        finals: final Results received (empty ones included).
        cut_finals: finals that did not end on a pause (max-segment cut or Finalize/CloseStream).
        interims: interim Results received.
        unmatched_finals: non-empty finals that contain no sentence.
        sentences_sent: sentences wholly sent.
        sentences_matched: of those, the ones some final contained.
        errors: ``Error`` codes received, refusals and exceptions.
        close_code: the server's close code.
        audio_s: seconds of audio sent.
        wall_s: seconds from connect to close.
        transcript: the finals' texts joined (only with ``keep_text``).
        reference: the sentences wholly sent, joined (only with ``keep_text``).
    """

    final_latencies_s: list[float] = field(default_factory=list)
    final_speech_end_wall_s: list[float] = field(default_factory=list)
    interim_latencies_s: list[float] = field(default_factory=list)
    interim_end_wall_s: list[float] = field(default_factory=list)
    finals: int = 0
    cut_finals: int = 0
    interims: int = 0
    unmatched_finals: int = 0
    sentences_sent: int = 0
    sentences_matched: int = 0
    errors: list[str] = field(default_factory=list)
    close_code: int | None = None
    audio_s: float = 0.0
    wall_s: float = 0.0
    transcript: str = ""
    reference: str = ""


@dataclass
class Progress:
    """Audio sent so far by one session (read by samplers while it runs)."""

    samples_sent: int = 0
    done: bool = False


async def stream_session(
    url: str,
    material: Material,
    *,
    duration_s: float,
    offset_s: float = 0.0,
    speed: float = 1.0,
    chunk_ms: int = 100,
    params: dict[str, Any] | None = None,
    start_at: float | None = None,
    measure: bool = True,
    keep_text: bool = False,
    progress: Progress | None = None,
    timeout_s: float = 600.0,
    tolerance_s: float = 0.05,
    ping_interval_s: float | None = 20.0,
) -> SessionResult:
    """Stream ``duration_s`` of looped material through one session and measure it.

    Args:
        url: ``ws://127.0.0.1:PORT/v1/listen``.
        material: what to loop.
        duration_s: audio to send, then ``CloseStream``.
        offset_s: where in the material to begin.
        speed: times real time; 0 sends as fast as the server takes it (back-pressure paces it).
        chunk_ms: audio per WebSocket frame.
        params: more query parameters (``endpointing``, ``interim_results``...).
        start_at: monotonic time to connect at (staggered starts); None: now.
        measure: record send times and compute latencies (off for long soaks).
        keep_text: keep the transcript and the reference text (for WER).
        progress: updated with the samples sent.
        timeout_s: give up after this long (recorded as an error).
        tolerance_s: a sentence counts as ended inside a final when it ends at most this much after
            the final's end.
        ping_interval_s: websockets' keepalive ping interval and timeout (its default, 20 s; None: off).

    Returns:
        The measurements; failures are in ``errors``, never raised.
    """
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    result = SessionResult()
    if start_at is not None:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    query = {"encoding": "linear16", "sample_rate": SAMPLE_RATE_HZ, "channels": 1, **(params or {})}
    total = int(duration_s * SAMPLE_RATE_HZ)
    chunk = max(1, SAMPLE_RATE_HZ * chunk_ms // 1000)
    spans = loop_spans(material, offset_s, total / SAMPLE_RATE_HZ) if (measure or keep_text) else []
    mids = [s.mid_s for s in spans]
    matched = [False] * len(spans)
    texts: list[str] = []
    sent_samples: list[int] = []
    sent_at: list[float] = []

    def sent_time(t_s: float) -> float | None:
        """When the chunk holding the sample just before session time t_s was sent."""
        i = bisect.bisect_left(sent_samples, round(t_s * SAMPLE_RATE_HZ))
        return sent_at[i] if i < len(sent_at) else None

    def on_final(message: dict[str, Any], now: float) -> None:
        result.finals += 1
        text = message["channel"]["alternatives"][0]["transcript"].strip()
        if keep_text and text:
            texts.append(text)
        if not message.get("speech_final") or message.get("from_finalize"):
            result.cut_finals += 1
        if not (measure or keep_text):
            return
        start, end = float(message["start"]), float(message["start"]) + float(message["duration"])
        i0, i1 = bisect.bisect_left(mids, start), bisect.bisect_right(mids, end)
        inside = range(i0, i1)
        for i in inside:
            matched[i] = True
        if not inside:
            if text:
                result.unmatched_finals += 1
            return
        if not message.get("speech_final") or message.get("from_finalize") or not measure:
            return
        speech_end = spans[i1 - 1].end_s
        if speech_end > end + tolerance_s:
            return  # the last sentence runs past the final: not an end of speech
        sent = sent_time(speech_end)
        if sent is not None:
            result.final_latencies_s.append(now - sent)
            result.final_speech_end_wall_s.append(sent)

    def on_interim(message: dict[str, Any], now: float) -> None:
        result.interims += 1
        if not measure:
            return
        sent = sent_time(float(message["start"]) + float(message["duration"]))
        if sent is not None:
            result.interim_latencies_s.append(now - sent)
            result.interim_end_wall_s.append(sent)

    started = time.monotonic()
    position = 0
    try:
        async with timeout(timeout_s):
            # websockets' own keepalive, as a standard client has it (ping every 20 s, pong due in 20 s),
            # also when streaming faster than real time: the server must answer it.
            async with connect(
                listen_url(url, query),
                max_size=None,
                open_timeout=30,
                ping_interval=ping_interval_s,
                ping_timeout=ping_interval_s,
            ) as ws:

                async def receive() -> None:
                    with contextlib.suppress(ConnectionClosed):
                        async for raw in ws:
                            now = time.monotonic()
                            message = json.loads(raw)
                            kind = message.get("type")
                            if kind == "Results":
                                if message.get("is_final"):
                                    on_final(message, now)
                                else:
                                    on_interim(message, now)
                            elif kind == "Error":
                                result.errors.append(str(message.get("code")))

                reader = asyncio.ensure_future(receive())
                try:
                    while position < total:
                        n = min(chunk, total - position)
                        piece = looped_pcm(material, offset_s, position, n)
                        if speed > 0:
                            due = started + (position + n) / SAMPLE_RATE_HZ / speed
                            delay = due - time.monotonic()
                            if delay > 0:
                                await asyncio.sleep(delay)
                        await ws.send(piece.astype("<i2").tobytes())
                        position += n
                        if measure:
                            sent_samples.append(position)
                            sent_at.append(time.monotonic())
                        if progress is not None:
                            progress.samples_sent = position
                        if speed <= 0:
                            await asyncio.sleep(0)  # let the reader run
                    await ws.send(json.dumps({"type": "CloseStream"}))
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
        if progress is not None:
            progress.done = True
    result.wall_s = time.monotonic() - started
    result.audio_s = position / SAMPLE_RATE_HZ
    sent_until = result.audio_s
    complete = [i for i, s in enumerate(spans) if s.end_s <= sent_until]
    result.sentences_sent = len(complete)
    result.sentences_matched = sum(1 for i in complete if matched[i])
    if keep_text:
        result.transcript = " ".join(texts)
        result.reference = " ".join(spans[i].text for i in complete)
    return result


def summary_line(values: Sequence[float]) -> str:
    """``n=.. p50=.. p95=.. p99=.. max=..`` in seconds."""
    return (
        f"n={len(values)} p50={fmt_s(percentile(values, 50))} p95={fmt_s(percentile(values, 95))} "
        f"p99={fmt_s(percentile(values, 99))} max={fmt_s(max(values) if values else math.nan)}"
    )
