"""Replay a phone call to a WebSocket server the way Twilio Media Streams sends it.

Written from Twilio's documentation alone, not from this server's own parser (``stream_server.twilio``),
so that each checks the other:

* Messages: https://www.twilio.com/docs/voice/media-streams/websocket-messages (connected, start,
  media, dtmf, stop, mark). All are JSON text frames; numbers inside them (``sequenceNumber``,
  ``media.chunk``, ``media.timestamp``) are strings, except ``mediaFormat.sampleRate`` and
  ``mediaFormat.channels``. ``connected`` carries no ``sequenceNumber``; ``start`` is ``"1"`` and every
  later message adds one. ``media.chunk`` "begins with 1 and increments with each subsequent message"
  (per track here, as in the page's two-track example), so a lost packet leaves no hole in the chunk
  numbers: only ``media.timestamp`` ("milliseconds from the start of the stream") shows the gap. The
  DTMF track is always ``inbound_track`` (media tracks are ``inbound`` and ``outbound``). Payloads are
  base64 ``audio/x-mulaw`` at 8000 Hz, mono, without a file header; 20 ms (160 bytes) per message.
* ``<Stream>``: https://www.twilio.com/docs/voice/twiml/stream — only ``wss`` URLs and no query string;
  values reach the server as ``<Parameter>`` nouns, which arrive in ``start.customParameters``.
* Signature: https://www.twilio.com/docs/usage/webhooks/webhooks-security and
  https://www.twilio.com/docs/global-infrastructure/firewall-configurations/media-streams-configuration —
  the WebSocket upgrade request carries ``X-Twilio-Signature``, the HMAC-SHA1 of the ``wss`` URL (no
  POST parameters) keyed by the account's Auth Token, here computed by the official ``twilio`` package's
  ``RequestValidator(auth_token).compute_signature(url, {})``.

What a real Twilio does that this does not: it reads what the server sends only on a bidirectional
stream, and then only ``media``/``mark``/``clear`` JSON; a binary frame would end the stream with error
31924. This client records every frame instead (:attr:`ReplayReport.binary_frames_received` counts the
binary ones) so a test can assert there were none.

Library: :func:`mulaw_encode`, :func:`to_8k`, :class:`TwilioCallAudio` (the message sequence of a call),
:func:`replay_call` (send it, record what comes back), :func:`two_track_call` and :func:`stereo_wav`
(real recorded speech). Command line::

    python -m stream_server.testing.twilio_replay ws://127.0.0.1:8000/v1/twilio \\
        --inbound caller.wav --outbound agent.wav --speed 1 --auth-token T --param language=en

Nothing in the server imports this module.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import secrets
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import soxr

from ..compat import timeout
from .speech import read_mono_float32, read_wav, recorded_speech, write_wav

__all__ = [
    "DTMF_DIGITS",
    "MULAW_SILENCE",
    "SAMPLE_RATE_HZ",
    "TRACKS",
    "ReplayReport",
    "SentChunk",
    "Track",
    "TwilioCallAudio",
    "main",
    "mulaw_encode",
    "replay_call",
    "stereo_wav",
    "to_8k",
    "two_track_call",
]

FloatArray = npt.NDArray[np.float32]
Track = Literal["inbound", "outbound"]

SAMPLE_RATE_HZ = 8000
"""Twilio's ``mediaFormat.sampleRate``: always 8000."""

TRACKS: tuple[Track, Track] = ("inbound", "outbound")
"""The media track names, in the order this client sends a pair of chunks with the same timestamp."""

MULAW_SILENCE = 0xFF
"""The mu-law byte of a zero sample (positive zero), what the shorter track is padded with."""

DTMF_DIGITS = frozenset("0123456789*#")
"""The keys a ``dtmf`` message may carry here (a phone's keypad)."""

_DTMF_TRACK = "inbound_track"
"""``dtmf.track``: the docs say the value is always this (not ``inbound``)."""

_MULAW_BIAS = 0x84
"""G.711 mu-law encoder bias (132) added to the 16-bit magnitude before the segment search."""

