"""Soak: does the server's memory stay flat while sessions carry hours of audio?

Starts the server as a subprocess on 127.0.0.1 and opens ``--sessions`` sessions that stream as fast as
the server takes them (speed 0: the server's back-pressure paces them) until each has carried
``--hours`` of audio (default 8). The material looks like one participant's microphone in a meeting
(:func:`common.meeting`, about 15 minutes, looped, each session its own order): turns of one to three
espeak-ng sentences, long stretches of silence, and monologues of over 30 s that hit the
``--max-segment-ms`` cut (20 s); speech makes up ``--speech-ratio`` of it (default 25 %).

Every ``--sample-every-s`` seconds of audio per session it samples the server's RSS (psutil) and, when
``/metrics`` has them (CUDA), GPU memory reserved / allocated and NVML used. It prints the series as a
table (audio hours vs RSS), saves every sample to ``load_tests/out/soak.csv`` and a plot to
``load_tests/out/soak.png``, and prints the drift between the first hour after warm-up
(``--warmup-minutes``, default 10) and the last hour, in MB and %. It also prints the RSS after the
first minute of audio and after 60 minutes (issue 2: ``--hours 1 --sessions 1``)::

    python load_tests/soak.py --model /tmp/sv-full --dtype int8 --sessions 1 --hours 8
    python load_tests/soak.py --model /tmp/sv-full --dtype int8 --sessions 1 --hours 1

On a 2-core machine the time goes into decoding the speech (the silence costs almost nothing), so the
speech ratio and int8 are what keep 8 hours with the full-size SenseVoice well under 40 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from latency import DEFAULT_MODEL, ensure_model  # noqa: E402


@dataclass(frozen=True)
class Point:
    """One sample: audio per session (s), wall time (s), RSS (MB), GPU figures (MB, NaN without GPU)."""

    audio_s: float
    wall_s: float
    rss_mb: float
    gpu_reserved_mb: float
    gpu_allocated_mb: float
    gpu_nvml_mb: float
    finals: float


def take_point(server: common.ServerProcess, audio_s: float, started: float) -> Point:
    values = common.scrape_metrics(server)
    mb = 2.0**20
    return Point(
        audio_s=audio_s,
        wall_s=time.monotonic() - started,
        rss_mb=common.rss_mb(server.pid),
        gpu_reserved_mb=common.metric(values, "stream_gpu_memory_reserved_bytes") / mb,
        gpu_allocated_mb=common.metric(values, "stream_gpu_memory_allocated_bytes") / mb,
        gpu_nvml_mb=common.metric(values, "stream_gpu_nvml_used_bytes") / mb,
        finals=common.metric(values, "stream_segments_finalized_total"),
    )


async def soak(
    server: common.ServerProcess,
    materials: list[common.Material],
    *,
    sessions: int,
    audio_s: float,
    sample_every_s: float,
    chunk_ms: int,
    timeout_s: float,
    report_every_s: float,
) -> tuple[list[Point], list[common.SessionResult]]:
    """Stream, sampling every ``sample_every_s`` of mean audio per session (a progress line every
    ``report_every_s``)."""
    progress = [common.Progress() for _ in range(sessions)]
    started = time.monotonic()
    tasks = [
        asyncio.ensure_future(
            common.stream_session(
                server.ws_url,
                materials[j % len(materials)],
                duration_s=audio_s,
                offset_s=materials[j % len(materials)].start_offset_s(j / sessions),
                speed=0.0,
                chunk_ms=chunk_ms,
                measure=False,
                progress=progress[j],
                timeout_s=timeout_s,
            )
        )
        for j in range(sessions)
    ]
    points = [take_point(server, 0.0, started)]
    next_s = sample_every_s
    next_report_s = report_every_s
    deadline = started + timeout_s + 30
    while not all(t.done() for t in tasks) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        mean_s = sum(p.samples_sent for p in progress) / sessions / common.SAMPLE_RATE_HZ
        if mean_s >= next_s and next_s <= audio_s + 1e-6:
            # One sample per poll: at high speed several sample times can pass between two polls.
            points.append(take_point(server, mean_s, started))
            next_s = (math.floor(mean_s / sample_every_s) + 1) * sample_every_s
            if points[-1].audio_s >= next_report_s:
                p = points[-1]
                print(
                    f"  ... {p.audio_s / 3600:.2f} h: RSS {p.rss_mb:.0f} MB after {p.wall_s / 60:.1f} min",
                    flush=True,
                )
                next_report_s += report_every_s
    results = list(await asyncio.gather(*tasks))
    final_s = sum(p.samples_sent for p in progress) / sessions / common.SAMPLE_RATE_HZ
    if final_s > points[-1].audio_s + 1:
        points.append(take_point(server, final_s, started))
    return points, results


def rss_at(points: list[Point], audio_s: float) -> Point | None:
    """The first point at or after ``audio_s`` of audio."""
    return next((p for p in points if p.audio_s >= audio_s - 1e-6), None)


def drift(points: list[Point], hours: float, warmup_min: float, window_min: float) -> tuple[str, float]:
    """A line about the drift between the first window after warm-up and the last window, and the %."""
    total_min = hours * 60
    window = min(window_min, max(0.0, (total_min - warmup_min) / 2))
    first = [p.rss_mb for p in points if warmup_min * 60 <= p.audio_s <= (warmup_min + window) * 60]
    last = [p.rss_mb for p in points if (total_min - window) * 60 <= p.audio_s <= total_min * 60 + 1]
    if window <= 0 or not first or not last:
        return "drift: not enough audio after warm-up for two windows", math.nan
    a, b = sum(first) / len(first), sum(last) / len(last)
    pct = 100 * (b - a) / a
    line = (
        f"drift: mean RSS {a:.0f} MB over minutes {warmup_min:g}-{warmup_min + window:g} of audio "
        f"({len(first)} samples) vs {b:.0f} MB over minutes {total_min - window:g}-{total_min:g} "
        f"({len(last)} samples): {b - a:+.1f} MB ({pct:+.2f} %)"
    )
    return line, pct


def plot(points: list[Point], path: Path, title: str, warmup_min: float) -> None:
    """RSS (and GPU memory when measured) against audio hours, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu = any(not math.isnan(p.gpu_reserved_mb) for p in points)
    fig, axes = plt.subplots(2 if gpu else 1, 1, figsize=(10, 6 if gpu else 4.5), sharex=True, squeeze=False)
    hours = [p.audio_s / 3600 for p in points]
    ax = axes[0][0]
    ax.plot(hours, [p.rss_mb for p in points], marker=".", label="server RSS")
    ax.axvline(warmup_min / 60, color="grey", linestyle=":", label="end of warm-up")
    ax.set_ylabel("MB")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    if gpu:
        ax = axes[1][0]
        ax.plot(hours, [p.gpu_reserved_mb for p in points], label="torch reserved")
        ax.plot(hours, [p.gpu_allocated_mb for p in points], label="torch allocated")
        ax.plot(hours, [p.gpu_nvml_mb for p in points], label="NVML used")
        ax.set_ylabel("GPU MB")
        ax.set_ylim(bottom=0)
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("hours of audio per session")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a SenseVoice folder, or tiny.en")
    parser.add_argument("--dtype", default="int8", choices=("auto", "fp32", "int8"))
    parser.add_argument("--threads", type=int, default=0, help="model threads (0: every core)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--sessions", type=int, default=1, help="concurrent sessions")
    parser.add_argument("--hours", type=float, default=8.0, help="hours of audio each session carries")
    parser.add_argument(
        "--speech-ratio", type=float, default=0.25, help="share of the material that is speech"
    )
    parser.add_argument("--sample-every-s", type=float, default=60.0, help="seconds of audio between samples")
    parser.add_argument(
        "--warmup-minutes", type=float, default=10.0, help="audio minutes left out of the drift"
    )
    parser.add_argument("--window-minutes", type=float, default=60.0, help="first/last window for the drift")
    parser.add_argument("--table-every-min", type=float, default=0, help="table row spacing (0: automatic)")
    parser.add_argument("--chunk-ms", type=int, default=1000, help="audio per WebSocket frame")
    parser.add_argument("--timeout-minutes", type=float, default=60.0, help="give up after this long")
    parser.add_argument("--out", type=Path, default=common.OUT_DIR, help="where soak.csv and soak.png go")
    parser.add_argument("--server-arg", action="append", default=[], help="another server flag (repeat)")
    parser.add_argument("--server-env", action="append", default=[], help="K=V for the server (repeat)")
    parser.add_argument(
        "--replot", type=Path, default=None, help="no run: re-read a soak.csv, print and plot it again"
    )
    parser.add_argument("--quick", action="store_true", help="2 minutes of audio (smoke test)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress in logs
    hours, sample_every, warmup, window = (
        args.hours,
        args.sample_every_s,
        args.warmup_minutes,
        args.window_minutes,
    )
    if args.quick:
        # Windows wide enough to hold samples however fast the machine streams (drift over 0-1 min vs 1-2).
        hours, sample_every, warmup, window = 2 / 60, 10.0, 0.0, 1.0
    if args.replot is not None:
        points, head = read_csv(args.replot)
        hours = args.hours if args.hours != 8.0 else points[-1].audio_s / 3600
        every = args.table_every_min or (30.0 if hours >= 4 else 5.0)
        print(f"re-reading {args.replot}: {head}; warm-up {warmup:g} min, windows {window:g} min")
        report(points, hours=hours, warmup=warmup, window=window, every_min=every, head=head, out=args.out)
        return 0
    print(f"machine: {common.machine_line()}")
    model = ensure_model(args.model)
    materials = [common.meeting(speech_ratio=args.speech_ratio, seed=j) for j in range(args.sessions)]
    m = materials[0]
    print(
        f"material: meeting microphone, {m.duration_s / 60:.1f} min looped, {len(m.spans)} sentences, "
        f"speech {100 * m.speech_ratio:.0f} %, with monologues over 30 s; {args.sessions} session(s) x "
        f"{hours:g} h of audio at speed 0 in {args.chunk_ms} ms chunks"
    )
    server_args = common.server_args(args, model)
    env = dict(item.split("=", 1) for item in args.server_env)
    server = common.ServerProcess(server_args, env=env)
    print(
        "server: "
        + " ".join(f"{k}={v}" for k, v in env.items())
        + (" " if env else "")
        + " ".join(server.command())
    )
    load_before = common.loadavg()
    with server:
        info = server.health.get("model", {})
        print(
            f"ready in {server.ready_s:.1f} s: {info.get('name')} {info.get('dtype')} "
            f"on {info.get('device')}; "
            f"RSS {common.rss_mb(server.pid):.0f} MB; load average {load_before}"
        )
        started = time.monotonic()
        points, results = asyncio.run(
            soak(
                server,
                materials,
                sessions=args.sessions,
                audio_s=hours * 3600,
                sample_every_s=sample_every,
                chunk_ms=args.chunk_ms,
                timeout_s=args.timeout_minutes * 60,
                report_every_s=max(sample_every, 1800.0 if hours >= 4 else 300.0),
            )
        )
        wall = time.monotonic() - started
        server.check_alive()
    load_after = common.loadavg()
    errors = [e for r in results for e in r.errors]
    finals = sum(r.finals for r in results)
    cut = sum(r.cut_finals for r in results)
    audio_h = sum(r.audio_s for r in results) / 3600
    print(
        f"streamed {audio_h:.2f} h of audio in total ({audio_h / max(1, args.sessions):.2f} h per session) "
        f"in {wall / 60:.1f} min ({audio_h * 3600 / wall:.1f}x real time); {finals} finals, {cut} not ended "
        f"by a pause (max-segment cuts and the last one); errors: {errors or 'none'}"
    )
    print(f"load average: before {load_before}; after {load_after}")

    every = args.table_every_min or (30.0 if hours >= 4 else 5.0 if hours >= 0.5 else sample_every / 60)
    head = (
        f"{info.get('name')} {info.get('dtype')} on {info.get('device')}, {args.sessions} session(s) x "
        f"{hours:g} h, speech {100 * m.speech_ratio:.0f} %"
    )
    report(points, hours=hours, warmup=warmup, window=window, every_min=every, head=head, out=args.out)
    return 0 if not errors else 1


def report(
    points: list[Point], *, hours: float, warmup: float, window: float, every_min: float, head: str, out: Path
) -> None:
    """Print the table, the drift and the RSS at 1 and 60 minutes; save the CSV and the plot."""
    gpu = any(not math.isnan(p.gpu_reserved_mb) for p in points)
    print(
        f"{'audio h':>8} {'audio min':>9} {'wall min':>8} {'RSS MB':>8}"
        + ("  GPU reserved/allocated/NVML MB" if gpu else "")
    )
    targets = [k * every_min * 60 for k in range(int(hours * 60 / every_min) + 1)]
    rows = [p for p in (rss_at(points, t) for t in targets) if p is not None] + [points[-1]]
    for p in dict.fromkeys(rows):  # in order, without repeats
        extra = f"  {p.gpu_reserved_mb:.0f}/{p.gpu_allocated_mb:.0f}/{p.gpu_nvml_mb:.0f}" if gpu else ""
        print(
            f"{p.audio_s / 3600:>8.2f} {p.audio_s / 60:>9.1f} {p.wall_s / 60:>8.1f} {p.rss_mb:>8.0f}{extra}"
        )
    line, _ = drift(points, hours, warmup, window)
    print(line)
    after_warmup = [p.rss_mb for p in points if p.audio_s >= warmup * 60]
    if after_warmup:
        print(f"RSS after warm-up: min {min(after_warmup):.0f} MB, max {max(after_warmup):.0f} MB")
    for minutes in (1, 60):
        point = rss_at(points, minutes * 60)
        if point is not None:
            print(f"RSS after {minutes} min of audio per session: {point.rss_mb:.0f} MB")
    end = points[-1]
    print(f"RSS after {end.audio_s / 60:.1f} min of audio per session (the end): {end.rss_mb:.0f} MB")

    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "soak.csv"
    with csv_path.open("w", newline="") as stream:
        stream.write(f"# {head}\n")
        writer = csv.writer(stream)
        writer.writerow(["audio_s", "wall_s", "rss_mb", "gpu_reserved_mb", "gpu_allocated_mb", "gpu_nvml_mb"])
        for p in points:
            writer.writerow(
                [f"{p.audio_s:.1f}", f"{p.wall_s:.1f}", f"{p.rss_mb:.1f}"]
                + [f"{v:.1f}" for v in (p.gpu_reserved_mb, p.gpu_allocated_mb, p.gpu_nvml_mb)]
            )
    png = out / "soak.png"
    plot(points, png, f"stream_server soak: {head}\n{line.split(': ', 1)[-1]}", warmup)
    print(f"saved {csv_path} and {png}")


def read_csv(path: Path) -> tuple[list[Point], str]:
    """The points and the description line of a CSV this script saved."""
    lines = path.read_text().splitlines()
    head = lines[0][2:] if lines and lines[0].startswith("# ") else path.name
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    points = [
        Point(
            audio_s=float(r["audio_s"]),
            wall_s=float(r["wall_s"]),
            rss_mb=float(r["rss_mb"]),
            gpu_reserved_mb=float(r["gpu_reserved_mb"]),
            gpu_allocated_mb=float(r["gpu_allocated_mb"]),
            gpu_nvml_mb=float(r["gpu_nvml_mb"]),
            finals=math.nan,
        )
        for r in rows
    ]
    return points, head


if __name__ == "__main__":
    sys.exit(main())
