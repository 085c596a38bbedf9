"""Cost and accuracy of the faster-whisper tiny.en engine's options, without the server.

One command prints every figure the engine's CPU defaults were chosen from (run from the repository
root, on an otherwise idle machine: the load average is printed with each table)::

    python load_tests/whisper_bench.py [--sections calls,accuracy,workers,batch] [--configs ...]
        [--buckets 20] [--margin 5] [--meetings]

The whole run takes about 35 minutes on 2 cores; ``--sections`` runs part of it.

The options compared (``--configs``; each is a set of ``WhisperEngine.load`` arguments):

* ``beam5-30s`` - beam search (5) over Whisper's full 30 s encoder window, no wider retry: the engine as
  it was before the CPU defaults changed, and the **reference** for the real recordings;
* ``greedy-30s`` - greedy search, full window;
* ``beam5-buckets`` - beam 5, the encoder window cut to the shortest of ``--buckets`` (default 20 s)
  that holds the clip with ``--margin`` (default 5 s) to spare, else the full 30 s: the CPU default;
* ``greedy-buckets`` - greedy search and buckets (a clip failing Whisper's guards is retried with beam
  5 before temperature fallback);
* ``greedy-buckets-noretry`` - the same without the beam-5 retry.

Sections:

* ``calls`` - mean wall time of one ``transcribe`` call by clip length (1, 3, 5, 10, 20 s), without and
  with word times. The clips are real speech (the silero-vad lecture and news recordings), each starting
  at a quiet 100 ms and ending at the quietest 100 ms of the last tenth of its length, so a clip
  never cuts a word in half (as the server's segments do not); the mean clip length is printed.
* ``accuracy`` - the recordings cut into segments by the real session core (webrtcvad, endpointing
  ``--endpointing-ms``, 20 s cap, as a conversational client gets), each transcribed alone with word
  times. Per option: mean and p95 call time; WER against the reference option on the same segments (the
  recordings have no transcript, so this is the *cost* of the option, not its accuracy); absolute WER
  on espeak speech with known text (single sentences, and two to four sentences joined by 0.4 s pauses,
  3-20 s); absolute WER on the pyannote telephone dialogue when ``stream_server.testing.speech`` has
  its transcript; WER against faster-whisper's own long-form ``transcribe`` of each whole recording
  (beam 5: a second view of the cost, with context across segments that the engine never has); how
  many clips needed a fallback decode; and word times: median and p90 |difference|
  of word starts and ends against the reference (segments whose words agree), and the error of
  sentence edges in the espeak clips (first word's start, last word's end, against the sound).
  ``--meetings`` adds the 14 AMI meeting clips (no transcript; about 8 minutes more).
* ``workers`` - the default options with 1 worker x 2 threads against 2 workers x 1 thread, on 3 s and
  10 s clips: the median latency of one call alone; of two calls started at the same moment from two
  threads, and the wall time until both ended; and, with one worker, of the two clips as one batched
  call. Resident memory of a fresh process after two 10 s calls at once is printed too.
* ``batch`` - the default options: 2, 4 and 8 clips of about 5 s as one batched call and as one call per
  clip.
* ``sessions`` - ``--sessions`` N (default 4) real-time sessions, each streaming two AMI meeting clips
  (60 s of several people talking) through its own session core, their finals served as they arrive by
  as many threads as the engine takes calls, each taking every waiting final (up to 8) into one call:
  the end-of-speech-to-final latency (p50, p95, max; it includes the 300 ms endpointing, not the
  network) for each ``--configs`` option (default: all) with 1 worker x 2 threads and 2 x 1. It is the
  server's path without the server: what it leaves out is the transport and the batcher's own rules.

There is no human reference for the lecture and news, and no timing threshold: the script prints.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_server.config import EngineConfig, SegmenterConfig  # noqa: E402
from stream_server.engines import whisper as whisper_module  # noqa: E402
from stream_server.engines.base import SAMPLE_RATE_HZ, TranscribeRequest, Transcript  # noqa: E402
from stream_server.engines.whisper import WhisperEngine  # noqa: E402
from stream_server.protocol import ModelInfo, StreamOptions  # noqa: E402
from stream_server.session import JobKind, Session, SessionIdentity, SessionSettings  # noqa: E402
from stream_server.testing import speech as speech_module  # noqa: E402
from stream_server.testing.speech import (  # noqa: E402
    normalize_text,
    read_mono_float32,
    recorded_speech,
    sentence_spans,
    speech_with_pauses,
    word_error_rate,
)
from stream_server.vad import WebRtcVad  # noqa: E402

FloatArray = npt.NDArray[np.float32]

PASSAGE = (
    "The museum opens at nine in the morning and closes at six in the evening. "
    "Visitors may take photographs in most rooms, but not in the special exhibition. "
    "A guided tour leaves from the main hall every hour, and it lasts about forty minutes. "
    "The cafe on the top floor serves soup, sandwiches and fresh fruit. "
    "Children under twelve enter for free when they come with an adult. "
    "Please leave large bags and umbrellas in the cloakroom near the entrance. "
    "The gift shop sells books, posters and postcards of the most famous paintings. "
    "We hope you enjoy your visit and come back again soon."
)

ESPEAK_SENTENCES: tuple[str, ...] = (
    "Good morning everyone.",
    "Can you hear me now?",
    "Thank you all for coming today.",
    "The quick brown fox jumps over the lazy dog.",
    "Please remember to bring your notebooks to the meeting on Friday afternoon.",
    "We should finish the report before the end of the week.",
    "The weather today is sunny with a light breeze from the west.",
    "I think we need more time to test the new release.",
    "The train to the city leaves every twenty minutes.",
    "She opened the window and let the fresh air into the room.",
    "Does anyone have a question about the budget?",
    "He bought a loaf of bread and a bottle of milk.",
    *(sentence.strip() + "." for sentence in PASSAGE.split(".") if sentence.strip()),
)
"""Plain sentences tiny.en knows at 100 words per minute; 1-8 s of espeak speech each."""

CONFIGS: dict[str, dict[str, Any]] = {
    "beam5-30s": {"beam_size": 5, "encoder_buckets_s": (), "retry_beam_size": 0},
    "greedy-30s": {"beam_size": 1, "encoder_buckets_s": ()},
    "beam5-buckets": {"beam_size": 5},
    "greedy-buckets": {"beam_size": 1},
    "greedy-buckets-noretry": {"beam_size": 1, "retry_beam_size": 0},
}
"""``WhisperEngine.load`` arguments of each option; ``--buckets`` fills in the buckets left unset."""
REFERENCE = "beam5-30s"
DEFAULT = "beam5-buckets"
"""The option the engine's CPU defaults are; the workers, batch and memory figures use it."""
CALL_LENGTHS_S = (1.0, 3.0, 5.0, 10.0, 20.0)


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"