_MULAW_CLIP = 32635
"""Largest 16-bit magnitude the encoder takes (32635 + bias = 0x7FFF)."""

_RECORDING_RATE_HZ = 16000
"""Rate of every file :func:`~stream_server.testing.speech.recorded_speech` returns."""


# --------------------------------------------------------------------------------------------------
# Audio


def mulaw_encode(samples: npt.ArrayLike) -> bytes:
    """ITU-T G.711 mu-law encoding, vectorised (the classic Sun ``linear2ulaw`` on 16-bit PCM).

    Each sample is scaled by 32768 and rounded to 16-bit, its magnitude clipped to 32635 and biased by
    132; the segment is the position of the highest set bit, the mantissa the next four bits, and the
    byte is inverted (0.0 gives ``0xFF``). Decoding with ``stream_server.audio.MULAW_TO_FLOAT`` gives the
    middle of the sample's quantisation step back, so the error is at most half a step (plus the clip
    above 32635/32768).

    Args:
        samples: float samples in [-1, 1], any shape (encoded in C order); values outside are clipped.

    Returns:
        One byte per sample.

    Raises:
        ValueError: a sample is NaN or infinite.
    """
    values = np.asarray(samples, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(values)):
        raise ValueError("samples must be finite (found NaN or infinity)")
    pcm = np.clip(np.round(values * 32768.0), -32768, 32767).astype(np.int32)
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    biased = np.minimum(np.abs(pcm), _MULAW_CLIP) + _MULAW_BIAS  # 132 ..= 32767: segments 0..7
    _, exponent = np.frexp(biased.astype(np.float64))  # biased = m * 2**exponent, 0.5 <= m < 1
    segment = exponent.astype(np.int32) - 8
    mantissa = (biased >> (segment + 3)) & 0x0F
    return ((((segment << 4) | mantissa) ^ mask) & 0xFF).astype(np.uint8).tobytes()


