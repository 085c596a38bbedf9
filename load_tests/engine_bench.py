"""Latency of the SenseVoice engine on a full-size random-weight SenseVoice Small, on CPU.

Prints a table of ``transcribe`` wall-clock latency (median and min of ``--runs`` runs, after one untimed
run of the same case), per backend (``--backends torch,onnx``: funasr's model in torch, or its ONNX
export in ONNX Runtime) and dtype (fp32, int8):

* one clip of 1, 5, 10 and 20 s;
* a batch of 4 clips of 5 s as one ``transcribe`` call, and the same 4 clips one call each.

Each case runs on two engines: the default length buckets (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 30 s for
30 s clips: what the server runs, every batch padded up to its bucket) and buckets equal to the clip
lengths (no padding: the price of padding is the difference). Word timestamps are on, as the server asks
by default.

Then, for the ONNX backend, **workers against threads** (``--concurrency``): the same jobs (one clip
each, mixed lengths as a conversation gives) sent by ``W`` threads at once to one engine whose runs use
``T`` intra-op threads each, for each ``W x T`` in ``--worker-threads`` (default ``1x2,2x1``): jobs per
second and the latency of each job (median, p95). ``1x2`` is one call at a time on both cores; ``2x1`` is
two calls at once, one core each, sharing one copy of the weights.

The weights are random, so the audio is noise: the encoder's cost does not depend on the content, and a
random model emits a token on most frames, the worst case for word alignment. The folder is built first
when missing (about 936 MB, 15 s)::

    python load_tests/engine_bench.py [--model-dir /tmp/sv-full] [--threads 2] [--runs 3] [--dtypes fp32,int8]
        [--backends torch,onnx] [--concurrency] [--worker-threads 1x2,2x1]

Other processes on the machine share the cores: the padded and unpadded runs of a case are interleaved
so both see the same contention, the 1-minute load average at the start of each case is printed in the
``load`` column, and each latency is given as median (min).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_server.config import EngineConfig  # noqa: E402
from stream_server.engines.base import SAMPLE_RATE_HZ, TranscribeRequest  # noqa: E402
from stream_server.engines.sensevoice import SenseVoiceCore, SenseVoiceEngine  # noqa: E402
from stream_server.engines.sensevoice_onnx import SenseVoiceOnnxEngine  # noqa: E402
from stream_server.testing.sensevoice_random import build_random_sensevoice  # noqa: E402

MAX_AUDIO_S = 30.0


@dataclass(frozen=True)
class Case:
    label: str
    durations_s: tuple[float, ...]
    one_by_one: bool = False


CASES = (
    Case("1 x 1 s", (1.0,)),
    Case("1 x 5 s", (5.0,)),
    Case("1 x 10 s", (10.0,)),
    Case("1 x 20 s", (20.0,)),
    Case("4 x 5 s batched", (5.0,) * 4),
    Case("4 x 5 s one by one", (5.0,) * 4, one_by_one=True),
)


def noise(seconds: float, seed: int) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE_HZ))).astype(np.float32)


def timed_pair_s(
    first: Callable[[], object], second: Callable[[], object], runs: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(median, min) wall-clock seconds of ``runs`` calls of each, interleaved, after one untimed call each.

    Interleaving gives both the same share of whatever else the machine is doing.
    """
    first()  # untimed: first use of a shape
    second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(runs):
        for run, bucket in ((first, times[0]), (second, times[1])):
            started = time.perf_counter()
            run()
            bucket.append(time.perf_counter() - started)
    return (statistics.median(times[0]), min(times[0])), (statistics.median(times[1]), min(times[1]))


def case_runner(engine: SenseVoiceCore, case: Case) -> Callable[[], object]:
    requests = [TranscribeRequest(noise(d, seed)) for seed, d in enumerate(case.durations_s)]
    if case.one_by_one:
        return lambda: [engine.transcribe([r]) for r in requests]
    return lambda: engine.transcribe(requests)


def load(
    model_dir: Path,
    backend: str,
    dtype: str,
    threads: int,
    buckets: Sequence[float] | None,
    *,
    workers: int = 1,
) -> tuple[SenseVoiceCore, float]:
    started = time.perf_counter()
    config = EngineConfig(model=str(model_dir), dtype=dtype, threads=threads, workers=workers)  # type: ignore[arg-type]
    engine: SenseVoiceCore
    if backend == "onnx":
        engine = SenseVoiceOnnxEngine.load(config, max_audio_s=MAX_AUDIO_S, length_buckets_s=buckets)
    else:
        engine = SenseVoiceEngine.load(config, max_audio_s=MAX_AUDIO_S, length_buckets_s=buckets)
    return engine, time.perf_counter() - started


CONVERSATION_S = (1.2, 2.5, 3.0, 4.5, 1.8, 6.0, 2.2, 8.0, 3.5, 1.5, 5.0, 2.8)
"""Clip lengths of the concurrency jobs: turns of a conversation (mean 3.5 s)."""


