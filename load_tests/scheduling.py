"""Scheduling choices at one load: which engine workers, threads, batching and speculation give the best
tail latency.

For each configuration in ``--configs`` it starts a fresh server (admission off, so every session is
served) and runs one step of ``capacity.py`` at ``--n`` concurrent real-time sessions of real recorded
conversation, printing the end-of-speech-to-final p50/p95/p99, the mean batch and model call of finals,
the server's CPU and the speculation outcomes. A configuration is ``WxT`` (engine workers x threads per
worker) with optional suffixes: ``bN`` (max batch N; without it the server's default, 1 on CPU),
``nospec`` (speculative finals off), ``w0`` (max wait 0 ms, no waiting for company), ``specM`` (speculative
finals M ms into a pause instead of 200)::

    python load_tests/scheduling.py --model /tmp/sv-full --n 16
    python load_tests/scheduling.py --model /tmp/sv-full --n 8 --configs 2x1,1x2,2x1-b8,2x1-nospec

These are the measurements behind the server's defaults (README, "Batching and scheduling").
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from capacity import run_step  # noqa: E402
from latency import DEFAULT_MODEL, QUICK_SENTENCES, ensure_model  # noqa: E402

DEFAULT_CONFIGS = "2x1,1x2,2x1-b8,1x2-b8,2x1-nospec,1x2-nospec,2x1-spec300"


def config_flags(config: str) -> list[str]:
    """Server flags for a configuration name such as ``2x1-b1-nospec``."""
    shape, *suffixes = config.split("-")
    workers, threads = (int(x) for x in shape.lower().split("x"))
    flags = ["--workers", str(workers), "--threads", str(threads)]
    for suffix in suffixes:
        if suffix.startswith("b") and suffix[1:].isdigit():
            flags += ["--max-batch-size", suffix[1:]]
        elif suffix.startswith("spec") and suffix[4:].isdigit():
            flags += ["--speculative-final-ms", suffix[4:]]
        elif suffix == "nospec":
            flags += ["--speculative-final-ms", "0"]
        elif suffix == "w0":
            flags += ["--max-wait-ms", "0"]
        else:
            raise ValueError(f"unknown configuration suffix {suffix!r} in {config!r}")
    return flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a SenseVoice folder, or tiny.en")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "int8"))
    parser.add_argument("--backend", default=None, choices=("auto", "onnx", "torch"))
    parser.add_argument("--n", type=int, default=16, help="concurrent sessions")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated configurations")
    parser.add_argument("--step-seconds", type=float, default=90.0, help="measured seconds per config")
    parser.add_argument("--stagger-seconds", type=float, default=10.0, help="sessions connect over this long")
    parser.add_argument("--material", default="call", choices=common.MATERIALS)
    parser.add_argument("--server-arg", action="append", default=[], help="another server flag (repeat)")
    parser.add_argument("--quick", action="store_true", help="N=2, two configs, a few seconds (smoke test)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    print(f"machine: {common.machine_line()}")
    model = ensure_model(args.model)
    configs, n, step_s, stagger_s = args.configs.split(","), args.n, args.step_seconds, args.stagger_seconds
    if args.quick:
        configs, n, step_s, stagger_s = ["1x2", "2x1-b2"], 2, 5.0, 0.5
        materials = [common.conversation(QUICK_SENTENCES, pauses_s=(0.8,), seed=j) for j in range(2)]
    else:
        materials = [common.material(args.material, seed=j) for j in range(8)]
    cycle_s = statistics.mean(m.duration_s / len(m.spans) for m in materials)
    print(
        f"material: {args.material if not args.quick else 'espeak'}, one utterance per {cycle_s:.1f} s per "
        f"session; N={n} real-time sessions, {step_s:g} s measured per configuration"
    )
    print(
        f"{'config':<14} {'segs':>5} {'p50':>6} {'p95':>6} {'p99':>6} {'batch':>5} {'infer s':>7} "
        f"{'srv CPU%':>8} {'spec used/wasted/refused':>24} {'errors':>6}  load"
    )
    for config in configs:
        base = argparse.Namespace(
            dtype=args.dtype,
            threads=0,
            max_batch_size=0,
            backend=args.backend,
            workers=None,
            server_arg=[*config_flags(config), *args.server_arg],
        )
        flags = common.server_args(base, model, "--admission", "false", "--max-sessions", str(n + 4))
        server = common.ServerProcess(flags)
        with server:
            sampler = common.ProcessSampler(server.pid, interval_s=1.0).start()
            before = common.scrape_metrics(server)
            try:
                step = asyncio.run(
                    run_step(
                        server,
                        sampler,
                        materials,
                        n,
                        step_s=step_s,
                        stagger_s=stagger_s,
                        params={"punctuate": True},
                        chunk_ms=100,
                    )
                )
            finally:
                sampler.stop()
            after = common.scrape_metrics(server)
        spec = [
            common.metric(after, "stream_speculative_finals_total", 0.0, outcome=o)
            - common.metric(before, "stream_speculative_finals_total", 0.0, outcome=o)
            for o in ("used", "wasted", "refused")
        ]
        f = step.final_s
        print(
            f"{config:<14} {len(f):>5} {common.fmt_s(common.percentile(f, 50)):>6} "
            f"{common.fmt_s(common.percentile(f, 95)):>6} {common.fmt_s(common.percentile(f, 99)):>6} "
            f"{step.batch_mean:>5.2f} {common.fmt_s(step.infer_mean_s):>7} {step.server_cpu:>8.0f} "
            f"{'/'.join(f'{x:.0f}' for x in spec):>24} {len(step.errors):>6}  {step.load}"
        )
    print(f"load average at the end: {common.loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
