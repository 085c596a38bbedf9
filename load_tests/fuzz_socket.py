"""Socket-level protocol fuzzer: random frames and message sequences against a real server.

Runs the real server (transport, session, VAD, batcher) on 127.0.0.1 in this process with a fast
fake engine below it (the model is not what is fuzzed), and ``--connections`` bare clients
(:mod:`stream_server.testing.raw_ws`) that each open a stream with a random query and send a random
sequence of frames: audio of random length and content, valid and broken control messages, invalid
UTF-8, pings and pongs, close frames with random codes, reserved opcodes and RSV bits, unmasked and
fragmented frames, and headers that claim huge payloads. Every answer is checked against the
documented protocol (docs/protocol.md):

- a handshake answers 101 or a documented HTTP status with a JSON body carrying a code;
- every text frame the server sends is JSON of a documented type, and every ``Error`` code is one the
  protocol documents;
- every close code is a documented one;
- nothing is logged at ERROR level (an unhandled exception anywhere) and the server still serves a
  clean stream at the end.

Stops after ``--frames`` frames (1 M by default) or ``--max-seconds``::

    python load_tests/fuzz_socket.py --frames 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import struct
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from stream_server.config import Config, LimitsConfig, ServerConfig  # noqa: E402
from stream_server.engines.base import EngineInfo, TranscribeRequest, Transcript  # noqa: E402
from stream_server.testing.raw_ws import (  # noqa: E402
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawClient,
    frame,
    frame_header_claiming,
)
from stream_server.transport import Server  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
EVENT_TYPES = {"Results", "Metadata", "UtteranceEnd", "SpeechStarted", "Error"}
CLOSE_CODES = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 1013}
HTTP_STATUSES = {101, 400, 401, 403, 426, 429, 503}


def documented_error_codes() -> set[str]:
    """Every ``CODE`` in a table row of docs/protocol.md."""
    return set(re.findall(r"^\| `([A-Z_]+)` \|", DOCS.read_text(), flags=re.MULTILINE))


class QuickEngine:
    """Answers at once with the clip's length: the fuzz is of the protocol, not the model."""

    def __init__(self) -> None:
        self.info = EngineInfo(
            name="fuzz-engine", model="fuzz", device="cpu", dtype="fp32", languages=("en", "zh")
        )

    def transcribe(self, requests: Sequence[TranscribeRequest]) -> list[Transcript]:
        return [
            Transcript(f"clip {len(r.audio) / 16000:.2f}", 0.9, (), "en", "neutral", "speech")
            for r in requests
        ]

    def warmup(self, max_batch_size: int, max_audio_s: float) -> None:
        pass


QUERIES = (
    "",
    "?interim_results=true",
    "?interim_results=true&vad_events=true&utterance_end_ms=1000",
    "?encoding=mulaw&sample_rate=8000",
    "?sample_rate=8000",
    "?sample_rate=48000&channels=1",
    "?endpointing=10",
    "?endpointing=false",
    "?punctuate=true&smart_format=true&diarize=true",
    "?encoding=opus",
    "?sample_rate=0",
    "?channels=9",
    "?language=xx",
    "?%00=1",
    "?interim_results=" + "x" * 300,
)

CONTROL = (
    b'{"type": "KeepAlive"}',
    b'{"type": "Finalize"}',
    b'{"type": "CloseStream"}',
    b'{"type": "Finalize", "channel": [0]}',
    b'{"type": "Finalize", "channel": [5]}',
    b'{"type": 3}',
    b'{"type": "Nope"}',
    b"[]",
    b"null",
    b'{"type": "KeepAlive"',
    b"\xff\xfe\x00",
    b'{"type": "' + b"A" * 5000 + b'"}',
    b"",
)


