"""Latency of the faster-whisper tiny.en engine: single clips, and batches batched vs one by one.

Prints a table of ``WhisperEngine.transcribe`` wall-clock latency (median of ``--runs`` runs, after one
warm-up batch), with and without word timestamps:

* one clip of 2, 5 and 10 s of espeak speech;
* batches of 4 and 8 clips of 5 s, as one ``transcribe`` call ("batched") and as one call per clip
  ("one by one").

Each cell makes one untimed call first; the cells of a row take turns run by run.

``--lecture`` adds a sanity figure: the WER between faster-whisper's own ``WhisperModel.transcribe`` over
the whole 60 s silero-vad lecture (beam 5, its defaults) and this engine over 10-20 s chunks of it, cut
at the quietest 100 ms in each 10-20 s stretch. There is no human reference transcript: it measures how
much chunking (no cross-chunk context) changes the text, not absolute accuracy.

Clips are cut, at exactly their length, from one long espeak-ng passage at 100 words per minute (its
leading silence trimmed), each batch clip from a different place so the clips differ. Run from the
repository root::

    python load_tests/whisper_bench.py [--runs 3] [--threads 0] [--beam-size 5] [--batch-encoder] [--lecture]

Other processes on the machine share the cores: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_server.config import EngineConfig  # noqa: E402
from stream_server.engines.base import SAMPLE_RATE_HZ, TranscribeRequest  # noqa: E402
from stream_server.engines.whisper import WhisperEngine  # noqa: E402
from stream_server.testing.speech import (  # noqa: E402
    espeak_wav,
    read_mono_float32,
    recorded_speech,
    word_error_rate,
)

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


def passage_audio() -> npt.NDArray[np.float32]:
    """The passage as 16 kHz float32 speech with its leading silence trimmed."""
    audio = read_mono_float32(espeak_wav(PASSAGE))
    loud = np.flatnonzero(np.abs(audio) > 1e-3)
    return audio[int(loud[0]) :]


def clip(audio: npt.NDArray[np.float32], start_s: float, length_s: float) -> npt.NDArray[np.float32]:
    """``length_s`` of ``audio`` from ``start_s``, wrapping around the end."""
    start = int(start_s * SAMPLE_RATE_HZ) % len(audio)
    samples = int(length_s * SAMPLE_RATE_HZ)
    return np.resize(np.roll(audio, -start), samples).astype(np.float32)


def medians_s(actions: Sequence[Callable[[], object]], runs: int) -> list[tuple[float, float]]:
    """Median (wall-clock, CPU) seconds of ``runs`` calls of each action, after one untimed call of each.

    The actions take turns run by run, so a change in the machine's load hits them all alike. CPU
    seconds are this process's, summed over its threads: less disturbed by other processes than wall
    time, and the better guide to throughput when the cores are shared.
    """
    for action in actions:
        action()
    walls: list[list[float]] = [[] for _ in actions]
    cpus: list[list[float]] = [[] for _ in actions]
    for _ in range(runs):
        for action, wall, cpu in zip(actions, walls, cpus, strict=True):
            wall_started, cpu_started = time.perf_counter(), time.process_time()
            action()
            wall.append(time.perf_counter() - wall_started)
            cpu.append(time.process_time() - cpu_started)
    return [(statistics.median(w), statistics.median(c)) for w, c in zip(walls, cpus, strict=True)]


def quiet_cuts(audio: npt.NDArray[np.float32], min_s: float = 10.0, max_s: float = 20.0) -> list[int]:
    """Cut points (samples) so every chunk but the last is ``min_s``..``max_s`` long, at a quiet 100 ms."""
    frame = SAMPLE_RATE_HZ // 10
    energy = np.array([float(np.mean(audio[i : i + frame] ** 2)) for i in range(0, len(audio), frame)])
    cuts = [0]
    while len(audio) - cuts[-1] > max_s * SAMPLE_RATE_HZ:
        low = (cuts[-1] + int(min_s * SAMPLE_RATE_HZ)) // frame
        high = (cuts[-1] + int(max_s * SAMPLE_RATE_HZ)) // frame
        cuts.append(int(low + np.argmin(energy[low:high])) * frame + frame // 2)
    return [*cuts, len(audio)]


def lecture_wer(engine: WhisperEngine) -> None:
    """Print the WER between whole-file faster-whisper and the engine over 10-20 s chunks of the lecture."""
    from faster_whisper import WhisperModel

    audio = read_mono_float32(recorded_speech("lecture"))
    threads = int(engine.info.extras["threads"])
    model = WhisperModel(engine.info.model, device="cpu", compute_type="int8", cpu_threads=threads)
    started = time.perf_counter()
    segments, _ = model.transcribe(audio, language="en", beam_size=5)
    whole = " ".join(segment.text.strip() for segment in segments)
    whole_s = time.perf_counter() - started
    cuts = quiet_cuts(audio)
    chunks = [audio[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    started = time.perf_counter()
    results = engine.transcribe([TranscribeRequest(audio=c, language="en") for c in chunks])
    chunked_s = time.perf_counter() - started
    chunked = " ".join(r.text for r in results if r.text)
    print(f"lecture, whole file ({whole_s:.2f} s): {whole}")
    lengths = ", ".join(f"{(b - a) / SAMPLE_RATE_HZ:.1f}" for a, b in zip(cuts, cuts[1:], strict=False))
    print(f"lecture, engine over chunks of {lengths} s, one batch ({chunked_s:.2f} s): {chunked}")
    print(f"WER(whole file -> engine chunks) = {word_error_rate(whole, chunked):.3f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per cell; the median is printed")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: every core)")
    parser.add_argument("--beam-size", type=int, default=5, help="1 is greedy search")
    parser.add_argument("--batch-encoder", action="store_true", help="one batched encoder pass on CPU too")
    parser.add_argument("--lecture", action="store_true", help="also print the chunked-lecture WER figure")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    started = time.perf_counter()
    engine = WhisperEngine.load(
        EngineConfig(threads=args.threads), beam_size=args.beam_size, batch_encoder=args.batch_encoder or None
    )
    load_s = time.perf_counter() - started
    audio = passage_audio()
    engine.warmup(max_batch_size=8, max_audio_s=5.0)
    info = engine.info
    print(
        f"engine {info.name} on {info.device} {info.dtype}, threads {info.extras['threads']}, beam "
        f"{info.extras['beam_size']}, batched encoder {info.extras['batch_encoder']}; load {load_s:.2f} s; "
        f"median of {args.runs} runs; load average before {load_before[0]:.2f}"
    )

    def requests(clips: list[npt.NDArray[np.float32]], words: bool) -> list[TranscribeRequest]:
        return [TranscribeRequest(audio=c, language="en", word_timestamps=words) for c in clips]

    def batched(clips: list[npt.NDArray[np.float32]], words: bool) -> Callable[[], object]:
        return lambda: engine.transcribe(requests(clips, words))

    def one_by_one(clips: list[npt.NDArray[np.float32]], words: bool) -> Callable[[], object]:
        return lambda: [engine.transcribe(requests([c], words)) for c in clips]

    Cell = tuple[float, float]
    rows: list[tuple[str, str, Cell, Cell]] = []
    for length_s in (2.0, 5.0, 10.0):
        single = [clip(audio, 0.0, length_s)]
        plain, words = medians_s([batched(single, False), batched(single, True)], args.runs)
        rows.append((f"1 x {length_s:g} s", "single call", plain, words))
    for batch in (4, 8):
        clips = [clip(audio, 7.0 * i, 5.0) for i in range(batch)]
        actions = [
            batched(clips, False),
            batched(clips, True),
            one_by_one(clips, False),
            one_by_one(clips, True),
        ]
        cells = medians_s(actions, args.runs)
        rows.append((f"{batch} x 5 s", "batched", cells[0], cells[1]))
        rows.append((f"{batch} x 5 s", "one by one", cells[2], cells[3]))

    print()
    print("| clips    | how         | no words: wall s | CPU s | words: wall s | CPU s | words cost (CPU) |")
    print("|----------|-------------|-----------------:|------:|--------------:|------:|-----------------:|")
    for label, how, (plain_wall, plain_cpu), (words_wall, words_cpu) in rows:
        print(
            f"| {label:<8} | {how:<11} | {plain_wall:>16.3f} | {plain_cpu:>5.2f} | {words_wall:>13.3f} | "
            f"{words_cpu:>5.2f} | {words_cpu / plain_cpu - 1:>+16.0%} |"
        )
    print()
    print(f"load average after {os.getloadavg()[0]:.2f}")
    if args.lecture:
        print()
        lecture_wer(engine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
