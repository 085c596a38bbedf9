"""Faster than real time: clients that push a long recording as fast as the server takes it.

Starts the server once and runs ``--clients`` (3) sessions at once, each sending ``--minutes`` (15) of
real recorded speech (``common.recorded_material``: the telephone call, the AMI meeting clips, the lecture
and the news clip, looped) **unpaced**, with the websockets library's default keepalive (a ping every
20 s, the connection dropped when no pong comes within 20 s) - what a standard client uploading a
recording does. Every client must finish: close 1000, no Error, and **every final it is owed**: as many
as the server's own session core cuts from the same audio when fed offline (``expected``). Prints per
client the wall time, finals and close code, and the server's peak RSS (the kernel's high-water mark,
``VmHWM``), its RSS before, and the most audio its spools held::

    python load_tests/fast_clients.py --model /tmp/sv-full
    python load_tests/fast_clients.py --model tiny.en --minutes 5
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from latency import DEFAULT_MODEL, QUICK_SENTENCES, ensure_model  # noqa: E402


def expected_finals(material: common.Material, offset_s: float, seconds: float) -> int:
    """How many segments the server's own session core (default settings, default VAD) cuts from the
    same looped audio: the finals a client is owed, whatever the pace it was sent at."""
    from stream_server.config import Config
    from stream_server.protocol import ModelInfo, StreamOptions
    from stream_server.session import Session, SessionIdentity, SessionSettings
    from stream_server.transport import default_vad_factory

    config = Config()
    identity = SessionIdentity("expected", "2026-01-01T00:00:00Z", ModelInfo("none", "0", "none", "none"))
    settings = SessionSettings(segmenter=config.segmenter, interim=config.interim)
    session = Session(StreamOptions(), settings, default_vad_factory(config)(), identity)
    total = int(seconds * common.SAMPLE_RATE_HZ)
    step = common.SAMPLE_RATE_HZ  # 1 s at a time
    for position in range(0, total, step):
        pcm = common.looped_pcm(material, offset_s, position, min(step, total - position))
        session.receive_audio(pcm.astype("<i2").tobytes())
        session.jobs_to_run()
    session.receive_text('{"type": "CloseStream"}')
    return session.segments_finalized


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_engine_arguments(parser, DEFAULT_MODEL)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=15.0, help="audio per client")
    parser.add_argument("--chunk-ms", type=int, default=100, help="audio per WebSocket frame")
    parser.add_argument("--timeout-minutes", type=float, default=60.0, help="give up after this long")
    parser.add_argument("--server-arg", action="append", default=[], help="another server flag (repeat)")
    parser.add_argument("--quick", action="store_true", help="2 clients, 20 s each (smoke test)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    print(f"machine: {common.machine_line()}")
    model = ensure_model(args.model)
    clients, seconds = args.clients, args.minutes * 60
    if args.quick:
        clients, seconds = 2, 20.0
        material = common.conversation(QUICK_SENTENCES, pauses_s=(0.8,), seed=3)
    else:
        material = common.recorded_material()
    # The quick smoke test runs the fallback model, whose measured capacity may be a single stream.
    extra = ["--admission", "false"] if args.quick else []
    server = common.ServerProcess(common.server_args(args, model, *extra))
    print("server: " + " ".join(server.command()))
    print(
        f"material: {len(material.spans)} utterances in {material.duration_s:.0f} s (looped); "
        f"{clients} clients x {seconds / 60:.1f} min, unpaced, {args.chunk_ms} ms frames, websockets "
        "keepalive 20 s / 20 s"
    )
    with server:
        rss_ready = common.rss_mb(server.pid)
        common.peak_rss_reset(server.pid)
        spooled_peak = 0.0
        done = threading.Event()

        def watch() -> None:
            nonlocal spooled_peak
            while not done.wait(1.0):
                try:
                    values = common.scrape_metrics(server)
                except (OSError, common.ServerError):
                    continue
                spooled_peak = max(spooled_peak, common.metric(values, "stream_spooled_bytes", 0.0))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started = time.monotonic()

        async def run_all() -> list[common.SessionResult]:
            return await asyncio.gather(
                *(
                    common.stream_session(
                        server.ws_url,
                        material,
                        duration_s=seconds,
                        offset_s=material.start_offset_s(j / clients),
                        speed=0.0,
                        chunk_ms=args.chunk_ms,
                        timeout_s=args.timeout_minutes * 60,
                    )
                    for j in range(clients)
                )
            )

        results = asyncio.run(run_all())
        wall_s = time.monotonic() - started
        done.set()
        watcher.join(timeout=5)
        server.check_alive()
        peak = common.peak_rss_mb(server.pid)
        rss_end = common.rss_mb(server.pid)
    print(
        f"{'client':>6} {'audio s':>8} {'wall s':>7} {'x real time':>11} {'finals':>6} {'expected':>8} "
        f"{'utterances matched':>18} close errors"
    )
    ok = True
    for j, r in enumerate(results):
        speed = r.audio_s / r.wall_s if r.wall_s > 0 else math.nan
        owed = expected_finals(material, material.start_offset_s(j / clients), seconds)
        complete = r.close_code == 1000 and not r.errors and r.finals == owed
        ok = ok and complete
        print(
            f"{j:>6} {r.audio_s:>8.0f} {r.wall_s:>7.1f} {speed:>11.1f} {r.finals:>6} {owed:>8} "
            f"{r.sentences_matched:>11}/{r.sentences_sent:<6} {r.close_code} {r.errors or 'none'}"
        )
    print(
        f"all {clients} finished in {wall_s:.1f} s: {'every' if ok else 'NOT every'} client complete; "
        f"server RSS ready {rss_ready:.0f} MB, peak {peak:.0f} MB (VmHWM while streaming), end "
        f"{rss_end:.0f} MB; spooled at most {spooled_peak / 2**20:.1f} MiB"
    )
    print(f"load average at the end: {common.loadavg()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