def random_audio(rng: random.Random) -> bytes:
    kind = rng.random()
    n = rng.choice((0, 1, 3, 160, 320, 640, 641, 1600, 3200, 8000))
    if kind < 0.4:
        return bytes(n)  # silence
    if kind < 0.7:  # a tone: speech to the VAD
        t = np.arange(n // 2) / 16000
        return (8000 * np.sin(2 * np.pi * rng.uniform(120, 900) * t)).astype("<i2").tobytes() + bytes(n % 2)
    return os.urandom(n)


def random_frame(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.55:
        return frame(OP_BINARY, random_audio(rng))
    if r < 0.80:
        return frame(OP_TEXT, rng.choice(CONTROL))
    if r < 0.84:
        return frame(OP_PING, os.urandom(rng.randint(0, 125)))
    if r < 0.86:
        return frame(OP_PONG, os.urandom(rng.randint(0, 10)))
    if r < 0.88:  # fragmented audio, sometimes never finished
        return frame(OP_BINARY, os.urandom(64), fin=False) + (
            frame(OP_CONTINUATION, os.urandom(64)) if rng.random() < 0.7 else b""
        )
    if r < 0.89:
        return frame(OP_CONTINUATION, os.urandom(32))  # continuation of nothing
    if r < 0.90:
        return frame(rng.choice((3, 4, 5, 6, 7, 0xB, 0xC, 0xF)), os.urandom(8))  # reserved opcodes
    if r < 0.91:
        return frame(OP_BINARY, os.urandom(16), rsv=rng.randint(1, 7))
    if r < 0.92:
        return frame(OP_BINARY, os.urandom(16), mask=False)
    if r < 0.93:
        return frame(OP_PING, os.urandom(8), fin=False)  # fragmented control frame
    if r < 0.94:
        return frame(OP_PING, os.urandom(200))  # control frame over 125 bytes
    if r < 0.95:
        return frame_header_claiming(
            rng.choice((OP_BINARY, OP_TEXT)), rng.choice((1 << 21, 1 << 40, 1 << 63))
        )
    if r < 0.96:
        return os.urandom(rng.randint(1, 64))  # not a frame at all
    if r < 0.97:
        code = rng.choice((1000, 1001, 1005, 1006, 1015, 2999, 4000, 0, 65535))
        return frame(OP_CLOSE, struct.pack("!H", code) + os.urandom(rng.randint(0, 10)))
    return frame(OP_TEXT, os.urandom(rng.randint(1, 100)))  # text that is likely invalid UTF-8


@dataclass
class Findings:
    frames: int = 0
    connections: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    close_codes: Counter[str] = field(default_factory=Counter)
    error_codes: Counter[str] = field(default_factory=Counter)
    event_types: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    def violation(self, text: str) -> None:
        if len(self.violations) < 50:
            self.violations.append(text)


def check(frames: list[tuple[int, bytes]], found: Findings, codes: set[str]) -> None:
    for opcode, payload in frames:
        if opcode == OP_TEXT:
            try:
                message = json.loads(payload)
            except ValueError:
                found.violation(f"text frame that is not JSON: {payload[:80]!r}")
                continue
            kind = message.get("type")
            found.event_types[str(kind)] += 1
            if kind not in EVENT_TYPES:
                found.violation(f"undocumented event type {kind!r}")
            if kind == "Error":
                found.error_codes[str(message.get("code"))] += 1
                if message.get("code") not in codes:
                    found.violation(f"undocumented Error code {message.get('code')!r}")
        elif opcode == OP_CLOSE:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            found.close_codes[str(code)] += 1
            if code is not None and code not in CLOSE_CODES:
                found.violation(f"undocumented close code {code}")
        elif opcode == OP_BINARY:
            found.violation("the server sent a binary frame")


async def one_connection(port: int, rng: random.Random, found: Findings, codes: set[str], budget: int) -> int:
    client = await RawClient.open("127.0.0.1", port, "/v1/listen" + rng.choice(QUERIES))
    found.connections += 1
    found.statuses[client.status] += 1
    if client.status not in HTTP_STATUSES:
        found.violation(f"undocumented HTTP status {client.status}")
    if client.status != 101:
        head = client.head.decode("latin-1")
        length = int(re.search(r"(?i)content-length: (\d+)", head).group(1)) if "ontent-Length" in head else 0
        body = await client.reader.readexactly(length) if length else b""
        try:
            if "code" not in json.loads(body):
                found.violation(f"HTTP {client.status} without a code")
        except ValueError:
            found.violation(f"HTTP {client.status} body is not JSON: {body[:80]!r}")
        client.abort()
        return 0
    count = min(budget, rng.choice((1, 20, 200, 1000, 3000)))
    reading = asyncio.ensure_future(client.read_frames(10.0))
    sent = 0
    try:
        for _ in range(count):
            client.send(random_frame(rng))
            sent += 1
            if sent % 50 == 0:
                await client.drain(5)
                await asyncio.sleep(rng.choice((0, 0, 0, 0.01)))
        ending = rng.random()
        if ending < 0.6:
            client.send(frame(OP_TEXT, b'{"type": "CloseStream"}'))
        elif ending < 0.85:
            client.abort()  # vanish; otherwise wait for the server's timeouts
    except (ConnectionError, asyncio.TimeoutError):
        pass
    check(await reading, found, codes)
    client.abort()
    return sent


async def clean_stream(port: int) -> bool:
    """A well-behaved stream still gets its final."""
    client = await RawClient.open("127.0.0.1", port)
    t = np.arange(16000) / 16000
    tone = (8000 * np.sin(2 * np.pi * 300 * t)).astype("<i2").tobytes()
    client.send(frame(OP_BINARY, bytes(16000) + tone + bytes(32000)))
    client.send(frame(OP_TEXT, b'{"type": "CloseStream"}'))
    frames = await client.read_frames(20)
    client.abort()
    return any(op == OP_TEXT and b'"is_final":true' in p for op, p in frames)


class ErrorCount(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        self.records.append(text if len(text) < 900 else text[:200] + " ... " + text[-700:])


async def run(args: argparse.Namespace) -> int:
    errors = ErrorCount()
    logging.getLogger().addHandler(errors)
    logging.getLogger().setLevel(logging.WARNING)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, ctx: errors.records.append(str(ctx.get("message"))[:300]))
    limits = replace(
        LimitsConfig(admission=False),
        max_sessions=256,
        idle_timeout_s=2.0,
        no_audio_timeout_s=2.0,
        handshake_timeout_s=2.0,
        max_frame_bytes=1 << 20,
    )
    config = replace(Config(), limits=limits, server=ServerConfig(host="127.0.0.1", port=0))
    server = Server(config, engine=QuickEngine())
    _, port = await server.start()
    codes = documented_error_codes()
    found = Findings()
    started = time.monotonic()
    deadline = started + args.max_seconds

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        while found.frames < args.frames and time.monotonic() < deadline:
            try:
                sent = await one_connection(port, rng, found, codes, args.frames - found.frames)
                found.frames += sent
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
                found.violation(f"handshake failed: {type(exc).__name__}: {exc}")

    try:
        last = 0
        tasks = [asyncio.ensure_future(worker(args.seed + i)) for i in range(args.connections)]
        while not all(t.done() for t in tasks):
            await asyncio.sleep(5)
            if found.frames - last >= 100000 or args.verbose:
                last = found.frames
                print(
                    f"  {found.frames:>8} frames, {found.connections} connections, "
                    f"{time.monotonic() - started:.0f} s"
                )
        for t in tasks:
            await t
        clean = await clean_stream(port)
        alive = len(server.connections)
        await asyncio.sleep(3)
    finally:
        await server.stop()
    elapsed = time.monotonic() - started
    print(f"{found.frames} frames in {found.connections} connections in {elapsed:.0f} s")
    print(f"  handshakes: {dict(found.statuses)}")
    print(f"  close codes: {dict(found.close_codes.most_common())}")
    print(f"  Error codes: {dict(found.error_codes.most_common())}")
    print(f"  event types: {dict(found.event_types.most_common())}")
    print(f"  streams open after the clean stream: {alive}; clean stream got its final: {clean}")
    print(f"  ERROR log records / loop exceptions (crashes): {len(errors.records)}")
    for line in errors.records[:10]:
        print(f"    {line}")
    print(f"  undocumented responses: {len(found.violations)}")
    for line in found.violations[:20]:
        print(f"    {line}")
    ok = not errors.records and not found.violations and clean
    print(f"{'OK' if ok else 'NOT MET'}: 0 crashes and every response documented")
    print(f"load average at the end: {common.loadavg()}")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=1_000_000, help="stop after this many frames")
    parser.add_argument("--connections", type=int, default=16, help="clients at once")
    parser.add_argument("--max-seconds", type=float, default=1800, help="stop after this long anyway")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="progress every 5 s")
    parser.add_argument("--quick", action="store_true", help="5000 frames (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.frames, args.connections = 5000, 4
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    print(f"machine: {common.machine_line()}")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