def concurrency(
    model_dir: Path, dtype: str, workers: int, threads: int, rounds: int
) -> tuple[float, list[float]]:
    """Jobs per second and per-job latencies with ``workers`` callers at once on one ONNX engine."""
    from concurrent.futures import ThreadPoolExecutor

    engine, _ = load(model_dir, "onnx", dtype, threads, None, workers=workers)
    engine.warmup(1, 8.0)
    jobs = [[TranscribeRequest(noise(d, 100 + i))] for i, d in enumerate(CONVERSATION_S * rounds)]
    latencies: list[float] = []

    def run(job: list[TranscribeRequest]) -> None:
        started = time.perf_counter()
        engine.transcribe(job)
        latencies.append(time.perf_counter() - started)

    for job in jobs[: workers * 2]:  # untimed: first use of each thread
        run(job)
    latencies.clear()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(run, jobs))
    wall_s = time.perf_counter() - started
    return len(jobs) / wall_s, latencies


def rss_mb() -> float:
    return float(psutil.Process().memory_info().rss) / 2**20


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-dir", type=Path, default=Path("/tmp/sv-full"), help="full-size random folder"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per case (median)")
    parser.add_argument("--dtypes", default="fp32,int8", help="comma-separated: fp32,int8")
    parser.add_argument("--backends", default="torch,onnx", help="comma-separated: torch,onnx")
    parser.add_argument("--concurrency", action="store_true", help="also compare workers x threads (ONNX)")
    parser.add_argument("--worker-threads", default="1x2,2x1", help="W x T settings for --concurrency")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of the 12 conversation clips per setting"
    )
    parser.add_argument("--skip-cases", action="store_true", help="only the concurrency comparison")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; cores: {os.cpu_count()}")
    model_dir = build_random_sensevoice(args.model_dir)
    exact_buckets = sorted({d for case in CASES for d in case.durations_s} | {MAX_AUDIO_S})
    rows: list[tuple[str, str, str, float, tuple[float, float], tuple[float, float]]] = []
    for backend in [] if args.skip_cases else args.backends.split(","):
        for dtype in args.dtypes.split(","):
            engine, load_s = load(model_dir, backend, dtype, args.threads, None)
            engine.warmup(4, 20.0)
            # One process for everything: RSS after the first includes what earlier engines left behind.
            print(
                f"{backend} {dtype}: loaded in {load_s:.1f} s; process RSS after 4 x 20 s warm-up "
                f"{rss_mb():.0f} MB"
            )
            exact_engine, _ = load(model_dir, backend, dtype, args.threads, exact_buckets)
            for case in CASES:
                load_1min = os.getloadavg()[0]
                padded, exact = timed_pair_s(
                    case_runner(engine, case), case_runner(exact_engine, case), args.runs
                )
                bucket_s = next(b for b in engine.length_buckets_s if b >= max(case.durations_s))
                rows.append((f"{backend} {dtype}", case.label, f"{bucket_s:g} s", load_1min, padded, exact))
            del engine, exact_engine
            gc.collect()

    print()
    print(
        f"SenseVoice Small (random weights, 234 M parameters), CPU, {args.threads} threads, "
        f"median (min) of {args.runs} runs"
    )
    header = (
        f"{'engine':<11} {'case':<20} {'load':>5} {'padded to':>9} {'latency':>15} {'RTF':>6}"
        f" {'no padding':>15} {'RTF':>6}"
    )
    print(header)
    print("-" * len(header))
    for dtype, label, bucket, load_1min, (padded_s, padded_min_s), (exact_s, exact_min_s) in rows:
        audio_s = _audio_s(label)
        print(
            f"{dtype:<11} {label:<20} {load_1min:>5.1f} {bucket:>9}"
            f" {padded_s:>6.2f}s ({padded_min_s:>5.2f}) {padded_s / audio_s:>6.3f}"
            f" {exact_s:>6.2f}s ({exact_min_s:>5.2f}) {exact_s / audio_s:>6.3f}"
        )
    if args.concurrency:
        print(
            f"\nONNX Runtime, workers x threads: {len(CONVERSATION_S) * args.rounds} one-clip jobs "
            f"({', '.join(f'{d:g}' for d in CONVERSATION_S)} s, x{args.rounds}), all queued at once"
        )
        print(f"{'dtype':<6} {'W x T':>6} {'jobs/s':>7} {'latency p50':>12} {'p95':>7} {'load':>5}")
        for dtype in args.dtypes.split(","):
            for setting in args.worker_threads.split(","):
                workers, threads = (int(x) for x in setting.lower().split("x"))
                load_1min = os.getloadavg()[0]
                rate, latencies = concurrency(model_dir, dtype, workers, threads, args.rounds)
                p50, p95 = np.percentile(latencies, 50), np.percentile(latencies, 95)
                print(f"{dtype:<6} {setting:>6} {rate:>7.2f} {p50:>11.3f}s {p95:>6.3f}s {load_1min:>5.1f}")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def _audio_s(label: str) -> float:
    return sum(next(c for c in CASES if c.label == label).durations_s)


if __name__ == "__main__":
    sys.exit(main())