def rss_mb() -> float:
    """This process's resident memory, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass(frozen=True)
class Windows:
    """The encoder windows of the ``*-buckets`` options (``--buckets``, ``--margin``)."""

    buckets_s: tuple[float, ...]
    margin_s: float


def load_engine(config: str, windows: Windows, *, threads: int = 0, workers: int = 1) -> WhisperEngine:
    arguments = dict(CONFIGS[config])
    arguments.setdefault("encoder_buckets_s", windows.buckets_s)
    arguments.setdefault("encoder_margin_s", windows.margin_s)
    return WhisperEngine.load(EngineConfig(device="cpu", threads=threads), workers=workers, **arguments)


# --- material ---------------------------------------------------------------------------------------


def frame_energy(audio: FloatArray, frame: int) -> npt.NDArray[np.float64]:
    usable = len(audio) // frame * frame
    blocks = audio[:usable].astype(np.float64).reshape(-1, frame)
    return np.asarray(np.mean(blocks**2, axis=1))


def quiet_clips(audio: FloatArray, length_s: float, count: int) -> list[FloatArray]:
    """``count`` clips of about ``length_s``, each from a quiet 100 ms to the quietest 100 ms of its end.

    A clip starts at the quietest 100 ms within 2 s after the previous clip's start plus a stride that
    spreads the clips over the recording, and ends at the quietest 100 ms of the last tenth of
    ``length_s`` (at least 0.3 s of choice), so it cuts no word in half.
    """
    frame = SAMPLE_RATE_HZ // 10
    energy = frame_energy(audio, frame)
    frames_per_clip = round(length_s * 10)
    slack = max(3, frames_per_clip // 10)
    stride = max(1, (len(energy) - frames_per_clip - 20) // max(1, count))
    clips: list[FloatArray] = []
    for i in range(count):
        low = i * stride
        start = low + int(np.argmin(energy[low : low + 20]))
        end_low = start + frames_per_clip - slack
        end_high = min(len(energy), start + frames_per_clip)
        if end_low >= end_high:
            break
        end = end_low + int(np.argmin(energy[end_low:end_high])) + 1
        clips.append(audio[start * frame : end * frame].copy())
    return clips


IDENTITY = SessionIdentity(
    request_id="whisper-bench",
    created="2026-01-01T00:00:00Z",
    model=ModelInfo(name="bench", version="0", arch="bench", uuid="bench"),
)


@dataclass(frozen=True)
class Final:
    """A final the session core asked for: its audio, when it asked (s of audio streamed), and where the
    speech it holds ended (s; None when the segment was not ended by a pause)."""

    audio: FloatArray
    asked_s: float
    speech_end_s: float | None


def server_finals(audio: FloatArray, endpointing_ms: int) -> list[Final]:
    """The finals the real session core asks for while ``audio`` streams in 100 ms chunks."""
    segmenter = SegmenterConfig(endpointing_ms=endpointing_ms, speculative_final_ms=0)
    vad = WebRtcVad(segmenter.vad_aggressiveness, segmenter.frame_ms, segmenter.min_energy_dbfs)
    session = Session(StreamOptions(), SessionSettings(segmenter=segmenter), vad, IDENTITY)
    pcm = (np.clip(audio, -1.0, 1.0 - 1 / 32768) * 32768).astype("<i2").tobytes()
    finals: list[Final] = []
    chunk_bytes = SAMPLE_RATE_HZ // 10 * 2
    post_roll_s = segmenter.post_roll_ms / 1000

    def drain(streamed_bytes: int) -> None:
        for job in session.jobs_to_run():
            if job.kind is JobKind.FINAL and len(job.request.audio):
                paused = job.reason is not None and job.reason.value == "pause"
                finals.append(
                    Final(
                        audio=job.request.audio.copy(),
                        asked_s=streamed_bytes / 2 / SAMPLE_RATE_HZ,
                        speech_end_s=job.end_sample / SAMPLE_RATE_HZ - post_roll_s if paused else None,
                    )
                )
            session.receive_result(job.job_id, Transcript(text="", confidence=0.0))
        session.events_to_send()

    for offset in range(0, len(pcm), chunk_bytes):
        session.receive_audio(pcm[offset : offset + chunk_bytes])
        drain(min(len(pcm), offset + chunk_bytes))
    session.receive_text('{"type": "CloseStream"}')
    drain(len(pcm))
    return finals


def server_segments(audio: FloatArray, endpointing_ms: int) -> list[FloatArray]:
    """The audio of the finals the real session core cuts ``audio`` into."""
    return [final.audio for final in server_finals(audio, endpointing_ms)]


@dataclass(frozen=True)
class EspeakClip:
    """Synthetic speech with known text and sentence edges (seconds in the clip)."""

    audio: FloatArray
    text: str
    sentence_word_counts: tuple[int, ...]
    edges_s: tuple[tuple[float, float], ...]


def espeak_clips() -> list[EspeakClip]:
    """Each sentence alone, then groups of 2, 3 and 4 consecutive sentences with 0.4 s pauses (2-20 s)."""
    groups: list[list[str]] = [[s] for s in ESPEAK_SENTENCES]
    for size in (2, 3, 4):
        for start in range(0, len(ESPEAK_SENTENCES) - size + 1, size + 1):
            groups.append(list(ESPEAK_SENTENCES[start : start + size]))
    clips: list[EspeakClip] = []
    for group in groups:
        path = speech_with_pauses(group, 0.4)
        audio = read_mono_float32(path)
        if len(audio) > 20 * SAMPLE_RATE_HZ:
            continue
        spans = sentence_spans(path)
        clips.append(
            EspeakClip(
                audio=audio,
                text=" ".join(group),
                sentence_word_counts=tuple(len(normalize_text(s)) for s in group),
                edges_s=tuple((s.start_s, s.end_s) for s in spans),
            )
        )
    return clips


@dataclass
class Material:
    """What the accuracy section transcribes."""

    real: list[FloatArray]
    espeak: list[EspeakClip]
    whole_file: list[tuple[int, str]] = field(default_factory=list)
    """Per recording, in order: how many of ``real`` are its segments, and faster-whisper's own text."""
    dialogue: list[FloatArray] = field(default_factory=list)
    dialogue_text: str = ""


