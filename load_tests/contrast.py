"""Contrast: memory against audio length, decoding a whole recording at once (the naive way) vs streaming.

The published SenseVoice memory table (GPU memory for one long file decoded at once: about 3.3 GB at
15 s, 9 GB at 10 min, out of memory at 15 min on a 24 GB card) is what happens when a whole recording
goes through the encoder in one piece: attention is quadratic in its length. This script measures both
ways on the same machine, with the same model (default: the full-size random SenseVoice Small, fp32):

* **naive**: for each length, a FRESH subprocess loads the model with ``funasr.AutoModel`` and calls
  ``generate(input=<the whole clip>)`` once: no VAD, no cutting. It reports its RSS after loading, the
  kernel's RSS high-water mark during the decode (``VmHWM``, reset after loading), its lifetime peak
  (``ru_maxrss``, loading included), the decode time and, on CUDA, ``torch.cuda.max_memory_reserved``.
  A length that runs past ``--time-limit-s`` or whose RSS passes ``--mem-limit-gb`` is stopped and
  reported as such, and longer lengths are not run.
* **ours**: one server (same model, same dtype, default settings) as a subprocess on 127.0.0.1; each
  length streams through one fresh session as fast as the server takes it. It reports the server's RSS
  before, the high-water mark during the stream (``VmHWM``, reset before it) and the wall time.

The audio is real recorded English (the lecture and news clips, 229 s together) looped to each length::

    python load_tests/contrast.py --model /tmp/sv-full
    python load_tests/contrast.py --lengths 15,30,60,120,300,600,900 --time-limit-s 600 --mem-limit-gb 16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from latency import DEFAULT_MODEL, ensure_model  # noqa: E402

DEFAULT_LENGTHS = (15, 30, 60, 120, 300, 600, 900)


def speech(length_s: float) -> np.ndarray:
    """Real recorded speech (lecture then news) looped to ``length_s``, int16 at 16 kHz."""
    from stream_server.testing.speech import read_wav, recorded_speech

    parts = [read_wav(recorded_speech(name))[0] for name in ("lecture", "news")]
    source = np.concatenate(parts)
    n = int(length_s * common.SAMPLE_RATE_HZ)
    return source[np.arange(n) % len(source)]


# --------------------------------------------------------------------------------------------------
# The naive decode, in a fresh process


def naive_child(model: str, length_s: float, device: str, threads: int) -> int:
    """Load the model with funasr, decode ``length_s`` of speech in one call, print one JSON line."""
    import torch
    from funasr import AutoModel

    pid = os.getpid()
    started = time.perf_counter()
    auto = AutoModel(model=model, device=device, ncpu=threads, disable_update=True, disable_pbar=True)
    load_s = time.perf_counter() - started
    audio = speech(length_s).astype(np.float32) / 32768.0
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_loaded = common.rss_mb(pid)
    reset = common.peak_rss_reset(pid)
    started = time.perf_counter()
    result = auto.generate(input=audio, cache={}, language="auto", use_itn=True)
    if cuda:
        torch.cuda.synchronize()
    decode_s = time.perf_counter() - started
    report = {
        "length_s": length_s,
        "load_s": load_s,
        "decode_s": decode_s,
        "rss_loaded_mb": rss_loaded,
        "decode_peak_mb": common.peak_rss_mb(pid) if reset else math.nan,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_max_reserved_mb": torch.cuda.max_memory_reserved() / 2**20 if cuda else math.nan,
        "text_chars": len(str(result[0].get("text", ""))) if result else 0,
    }
    print("NAIVE " + json.dumps(report), flush=True)
    return 0


@dataclass
class NaiveRow:
    """One naive decode, or why it stopped."""

    length_s: float
    report: dict[str, float] | None = None
    status: str = "ok"
    wall_s: float = math.nan
    sampled_peak_mb: float = math.nan
    ru_maxrss_mb: float = math.nan


def run_naive(
    model: str, length_s: float, *, device: str, threads: int, time_limit_s: float, mem_limit_mb: float
) -> NaiveRow:
    """One fresh process; stopped (SIGKILL) past the time or memory budget."""
    row = NaiveRow(length_s)
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--naive-child",
        str(length_s),
        "--model",
        model,
        "--device",
        device,
        "--threads",
        str(threads),
    ]
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True)
        proc = psutil.Process(child.pid)
        peak = 0.0
        stopped = ""
        # wait4, not poll(): it reaps the child and gives its own rusage (ru_maxrss), killed or not.
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            with contextlib.suppress(psutil.Error):
                peak = max(peak, proc.memory_info().rss / 2**20)
            if time.monotonic() - started > time_limit_s:
                stopped = f"stopped: over the {time_limit_s:.0f} s time limit"
            elif peak > mem_limit_mb:
                stopped = f"stopped: RSS passed the {mem_limit_mb / 1024:.0f} GB memory limit"
            if stopped:
                child.send_signal(signal.SIGKILL)
                _, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(0.05)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    row.wall_s = time.monotonic() - started
    row.sampled_peak_mb = peak
    row.ru_maxrss_mb = usage.ru_maxrss / 1024
    line = next((x for x in text.splitlines() if x.startswith("NAIVE ")), None)
    if stopped:
        row.status = stopped
    elif child.returncode != 0 or line is None:
        killed = child.returncode == -signal.SIGKILL
        row.status = "killed (out of memory?)" if killed else f"failed ({child.returncode})"
        print(text[-2000:], file=sys.stderr)
    else:
        row.report = json.loads(line[len("NAIVE ") :])
    return row


# --------------------------------------------------------------------------------------------------
# Ours: the server


@dataclass
class OursRow:
    """One length streamed through one session of the server."""

    length_s: float
    rss_before_mb: float
    peak_mb: float
    wall_s: float
    finals: int
    errors: list[str]
    gpu_max_reserved_mb: float


def run_ours(server: common.ServerProcess, lengths: Sequence[float], chunk_ms: int) -> list[OursRow]:
    rows = []
    for length in lengths:
        pcm = speech(length)
        material = common.Material(pcm=pcm, spans=[])
        rss_before = common.rss_mb(server.pid)
        reset = common.peak_rss_reset(server.pid)
        started = time.monotonic()
        result = asyncio.run(
            common.stream_session(
                server.ws_url,
                material,
                duration_s=length,
                speed=0.0,
                chunk_ms=chunk_ms,
                measure=False,
                timeout_s=max(600.0, length * 2),
            )
        )
        wall = time.monotonic() - started
        peak = common.peak_rss_mb(server.pid) if reset else math.nan
        values = common.scrape_metrics(server)
        gpu = common.metric(values, "stream_gpu_memory_max_reserved_bytes") / 2**20
        rows.append(OursRow(length, rss_before, peak, wall, result.finals, result.errors, gpu))
        print(
            f"  ours {length:>5g} s: RSS before {rss_before:.0f} MB, peak {peak:.0f} MB, {wall:.1f} s, "
            f"{result.finals} finals, errors {result.errors or 'none'}",
            flush=True,
        )
    return rows


def fmt_mb(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a SenseVoice folder")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (naive decode and server)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"), help="the server's dtype")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both")
    parser.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="seconds, ascending")
    parser.add_argument("--time-limit-s", type=float, default=600.0, help="per naive decode (load included)")
    parser.add_argument("--mem-limit-gb", type=float, default=16.0, help="naive RSS above this is stopped")
    parser.add_argument("--chunk-ms", type=int, default=1000, help="audio per WebSocket frame (ours)")
    parser.add_argument("--skip-ours", action="store_true", help="only the naive decodes")
    parser.add_argument("--quick", action="store_true", help="one 8 s length (smoke test)")
    parser.add_argument("--naive-child", type=float, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress in logs
    if args.naive_child is not None:
        return naive_child(args.model, args.naive_child, args.device, args.threads)
    lengths = [float(x) for x in args.lengths.split(",")]
    if args.quick:
        lengths = [8.0]
    print(f"machine: {common.machine_line()}")
    model = ensure_model(args.model)
    mem_limit_mb = args.mem_limit_gb * 1024
    ours: dict[float, OursRow] = {}
    if not args.skip_ours:
        server_args = [
            "--model",
            model,
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--threads",
            str(args.threads),
            "--log-level",
            "warning",
        ]
        server = common.ServerProcess(server_args)
        print("ours: " + " ".join(server.command()))
        with server:
            print(
                f"  server ready in {server.ready_s:.1f} s, RSS {common.rss_mb(server.pid):.0f} MB, "
                f"load average {common.loadavg()}"
            )
            ours = {row.length_s: row for row in run_ours(server, lengths, args.chunk_ms)}
    print(f"naive: a fresh `{Path(sys.executable).name} contrast.py --naive-child LENGTH` per length")
    naive: dict[float, NaiveRow] = {}
    blocked = ""
    for length in lengths:
        if blocked:
            naive[length] = NaiveRow(length, status=f"not run: {blocked}")
            continue
        row = run_naive(
            model,
            length,
            device=args.device,
            threads=args.threads,
            time_limit_s=args.time_limit_s,
            mem_limit_mb=mem_limit_mb,
        )
        naive[length] = row
        r = row.report or {}
        print(
            f"  naive {length:>5g} s: {row.status}; "
            f"loaded RSS {fmt_mb(r.get('rss_loaded_mb', math.nan))} MB, "
            f"decode peak {fmt_mb(r.get('decode_peak_mb', math.nan))} MB, decode "
            f"{r.get('decode_s', math.nan):.1f} s, wall {row.wall_s:.1f} s; load average {common.loadavg()}",
            flush=True,
        )
        if row.status != "ok":
            blocked = f"{length:g} s was {row.status.split(':')[0]}"
    cuda = args.device.startswith("cuda")
    print()
    print(f"memory against audio length, {model} ({args.dtype}) on {args.device}; {common.machine_line()}")
    head = (
        f"{'audio':>7} | {'naive: RSS loaded':>17} {'peak in decode':>14} {'ru_maxrss':>9} {'decode s':>8}"
        + (f" {'GPU max rsv':>11}" if cuda else "")
        + f" | {'ours: RSS before':>16} {'peak':>6} {'stream s':>8}"
        + (f" {'GPU max rsv':>11}" if cuda else "")
    )
    print(head)
    print("-" * len(head))
    for length in lengths:
        n = naive[length]
        r = n.report or {}
        if n.report is not None:
            left = (
                f"{fmt_mb(r['rss_loaded_mb']):>17} {fmt_mb(r['decode_peak_mb']):>14} "
                f"{fmt_mb(r['ru_maxrss_mb']):>9} {r['decode_s']:>8.1f}"
                + (f" {fmt_mb(r['cuda_max_reserved_mb']):>11}" if cuda else "")
            )
        else:
            detail = n.status
            if not math.isnan(n.sampled_peak_mb) and not n.status.startswith("not run"):
                detail += f" (RSS reached {n.sampled_peak_mb:.0f} MB in {n.wall_s:.0f} s)"
            left = f"{detail:<{17 + 15 + 10 + 9 + (12 if cuda else 0)}}"
        o = ours.get(length)
        right = (
            f"{fmt_mb(o.rss_before_mb):>16} {fmt_mb(o.peak_mb):>6} {o.wall_s:>8.1f}"
            + (f" {fmt_mb(o.gpu_max_reserved_mb):>11}" if cuda else "")
            if o
            else "not run"
        )
        print(f"{length:>6g}s | {left} | {right}")
    print("(MB of RSS; 'peak in decode' and ours' 'peak' are the kernel's VmHWM reset just before)")
    print(f"load average at the end: {common.loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
