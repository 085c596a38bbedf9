"""Capacity: how many concurrent real-time sessions one server holds with p95 final latency under 1 s.

Starts the server once as a subprocess on 127.0.0.1 and sweeps the number of concurrent sessions N
(1, 2, 4, 6, 8, 12, 16, 24, ... up to ``--max-n``). In each step every session streams its own order of
the material at real-time pace in 100 ms chunks: by default (``--material call``) one side of a
conversation made of **real recorded utterances** (the pyannote telephone call and AMI meeting clips,
``common.recorded_conversation``) with pauses of 1-4 s filled with the recordings' own background
noise; ``--material mix`` streams the recordings as they are, ``--material espeak`` synthetic sentences
with digital silence (0.8-3 s pauses). Latency is measured from the true end of each utterance
(``stream_server.testing.truth``). Sessions connect staggered over the first seconds so they do not speak
in lockstep, and all of them stream until the step ends. Only what happens while all N stream is counted.

The server runs with admission by capacity off (``--admission false``), so every N is admitted and
the sweep measures what the server really holds; each row also prints what admission *would* allow
(``adm cap``: ``capacity_sessions`` from ``/health`` at the end of the step), to check the model against
the measurement. Per N it prints the end-of-speech-to-final latency (p50/p95/p99, from ground-truth sentence
ends, endpointing included), interim latency when ``--interim``, server CPU (100 % = one core) and RSS,
the mean batch size and mean model-call time of finals (from ``/metrics``), segments, errors and the
load average. The sweep stops at the first N whose p95 reaches ``--target-s`` (1 s; ``--stop-s`` to go
on further) or that has errors; it then prints the largest N under the target and re-runs half that N,
printing its percentiles.

Endpointing is the server's default (500 ms) unless ``--endpointing`` is given, interim results off.
Typical runs::

    python load_tests/capacity.py --model /tmp/sv-full                      # default backend (ONNX int8)
    python load_tests/capacity.py --model /tmp/sv-full --backend torch --dtype int8
    python load_tests/capacity.py --model /tmp/sv-full --workers 1 --threads 2 --interim

The client runs in this process on the same machine, so its CPU (printed) competes with the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from latency import DEFAULT_MODEL, QUICK_SENTENCES, ensure_model  # noqa: E402

DEFAULT_NS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64)


@dataclass
class StepResult:
    """One step of the sweep."""

    n: int
    final_s: list[float] = field(default_factory=list)
    interim_s: list[float] = field(default_factory=list)
    segments: int = 0
    sentences_sent: int = 0
    sentences_matched: int = 0
    errors: list[str] = field(default_factory=list)
    server_cpu: float = math.nan
    client_cpu: float = math.nan
    rss_mean_mb: float = math.nan
    rss_max_mb: float = math.nan
    batch_mean: float = math.nan
    interims_skipped: float = math.nan
    infer_mean_s: float = math.nan
    load: str = ""
    window_s: float = 0.0
    admission_capacity: float = math.nan

    @property
    def p95(self) -> float:
        return common.percentile(self.final_s, 95)

    def ok(self, target_s: float) -> bool:
        return not self.errors and bool(self.final_s) and self.p95 < target_s


def header(interim: bool) -> str:
    cols = f"{'N':>3} {'segs':>5} {'final p50':>9} {'p95':>6} {'p99':>6}"
    if interim:
        cols += f" {'interims':>8} {'int p50':>7} {'p95':>6} {'skipped':>7}"
    return (
        cols
        + f" {'srv CPU%':>8} {'cli CPU%':>8} {'RSS MB':>7} {'batch':>5} {'infer s':>7} {'adm cap':>7}"
        + f" {'errors':>6}  load"
    )


def row(step: StepResult, interim: bool) -> str:
    f, i = step.final_s, step.interim_s
    text = (
        f"{step.n:>3} {len(f):>5} {common.fmt_s(common.percentile(f, 50)):>9} "
        f"{common.fmt_s(common.percentile(f, 95)):>6} {common.fmt_s(common.percentile(f, 99)):>6}"
    )
    if interim:
        text += (
            f" {len(i):>8} {common.fmt_s(common.percentile(i, 50)):>7} "
            f"{common.fmt_s(common.percentile(i, 95)):>6} {step.interims_skipped:>7.0f}"
        )
    return text + (
        f" {step.server_cpu:>8.0f} {step.client_cpu:>8.0f} {step.rss_max_mb:>7.0f} {step.batch_mean:>5.2f}"
        f" {common.fmt_s(step.infer_mean_s):>7} {step.admission_capacity:>7.0f}"
        f" {len(step.errors):>6}  {step.load}"
    )


async def run_step(
    server: common.ServerProcess,
    sampler: common.ProcessSampler,
    materials: list[common.Material],
    n: int,
    *,
    step_s: float,
    stagger_s: float,
    params: dict[str, object],
    chunk_ms: int,
) -> StepResult:
    """N sessions at real-time pace; measure what happens while all of them stream."""
    before = common.scrape_metrics(server)
    client = psutil.Process()
    client_cpu0 = sum(client.cpu_times()[:2])
    t0 = time.monotonic() + 0.5
    window = (t0 + stagger_s, t0 + stagger_s + step_s)
    tasks = []
    for j in range(n):
        material = materials[j % len(materials)]
        start_at = t0 + j * stagger_s / n
        tasks.append(
            common.stream_session(
                server.ws_url,
                material,
                duration_s=window[1] - start_at,
                offset_s=material.start_offset_s(j / n),
                speed=1.0,
                chunk_ms=chunk_ms,
                params=params,
                start_at=start_at,
                timeout_s=step_s + stagger_s + 300,
            )
        )
    results = await asyncio.gather(*tasks)
    after = common.scrape_metrics(server)
    admission = common.metric(after, "stream_capacity_sessions")
    server.check_alive()
    step = StepResult(n=n, load=common.loadavg(), window_s=step_s, admission_capacity=admission)
    for r in results:
        step.final_s += [
            x for x, t in zip(r.final_latencies_s, r.final_speech_end_wall_s, strict=True) if t >= window[0]
        ]
        step.interim_s += [
            x for x, t in zip(r.interim_latencies_s, r.interim_end_wall_s, strict=True) if t >= window[0]
        ]
        step.segments += r.finals
        step.sentences_sent += r.sentences_sent
        step.sentences_matched += r.sentences_matched
        step.errors += r.errors
    step.server_cpu, step.rss_mean_mb, step.rss_max_mb = sampler.window(*window)
    step.client_cpu = 100 * (sum(client.cpu_times()[:2]) - client_cpu0) / (time.monotonic() - t0)
    count = common.metric(after, "stream_batch_size_count", 0.0, kind="final") - common.metric(
        before, "stream_batch_size_count", 0.0, kind="final"
    )
    total = common.metric(after, "stream_batch_size_sum", 0.0, kind="final") - common.metric(
        before, "stream_batch_size_sum", 0.0, kind="final"
    )
    step.batch_mean = total / count if count > 0 else math.nan
    infer = common.metric(after, "stream_inference_seconds_sum", 0.0, kind="final") - common.metric(
        before, "stream_inference_seconds_sum", 0.0, kind="final"
    )
    step.infer_mean_s = infer / count if count > 0 else math.nan
    skipped = common.metric(after, "stream_interims_skipped_total", 0.0)
    step.interims_skipped = skipped - common.metric(before, "stream_interims_skipped_total", 0.0)
    return step


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_engine_arguments(parser, DEFAULT_MODEL)
    parser.add_argument("--max-wait-ms", type=int, default=10)
    parser.add_argument(
        "--endpointing", type=int, default=None, help="client endpointing, ms (default: the server's 500)"
    )
    parser.add_argument("--material", default="call", choices=common.MATERIALS, help="what each session says")
    parser.add_argument("--interim", action="store_true", help="ask for interim results too")
    parser.add_argument("--step-seconds", type=float, default=60.0, help="measured seconds per step")
    parser.add_argument(
        "--min-segments", type=int, default=20, help="lengthen small-N steps to about this many segments"
    )
    parser.add_argument("--stagger-seconds", type=float, default=10.0, help="sessions connect over this long")
    parser.add_argument("--max-n", type=int, default=64, help="largest N tried")
    parser.add_argument("--ns", default=",".join(map(str, DEFAULT_NS)), help="the N to try, ascending")
    parser.add_argument("--target-s", type=float, default=1.0, help="p95 final latency target")
    parser.add_argument(
        "--stop-s", type=float, default=None, help="go on sweeping until p95 reaches this (default: target)"
    )
    parser.add_argument("--chunk-ms", type=int, default=100, help="audio per WebSocket frame")
    parser.add_argument("--server-arg", action="append", default=[], help="another server flag (repeat)")
    parser.add_argument("--quick", action="store_true", help="N = 1, 2 for a few seconds (smoke test)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress in logs
    print(f"machine: {common.machine_line()}")
    ns = [int(x) for x in args.ns.split(",") if int(x) <= args.max_n]
    step_s, stagger_s, min_segments = args.step_seconds, args.stagger_seconds, args.min_segments
    stop_s = max(args.target_s, args.stop_s or args.target_s)
    if args.quick:
        ns, step_s, stagger_s, min_segments = [1, 2], 5.0, 0.5, 0
    model = ensure_model(args.model)
    endpointing_ms = args.endpointing or 500
    if args.quick:
        materials = [common.conversation(QUICK_SENTENCES, pauses_s=(0.8,), seed=j) for j in range(2)]
    else:
        materials = [common.material(args.material, seed=j, min_pause_ms=endpointing_ms) for j in range(8)]
    cycle_s = statistics.mean(m.duration_s / len(m.spans) for m in materials)
    params: dict[str, object] = {"punctuate": True}
    if args.endpointing:
        params["endpointing"] = args.endpointing
    if args.interim:
        params["interim_results"] = True
    server_args = common.server_args(
        args,
        model,
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--max-sessions",
        str(max(ns) + 4),
        "--admission",
        "false",
    )
    print(
        f"material: {args.material if not args.quick else 'espeak'}, {len(materials)} orders of "
        f"{len(materials[0].spans)} utterances, "
        f"{materials[0].duration_s:.0f} s each, speech {100 * materials[0].speech_ratio:.0f} %, "
        f"one utterance per {cycle_s:.1f} s; real time, {args.chunk_ms} ms chunks; endpointing "
        f"{endpointing_ms} ms; interim results {'on' if args.interim else 'off'}; "
        f"steps of {step_s:g} s (longer for small N: >= {min_segments} segments), "
        f"staggered over {stagger_s:g} s"
    )
    server = common.ServerProcess(server_args)
    print("server: " + " ".join(server.command()))
    with server:
        info = server.health.get("model", {})
        print(
            f"ready in {server.ready_s:.1f} s: {info.get('name')} {info.get('dtype')} "
            f"({info.get('backend', '-')}) on {info.get('device')}, "
            f"{info.get('workers', '1')} worker(s) x {info.get('threads', '?')} threads, "
            f"max batch {info.get('max_batch_size')}; "
            f"RSS {common.rss_mb(server.pid):.0f} MB; load average {common.loadavg()}"
        )
        sampler = common.ProcessSampler(server.pid, interval_s=1.0).start()
        try:
            print(header(args.interim))
            steps: list[StepResult] = []
            for n in ns:
                seconds = max(step_s, min_segments * cycle_s / n)
                step = asyncio.run(
                    run_step(
                        server,
                        sampler,
                        materials,
                        n,
                        step_s=seconds,
                        stagger_s=stagger_s,
                        params=params,
                        chunk_ms=args.chunk_ms,
                    )
                )
                steps.append(step)
                print(row(step, args.interim), flush=True)
                if step.errors:
                    print(f"    errors at N={n}: {sorted(set(step.errors))[:5]}")
                if not step.ok(stop_s):
                    break
            best = 0
            for s in steps:  # the largest N before the first one over the target
                if not s.ok(args.target_s):
                    break
                best = s.n
            first_fail = next((s.n for s in steps if not s.ok(args.target_s)), None)
            limit = f"; N={first_fail} did not" if first_fail else f"; every N tried passed (max {ns[-1]})"
            print(f"capacity: largest N with p95 final latency < {args.target_s:g} s: {best}{limit}")
            if best >= 1:
                half = max(1, best // 2)
                seconds = max(step_s, min_segments * cycle_s / half)
                step = asyncio.run(
                    run_step(
                        server,
                        sampler,
                        materials,
                        half,
                        step_s=seconds,
                        stagger_s=stagger_s,
                        params=params,
                        chunk_ms=args.chunk_ms,
                    )
                )
                print(f"half load, N={half}:")
                print(header(args.interim))
                print(row(step, args.interim))
                print(f"  final latency (s):   {common.summary_line(step.final_s)}")
                if args.interim:
                    print(f"  interim latency (s): {common.summary_line(step.interim_s)}")
                print(f"  sentences matched: {step.sentences_matched}/{step.sentences_sent}")
        finally:
            sampler.stop()
    print(f"load average at the end: {common.loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