def whole_file_text(audio: FloatArray) -> str:
    """faster-whisper's own long-form ``WhisperModel.transcribe`` of a whole recording (beam 5, defaults)."""
    from faster_whisper import WhisperModel

    model = WhisperModel(
        str(whisper_module.bundled_model_dir()), device="cpu", compute_type="int8", local_files_only=True
    )
    segments, _ = model.transcribe(audio, language="en", beam_size=5)
    return " ".join(segment.text.strip() for segment in segments)


def accuracy_material(endpointing_ms: int, meetings: bool) -> Material:
    real: list[FloatArray] = []
    whole_file: list[tuple[int, str]] = []
    names = ["lecture", "news"]
    if meetings:
        names += list(getattr(speech_module, "MEETING_CLIPS", ()))
    for name in names:
        audio = read_mono_float32(recorded_speech(name))
        segments = server_segments(audio, endpointing_ms)
        real += segments
        whole_file.append((len(segments), whole_file_text(audio)))
    material = Material(real=real, espeak=espeak_clips(), whole_file=whole_file)
    recorded_text: Callable[[str], str] | None = getattr(speech_module, "recorded_text", None)
    if recorded_text is not None and "dialogue" in speech_module.RECORDED_SPEECH:
        try:
            material.dialogue_text = recorded_text("dialogue")
            audio = read_mono_float32(recorded_speech("dialogue"))
            material.dialogue = server_segments(audio, endpointing_ms)
        except (OSError, RuntimeError, KeyError) as exc:  # the dialogue is optional material
            print(f"(no dialogue: {exc})")
    return material