def to_8k(samples: npt.ArrayLike, sample_rate_hz: int = _RECORDING_RATE_HZ) -> FloatArray:
    """Resample mono audio to Twilio's 8 kHz with soxr (high quality, whole signal at once).

    Args:
        samples: mono float samples in [-1, 1] (the recordings are 16 kHz).
        sample_rate_hz: their rate.

    Returns:
        float32 samples at 8000 Hz (half as many from 16 kHz).

    Raises:
        ValueError: the samples are not one-dimensional, or the rate is not positive.
    """
    array = np.asarray(samples, dtype=np.float32)
    if array.ndim != 1:
        raise ValueError(f"samples must be mono (1-D), not shape {array.shape}")
    if sample_rate_hz <= 0:
        raise ValueError(f"sample_rate_hz must be positive, not {sample_rate_hz}")
    if sample_rate_hz == SAMPLE_RATE_HZ:
        copied: FloatArray = array.copy()
        return copied
    resampled = soxr.resample(array, sample_rate_hz, SAMPLE_RATE_HZ, quality="HQ")
    return np.asarray(resampled, dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# The messages of a call


def _sid(prefix: str) -> str:
    """A random Twilio-style SID: two letters and 32 hex digits."""
    return prefix + secrets.token_hex(16)


@dataclass(frozen=True, eq=False)
class TwilioCallAudio:
    """The audio of one call, as Twilio would stream it: the caller and, optionally, the other party.

    Attributes:
        inbound: the ``inbound`` track (what the caller says), mono float32 at 8 kHz in [-1, 1].
        outbound: the ``outbound`` track (what the caller hears, e.g. an agent), same form; None for a
            stream of the inbound track only (``tracks: ["inbound"]``).
    """

    inbound: FloatArray
    outbound: FloatArray | None = None

    def __post_init__(self) -> None:
        for name in ("inbound", "outbound"):
            track = getattr(self, name)
            if track is None:
                continue
            if not isinstance(track, np.ndarray) or track.ndim != 1 or track.dtype != np.float32:
                raise ValueError(f"{name} must be a 1-D float32 array at 8 kHz")
        if self.inbound.size == 0:
            raise ValueError("inbound must hold at least one sample")

    @property
    def tracks(self) -> tuple[Track, ...]:
        """The ``start.tracks`` list: ``("inbound",)`` or ``("inbound", "outbound")``."""
        return TRACKS if self.outbound is not None else TRACKS[:1]

    def duration_s(self, chunk_ms: int = 20) -> float:
        """How long the stream's media lasts: the longer track, rounded up to whole chunks.

        Args:
            chunk_ms: milliseconds of audio per ``media`` message.

        Returns:
            Seconds.
        """
        return self.chunk_count(chunk_ms) * chunk_ms / 1000

    def chunk_count(self, chunk_ms: int = 20) -> int:
        """The number of ``media`` messages per track before any are dropped.

        Args:
            chunk_ms: milliseconds of audio per ``media`` message.

        Returns:
            The longer track's length in chunks, the last one padded with silence.

        Raises:
            ValueError: ``chunk_ms`` is not positive.
        """
        if chunk_ms <= 0:
            raise ValueError(f"chunk_ms must be positive, not {chunk_ms}")
        samples = max(len(self.inbound), 0 if self.outbound is None else len(self.outbound))
        per_chunk = SAMPLE_RATE_HZ * chunk_ms // 1000
        return -(-samples // per_chunk)

    def messages(
        self,
        call_sid: str,
        stream_sid: str,
        account_sid: str,
        custom_parameters: Mapping[str, str],
        *,
        chunk_ms: int = 20,
        drop_chunks: Collection[tuple[str, int]] = (),
        dtmf: Sequence[tuple[float, str]] = (),
        marks: Sequence[tuple[float, str]] = (),
    ) -> Iterator[tuple[float, str]]:
        """The JSON text frames Twilio would send for this call, each with when it would send it.

        Order: ``connected`` and ``start`` at 0 s; then per 20 ms step the ``inbound`` chunk and (with two
        tracks) the ``outbound`` chunk of the same timestamp, each sent when its audio has been heard
        (chunk ``k`` from 1, timestamp ``(k - 1) * chunk_ms``, at ``k * chunk_ms``); a ``dtmf`` or
        ``mark`` at its time, after the chunks sent by then; ``stop`` with the last chunk. Both tracks
        are equally long: the shorter, and the last chunk of each, are padded with mu-law silence.

        Args:
            call_sid: ``start.callSid`` and ``stop.callSid`` (``CA...``).
            stream_sid: ``streamSid`` of every message but ``connected`` (``MZ...``).
            account_sid: ``start.accountSid`` and ``stop.accountSid`` (``AC...``).
            custom_parameters: ``start.customParameters`` (the ``<Parameter>`` nouns of the TwiML).
            chunk_ms: audio per ``media`` message; Twilio's is 20 (160 bytes).
            drop_chunks: ``(track, n)`` pairs: the n-th chunk of that track (counting from 1, lost ones
                included, i.e. the one with timestamp ``(n - 1) * chunk_ms``) is never sent, as if the
                packet were lost. Later chunks of the track keep consecutive ``chunk`` numbers; their
                timestamps show the gap.
            dtmf: ``(time_s, digit)`` key presses, sent at ``time_s`` on ``inbound_track``.
            marks: ``(time_s, name)`` ``mark`` messages (Twilio echoes a mark the server sent once the
                audio before it has played; here they are simply sent at ``time_s``).

        Returns:
            An iterator of ``(send_at_s, json_text)``, ``send_at_s`` seconds after the stream opened,
            never decreasing.

        Raises:
            ValueError: ``chunk_ms`` is not positive or not a whole number of samples; a dropped chunk
                names a track the call does not have or a chunk outside it; a DTMF digit is not one key
                of :data:`DTMF_DIGITS`; a DTMF or mark time is outside the call.
        """
        if chunk_ms <= 0 or SAMPLE_RATE_HZ * chunk_ms % 1000:
            raise ValueError(f"chunk_ms must be a positive whole number of 8 kHz samples, not {chunk_ms}")
        chunks = self.chunk_count(chunk_ms)
        duration_s = chunks * chunk_ms / 1000
        dropped: dict[str, set[int]] = {track: set() for track in self.tracks}
        for track, number in drop_chunks:
            if track not in dropped:
                raise ValueError(f"drop_chunks: the call has no {track!r} track (tracks: {self.tracks})")
            if not 1 <= number <= chunks:
                raise ValueError(f"drop_chunks: chunk {number} is outside 1..{chunks}")
            dropped[track].add(number)
        events: list[tuple[float, dict[str, Any]]] = []
        for time_s, digit in dtmf:
            if digit not in DTMF_DIGITS:
                raise ValueError(f"dtmf: {digit!r} is not a key ({''.join(sorted(DTMF_DIGITS))})")
            if not 0 <= time_s <= duration_s:
                raise ValueError(f"dtmf: time {time_s} s is outside the call (0..{duration_s} s)")
            events.append((time_s, {"event": "dtmf", "dtmf": {"track": _DTMF_TRACK, "digit": digit}}))
        for time_s, name in marks:
            if not 0 <= time_s <= duration_s:
                raise ValueError(f"marks: time {time_s} s is outside the call (0..{duration_s} s)")
            events.append((time_s, {"event": "mark", "mark": {"name": name}}))
        events.sort(key=lambda event: event[0])
        per_chunk = SAMPLE_RATE_HZ * chunk_ms // 1000
        payloads: dict[str, bytes] = {
            track: self._padded_mulaw(track, chunks * per_chunk) for track in self.tracks
        }  # encoded once, up front: the replay loop only slices
        return self._generate(
            call_sid,
            stream_sid,
            account_sid,
            dict(custom_parameters),
            chunk_ms,
            chunks,
            per_chunk,
            payloads,
            dropped,
            events,
        )

    def _padded_mulaw(self, track: str, samples: int) -> bytes:
        audio = self.inbound if track == "inbound" else self.outbound
        assert audio is not None
        encoded = mulaw_encode(audio)
        return encoded + bytes([MULAW_SILENCE]) * (samples - len(encoded))

    def _generate(
        self,
        call_sid: str,
        stream_sid: str,
        account_sid: str,
        custom_parameters: dict[str, str],
        chunk_ms: int,
        chunks: int,
        per_chunk: int,
        payloads: dict[str, bytes],
        dropped: dict[str, set[int]],
        events: list[tuple[float, dict[str, Any]]],
    ) -> Iterator[tuple[float, str]]:
        sequence = 0

        def numbered(message: dict[str, Any]) -> str:
            nonlocal sequence
            sequence += 1
            return json.dumps({"event": message["event"], "sequenceNumber": str(sequence), **message})

        yield 0.0, json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        start = {
            "accountSid": account_sid,
            "streamSid": stream_sid,
            "callSid": call_sid,
            "tracks": list(self.tracks),
            "customParameters": custom_parameters,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": SAMPLE_RATE_HZ, "channels": 1},
        }
        yield 0.0, numbered({"event": "start", "start": start, "streamSid": stream_sid})
        sent_per_track = dict.fromkeys(self.tracks, 0)
        pending = iter(events)
        event = next(pending, None)
        for number in range(1, chunks + 1):
            send_at_s = number * chunk_ms / 1000
            while event is not None and event[0] < send_at_s:
                yield event[0], numbered({**event[1], "streamSid": stream_sid})
                event = next(pending, None)
            for track in self.tracks:
                if number in dropped[track]:
                    continue
                sent_per_track[track] += 1
                payload = payloads[track][(number - 1) * per_chunk : number * per_chunk]
                media = {
                    "track": track,
                    "chunk": str(sent_per_track[track]),
                    "timestamp": str((number - 1) * chunk_ms),
                    "payload": base64.b64encode(payload).decode("ascii"),
                }
                yield send_at_s, numbered({"event": "media", "media": media, "streamSid": stream_sid})
        end_s = chunks * chunk_ms / 1000
        while event is not None:  # times equal to the end: after the last chunk, before stop
            yield event[0], numbered({**event[1], "streamSid": stream_sid})
            event = next(pending, None)
        stop = {"accountSid": account_sid, "callSid": call_sid}
        yield end_s, numbered({"event": "stop", "stop": stop, "streamSid": stream_sid})


# --------------------------------------------------------------------------------------------------
# Replaying a call


@dataclass(frozen=True)
class SentChunk:
    """One ``media`` message as sent.

    Attributes:
        track: ``inbound`` or ``outbound``.
        chunk: its ``media.chunk``.
        timestamp_ms: its ``media.timestamp``.
        sequence_number: its ``sequenceNumber``.
        sent_at_monotonic: ``time.monotonic()`` just after the frame was handed to the socket.
    """

    track: str
    chunk: int
    timestamp_ms: int
    sequence_number: int
    sent_at_monotonic: float


@dataclass(frozen=True)
class ReplayReport:
    """What happened when a call was replayed.

    Attributes:
        call_sid: the call's ``callSid``.
        stream_sid: the stream's ``streamSid``.
        sent_media: every ``media`` message sent, in order (fewer than planned when the server closed
            the connection early).
        started_at_monotonic: ``time.monotonic()`` when the connection opened; message times are
            relative to this.
        close_code: the code of the server's close frame (None when the connection broke without one).
        close_reason: its reason.
        received_text: every text frame the server sent, in order.
        binary_frames_received: how many binary frames it sent (a real Twilio would fail the stream).
        stop_sent: whether the ``stop`` message went out (False: the server closed before it).
        closed_by_server: whether the server closed the connection on its own; False when this client
            closed it after waiting ``close_timeout_s`` past ``stop``.
    """

    call_sid: str
    stream_sid: str
    sent_media: tuple[SentChunk, ...]
    started_at_monotonic: float
    close_code: int | None
    close_reason: str
    received_text: tuple[str, ...]
    binary_frames_received: int
    stop_sent: bool = False
    closed_by_server: bool = False

    def received_json(self) -> list[Any]:
        """The text frames parsed as JSON (a frame that is not JSON raises).

        Returns:
            One value per text frame, in order.

        Raises:
            json.JSONDecodeError: a frame is not JSON.
        """
        return [json.loads(text) for text in self.received_text]


async def replay_call(
    url: str,
    audio: TwilioCallAudio,
    *,
    speed: float = 1.0,
    headers: Mapping[str, str] | None = None,
    auth_token: str | None = None,
    signed_url: str | None = None,
    custom_parameters: Mapping[str, str] | None = None,
    call_sid: str | None = None,
    stream_sid: str | None = None,
    account_sid: str | None = None,
    chunk_ms: int = 20,
    drop_chunks: Collection[tuple[str, int]] = (),
    dtmf: Sequence[tuple[float, str]] = (),
    marks: Sequence[tuple[float, str]] = (),
    open_timeout_s: float = 10.0,
    close_timeout_s: float = 30.0,
    on_text: Callable[[str], None] | None = None,
) -> ReplayReport:
    """Open a WebSocket to ``url`` as Twilio would, stream the call in real time, and record the answers.

    The messages are those of :meth:`TwilioCallAudio.messages`, each sent at its time divided by
    ``speed``. After ``stop`` the client waits up to ``close_timeout_s`` for the server to close the
    connection (a Twilio stream ends with the server's close); past that it closes it itself. A server
    that closes early ends the sending: the report shows how far it got. websockets' default keepalive
    pings stay on.

    Args:
        url: the server's WebSocket URL (``ws://`` or ``wss://``).
        audio: what the call sounds like.
        speed: times real time; 0 sends as fast as the connection takes it.
        headers: more HTTP headers for the upgrade request.
        auth_token: an Auth Token: the request then carries ``X-Twilio-Signature`` for the URL.
        signed_url: the URL to sign, when it differs from ``url`` (Twilio signs the public ``wss`` URL of
            the TwiML, which a proxy in front of the server may rewrite); default ``url``.
        custom_parameters: ``start.customParameters``; default none.
        call_sid: ``callSid``; default a random ``CA...``.
        stream_sid: ``streamSid``; default a random ``MZ...``.
        account_sid: ``accountSid``; default a random ``AC...``.
        chunk_ms: as for :meth:`TwilioCallAudio.messages`.
        drop_chunks: as for :meth:`TwilioCallAudio.messages`.
        dtmf: as for :meth:`TwilioCallAudio.messages`.
        marks: as for :meth:`TwilioCallAudio.messages`.
        open_timeout_s: limit for the TCP connection and the WebSocket handshake.
        close_timeout_s: how long to wait after ``stop`` for the server to close.
        on_text: called with each text frame as it arrives.

    Returns:
        The report.

    Raises:
        ValueError: ``speed`` is negative, or bad ``messages`` arguments.
        OSError: the server cannot be reached.
        asyncio.TimeoutError: the handshake did not finish within ``open_timeout_s``.
        websockets.exceptions.InvalidStatus: the server refused the upgrade (its HTTP response is on
            the exception).
    """
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    if speed < 0:
        raise ValueError(f"speed must be 0 or more, not {speed}")
    call_sid = call_sid or _sid("CA")
    stream_sid = stream_sid or _sid("MZ")
    account_sid = account_sid or _sid("AC")
    plan = audio.messages(
        call_sid,
        stream_sid,
        account_sid,
        dict(custom_parameters or {}),
        chunk_ms=chunk_ms,
        drop_chunks=drop_chunks,
        dtmf=dtmf,
        marks=marks,
    )
    request_headers = dict(headers or {})
    if auth_token is not None:
        from twilio.request_validator import RequestValidator

        signature = RequestValidator(auth_token).compute_signature(signed_url or url, {})
        request_headers["X-Twilio-Signature"] = str(signature)
    received: list[str] = []
    binary_frames = 0
    sent: list[SentChunk] = []
    stop_sent = False
    closed_by_server = False

    async with connect(url, additional_headers=request_headers, open_timeout=open_timeout_s) as ws:
        started = time.monotonic()

        async def receive() -> None:
            nonlocal binary_frames
            try:
                async for frame in ws:  # ends when the connection closes
                    if isinstance(frame, str):
                        received.append(frame)
                        if on_text is not None:
                            on_text(frame)
                    else:
                        binary_frames += 1
            except ConnectionClosed:
                pass

        reader = asyncio.ensure_future(receive())
        try:
            for send_at_s, text in plan:
                if speed > 0:
                    delay = started + send_at_s / speed - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if reader.done():
                    break  # the server closed the connection: nothing more can be sent
                try:
                    await ws.send(text)
                except ConnectionClosed:
                    break
                message = json.loads(text)
                if message["event"] == "media":
                    media = message["media"]
                    sent.append(
                        SentChunk(
                            track=media["track"],
                            chunk=int(media["chunk"]),
                            timestamp_ms=int(media["timestamp"]),
                            sequence_number=int(message["sequenceNumber"]),
                            sent_at_monotonic=time.monotonic(),
                        )
                    )
                elif message["event"] == "stop":
                    stop_sent = True
            try:
                async with timeout(close_timeout_s):
                    await asyncio.shield(reader)
                closed_by_server = True
            except asyncio.TimeoutError:
                await ws.close()  # bounded by websockets' own close_timeout (10 s)
                await reader
        finally:
            if not reader.done():
                reader.cancel()
        rcvd = ws.protocol.close_rcvd
        close_code = None if rcvd is None else int(rcvd.code)
        close_reason = "" if rcvd is None else rcvd.reason
    return ReplayReport(
        call_sid=call_sid,
        stream_sid=stream_sid,
        sent_media=tuple(sent),
        started_at_monotonic=started,
        close_code=close_code,
        close_reason=close_reason,
        received_text=tuple(received),
        binary_frames_received=binary_frames,
        stop_sent=stop_sent,
        closed_by_server=closed_by_server,
    )


# --------------------------------------------------------------------------------------------------
# Real recorded speech


def _first_seconds(name: str, seconds: float) -> FloatArray:
    """The first ``seconds`` of a recording, 16 kHz float32."""
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, not {seconds}")
    samples = read_mono_float32(recorded_speech(name))
    wanted = round(seconds * _RECORDING_RATE_HZ)
    if wanted > len(samples):
        raise ValueError(
            f"recording {name!r} is {len(samples) / _RECORDING_RATE_HZ:.1f} s long, not {seconds} s"
        )
    return samples[:wanted]


def two_track_call(
    inbound: str = "lecture", outbound: str = "news", seconds: float = 20.0
) -> TwilioCallAudio:
    """A two-track call of real recorded speech: a different recording on each track.

    The defaults differ in every word: the first 20 s of ``lecture`` are a man on political philosophy
    ("how do I get to Dublin", "I wouldn't start from here"), of ``news`` a news report on Donald Trump
    and Sarah Palin campaigning in Oklahoma (faster-whisper tiny.en hears these words both in the
    16 kHz files and after 8 kHz mu-law and back), so a transcript shows which track a word came from.

    Args:
        inbound: a :func:`~stream_server.testing.speech.recorded_speech` name for the caller.
        outbound: one for the other party.
        seconds: how much of each, from its start.

    Returns:
        Both tracks resampled to 8 kHz (equally long).

    Raises:
        KeyError: unknown recording name.
        ValueError: ``seconds`` is not positive or longer than a recording.
        stream_server.testing.speech.SpeechToolError: the recordings could not be fetched.
    """
    return TwilioCallAudio(
        inbound=to_8k(_first_seconds(inbound, seconds)), outbound=to_8k(_first_seconds(outbound, seconds))
    )


def stereo_wav(left: str, right: str, seconds: float, path: Path, *, sample_rate_hz: int = 16000) -> Path:
    """A stereo 16-bit WAV with a different real recording on each channel (multichannel tests).

    At 16 kHz the samples are the recordings' own, unchanged; at another rate each channel is resampled
    with soxr.

    Args:
        left: a :func:`~stream_server.testing.speech.recorded_speech` name for channel 0.
        right: one for channel 1.
        seconds: how much of each, from its start.
        path: where to write (parent directories are created).
        sample_rate_hz: the file's rate.

    Returns:
        ``path``.

    Raises:
        KeyError: unknown recording name.
        ValueError: ``seconds`` is not positive or longer than a recording, or the rate is not positive.
        stream_server.testing.speech.SpeechToolError: the recordings could not be fetched.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, not {seconds}")
    if sample_rate_hz <= 0:
        raise ValueError(f"sample_rate_hz must be positive, not {sample_rate_hz}")
    wanted = round(seconds * _RECORDING_RATE_HZ)
    channels: list[npt.NDArray[np.int16]] = []
    for name in (left, right):
        samples, rate_hz, _ = read_wav(recorded_speech(name))
        if len(samples) < wanted:
            raise ValueError(f"recording {name!r} is {len(samples) / rate_hz:.1f} s long, not {seconds} s")
        pcm = samples[:wanted]
        if sample_rate_hz != _RECORDING_RATE_HZ:
            floats = soxr.resample(pcm.astype(np.float32) / 32768.0, _RECORDING_RATE_HZ, sample_rate_hz, "HQ")
            pcm = np.clip(np.round(np.asarray(floats) * 32768.0), -32768, 32767).astype(np.int16)
        channels.append(pcm)
    frames = min(len(c) for c in channels)
    interleaved = np.stack([c[:frames] for c in channels], axis=1).reshape(-1)
    return write_wav(path, interleaved, sample_rate_hz, channels=2)


# --------------------------------------------------------------------------------------------------
# CLI


def _read_track(path: Path) -> FloatArray:
    from ..client import read_audio

    pcm, rate_hz = read_audio(path)
    return to_8k(pcm.astype(np.float32) / 32768.0, rate_hz)


def _pairs(items: Sequence[str], option: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{option} takes KEY=VALUE, not {item!r}")
        pairs.append((key, value))
    return pairs


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m stream_server.testing.twilio_replay``.

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(
        prog="python -m stream_server.testing.twilio_replay",
        description="Replay a phone call to a WebSocket server as Twilio Media Streams would send it.",
    )
    parser.add_argument("url", help="the server's WebSocket URL, e.g. ws://127.0.0.1:8000/v1/twilio")
    parser.add_argument("--inbound", type=Path, required=True, help="WAV file of the caller (any rate)")
    parser.add_argument("--outbound", type=Path, default=None, help="WAV file of the other party")
    parser.add_argument("--speed", type=float, default=1.0, help="times real time; 0 = as fast as possible")
    parser.add_argument("--auth-token", default=None, help="sign the request (X-Twilio-Signature)")
    parser.add_argument("--signed-url", default=None, help="the URL to sign, if not the one connected to")
    parser.add_argument(
        "--param", action="append", default=[], metavar="K=V", help="a start.customParameters entry"
    )
    parser.add_argument(
        "--header", action="append", default=[], metavar="K=V", help="another HTTP header of the upgrade"
    )
    parser.add_argument(
        "--drop", action="append", default=[], metavar="TRACK=N", help="leave out chunk N of TRACK"
    )
    parser.add_argument("--dtmf", action="append", default=[], metavar="SECONDS=DIGIT", help="a key press")
    parser.add_argument("--close-timeout", type=float, default=30.0, help="seconds to wait for the close")
    parser.add_argument("--json", action="store_true", help="print each server text frame as it is")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.

    Returns:
        0 when the server closed the stream with code 1000 and sent no binary frame, 1 otherwise, 2 for
        bad arguments or unreadable files.
    """
    args = build_parser().parse_args(argv)
    try:
        if args.speed < 0:
            raise ValueError("--speed must be 0 or more")
        params = dict(_pairs(args.param, "--param"))
        headers = dict(_pairs(args.header, "--header"))
        drops = [(track, int(number)) for track, number in _pairs(args.drop, "--drop")]
        dtmf = [(float(at), digit) for at, digit in _pairs(args.dtmf, "--dtmf")]
        inbound = _read_track(args.inbound)
        outbound = None if args.outbound is None else _read_track(args.outbound)
        audio = TwilioCallAudio(inbound=inbound, outbound=outbound)
        list(audio.messages("CA", "MZ", "AC", params, drop_chunks=drops, dtmf=dtmf))  # check arguments
    except (OSError, ValueError) as exc:
        print(f"twilio_replay: {exc}", file=sys.stderr)
        return 2

    def show(text: str) -> None:
        if args.json:
            print(text)
        else:
            print(f"<- {text[:200]}{'...' if len(text) > 200 else ''}")
        sys.stdout.flush()

    print(
        f"-> {args.url}: {audio.duration_s():.2f} s on {', '.join(audio.tracks)}, "
        f"{len(drops)} chunk(s) dropped, {len(dtmf)} DTMF, speed {args.speed:g}"
    )
    try:
        report = asyncio.run(
            replay_call(
                args.url,
                audio,
                speed=args.speed,
                headers=headers,
                auth_token=args.auth_token,
                signed_url=args.signed_url,
                custom_parameters=params,
                drop_chunks=drops,
                dtmf=dtmf,
                close_timeout_s=args.close_timeout,
                on_text=show,
            )
        )
    except asyncio.TimeoutError:  # before OSError: from Python 3.11 the builtin TimeoutError is one
        print(f"twilio_replay: {args.url} did not complete the handshake in time", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"twilio_replay: cannot connect to {args.url}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the upgrade was refused: say what the server answered
        response = getattr(exc, "response", None)
        body = getattr(response, "body", b"") or b""
        status = getattr(response, "status_code", "?")
        print(
            f"twilio_replay: handshake refused (HTTP {status}): {bytes(body).decode(errors='replace')}",
            file=sys.stderr,
        )
        return 1
    per_track = {track: sum(1 for c in report.sent_media if c.track == track) for track in audio.tracks}
    print(
        f"-> sent call {report.call_sid} stream {report.stream_sid}: "
        + ", ".join(f"{n} {track} chunk(s)" for track, n in per_track.items())
        + ("" if report.stop_sent else " (no stop: the server closed first)")
    )
    print(
        f"<- {len(report.received_text)} text frame(s), {report.binary_frames_received} binary frame(s); "
        f"closed by {'server' if report.closed_by_server else 'client'} "
        f"with {report.close_code} {report.close_reason!r}"
    )
    ok = report.close_code == 1000 and report.binary_frames_received == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
