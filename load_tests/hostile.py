"""Hostile clients: do honest sessions stay unhurt, and does the server return to its baseline?

Starts the server once (``--max-sessions-per-ip``, as an operator who exposes it would set it) and runs
three phases of ``--seconds`` each:

1. **alone**: M honest real-time sessions (``--honest``), real recorded conversation and espeak
   sentences in turn (``--materials``), standard websockets clients (keepalive pings every 20 s);
2. **attacked**: the same honest sessions while K clients of each hostile kind (``--hostile-each``)
   run at the same time, each kind from its own loopback address (127.0.0.2, 127.0.0.3, ...):

   - ``keepalive``: opens streams that send only KeepAlive (no audio), again and again;
   - ``non_reader``: streams real-time audio with interim results and never reads a byte;
   - ``slowloris``: sends its HTTP handshake one byte every 0.5 s;
   - ``garbage``: a good handshake, then random bytes that are not WebSocket frames;
   - ``oversized``: a frame header that claims 1 GiB;
   - ``finalize_spam``: real-time audio with a ``Finalize`` after every 20 ms frame;
   - ``churn``: connects and disconnects as fast as it can;

   the honest sessions connect first: the attack starts two seconds into the phase;

3. **after**: nothing runs for ``--settle-s`` (also the pause between phases 1 and 2); then the
   server's file descriptors, event-loop tasks and RSS are compared with the baseline taken before
   phase 1.

Prints, per phase, the honest sessions' end-of-speech-to-final latency (p50/p95), WER (on the
sessions whose material has a reference text), errors, and the server's fds/tasks/RSS; per hostile
kind, what the server did to it (closed after how long, with which code)::

    python load_tests/hostile.py --model tiny.en --honest 2 --hostile-each 2 --seconds 60

The clients run in this process on the same machine, so their CPU competes with the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from latency import DEFAULT_MODEL, ensure_model  # noqa: E402

from stream_server.testing.raw_ws import (  # noqa: E402
    OP_BINARY,
    OP_CLOSE,
    OP_TEXT,
    RawClient,
    frame,
    frame_header_claiming,
    handshake_request,
)
from stream_server.testing.speech import word_error_rate  # noqa: E402

KINDS = ("keepalive", "non_reader", "slowloris", "garbage", "oversized", "finalize_spam", "churn")


@dataclass
class Tally:
    """What the server did to one kind of hostile client."""

    attempts: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    held_s: list[float] = field(default_factory=list)

    def line(self) -> str:
        held = f"held p50 {common.fmt_s(common.percentile(self.held_s, 50))} s" if self.held_s else ""
        top = ", ".join(f"{k} x{v}" for k, v in self.outcomes.most_common(4))
        return f"{self.attempts:>6} tries; {top}; {held}"


def close_outcome(frames: list[tuple[int, bytes]]) -> str:
    """``Error CODE / close NNNN`` from what a raw client read."""
    codes = []
    for opcode, payload in frames:
        if opcode == OP_TEXT:
            with contextlib.suppress(ValueError):
                message = json.loads(payload)
                if message.get("type") == "Error":
                    codes.append(str(message.get("code")))
    close = next((p for op, p in frames if op == OP_CLOSE), None)
    close_text = f"close {int.from_bytes(close[:2], 'big')}" if close and len(close) >= 2 else "dropped"
    return f"{'/'.join(sorted(set(codes))) or 'no Error'} + {close_text}"


class Hostiles:
    def __init__(self, port: int, end: float, material_pcm: bytes) -> None:
        self.port = port
        self.end = end
        self.audio = material_pcm
        self.tallies = {kind: Tally() for kind in KINDS}

    async def _raw(self, address: str, tally: Tally, query: str = "", rcvbuf: int = 0) -> RawClient | None:
        """An open stream from ``address``; None (the refusal tallied) when the handshake was refused."""
        client = await RawClient.open(
            "127.0.0.1", self.port, "/v1/listen" + query, local_addr=(address, 0), rcvbuf=rcvbuf
        )
        if client.status != 101:
            tally.outcomes[f"HTTP {client.status}"] += 1
            client.abort()
            return None
        return client

    async def _loop(self, kind: str, address: str, once: Callable[[str, Tally], Awaitable[None]]) -> None:
        tally = self.tallies[kind]
        while time.monotonic() < self.end:
            tally.attempts += 1
            try:
                await asyncio.wait_for(once(address, tally), max(1.0, self.end - time.monotonic() + 5))
            except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
                tally.outcomes[type(exc).__name__] += 1
            except asyncio.TimeoutError:
                tally.outcomes["still held at the end"] += 1
            await asyncio.sleep(0.05)

    async def keepalive(self, address: str, tally: Tally) -> None:
        client = await self._raw(address, tally)
        if client is None:
            return
        started = time.monotonic()
        reading = asyncio.ensure_future(client.read_frames(self.end - started + 2))
        while not reading.done() and time.monotonic() < self.end:
            client.send(frame(OP_TEXT, b'{"type": "KeepAlive"}'))
            await asyncio.sleep(1.0)
        frames = await reading
        tally.held_s.append(time.monotonic() - started)
        tally.outcomes[close_outcome(frames)] += 1
        client.abort()

    async def non_reader(self, address: str, tally: Tally) -> None:
        client = await self._raw(address, tally, "?interim_results=true", rcvbuf=4096)
        if client is None:
            return
        started = time.monotonic()
        position = 0
        try:
            while time.monotonic() < self.end:
                piece = self.audio[position : position + 3200] or self.audio[:3200]
                position = (position + 3200) % len(self.audio)
                client.send(frame(OP_BINARY, piece))
                await client.drain(5)
                await asyncio.sleep(0.1)
            tally.outcomes["streamed to the end, unread"] += 1
        except (ConnectionError, asyncio.TimeoutError):
            tally.outcomes["cut by the server"] += 1
        tally.held_s.append(time.monotonic() - started)
        client.abort()

    async def slowloris(self, address: str, tally: Tally) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, local_addr=(address, 0))
        request = handshake_request("127.0.0.1", self.port) + b"X-Pad: " + b"a" * 4096
        started = time.monotonic()
        try:
            for i in range(len(request)):
                if time.monotonic() > self.end:
                    tally.outcomes["still held at the end"] += 1
                    return
                writer.write(request[i : i + 1])
                await writer.drain()
                with contextlib.suppress(asyncio.TimeoutError):
                    data = await asyncio.wait_for(reader.read(1024), 0.5)
                    if data == b"" or data.startswith(b"HTTP/1.1 4"):
                        tally.outcomes[data.split(b"\r\n")[0].decode() or "closed"] += 1
                        return
            tally.outcomes["request completed?!"] += 1
        except ConnectionError:
            tally.outcomes["reset"] += 1
        finally:
            tally.held_s.append(time.monotonic() - started)
            writer.transport.abort()

    async def garbage(self, address: str, tally: Tally) -> None:
        client = await self._raw(address, tally)
        if client is None:
            return
        client.send(os.urandom(random.randint(16, 4096)))
        tally.outcomes[close_outcome(await client.read_frames(10))] += 1
        client.abort()

    async def oversized(self, address: str, tally: Tally) -> None:
        client = await self._raw(address, tally)
        if client is None:
            return
        client.send(frame(OP_BINARY, self.audio[:32000]))
        client.send(frame_header_claiming(OP_BINARY, 1 << 30) + os.urandom(65536))
        tally.outcomes[close_outcome(await client.read_frames(20))] += 1
        client.abort()

    async def finalize_spam(self, address: str, tally: Tally) -> None:
        client = await self._raw(address, tally)
        if client is None:
            return
        started = time.monotonic()
        reading = asyncio.ensure_future(client.read_frames(self.end - started + 10))
        position = 0
        try:
            while not reading.done() and time.monotonic() < self.end:
                piece = self.audio[position : position + 640] or self.audio[:640]
                position = (position + 640) % len(self.audio)
                client.send(frame(OP_BINARY, piece) + frame(OP_TEXT, b'{"type": "Finalize"}'))
                await client.drain(5)
                await asyncio.sleep(0.02)
            client.send(frame(OP_TEXT, b'{"type": "CloseStream"}'))
        except (ConnectionError, asyncio.TimeoutError):
            pass
        frames = await reading
        finals = sum(1 for op, p in frames if op == OP_TEXT and b'"is_final":true' in p)
        tally.outcomes[f"{close_outcome(frames)}, {finals} finals"] += 1
        tally.held_s.append(time.monotonic() - started)
        client.abort()

    async def churn(self, address: str, tally: Tally) -> None:
        client = await self._raw(address, tally)  # a refusal is tallied there
        if client is not None:
            tally.outcomes["HTTP 101"] += 1
            client.abort()

    def run(self, each: int) -> list[asyncio.Task[None]]:
        tasks = []
        for k, kind in enumerate(KINDS):
            for j in range(each):
                address = f"127.0.0.{2 + k}"
                tasks.append(asyncio.ensure_future(self._loop(kind, address, getattr(self, kind))))
                del j
        return tasks


@dataclass
class Snapshot:
    fds: int
    tasks: float
    rss_mb: float
    sessions: float

    def line(self) -> str:
        return (
            f"fds {self.fds}, event-loop tasks {self.tasks:.0f}, RSS {self.rss_mb:.0f} MB, "
            f"streams {self.sessions:.0f}"
        )


def snapshot(server: common.ServerProcess) -> Snapshot:
    values = common.scrape_metrics(server)
    return Snapshot(
        fds=len(os.listdir(f"/proc/{server.pid}/fd")),
        tasks=common.metric(values, "stream_event_loop_tasks"),
        rss_mb=common.rss_mb(server.pid),
        sessions=common.metric(values, "stream_sessions_active"),
    )


async def honest_phase(
    server: common.ServerProcess,
    materials: list[common.Material],
    seconds: float,
    hostiles: Hostiles | None,
    each: int,
) -> tuple[list[common.SessionResult], list[Snapshot]]:
    snaps: list[Snapshot] = []
    t0 = time.monotonic()
    honest = [
        common.stream_session(
            server.ws_url,
            m,
            duration_s=seconds,
            offset_s=m.start_offset_s(i / len(materials)),
            keep_text=True,
            params={"punctuate": True},
            timeout_s=seconds + 300,
        )
        for i, m in enumerate(materials)
    ]
    attack: list[asyncio.Task[None]] = []
    if hostiles is not None:
        # The honest sessions are streaming first (an attack on users already connected); the
        # hostile clients begin two seconds later and stop with the phase.
        async def later() -> None:
            await asyncio.sleep(2.0)
            attack.extend(hostiles.run(each))

        starter = asyncio.ensure_future(later())

    async def sample() -> None:
        while time.monotonic() < t0 + seconds:
            await asyncio.sleep(5)
            with contextlib.suppress(Exception):
                snaps.append(await asyncio.to_thread(snapshot, server))

    sampler = asyncio.ensure_future(sample())
    results = await asyncio.gather(*honest)
    sampler.cancel()
    if hostiles is not None:
        await starter
    for task in attack:
        with contextlib.suppress(Exception):
            await task
    server.check_alive()
    return list(results), snaps


def report(name: str, results: Sequence[common.SessionResult], snaps: Sequence[Snapshot]) -> None:
    latencies = [x for r in results for x in r.final_latencies_s]
    wers = [word_error_rate(r.reference, r.transcript) for r in results if r.reference.strip()]
    errors = sorted({e for r in results for e in r.errors})
    print(
        f"{name:>9}: {len(results)} honest sessions, {sum(r.finals for r in results)} finals, latency "
        f"p50 {common.fmt_s(common.percentile(latencies, 50))} s p95 "
        f"{common.fmt_s(common.percentile(latencies, 95))} s (n={len(latencies)}), WER "
        f"{(100 * sum(wers) / len(wers)) if wers else math.nan:.1f} % on {len(wers)} session(s), "
        f"errors {errors or 'none'}"
    )
    if snaps:
        print(
            f"{'':>9}  during: fds max {max(s.fds for s in snaps)}, tasks max "
            f"{max(s.tasks for s in snaps):.0f}, RSS max {max(s.rss_mb for s in snaps):.0f} MB, streams "
            f"max {max(s.sessions for s in snaps):.0f}"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_engine_arguments(parser, DEFAULT_MODEL)
    parser.add_argument("--honest", type=int, default=2, help="honest real-time sessions (M)")
    parser.add_argument("--hostile-each", type=int, default=2, help="clients of each hostile kind (K)")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each phase")
    parser.add_argument("--settle-s", type=float, default=15.0, help="quiet time before the last snapshot")
    parser.add_argument("--materials", default="call,espeak", help="honest sessions' materials, in turn")
    parser.add_argument("--max-sessions-per-ip", type=int, default=4, help="the server's per-address limit")
    parser.add_argument("--admission", default="false", help="the server's --admission")
    parser.add_argument("--server-arg", action="append", default=[], help="another server flag (repeat)")
    parser.add_argument("--quick", action="store_true", help="one honest session, 6 s phases (smoke test)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    print(f"machine: {common.machine_line()}")
    model = ensure_model(args.model)
    if args.quick:
        args.honest, args.hostile_each, args.seconds, args.settle_s, args.materials = 1, 1, 6.0, 3.0, "espeak"
    kinds = args.materials.split(",")
    materials = [common.material(kinds[i % len(kinds)], seed=i) for i in range(args.honest)]
    server = common.ServerProcess(
        common.server_args(
            args,
            model,
            "--max-sessions-per-ip",
            str(args.max_sessions_per_ip),
            # Admission by capacity refuses most hostile clients at the handshake, which proves
            # nothing about the other defences: off, unless --admission says otherwise.
            "--admission",
            args.admission,
            *args.server_arg,
        )
    )
    print("server: " + " ".join(server.command()))
    with server:
        cap = server.health.get("capacity", {})
        print(
            f"ready in {server.ready_s:.1f} s; admission says {cap.get('capacity_sessions')} typical sessions"
        )
        time.sleep(2)
        baseline = snapshot(server)
        print(f" baseline: {baseline.line()}")
        alone, snaps = asyncio.run(honest_phase(server, materials, args.seconds, None, 0))
        report("alone", alone, snaps)
        time.sleep(args.settle_s)  # admission's measured load of phase 1 decays before phase 2
        audio = common.looped_pcm(materials[0], 0.0, 0, 16000 * 20).astype("<i2").tobytes()
        hostiles = Hostiles(server.port, time.monotonic() + args.seconds, audio)
        attacked, snaps = asyncio.run(
            honest_phase(server, materials, args.seconds, hostiles, args.hostile_each)
        )
        report("attacked", attacked, snaps)
        for kind, tally in hostiles.tallies.items():
            print(f"    {kind:>13}: {tally.line()}")
        time.sleep(args.settle_s)
        after = snapshot(server)
        print(f"    after: {after.line()}")
        back = after.fds <= baseline.fds + 2 and after.tasks <= baseline.tasks + 2 and after.sessions == 0
        hurt = [e for r in attacked for e in r.errors]
        print(
            f"{'OK' if back and not hurt else 'NOT MET'}: honest sessions hurt under attack: {len(hurt)}; "
            f"back to baseline: {'yes' if back else 'no'} "
            f"(RSS {baseline.rss_mb:.0f} -> {after.rss_mb:.0f} MB)"
        )
    print(f"load average at the end: {common.loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