# --- sections ----------------------------------------------------------------------------------------


def timed(engine: WhisperEngine, audio: FloatArray, words: bool) -> tuple[float, Transcript]:
    started = time.perf_counter()
    (result,) = engine.transcribe([TranscribeRequest(audio=audio, language="en", word_timestamps=words)])
    return time.perf_counter() - started, result


def section_calls(configs: Sequence[str], windows: Windows, count: int) -> None:
    recordings = [read_mono_float32(recorded_speech(name)) for name in ("lecture", "news")]
    by_length = {
        length_s: [c for audio in recordings for c in quiet_clips(audio, length_s, count)]
        for length_s in CALL_LENGTHS_S
    }
    print(f"## calls: mean wall s of one transcribe call, real speech; {load_line()}")
    lengths = " | ".join(
        f"{statistics.mean(len(c) for c in clips) / SAMPLE_RATE_HZ:.1f} s (n={len(clips)})"
        for clips in by_length.values()
    )
    print(f"mean clip lengths: {lengths}")
    print()
    header = " | ".join(f"{length_s:g} s" for length_s in CALL_LENGTHS_S)
    print(f"| option | words | {header} | fallback decodes |")
    print("|---|---|" + "---:|" * len(CALL_LENGTHS_S) + "---:|")
    for config in configs:
        engine = load_engine(config, windows)
        timed(engine, by_length[3.0][0], True)
        for words in (False, True):
            before = engine.fallback_decodes
            means = [
                statistics.mean(timed(engine, c, words)[0] for c in clips) for clips in by_length.values()
            ]
            cells = " | ".join(f"{m:.3f}" for m in means)
            print(f"| {config} | {'yes' if words else 'no'} | {cells} | {engine.fallback_decodes - before} |")
    print(f"\n{load_line()}\n")


