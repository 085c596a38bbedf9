"""Overload: offer more real-time sessions than the server can serve, and check it refuses the excess.

Starts the server once (admission by measured capacity on, with the engine's latency target: 1000 ms
for SenseVoice, 1500 ms for tiny.en, or ``--target-latency-ms``) and, for each multiple ``k`` in
``--multiples`` (2 and 4), offers ``k x N`` sessions, where ``N`` is the capacity measured by
``capacity.py`` (``--capacity``), arriving evenly over ``--arrival-s`` seconds (a rush: a meeting
starting, a shift of call agents logging in). Each session streams real recorded
conversation (``common.recorded_conversation``, its own order) at real-time pace for ``--step-seconds``.

Per step it prints how many sessions were admitted and refused (HTTP 503 at the handshake), the
end-of-speech-to-final latency of the admitted ones (p50/p95/p99, from the true end of each utterance,
only while all admitted ones stream), and how many admitted sessions were disconnected or got an Error
event: the promise is p95 within the target, the excess refused at the handshake, and **zero** admitted
sessions hurt. Steps are separated by a pause so the server's measured load settles::

    python load_tests/overload.py --model /tmp/sv-full --capacity 16
    python load_tests/overload.py --model tiny.en --capacity 4

The client runs in this process on the same machine, so its CPU (printed) competes with the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from latency import DEFAULT_MODEL, QUICK_SENTENCES, ensure_model  # noqa: E402


@dataclass
class Step:
    offered: int
    admitted: int = 0
    refused: int = 0
    final_s: list[float] = field(default_factory=list)
    hurt: list[str] = field(default_factory=list)
    other_errors: list[str] = field(default_factory=list)
    finals: int = 0
    server_cpu: float = math.nan
    rss_max_mb: float = math.nan
    capacity_before: float = math.nan
    load: str = ""


async def run_step(
    server: common.ServerProcess,
    sampler: common.ProcessSampler,
    materials: list[common.Material],
    offered: int,
    *,
    step_s: float,
    arrival_s: float,
    params: dict[str, object],
) -> Step:
    """``offered`` sessions arriving over ``arrival_s``; each streams until the step ends."""
    step = Step(offered=offered)
    step.capacity_before = common.metric(common.scrape_metrics(server), "stream_capacity_sessions_left")
    t0 = time.monotonic() + 0.5
    end = t0 + arrival_s + step_s
    tasks = []
    for j in range(offered):
        start_at = t0 + j * arrival_s / offered
        material = materials[j % len(materials)]
        tasks.append(
            common.stream_session(
                server.ws_url,
                material,
                duration_s=end - start_at,
                offset_s=material.start_offset_s(j / offered),
                speed=1.0,
                params=params,
                start_at=start_at,
                timeout_s=arrival_s + step_s + 300,
            )
        )
    results = await asyncio.gather(*tasks)
    server.check_alive()
    window = (t0 + arrival_s, end)
    for r in results:
        refused = [e for e in r.errors if e.startswith("refused")]
        if refused:
            step.refused += 1
            step.other_errors += [e for e in refused if "503" not in e]
            continue
        step.admitted += 1
        step.finals += r.finals
        step.final_s += [
            x for x, t in zip(r.final_latencies_s, r.final_speech_end_wall_s, strict=True) if t >= window[0]
        ]
        step.hurt += r.errors  # an Error event, a close other than 1000, a timeout
    step.server_cpu, _, step.rss_max_mb = sampler.window(*window)
    step.load = common.loadavg()
    return step


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_engine_arguments(parser, DEFAULT_MODEL)
    parser.add_argument("--capacity", type=int, required=False, default=8, help="N measured by capacity.py")
    parser.add_argument("--multiples", default="2,4", help="offer these multiples of N")
    parser.add_argument("--arrival-s", type=float, default=5.0, help="sessions arrive over this long")
    parser.add_argument("--step-seconds", type=float, default=60.0, help="measured seconds per step")
    parser.add_argument("--settle-s", type=float, default=15.0, help="pause between steps")
    parser.add_argument(
        "--target-latency-ms", type=int, default=0, help="the server's admission target (0: the engine's own)"
    )
    parser.add_argument("--material", default="call", choices=common.MATERIALS)
    parser.add_argument("--server-arg", action="append", default=[], help="another server flag (repeat)")
    parser.add_argument("--quick", action="store_true", help="N=1, x2, a few seconds (smoke test)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    print(f"machine: {common.machine_line()}")
    model = ensure_model(args.model)
    multiples = [int(x) for x in args.multiples.split(",")]
    step_s, arrival_s, settle_s = args.step_seconds, args.arrival_s, args.settle_s
    if args.quick:
        multiples, step_s, arrival_s, settle_s = [2], 6.0, 1.0, 1.0
        materials = [common.conversation(QUICK_SENTENCES, pauses_s=(0.8,), seed=j) for j in range(2)]
    else:
        materials = [common.material(args.material, seed=j) for j in range(8)]
    server_args = common.server_args(
        args,
        model,
        *(["--target-latency-ms", str(args.target_latency_ms)] if args.target_latency_ms else []),
        "--max-sessions",
        str(max(multiples) * args.capacity + 8),
    )
    server = common.ServerProcess(server_args)
    print("server: " + " ".join(server.command()))
    ok = True
    with server:
        info = server.health.get("model", {})
        cap = server.health.get("capacity", {})
        print(
            f"ready in {server.ready_s:.1f} s: {info.get('name')} {info.get('dtype')} "
            f"({info.get('backend', '-')}), {cap.get('workers')} worker(s); admission says "
            f"{cap.get('capacity_sessions')} typical sessions at {cap.get('target_latency_ms')} ms; "
            f"measured capacity given: N={args.capacity}"
        )
        sampler = common.ProcessSampler(server.pid, interval_s=1.0).start()
        try:
            print(
                f"{'offered':>7} {'admitted':>8} {'refused':>7} {'finals':>6} {'p50':>6} {'p95':>6} "
                f"{'p99':>6} {'hurt':>4} {'srv CPU%':>8} {'RSS MB':>7} {'seats before':>12}  load"
            )
            for k in multiples:
                offered = k * args.capacity
                step = asyncio.run(
                    run_step(
                        server,
                        sampler,
                        materials,
                        offered,
                        step_s=step_s,
                        arrival_s=arrival_s,
                        params={"punctuate": True},
                    )
                )
                p = [common.percentile(step.final_s, q) for q in (50, 95, 99)]
                print(
                    f"{offered:>7} {step.admitted:>8} {step.refused:>7} {step.finals:>6} "
                    f"{common.fmt_s(p[0]):>6} {common.fmt_s(p[1]):>6} {common.fmt_s(p[2]):>6} "
                    f"{len(step.hurt):>4} {step.server_cpu:>8.0f} {step.rss_max_mb:>7.0f} "
                    f"{step.capacity_before:>12.0f}  {step.load}"
                )
                if step.hurt or step.other_errors:
                    print(f"    problems: {sorted(set(step.hurt + step.other_errors))[:5]}")
                target_s = float(cap.get("target_latency_ms", 1000)) / 1000
                good = not step.hurt and not step.other_errors and step.refused > 0 and p[1] <= target_s
                print(
                    f"    {'OK' if good else 'NOT MET'}: admitted p95 {common.fmt_s(p[1])} s "
                    f"(target {target_s:g} s), {step.refused} refused at the handshake, "
                    f"{len(step.hurt)} admitted sessions hurt"
                )
                ok = ok and good
                time.sleep(settle_s)
        finally:
            sampler.stop()
    print(f"load average at the end: {common.loadavg()}")
    return 0 if ok or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
