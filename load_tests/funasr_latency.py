"""Latency per segment of a FunASR-protocol ``2pass`` session at real time.

Starts the server as a subprocess on 127.0.0.1 and streams one side of a conversation of **real
recorded utterances** (``common.recorded_conversation``, the recordings' own room noise in the pauses)
at real-time pace to ``/`` with FunASR's protocol, as FunASR's clients do: the ``binary`` subprotocol,
a first message ``{"mode": "2pass", "chunk_size": [5, 10, 5], "chunk_interval": 10, ...}``, then 60 ms
binary chunks (``60 * chunk_size[1] / chunk_interval`` ms, FunASR's client stride), then
``{"is_speaking": false}``. A ``2pass-offline`` result is matched to the utterances whose midpoints lie in
its ``stamp_sents`` span; its latency is its arrival minus the wall time the end of the last of them was
sent (endpointing included). Prints p50/p95/max of those, the 2pass-online latency (arrival minus the
send time of the audio it could have heard), counts and the load average::

    python load_tests/funasr_latency.py --model /tmp/sv-full --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from latency import DEFAULT_MODEL, ensure_model  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

CHUNK_MS = 60
TOLERANCE_S = 0.1


async def session(port: int, seconds: float, seed: int) -> tuple[list[float], list[float], int]:
    material = common.recorded_conversation(seed=seed)
    pcm = common.looped_pcm(material, 0.0, 0, int(seconds * 16000))
    spans = [(s.start_s, s.end_s) for s in common.loop_spans(material, 0.0, seconds)]
    data = pcm.astype("<i2").tobytes()
    step = 16000 * CHUNK_MS // 1000 * 2
    offline: list[tuple[float, float, float]] = []  # (start, end) of the segment, arrival
    online: list[float] = []
    t0 = 0.0
    async with connect(f"ws://127.0.0.1:{port}/", subprotocols=["binary"], ping_interval=None) as ws:  # type: ignore[list-item]
        first = {
            "mode": "2pass",
            "chunk_size": [5, 10, 5],
            "chunk_interval": 10,
            "wav_name": "call",
            "is_speaking": True,
            "audio_fs": 16000,
            "itn": True,
        }
        await ws.send(json.dumps(first))

        async def read() -> None:
            async for raw in ws:
                message = json.loads(raw)
                now = time.monotonic() - t0
                if message.get("mode") == "2pass-offline" and message.get("stamp_sents"):
                    sent = message["stamp_sents"][0]
                    offline.append((sent["start"] / 1000, sent["end"] / 1000, now))
                elif message.get("mode") == "2pass-online":
                    online.append(now)
                if message.get("is_final"):
                    return

        reader = asyncio.ensure_future(read())
        t0 = time.monotonic()
        for k, i in enumerate(range(0, len(data), step)):
            await ws.send(data[i : i + step])
            await asyncio.sleep(max(0.0, t0 + (k + 1) * CHUNK_MS / 1000 - time.monotonic()))
        await ws.send(json.dumps({"is_speaking": False}))
        await asyncio.wait_for(reader, 60)
    latencies = []
    for start, end, arrival in offline:
        inside = [u for u in spans if start <= (u[0] + u[1]) / 2 <= end]
        if inside and inside[-1][1] <= end + TOLERANCE_S and arrival < seconds:
            latencies.append(arrival - inside[-1][1])
    return latencies, online, len(offline)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_engine_arguments(parser, DEFAULT_MODEL)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-arg", action="append", default=[])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny.en, 12 s")
    args = parser.parse_args()
    if args.quick:
        args.model, args.seconds = "tiny.en", 12.0
    model = ensure_model(args.model)
    print(common.machine_line())
    with common.ServerProcess(common.server_args(args, model)) as server:
        print("server:", " ".join(server.command()[1:]))
        latencies, online, results = asyncio.run(session(server.port, args.seconds, args.seed))
    print(
        f"2pass session, {args.seconds:.0f} s at real time: {results} 2pass-offline results, "
        f"{len(latencies)} matched to utterances; end of speech -> 2pass-offline "
        f"p50 {common.percentile(latencies, 50):.3f} s, p95 {common.percentile(latencies, 95):.3f} s, "
        f"max {max(latencies, default=float('nan')):.3f} s; {len(online)} 2pass-online messages; "
        f"load {common.loadavg()}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
