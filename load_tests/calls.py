"""Call-centre load: two-track Twilio calls at real time, latency per track, and the RSS of an 8-channel
session.

Starts the server once as a subprocess on 127.0.0.1 (admission off, so every call is admitted) and, for
each N of ``--calls`` (e.g. ``1,2,3``), replays N concurrent two-track calls to ``/v1/twilio`` with the
replay client written from Twilio's documented messages (``stream_server.testing.twilio_replay``),
staggered by half a second, each ``--seconds`` long at real-time pace. Each track is one side of a
conversation of **real recorded utterances** (``common.recorded_conversation``, a different seed per
track and call, pauses filled with the recordings' own room noise), resampled to 8 kHz mu-law as Twilio
sends it. A follower socket (``/v1/calls/{callSid}``) per call records when each final arrives; the
latency of an utterance is from its true end of speech (``stream_server.testing.truth``; endpointing
included) to the arrival of the first final of its track that covers it. Per N it prints p50/p95 per
track and over both, finals, errors, server CPU and RSS, and the load average; it stops after the first
N whose p95 exceeds ``--target-s`` (1 s).

``--eight-channel`` instead streams one ``multichannel=true&channels=8`` session of eight different
conversations at real time to ``/v1/listen`` and prints the server's RSS before, at the peak and after,
and what the session added::

    python load_tests/calls.py --model /tmp/sv-full --calls 1,2,3,4 --seconds 40
    python load_tests/calls.py --model /tmp/sv-full --eight-channel --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from latency import DEFAULT_MODEL, ensure_model  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from stream_server.testing.twilio_replay import TwilioCallAudio, replay_call  # noqa: E402

CHUNK_MS = 20


TOLERANCE_S = 0.1


@dataclass
class Track:
    name: str
    spans: list[tuple[float, float]]  # true utterances (start, end of speech), call time
    # (start, end, ended on a pause, arrival): finals in call time; arrival made call time at the end
    finals: list[tuple[float, float, bool, float]] = field(default_factory=list)


def track_audio(seed: int, seconds: float) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """One side of a conversation of real recorded utterances, 8 kHz float, and its true utterances."""
    material = common.recorded_conversation(seed=seed)
    n = int(seconds * 16000)
    pcm = common.looped_pcm(material, 0.0, 0, n)
    ends = [(s.start_s, s.end_s) for s in common.loop_spans(material, 0.0, seconds)]
    audio = np.asarray(soxr.resample(pcm.astype(np.float32) / 32768, 16000, 8000, quality="HQ"), np.float32)
    return audio, ends


async def one_call(base_ws: str, index: int, seconds: float, delay_s: float) -> tuple[list[Track], int, int]:
    await asyncio.sleep(delay_s)
    inbound, in_ends = track_audio(2 * index, seconds)
    outbound, out_ends = track_audio(2 * index + 1, seconds)
    tracks = {"inbound": Track("inbound", in_ends), "outbound": Track("outbound", out_ends)}
    call_sid = f"CA{index:032d}"
    replay = asyncio.ensure_future(
        replay_call(
            f"{base_ws}/v1/twilio",
            TwilioCallAudio(inbound, outbound),
            speed=1.0,
            call_sid=call_sid,
            close_timeout_s=120,
        )
    )
    errors = 0
    finals = 0
    follower = None
    for _ in range(500):  # the call is listed once its start arrived
        try:
            follower = await connect(f"{base_ws}/v1/calls/{call_sid}")
            break
        except Exception:
            await asyncio.sleep(0.01)
    assert follower is not None, "the call never became live"
    async with follower:
        async for raw in follower:
            message: dict[str, Any] = json.loads(raw)
            if message.get("type") == "Error":
                errors += 1
            if message.get("type") == "Results" and message["is_final"] and message["segment_id"]:
                finals += 1
                start = float(message["start"])
                paused = bool(message["speech_final"]) and not message["from_finalize"]
                final = (start, start + float(message["duration"]), paused, time.monotonic())
                tracks[message["twilio"]["track"]].finals.append(final)
    report = await replay
    t0 = report.sent_media[0].sent_at_monotonic - CHUNK_MS / 1000
    for track in tracks.values():
        track.finals = [(a, b, paused, wall - t0) for a, b, paused, wall in track.finals]
    return list(tracks.values()), finals, errors


def latencies(track: Track) -> list[float]:
    """As ``common.stream_session`` measures them: a final that ended on a pause is matched to the
    utterances whose midpoints lie inside its span; from the end of the last of them to its arrival."""
    out = []
    for start, end, paused, arrival in track.finals:
        inside = [u for u in track.spans if start <= (u[0] + u[1]) / 2 <= end]
        if not paused or not inside:
            continue
        speech_end = inside[-1][1]
        if speech_end <= end + TOLERANCE_S:
            out.append(arrival - speech_end)
    return out


def fmt(values: list[float]) -> str:
    if not values:
        return "      -      -"
    return f"{common.percentile(values, 50):6.3f} {common.percentile(values, 95):6.3f}"


async def sweep(server: common.ServerProcess, counts: list[int], seconds: float, target_s: float) -> None:
    base_ws = f"ws://127.0.0.1:{server.port}"
    sampler = common.ProcessSampler(server.pid, interval_s=0.5).start()
    print(
        f"{'calls':>5} {'in p50':>6} {'p95':>6} {'out p50':>7} {'p95':>6} {'all p50':>7} {'p95':>6} "
        f"{'finals':>6} {'err':>3} {'cpu%':>5} {'rss MB':>6}  load"
    )
    for n in counts:
        t_start = time.monotonic()
        results = await asyncio.gather(*(one_call(base_ws, i + 100 * n, seconds, 0.5 * i) for i in range(n)))
        t_end = time.monotonic()
        cpu, _, rss_max = sampler.window(t_start, t_end)
        inbound = [x for tracks, _, _ in results for x in latencies(tracks[0])]
        outbound = [x for tracks, _, _ in results for x in latencies(tracks[1])]
        finals = sum(f for _, f, _ in results)
        errors = sum(e for _, _, e in results)
        both = inbound + outbound
        print(
            f"{n:5d} {fmt(inbound)} {fmt(outbound):>14} {fmt(both):>14} {finals:6d} {errors:3d} "
            f"{cpu:5.0f} {rss_max:6.0f}  {common.loadavg()}",
            flush=True,
        )
        if not both or common.percentile(both, 95) > target_s or errors:
            break
    sampler.stop()


async def eight_channel(server: common.ServerProcess, seconds: float) -> None:
    before = common.rss_mb(server.pid)
    sampler = common.ProcessSampler(server.pid, interval_s=0.25).start()
    channels = []
    for i in range(8):
        material = common.recorded_conversation(seed=50 + i)
        channels.append(common.looped_pcm(material, 0.0, 0, int(seconds * 16000)))
    data = np.stack(channels, axis=1).astype("<i2").tobytes()
    step = 16000 // 10 * 2 * 8  # 100 ms of eight 16-bit channels
    finals = 0
    url = f"ws://127.0.0.1:{server.port}/v1/listen?channels=8&multichannel=true"
    t0 = time.monotonic()
    async with connect(url) as ws:

        async def read() -> None:
            nonlocal finals
            async for raw in ws:
                m = json.loads(raw)
                if m.get("type") == "Results" and m["is_final"] and m["segment_id"]:
                    finals += 1

        reader = asyncio.ensure_future(read())
        for k, i in enumerate(range(0, len(data), step)):
            await ws.send(data[i : i + step])
            await asyncio.sleep(max(0.0, t0 + (k + 1) * 0.1 - time.monotonic()))
        await ws.send(json.dumps({"type": "CloseStream"}))
        await reader
    t1 = time.monotonic()
    await asyncio.sleep(2)
    after = common.rss_mb(server.pid)
    sampler.stop()
    _, _, peak = sampler.window(t0, t1)
    print(
        f"8-channel session, {seconds:.0f} s at real time, {finals} finals: "
        f"server RSS before {before:.0f} MB, "
        f"peak {peak:.0f} MB (+{peak - before:.0f}), 2 s after close {after:.0f} MB  load {common.loadavg()}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_engine_arguments(parser, DEFAULT_MODEL)
    parser.add_argument("--calls", default="1,2,3,4", help="concurrent two-track calls per step")
    parser.add_argument("--seconds", type=float, default=40.0, help="length of each call")
    parser.add_argument("--target-s", type=float, default=1.0)
    parser.add_argument("--eight-channel", action="store_true", help="RSS of one 8-channel session instead")
    parser.add_argument("--server-arg", action="append", default=[])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny.en, an 8 s 8-channel session, one 8 s call"
    )
    args = parser.parse_args()
    if args.quick:
        args.model, args.calls, args.seconds = "tiny.en", "1", 8.0
    model = ensure_model(args.model)
    print(common.machine_line())
    extra = ["--admission", "false", "--idle-timeout-s", "60"]
    with common.ServerProcess(common.server_args(args, model, *extra)) as server:
        print("server:", " ".join(server.command()[1:]))
        if args.eight_channel or args.quick:
            asyncio.run(eight_channel(server, args.seconds))
        if not args.eight_channel or args.quick:
            counts = [int(x) for x in args.calls.split(",") if x.strip()]
            asyncio.run(sweep(server, counts, args.seconds, args.target_s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