@dataclass
class Outcome:
    """One option's transcripts of the accuracy material, with call times."""

    real: list[Transcript]
    espeak: list[Transcript]
    dialogue: list[Transcript]
    times_s: list[float]
    fallbacks: int


def run_material(engine: WhisperEngine, material: Material) -> Outcome:
    timed(engine, material.espeak[0].audio, True)
    before = engine.fallback_decodes
    times: list[float] = []

    def run(clips: Sequence[FloatArray]) -> list[Transcript]:
        results: list[Transcript] = []
        for clip in clips:
            took_s, result = timed(engine, clip, True)
            times.append(took_s)
            results.append(result)
        return results

    real = run(material.real)
    espeak = run([c.audio for c in material.espeak])
    dialogue = run(material.dialogue)
    return Outcome(real, espeak, dialogue, times, engine.fallback_decodes - before)


def corpus_wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Word errors summed over clips, over the reference words summed (one clip's WER weighs its words)."""
    errors = 0.0
    words = 0
    for reference, hypothesis in zip(references, hypotheses, strict=True):
        count = len(normalize_text(reference))
        if count == 0:
            errors += len(normalize_text(hypothesis))
            continue
        errors += word_error_rate(reference, hypothesis) * count
        words += count
    return errors / max(1, words)


def word_time_deltas(
    reference: Sequence[Transcript], other: Sequence[Transcript]
) -> tuple[float, float, int]:
    """Median and p90 |start or end difference| (s) over segments whose words agree; how many agree."""
    deltas: list[float] = []
    agreeing = 0
    for ref, hyp in zip(reference, other, strict=True):
        if not ref.words or [w.word for w in ref.words] != [w.word for w in hyp.words]:
            continue
        agreeing += 1
        for a, b in zip(ref.words, hyp.words, strict=True):
            deltas += [abs(a.start_s - b.start_s), abs(a.end_s - b.end_s)]
    if not deltas:
        return float("nan"), float("nan"), 0
    return float(np.median(deltas)), float(np.percentile(deltas, 90)), agreeing


def sentence_edge_error(clips: Sequence[EspeakClip], results: Sequence[Transcript]) -> tuple[float, int]:
    """Mean |error| (s) of each sentence's first-word start and last-word end, over exactly-heard clips."""
    errors: list[float] = []
    exact = 0
    for clip, result in zip(clips, results, strict=True):
        if [w.word for w in result.words] != normalize_text(clip.text):
            continue
        exact += 1
        index = 0
        for count, (start_s, end_s) in zip(clip.sentence_word_counts, clip.edges_s, strict=True):
            errors += [
                abs(result.words[index].start_s - start_s),
                abs(result.words[index + count - 1].end_s - end_s),
            ]
            index += count
    return (float(np.mean(errors)) if errors else float("nan")), exact


def section_accuracy(configs: Sequence[str], windows: Windows, endpointing_ms: int, meetings: bool) -> None:
    material = accuracy_material(endpointing_ms, meetings)
    lengths = np.array([len(c) / SAMPLE_RATE_HZ for c in material.real])
    espeak_lengths = np.array([len(c.audio) / SAMPLE_RATE_HZ for c in material.espeak])
    print(
        f"## accuracy; {load_line()}\n"
        f"real: lecture + news{' + AMI meetings' if meetings else ''} through the session core "
        f"(endpointing {endpointing_ms} ms): {len(lengths)} "
        f"segments, {lengths.sum():.0f} s, lengths p10/p50/p90/max {np.percentile(lengths, 10):.1f}/"
        f"{np.median(lengths):.1f}/{np.percentile(lengths, 90):.1f}/{lengths.max():.1f} s; espeak: "
        f"{len(espeak_lengths)} clips of {espeak_lengths.min():.1f}-{espeak_lengths.max():.1f} s"
        + (f"; dialogue: {len(material.dialogue)} segments" if material.dialogue else "")
    )
    outcomes: dict[str, Outcome] = {}
    for config in (REFERENCE, *[c for c in configs if c != REFERENCE]):
        outcomes[config] = run_material(load_engine(config, windows), material)
    reference = outcomes[REFERENCE]
    espeak_truth = [c.text for c in material.espeak]
    print()
    print(
        "| option | mean call s | p95 call s | total s | WER vs reference (real) | WER vs whole-file (real) "
        "| espeak WER | dialogue WER "
        "| fallback decodes | word times vs reference: median / p90 s (segments) | espeak sentence edges: "
        "mean error s (clips) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for config, outcome in outcomes.items():
        wer_real = corpus_wer([r.text for r in reference.real], [r.text for r in outcome.real])
        wer_espeak = corpus_wer(espeak_truth, [r.text for r in outcome.espeak])
        wer_dialogue = (
            f"{word_error_rate(material.dialogue_text, ' '.join(r.text for r in outcome.dialogue)):.3f}"
            if material.dialogue
            else "-"
        )
        texts = [r.text for r in outcome.real]
        cuts = np.cumsum([0] + [count for count, _ in material.whole_file])
        wer_whole = corpus_wer(
            [text for _, text in material.whole_file],
            [" ".join(texts[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)],
        )
        median_s, p90_s, agreeing = word_time_deltas(reference.real, outcome.real)
        edge_s, exact = sentence_edge_error(material.espeak, outcome.espeak)
        mean_s, p95_s = statistics.mean(outcome.times_s), float(np.percentile(outcome.times_s, 95))
        print(
            f"| {config} | {mean_s:.3f} | {p95_s:.3f} | "
            f"{sum(outcome.times_s):.1f} | {wer_real:.3f} | {wer_whole:.3f} | {wer_espeak:.3f} | "
            f"{wer_dialogue} | "
            f"{outcome.fallbacks} | {median_s:.3f} / {p90_s:.3f} ({agreeing}/{len(material.real)}) | "
            f"{edge_s:.3f} ({exact}/{len(material.espeak)}) |"
        )
    print(f"\n{load_line()}\n")


def at_once(engine: WhisperEngine, first: FloatArray, second: FloatArray) -> tuple[list[float], float]:
    """Two threads start one call each at the same moment: (both latencies s, wall s until both ended)."""
    barrier = threading.Barrier(2)
    spans: list[tuple[float, float]] = []

    def worker(clip: FloatArray) -> None:
        barrier.wait()
        started = time.perf_counter()
        timed(engine, clip, True)
        spans.append((started, time.perf_counter()))

    threads = [threading.Thread(target=worker, args=(clip,)) for clip in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [b - a for a, b in spans], max(b for _, b in spans) - min(a for a, _ in spans)


def batched_pair(engine: WhisperEngine, first: FloatArray, second: FloatArray) -> float:
    """Wall s of one ``transcribe`` call holding both clips (both answers arrive together)."""
    started = time.perf_counter()
    engine.transcribe([TranscribeRequest(audio=c, language="en") for c in (first, second)])
    return time.perf_counter() - started


def rss_child(workers: int, threads: int, windows: Windows) -> None:
    """Print this fresh process's RSS (MB) after loading an engine and running two 10 s calls at once."""
    engine = load_engine(DEFAULT, windows, threads=threads, workers=workers)
    news = read_mono_float32(recorded_speech("news"))
    first, second = quiet_clips(news, 10.0, 2)
    for _ in range(2):
        at_once(engine, first, second)
    print(f"{rss_mb():.0f}")


def child_rss_mb(workers: int, threads: int) -> str:
    argv = [sys.executable, __file__, "--rss-child", f"{workers},{threads}"]
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    return completed.stdout.strip().splitlines()[-1] if completed.returncode == 0 else "?"


def section_workers(windows: Windows, runs: int) -> None:
    recordings = [read_mono_float32(recorded_speech(name)) for name in ("lecture", "news")]
    lengths_s = (3.0, 10.0)
    clips = {
        length_s: [c for a in recordings for c in quiet_clips(a, length_s, runs)] for length_s in lengths_s
    }
    print(
        f"## workers: default options, 2 cores, {2 * runs} real clips per length, medians; every call with "
        f"word times; {load_line()}"
    )
    print()
    print(
        "| workers x threads | RSS MB after two 10 s calls at once | length | one call alone s "
        "| two at once: latency s | two at once: wall s per pair | two in one batched call s "
        "| fallback decodes |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for workers, threads in ((1, 2), (2, 1)):
        rss = child_rss_mb(workers, threads)
        engine = load_engine(DEFAULT, windows, threads=threads, workers=workers)
        engine.warmup(max_batch_size=2, max_audio_s=10.0)
        for length_s, group in clips.items():
            before = engine.fallback_decodes
            alone = statistics.median(timed(engine, c, True)[0] for c in group)
            pairs = list(zip(group[0::2], group[1::2], strict=False))
            latencies: list[float] = []
            walls: list[float] = []
            for a, b in pairs:
                pair_latencies, wall_s = at_once(engine, a, b)
                latencies += pair_latencies
                walls.append(wall_s)
            batched = (
                f"{statistics.median(batched_pair(engine, a, b) for a, b in pairs):.3f}"
                if workers == 1
                else "-"
            )
            print(
                f"| {workers} x {threads} | {rss} | {length_s:g} s | {alone:.3f} | "
                f"{statistics.median(latencies):.3f} | {statistics.median(walls):.3f} | {batched} | "
                f"{engine.fallback_decodes - before} |"
            )
    print(f"\n{load_line()}\n")


def replay(engine: WhisperEngine, sessions: Sequence[Sequence[Final]], max_batch: int) -> list[float]:
    """Serve the sessions' finals at real-time pace as a batcher would; return end-of-speech-to-final s.

    Each final arrives when its session asked for it (all sessions start together). As many threads as
    the engine takes concurrent calls each take the oldest waiting final and, without waiting, up to
    ``max_batch - 1`` more, and transcribe them in one call with word times. The latency of a final that
    ended on a pause is the time its answer came back minus the time its speech ended (so it includes
    the endpointing silence, as the load tests' does, but no network or VAD lag).
    """
    arrivals = sorted(
        ((final.asked_s, index, final) for index, finals in enumerate(sessions) for final in finals),
        key=lambda item: (item[0], item[1]),
    )
    lock = threading.Lock()
    waiting: list[Final] = []
    latencies: list[float] = []
    started = time.perf_counter()

    def serve() -> None:
        while True:
            with lock:
                due = time.perf_counter() - started
                batch = [f for f in waiting if f.asked_s <= due][:max_batch]
                for final in batch:
                    waiting.remove(final)
                finished = not waiting
            if not batch:
                if finished:
                    return
                time.sleep(0.005)
                continue
            engine.transcribe([TranscribeRequest(audio=f.audio, language="en") for f in batch])
            answered_s = time.perf_counter() - started
            with lock:
                latencies.extend(answered_s - f.speech_end_s for f in batch if f.speech_end_s is not None)

    waiting.extend(final for _, _, final in arrivals)
    threads = [threading.Thread(target=serve) for _ in range(engine.info.max_concurrent_calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def section_sessions(
    configs: Sequence[str], windows: Windows, counts: Sequence[int], endpointing_ms: int
) -> None:
    names = list(getattr(speech_module, "MEETING_CLIPS", ()))
    if len(names) < 2 * max(counts):
        print("## sessions: needs the AMI meeting clips of stream_server.testing.speech; skipped\n")
        return
    audio = [read_mono_float32(recorded_speech(name)) for name in names]
    material = [
        server_finals(np.concatenate([audio[2 * i], audio[2 * i + 1]]), endpointing_ms)
        for i in range(max(counts))
    ]
    print(
        f"## sessions: N real-time sessions, each two AMI meeting clips (60 s), endpointing "
        f"{endpointing_ms} ms, finals batched up to 8, word times; latency from the end of speech; "
        f"{load_line()}"
    )
    print()
    print("| option | workers x threads | sessions | finals | p50 s | p95 s | max s | fallback decodes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for config in configs:
        for workers, threads in ((1, 2), (2, 1)):
            engine = load_engine(config, windows, threads=threads, workers=workers)
            engine.warmup(max_batch_size=2, max_audio_s=20.0)
            for count in counts:
                before = engine.fallback_decodes
                latencies = replay(engine, material[:count], max_batch=8)
                print(
                    f"| {config} | {workers} x {threads} | {count} | {len(latencies)} | "
                    f"{np.median(latencies):.2f} | {np.percentile(latencies, 95):.2f} | "
                    f"{max(latencies):.2f} | {engine.fallback_decodes - before} |"
                )
    print(f"\n{load_line()}\n")


def section_batch(windows: Windows, runs: int) -> None:
    news = read_mono_float32(recorded_speech("news"))
    clips = quiet_clips(news, 5.0, 8)
    engine = load_engine(DEFAULT, windows)
    engine.warmup(max_batch_size=8, max_audio_s=5.0)
    print(f"## batch: default options, clips of ~5 s real speech, median of {runs} runs; {load_line()}")
    print()
    print("| clips | batched s | one by one s | batched / one by one |")
    print("|---|---:|---:|---:|")
    for size in (2, 4, 8):
        group = clips[:size]
        requests = [TranscribeRequest(audio=c, language="en") for c in group]
        batched: list[float] = []
        single: list[float] = []
        engine.transcribe(requests)
        for _ in range(runs):
            started = time.perf_counter()
            engine.transcribe(requests)
            batched.append(time.perf_counter() - started)
            started = time.perf_counter()
            for request in requests:
                engine.transcribe([request])
            single.append(time.perf_counter() - started)
        b, s = statistics.median(batched), statistics.median(single)
        print(f"| {size} x 5 s | {b:.3f} | {s:.3f} | {b / s:.2f} |")
    print(f"\n{load_line()}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sections", default="calls,accuracy,workers,batch,sessions", help="comma-separated")
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}"
    )
    parser.add_argument(
        "--buckets",
        default=",".join(f"{b:g}" for b in whisper_module.CPU_ENCODER_BUCKETS_S),
        help="encoder windows (s) of the *-buckets options",
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=whisper_module.CPU_ENCODER_MARGIN_S,
        help="padding (s) a *-buckets window must leave after the clip",
    )
    parser.add_argument(
        "--meetings", action="store_true", help="accuracy: add the 14 AMI meeting clips to the real speech"
    )
    parser.add_argument("--clips", type=int, default=4, help="calls: clips per length per recording")
    parser.add_argument("--runs", type=int, default=3, help="workers: clips per length; batch: runs")
    parser.add_argument("--endpointing-ms", type=int, default=300, help="accuracy: the session's endpointing")
    parser.add_argument("--sessions", default="4", help="sessions: comma-separated session counts")
    parser.add_argument("--rss-child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown options {unknown}; known: {', '.join(CONFIGS)}")
    windows = Windows(tuple(float(b) for b in args.buckets.split(",") if b), args.margin)
    if args.rss_child:
        workers, threads = (int(v) for v in args.rss_child.split(","))
        rss_child(workers, threads, windows)
        return 0
    sections = [s for s in args.sections.split(",") if s]
    print(
        f"whisper_bench: CPU, int8, {os.cpu_count()} cores; *-buckets options: windows {windows.buckets_s} s "
        f"with {windows.margin_s:g} s to spare, else 30 s; {load_line()}\n"
    )
    for section in sections:
        if section == "calls":
            section_calls(configs, windows, args.clips)
        elif section == "accuracy":
            section_accuracy(configs, windows, args.endpointing_ms, args.meetings)
        elif section == "workers":
            section_workers(windows, args.runs)
        elif section == "sessions":
            counts = [int(n) for n in args.sessions.split(",") if n]
            section_sessions(configs, windows, counts, args.endpointing_ms)
        elif section == "batch":
            section_batch(windows, args.runs)
        else:
            parser.error(f"unknown section {section!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
