"""``stream-client``: stream an audio file to a server at X times real time and print what comes back.

::

    stream-client speech.wav --url ws://127.0.0.1:8000/v1/listen   # finals as text
    stream-client speech.wav --speed 0 --json                      # every message, as fast as it goes

The library half (:func:`read_audio`, :func:`stream_audio`) is what the load tests use: it records
when each piece of audio was sent, so the latency from the end of speech to its final can be measured
from the client's side.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import struct
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .compat import timeout

Int16Array = npt.NDArray[np.int16]


class AudioFileError(ValueError):
    """The file is not audio this client can read."""


def read_audio(path: Path, *, raw_sample_rate_hz: int | None = None) -> tuple[Int16Array, int]:
    """Read a WAV (PCM 8/16/24/32-bit or float32, any channels) or a raw 16-bit mono file as mono int16.

    Args:
        path: the file.
        raw_sample_rate_hz: treat the file as headerless 16-bit little-endian mono at this rate.

    Returns:
        (samples, sample_rate_hz).

    Raises:
        AudioFileError: naming what is wrong with the file.
    """
    data = path.read_bytes()
    if raw_sample_rate_hz is not None:
        if len(data) % 2:
            raise AudioFileError(f"{path}: raw 16-bit audio must have an even number of bytes")
        return np.frombuffer(data, dtype="<i2").copy(), raw_sample_rate_hz
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioFileError(f"{path}: not a WAV file (use --raw-sample-rate for headerless 16-bit PCM)")
    pos = 12
    fmt: tuple[int, int, int, int] | None = None
    payload: bytes | None = None
    while pos + 8 <= len(data):
        chunk_id, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = data[pos + 8 : pos + 8 + size]
        if chunk_id == b"fmt ":
            tag, channels, rate = struct.unpack("<HHI", body[:8])
            bits = struct.unpack("<H", body[14:16])[0]
            if tag == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real tag is in the GUID
                tag = struct.unpack("<H", body[24:26])[0]
            fmt = (tag, channels, rate, bits)
        elif chunk_id == b"data":
            payload = body
        pos += 8 + size + (size & 1)
    if fmt is None or payload is None:
        raise AudioFileError(f"{path}: WAV file without a fmt or data chunk")
    tag, channels, rate, bits = fmt
    if channels < 1:
        raise AudioFileError(f"{path}: WAV file with {channels} channels")
    frame_bytes = channels * bits // 8
    payload = payload[: len(payload) - len(payload) % frame_bytes]
    samples: npt.NDArray[np.float32]
    if tag == 1 and bits == 16:
        samples = np.frombuffer(payload, dtype="<i2").astype(np.float32) * np.float32(1 / 32768)
    elif tag == 1 and bits == 8:
        samples = (np.frombuffer(payload, dtype=np.uint8).astype(np.float32) - 128) * np.float32(1 / 128)
    elif tag == 1 and bits == 24:
        raw = np.frombuffer(payload, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        samples = (np.where(ints >= 1 << 23, ints - (1 << 24), ints) / float(1 << 23)).astype(np.float32)
    elif tag == 1 and bits == 32:
        samples = (np.frombuffer(payload, dtype="<i4") / float(1 << 31)).astype(np.float32)
    elif tag == 3 and bits == 32:
        samples = np.frombuffer(payload, dtype="<f4").astype(np.float32)
    else:
        raise AudioFileError(f"{path}: unsupported WAV encoding (format tag {tag}, {bits} bits)")
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    pcm = np.clip(np.round(samples * 32768), -32768, 32767).astype(np.int16)
    return pcm, rate


@dataclass
class StreamReport:
    """What happened on one stream.

    Attributes:
        messages: every server message, parsed, with ``_received_s`` (monotonic) added.
        close_code: the server's close code.
        close_reason: the server's close reason.
        audio_s: seconds of audio sent.
        wall_s: seconds from connect to close.
        latencies_s: per final: receive time minus the time the audio up to its last word (or its end,
            when it has no words) had been sent.
    """

    messages: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""
    audio_s: float = 0.0
    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)

    def finals(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == "Results" and m.get("is_final")]

    def transcript(self) -> str:
        texts = (m["channel"]["alternatives"][0]["transcript"].strip() for m in self.finals())
        return " ".join(t for t in texts if t)


def listen_url(base: str, params: dict[str, Any]) -> str:
    """Add query parameters (None values left out; booleans as true/false) to a /v1/listen URL."""
    query = {
        k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in params.items() if v is not None
    }
    joiner = "&" if urllib.parse.urlparse(base).query else "?"
    return base + (joiner + urllib.parse.urlencode(query) if query else "")


async def stream_audio(
    url: str,
    pcm: Int16Array,
    sample_rate_hz: int,
    *,
    speed: float = 1.0,
    chunk_ms: int = 100,
    params: dict[str, Any] | None = None,
    on_message: Callable[[dict[str, Any]], None] | None = None,
    timeout_s: float = 600.0,
    api_key: str | None = None,
) -> StreamReport:
    """Stream mono 16-bit audio to ``url`` and collect every message until the server closes.

    Args:
        url: the ``ws://.../v1/listen`` URL without audio parameters.
        pcm: mono samples.
        sample_rate_hz: their rate (sent as ``sample_rate``; the server resamples).
        speed: times real time; 0 sends as fast as the server takes it.
        chunk_ms: audio per WebSocket frame.
        params: more query parameters (``interim_results``, ``language``...).
        api_key: sent as ``Authorization: Token KEY`` (Deepgram's header) when given; a grant token
            (it has dots) goes as ``Authorization: Bearer TOKEN``.
        on_message: called with each message as it arrives.
        timeout_s: give up after this long.

    Returns:
        The report; latencies are measured from the client's clock.

    Raises:
        asyncio.TimeoutError: the stream did not end within ``timeout_s`` (on Python 3.10 this is not the
            builtin TimeoutError).
    """
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    query = {"encoding": "linear16", "sample_rate": sample_rate_hz, "channels": 1, **(params or {})}
    report = StreamReport(audio_s=len(pcm) / sample_rate_hz)
    chunk = max(1, sample_rate_hz * chunk_ms // 1000)
    sent_samples: list[int] = []  # cumulative samples after each send
    sent_at: list[float] = []

    def audio_sent_time(t_s: float) -> float | None:
        """When the audio up to session time t_s had been sent."""
        i = bisect.bisect_left(sent_samples, int(t_s * sample_rate_hz))
        return sent_at[i] if i < len(sent_at) else None

    started = time.monotonic()
    async with timeout(timeout_s):
        headers = {}
        if api_key:
            headers["Authorization"] = f"{'Bearer' if '.' in api_key else 'Token'} {api_key}"
        async with connect(listen_url(url, query), max_size=None, additional_headers=headers) as ws:

            async def receive() -> None:
                try:
                    async for raw in ws:
                        message = json.loads(raw)
                        now = time.monotonic()
                        message["_received_s"] = now
                        report.messages.append(message)
                        if message.get("type") == "Results" and message.get("is_final"):
                            words = message["channel"]["alternatives"][0].get("words") or []
                            end_s = words[-1]["end"] if words else message["start"] + message["duration"]
                            sent = audio_sent_time(end_s)
                            if sent is not None and message["channel"]["alternatives"][0]["transcript"]:
                                report.latencies_s.append(now - sent)
                        if on_message is not None:
                            on_message(message)
                except ConnectionClosed:
                    pass

            reader = asyncio.ensure_future(receive())
            for i in range(0, len(pcm), chunk):
                piece = pcm[i : i + chunk]
                if speed > 0:
                    due = started + (i + len(piece)) / sample_rate_hz / speed
                    delay = due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await ws.send(piece.astype("<i2").tobytes())
                sent_samples.append(i + len(piece))
                sent_at.append(time.monotonic())
            await ws.send(json.dumps({"type": "CloseStream"}))
            await reader
            report.close_code = ws.close_code
            report.close_reason = ws.close_reason or ""
    report.wall_s = time.monotonic() - started
    return report


def _clock(seconds: float) -> str:
    minutes, secs = divmod(max(0.0, seconds), 60)
    return f"{int(minutes):02d}:{secs:05.2f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream-client",
        description="Stream an audio file to a stream-server (or any Deepgram-compatible /v1/listen).",
    )
    parser.add_argument("file", type=Path, help="a WAV file (any rate, any channels), or raw 16-bit PCM")
    parser.add_argument("--url", default="ws://127.0.0.1:8000/v1/listen", help="the /v1/listen WebSocket URL")
    parser.add_argument("--speed", type=float, default=1.0, help="times real time; 0 = as fast as possible")
    parser.add_argument("--json", action="store_true", help="print every server message as a JSON line")
    parser.add_argument("--chunk-ms", type=int, default=100, help="audio per WebSocket frame")
    parser.add_argument("--raw-sample-rate", type=int, default=None, help="the file is raw 16-bit mono PCM")
    parser.add_argument("--language", default=None, help="auto (default), zh, en, ja, ko or yue")
    parser.add_argument("--punctuate", action="store_true", help="punctuation and inverse text normalisation")
    parser.add_argument("--interim", action="store_true", help="ask for interim results")
    parser.add_argument("--endpointing", default=None, help="ms of silence that ends a segment, or false")
    parser.add_argument(
        "--param", action="append", default=[], metavar="K=V", help="any other query parameter"
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("STREAM_SERVER_API_KEY") or None,
        help="an API key of the server (or a grant token) [env STREAM_SERVER_API_KEY]",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.speed < 0:
        print("stream-client: --speed must be 0 or more", file=sys.stderr)
        return 2
    try:
        pcm, rate = read_audio(args.file, raw_sample_rate_hz=args.raw_sample_rate)
    except (OSError, AudioFileError) as exc:
        print(f"stream-client: {exc}", file=sys.stderr)
        return 2
    params: dict[str, Any] = {
        "language": args.language,
        "punctuate": True if args.punctuate else None,
        "interim_results": True if args.interim else None,
        "endpointing": args.endpointing,
    }
    for item in args.param:
        key, _, value = item.partition("=")
        params[key] = value

    def show(message: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps({k: v for k, v in message.items() if not k.startswith("_")}, ensure_ascii=False))
        elif message.get("type") == "Results" and message.get("is_final"):
            text = message["channel"]["alternatives"][0]["transcript"].strip()
            if text:
                start, end = message["start"], message["start"] + message["duration"]
                print(f"[{_clock(start)} -> {_clock(end)}] {text}")
        elif message.get("type") == "Error":
            print(
                f"stream-client: server error {message.get('code')}: {message.get('description')}",
                file=sys.stderr,
            )
        elif message.get("type") == "Metadata":
            for warning in message.get("warnings", []):
                print(f"stream-client: server warning: {warning}", file=sys.stderr)
        sys.stdout.flush()

    try:
        report = asyncio.run(
            stream_audio(
                args.url,
                pcm,
                rate,
                speed=args.speed,
                chunk_ms=args.chunk_ms,
                params=params,
                on_message=show,
                api_key=args.api_key,
            )
        )
    except asyncio.TimeoutError:  # before OSError: from Python 3.11 the builtin TimeoutError is one
        print(f"stream-client: {args.url} did not end the stream in time", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"stream-client: cannot connect to {args.url}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the handshake was refused: say why
        response = getattr(exc, "response", None)
        body = getattr(response, "body", None)
        detail = str(exc)
        if isinstance(body, bytes | bytearray) and body:
            try:
                refusal = json.loads(body)
                detail = f"HTTP {response.status_code}: {refusal['code']}: {refusal['description']}"  # type: ignore[union-attr]
            except (ValueError, KeyError, TypeError):
                detail = f"{exc}: {bytes(body).decode(errors='replace')}"
        print(f"stream-client: {detail}", file=sys.stderr)
        return 1
    if not args.json:
        lat = sorted(report.latencies_s)
        median = f", median latency {lat[len(lat) // 2] * 1000:.0f} ms" if lat else ""
        print(
            f"stream-client: {report.audio_s:.1f} s of audio in {report.wall_s:.1f} s, "
            f"{len(report.finals())} final(s){median}, closed {report.close_code}",
            file=sys.stderr,
        )
    return 0 if report.close_code == 1000 else 1


if __name__ == "__main__":
    sys.exit(main())
