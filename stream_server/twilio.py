"""Twilio Media Streams, the wire format only: typed messages in, the audio timeline, the signature.

No sockets here (the transport owns ``/v1/twilio``). Twilio opens a WebSocket to the ``url`` of a
``<Start><Stream>`` or ``<Connect><Stream>`` TwiML noun and sends JSON text frames, never binary ones
(docs/twilio.md is the operator's page):

::

    connected   {"event": "connected", "protocol": "Call", "version": "1.0.0"}          once, first
    start       sequenceNumber, streamSid, start: {accountSid, streamSid, callSid, tracks,
                mediaFormat: {encoding, sampleRate, channels}, customParameters}        once, second
    media       sequenceNumber, streamSid, media: {track, chunk, timestamp, payload}    every ~20 ms
    dtmf        sequenceNumber, streamSid, dtmf: {track, digit}                         a key press
    mark        sequenceNumber, streamSid, mark: {name}                                 bidirectional
    stop        sequenceNumber, streamSid, stop: {accountSid, callSid}                  once, last

``parse_twilio_message`` turns one frame into a frozen dataclass or raises :class:`TwilioInputError`
with a stable code. It is strict on what decides the audio (the media format, the track, the
timestamp, the base64 payload) and lenient on everything else: Twilio adds fields over time, and an
unknown field is ignored. Numeric fields (``sequenceNumber``, ``chunk``, ``timestamp``; sometimes
``sampleRate``, ``channels``) arrive as JSON strings; plain JSON integers are accepted too.

:class:`TrackTimeline` places each track's chunks on the stream's clock by ``media.timestamp``
("Presentation Timestamp in Milliseconds from the start of the stream"), not by ``chunk``, so a lost
chunk becomes silence of the right length and a repeated one is not heard twice.

``X-Twilio-Signature`` on the WebSocket upgrade is Twilio's HMAC-SHA1, keyed with the account's Auth
Token, of the URL it connected to: the ``wss://`` URL exactly as written in the TwiML, with no
parameters (an upgrade has no body). :func:`signed_url` rebuilds that URL from what the server sees
and :func:`twilio_signature_valid` checks it with the official ``twilio`` package.

Sources (Twilio's documentation, as read for this module):

- https://www.twilio.com/docs/voice/media-streams/websocket-messages (every message shape above;
  ``mediaFormat`` is always ``audio/x-mulaw``, 8000 Hz, 1 channel; ``media.timestamp`` is ms from the
  start of the stream; ``start.tracks`` lists ``inbound`` / ``outbound``; ``dtmf.track`` reads
  ``inbound_track``)
- https://www.twilio.com/docs/voice/twiml/stream (``track="inbound_track|outbound_track|both_tracks"``;
  ``wss`` only; no query string on ``url``, custom values go in ``<Parameter>``)
- https://www.twilio.com/docs/voice/media-streams (one WebSocket per stream; bidirectional streams
  carry the inbound track only)
- https://www.twilio.com/docs/usage/webhooks/webhooks-security (the signature: the exact URL plus
  sorted parameters, HMAC-SHA1 with the Auth Token, base64; on a WebSocket request the header arrives
  as ``x-twilio-signature``)
- https://github.com/twilio-labs/twilio-aspnet/issues/162 (a WebSocket upgrade is signed over the
  ``wss://`` URL, not the ``https://`` one a server behind TLS sees)
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal
from urllib.parse import urlsplit, urlunsplit

from twilio.request_validator import RequestValidator

from .errors import CloseCode, ProtocolViolation

Track = Literal["inbound", "outbound"]

TRACK_CHANNELS: Final[Mapping[str, int]] = MappingProxyType({"inbound": 0, "outbound": 1})
"""The channel each track's audio goes to: the caller (inbound) is always channel 0 and the far side
(outbound) always channel 1, whichever tracks a stream has, so a result's ``channel_index`` means the
same party on every call."""

# TwiML spells tracks ``inbound_track`` / ``outbound_track`` / ``both_tracks``; the messages say
# ``inbound`` / ``outbound``, except ``dtmf.track``, documented as ``inbound_track``. The TwiML
# spellings are accepted in ``start.tracks`` and ``media.track`` too: they name the same track.
_TRACK_NAMES: Final[Mapping[str, Track]] = MappingProxyType(
    {"inbound": "inbound", "outbound": "outbound", "inbound_track": "inbound", "outbound_track": "outbound"}
)

SUPPORTED_ENCODING: Final = "audio/x-mulaw"
SUPPORTED_SAMPLE_RATE_HZ: Final = 8000
SUPPORTED_CHANNELS: Final = 1

MULAW_SILENCE: Final = b"\xff"
"""Mu-law zero (ITU-T G.711: 0xFF encodes +0), the byte a gap is filled with."""

BYTES_PER_MS: Final = SUPPORTED_SAMPLE_RATE_HZ // 1000
"""8 kHz mu-law: one byte a sample, 8 bytes a millisecond."""

DEFAULT_MAX_GAP_MS: Final = 10_000

MAX_NUMBER: Final = 2**53 - 1
"""The largest counter or timestamp accepted (JSON's safe integer; 285 000 years of milliseconds)."""

_CLIP_CHARS: Final = 40
_DIGITS = re.compile(r"[0-9]{1,16}")


class TwilioInputError(ProtocolViolation):
    """A Twilio Media Streams frame that cannot be used.

    Attributes:
        code: one of ``INVALID_JSON`` (not JSON, or not a JSON object), ``UNKNOWN_EVENT``,
            ``MISSING_FIELD``, ``BAD_FIELD`` (wrong type or value), ``BAD_PAYLOAD`` (``media.payload``
            is not base64) and ``UNSUPPORTED_MEDIA_FORMAT`` (anything but mu-law, 8000 Hz, mono).
        description: one sentence a person can act on; it quotes at most 40 characters of the input.
        close_code: set when the stream cannot go on: a ``start`` that cannot be used
            (``UNSUPPORTED_MEDIA_FORMAT``: 1003, otherwise 1002). None for any other message, which
            the stream can skip.
    """

    def __init__(self, code: str, description: str, *, close_code: CloseCode | None = None) -> None:
        super().__init__(code, description, close_code)


# --------------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class TwilioConnected:
    """The first message: what protocol follows. Twilio sends ``"Call"``, ``"1.0.0"``.

    Attributes:
        protocol: ``connected.protocol`` (None when absent).
        version: ``connected.version`` (None when absent).
    """

    protocol: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class TwilioStart:
    """The stream's metadata, sent once after ``connected``.

    Attributes:
        stream_sid: ``start.streamSid`` (``MZ...``), or the top-level ``streamSid`` when only that is sent.
        call_sid: ``start.callSid`` (``CA...``).
        account_sid: ``start.accountSid`` (``AC...``).
        tracks: ``start.tracks``, normalised to ``"inbound"`` / ``"outbound"``; at least one.
        encoding: ``start.mediaFormat.encoding``: always ``"audio/x-mulaw"`` (anything else is refused).
        sample_rate_hz: ``start.mediaFormat.sampleRate``: always 8000.
        channels: ``start.mediaFormat.channels``: always 1 (each track is mono; tracks are separate).
        custom_parameters: ``start.customParameters``, the TwiML's ``<Parameter>`` names and values
            (read-only; empty when absent).
        sequence_number: ``sequenceNumber``, None when absent.
    """

    stream_sid: str
    call_sid: str
    account_sid: str
    tracks: tuple[Track, ...]
    encoding: str = SUPPORTED_ENCODING
    sample_rate_hz: int = SUPPORTED_SAMPLE_RATE_HZ
    channels: int = SUPPORTED_CHANNELS
    custom_parameters: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    sequence_number: int | None = None


@dataclass(frozen=True)
class TwilioMedia:
    """One chunk of one track's audio.

    Attributes:
        track: ``media.track``, normalised to ``"inbound"`` (the caller) or ``"outbound"``.
        chunk: ``media.chunk``, counting from 1 per track (informational: gaps are found by timestamp).
        timestamp_ms: ``media.timestamp``: milliseconds from the start of the stream.
        payload: the decoded mu-law bytes (8 a millisecond).
        sequence_number: ``sequenceNumber``, counting every message of the stream; None when absent.
    """

    track: Track
    chunk: int
    timestamp_ms: int
    payload: bytes
    sequence_number: int | None = None


@dataclass(frozen=True)
class TwilioStop:
    """The stream ended (the call hung up, or ``<Stop><Stream>``). Nothing is required in it: a stop
    must end the stream even if Twilio trims it.

    Attributes:
        stream_sid: the top-level ``streamSid``, None when absent.
        account_sid: ``stop.accountSid``, None when absent.
        call_sid: ``stop.callSid``, None when absent.
        sequence_number: ``sequenceNumber``, None when absent.
    """

    stream_sid: str | None = None
    account_sid: str | None = None
    call_sid: str | None = None
    sequence_number: int | None = None


@dataclass(frozen=True)
class TwilioMark:
    """Twilio echoing a mark a bidirectional stream's server sent (this server sends none).

    Attributes:
        name: ``mark.name``.
        stream_sid: the top-level ``streamSid``, None when absent.
        sequence_number: ``sequenceNumber``, None when absent.
    """

    name: str
    stream_sid: str | None = None
    sequence_number: int | None = None


@dataclass(frozen=True)
class TwilioDtmf:
    """A key press on the call.

    Attributes:
        digit: ``dtmf.digit`` (``0``-``9``, ``*``, ``#``; passed on as sent).
        track: ``dtmf.track`` as sent (documented as ``"inbound_track"``), None when absent.
        stream_sid: the top-level ``streamSid``, None when absent.
        sequence_number: ``sequenceNumber``, None when absent.
    """

    digit: str
    track: str | None = None
    stream_sid: str | None = None
    sequence_number: int | None = None


TwilioMessage = TwilioConnected | TwilioStart | TwilioMedia | TwilioStop | TwilioMark | TwilioDtmf

EVENTS: Final = ("connected", "start", "media", "stop", "mark", "dtmf")


# --------------------------------------------------------------------------------------------------
# Parsing


def parse_twilio_message(text: str) -> TwilioMessage:
    """Parse one text frame from Twilio.

    Args:
        text: the frame's text.

    Returns:
        The typed message.

    Raises:
        TwilioInputError: ``INVALID_JSON``, ``UNKNOWN_EVENT``, ``MISSING_FIELD``, ``BAD_FIELD``,
            ``BAD_PAYLOAD`` or ``UNSUPPORTED_MEDIA_FORMAT``; the description names the field. Only an
            unusable ``start`` carries a close code.
    """
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError, and integers too long to convert
        raise TwilioInputError(
            "INVALID_JSON",
            "A Twilio Media Streams frame was not valid JSON; /v1/twilio takes only the JSON text "
            "frames Twilio sends.",
        ) from None
    if not isinstance(message, dict):
        raise TwilioInputError(
            "INVALID_JSON",
            'A Twilio Media Streams frame must be a JSON object with an "event", '
            'e.g. {"event": "media", ...}.',
        )
    event = _required_str(message, "event", "event")
    if event == "media":
        return _parse_media(message)
    if event == "start":
        try:
            return _parse_start(message)
        except TwilioInputError as error:
            close = CloseCode.UNSUPPORTED_DATA
            if error.code != "UNSUPPORTED_MEDIA_FORMAT":
                close = CloseCode.PROTOCOL_ERROR
            raise TwilioInputError(error.code, error.description, close_code=close) from None
    if event == "connected":
        return TwilioConnected(
            protocol=_optional_str(message, "protocol", "protocol"),
            version=_optional_str(message, "version", "version"),
        )
    if event == "stop":
        stop = _optional_object(message, "stop", "stop")
        return TwilioStop(
            stream_sid=_optional_str(message, "streamSid", "streamSid"),
            account_sid=_optional_str(stop, "accountSid", "stop.accountSid"),
            call_sid=_optional_str(stop, "callSid", "stop.callSid"),
            sequence_number=_sequence_number(message),
        )
    if event == "mark":
        mark = _required_object(message, "mark", "mark")
        return TwilioMark(
            name=_required_str(mark, "name", "mark.name"),
            stream_sid=_optional_str(message, "streamSid", "streamSid"),
            sequence_number=_sequence_number(message),
        )
    if event == "dtmf":
        dtmf = _required_object(message, "dtmf", "dtmf")
        return TwilioDtmf(
            digit=_required_str(dtmf, "digit", "dtmf.digit"),
            track=_optional_str(dtmf, "track", "dtmf.track"),
            stream_sid=_optional_str(message, "streamSid", "streamSid"),
            sequence_number=_sequence_number(message),
        )
    raise TwilioInputError(
        "UNKNOWN_EVENT",
        f"Unknown Twilio event {_clip(event)}; this server understands {', '.join(EVENTS)}.",
    )


def _parse_media(message: dict[str, Any]) -> TwilioMedia:
    media = _required_object(message, "media", "media")
    track = _track(_required_str(media, "track", "media.track"), "media.track")
    chunk = _number(_required(media, "chunk", "media.chunk"), "media.chunk")
    timestamp_ms = _number(_required(media, "timestamp", "media.timestamp"), "media.timestamp")
    encoded = _required(media, "payload", "media.payload")
    if not isinstance(encoded, str):
        raise TwilioInputError(
            "BAD_PAYLOAD", "media.payload must be a base64 string of mu-law audio; it was not a string."
        )
    try:
        payload = base64.b64decode(encoded, validate=True)
    except ValueError:  # binascii.Error, and non-ASCII text
        raise TwilioInputError(
            "BAD_PAYLOAD",
            f"media.payload is not valid base64 (it begins {_clip(encoded)}); send the mu-law bytes "
            "base64-encoded, as Twilio does.",
        ) from None
    return TwilioMedia(
        track=track,
        chunk=chunk,
        timestamp_ms=timestamp_ms,
        payload=payload,
        sequence_number=_sequence_number(message),
    )


def _parse_start(message: dict[str, Any]) -> TwilioStart:
    start = _required_object(message, "start", "start")
    stream_sid = _optional_str(start, "streamSid", "start.streamSid")
    if stream_sid is None:
        stream_sid = _required_str(message, "streamSid", "start.streamSid")
    raw_tracks = _required(start, "tracks", "start.tracks")
    if not isinstance(raw_tracks, list) or not raw_tracks:
        raise TwilioInputError(
            "BAD_FIELD",
            'start.tracks must be a non-empty list such as ["inbound"] or ["inbound", "outbound"].',
        )
    tracks: list[Track] = []
    for item in raw_tracks:
        if not isinstance(item, str):
            raise TwilioInputError(
                "BAD_FIELD", 'start.tracks must list track names ("inbound", "outbound") as strings.'
            )
        track = _track(item, "start.tracks")
        if track not in tracks:
            tracks.append(track)
    media_format = _required_object(start, "mediaFormat", "start.mediaFormat")
    encoding = _required_str(media_format, "encoding", "start.mediaFormat.encoding")
    sample_rate_hz = _number(
        _required(media_format, "sampleRate", "start.mediaFormat.sampleRate"), "start.mediaFormat.sampleRate"
    )
    channels = _number(
        _required(media_format, "channels", "start.mediaFormat.channels"), "start.mediaFormat.channels"
    )
    if (
        encoding.lower() != SUPPORTED_ENCODING
        or sample_rate_hz != SUPPORTED_SAMPLE_RATE_HZ
        or channels != SUPPORTED_CHANNELS
    ):
        raise TwilioInputError(
            "UNSUPPORTED_MEDIA_FORMAT",
            f"The stream's media format is {_clip(encoding)} at {sample_rate_hz} Hz, {channels} "
            f"channel(s); /v1/twilio takes Twilio's {SUPPORTED_ENCODING} at {SUPPORTED_SAMPLE_RATE_HZ} Hz, "
            "mono (omit audio format options on <Stream>).",
        )
    parameters = _optional_object(start, "customParameters", "start.customParameters")
    custom: dict[str, str] = {}
    for name, value in parameters.items():
        if not isinstance(value, str):
            raise TwilioInputError(
                "BAD_FIELD",
                f"start.customParameters {_clip(name)} must be a string, as <Parameter value=...> gives.",
            )
        custom[name] = value
    return TwilioStart(
        stream_sid=stream_sid,
        call_sid=_required_str(start, "callSid", "start.callSid"),
        account_sid=_required_str(start, "accountSid", "start.accountSid"),
        tracks=tuple(tracks),
        encoding=SUPPORTED_ENCODING,
        sample_rate_hz=sample_rate_hz,
        channels=channels,
        custom_parameters=MappingProxyType(custom),
        sequence_number=_sequence_number(message),
    )


def _clip(value: str) -> str:
    """Quote client text for a description, cut to 40 characters so an error never echoes a payload."""
    if len(value) > _CLIP_CHARS:
        return repr(value[:_CLIP_CHARS]) + "..."
    return repr(value)


def _required(obj: dict[str, Any], key: str, name: str) -> Any:
    if key not in obj:
        raise TwilioInputError("MISSING_FIELD", f"The Twilio message has no {name}; Twilio always sends it.")
    return obj[key]


def _required_str(obj: dict[str, Any], key: str, name: str) -> str:
    value = _required(obj, key, name)
    if not isinstance(value, str):
        raise TwilioInputError("BAD_FIELD", f"{name} must be a string.")
    return value


def _optional_str(obj: dict[str, Any], key: str, name: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise TwilioInputError("BAD_FIELD", f"{name} must be a string when present.")
    return value


def _required_object(obj: dict[str, Any], key: str, name: str) -> dict[str, Any]:
    value = _required(obj, key, name)
    if not isinstance(value, dict):
        raise TwilioInputError("BAD_FIELD", f"{name} must be a JSON object.")
    return value


def _optional_object(obj: dict[str, Any], key: str, name: str) -> dict[str, Any]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TwilioInputError("BAD_FIELD", f"{name} must be a JSON object when present.")
    return value


def _number(value: object, name: str) -> int:
    """A non-negative integer sent as a decimal string (as Twilio does) or a JSON integer."""
    number: int | None = None
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    if number is None or not 0 <= number <= MAX_NUMBER:
        shown = _clip(value) if isinstance(value, str) else f"a JSON {type(value).__name__}"
        raise TwilioInputError(
            "BAD_FIELD",
            f'{name} must be a non-negative whole number, e.g. "160" (Twilio sends numbers as strings); '
            f"it was {shown}.",
        )
    return number


def _sequence_number(message: dict[str, Any]) -> int | None:
    value = message.get("sequenceNumber")
    return None if value is None else _number(value, "sequenceNumber")


def _track(value: str, name: str) -> Track:
    track = _TRACK_NAMES.get(value)
    if track is None:
        raise TwilioInputError(
            "BAD_FIELD",
            f'{name} names an unknown track {_clip(value)}; Twilio\'s are "inbound" and "outbound".',
        )
    return track


def channels_for_tracks(tracks: Sequence[str]) -> int:
    """The channel count a stream needs for the tracks its ``start`` lists.

    Each track keeps its channel from :data:`TRACK_CHANNELS` (``inbound`` 0, ``outbound`` 1), so the
    count is one more than the highest: ``["inbound"]`` gives 1, ``["inbound", "outbound"]`` (TwiML
    ``track="both_tracks"``) gives 2, and ``["outbound"]`` also gives 2, with channel 0 silent, so that
    channel 1 is the far side on every call.

    Args:
        tracks: track names as in :attr:`TwilioStart.tracks`.

    Returns:
        1 or 2.

    Raises:
        ValueError: ``tracks`` is empty or names a track that is not in :data:`TRACK_CHANNELS`.
    """
    if not tracks:
        raise ValueError("a Twilio stream has at least one track")
    unknown = [track for track in tracks if track not in TRACK_CHANNELS]
    if unknown:
        raise ValueError(f"unknown Twilio track(s) {unknown!r}; known: {sorted(TRACK_CHANNELS)}")
    return 1 + max(TRACK_CHANNELS[track] for track in tracks)


# --------------------------------------------------------------------------------------------------
# The audio timeline


class TrackTimeline:
    """One track's audio on the stream's clock: which bytes to feed for each media chunk.

    Twilio stamps each chunk with ``media.timestamp``, milliseconds from the start of the stream. The
    timeline remembers how far it has fed (in bytes, 8 a millisecond) and, for each chunk:

    - a gap before it (a chunk lost on the way, or a track that was silent) is filled with mu-law
      silence of the same length, so what follows keeps its place in time and, on a two-track stream,
      both channels stay on one clock;
    - a chunk that overlaps what was already fed (late, or a duplicate) gives only its new tail, or
      nothing when it is entirely old: no audio is heard twice and none moves backwards in time;
    - a gap longer than ``max_gap_ms`` is a clock jump, not lost audio: only ``max_gap_ms`` of silence
      is fed and the timeline moves on to the new timestamp. A timestamp hours ahead must not become
      hours of silence held in memory and run through the VAD and the model: what one chunk can cost
      stays bounded. Each such jump is counted in ``jumps``.

    Gaps are found by timestamp, not ``chunk``: the chunk counter says that something was lost, the
    timestamp says how much.

    The leading gap is filled: the clock starts at 0 with the stream (the documented origin of
    ``media.timestamp``), so a first chunk at 160 ms is fed after 160 ms of silence. Result times then
    read on the call's clock, and a track whose audio starts later (the far side of a ``both_tracks``
    stream) stays aligned with the other. It is bounded by ``max_gap_ms`` like any other gap.

    Attributes:
        max_gap_ms: the most silence one gap is filled with.
        gap_ms_filled: milliseconds of silence fed for gaps so far (leading gap included).
        overlap_ms_dropped: milliseconds of audio dropped because it was already fed.
        bytes_fed: bytes returned so far, silence included.
        jumps: gaps longer than ``max_gap_ms``.
    """

    def __init__(self, max_gap_ms: int = DEFAULT_MAX_GAP_MS) -> None:
        """Start a track at the stream's time 0.

        Args:
            max_gap_ms: the most silence one gap is filled with; 0 fills none (each gap is a jump).

        Raises:
            ValueError: ``max_gap_ms`` is negative.
        """
        if max_gap_ms < 0:
            raise ValueError(f"max_gap_ms must be >= 0, got {max_gap_ms}")
        self.max_gap_ms = max_gap_ms
        self.bytes_fed = 0
        self.jumps = 0
        self._position = 0  # bytes on the stream's clock: where the next chunk would start
        self._gap_bytes = 0
        self._overlap_bytes = 0

    @property
    def gap_ms_filled(self) -> float:
        """Milliseconds of silence fed for gaps so far."""
        return self._gap_bytes / BYTES_PER_MS

    @property
    def overlap_ms_dropped(self) -> float:
        """Milliseconds of received audio dropped because that time was already fed."""
        return self._overlap_bytes / BYTES_PER_MS

    @property
    def position_ms(self) -> float:
        """Where the fed audio ends, on the stream's clock."""
        return self._position / BYTES_PER_MS

    def place(self, timestamp_ms: int, payload: bytes) -> bytes:
        """The bytes to feed for one chunk: silence for any gap before it, then its new audio.

        Args:
            timestamp_ms: the chunk's ``media.timestamp``.
            payload: the chunk's mu-law bytes.

        Returns:
            Mu-law bytes to append to the track's audio: possibly empty (a duplicate).

        Raises:
            ValueError: ``timestamp_ms`` is negative.
        """
        if timestamp_ms < 0:
            raise ValueError(f"timestamp_ms must be >= 0, got {timestamp_ms}")
        start = timestamp_ms * BYTES_PER_MS
        if start >= self._position:
            gap = start - self._position
            limit = self.max_gap_ms * BYTES_PER_MS
            if gap > limit:
                self.jumps += 1
                gap = limit
            self._gap_bytes += gap
            out = MULAW_SILENCE * gap + payload
            self._position = start + len(payload)
        else:
            old = min(self._position - start, len(payload))
            self._overlap_bytes += old
            out = payload[old:]
            self._position += len(out)
        self.bytes_fed += len(out)
        return out


# --------------------------------------------------------------------------------------------------
# The signature


def signed_url(
    scheme: str,
    host: str,
    path_qs: str,
    *,
    forwarded_proto: str | None,
    forwarded_host: str | None,
    public_url: str | None,
) -> str:
    """The ``wss://`` URL Twilio signed, rebuilt from what the server sees of the upgrade request.

    Twilio signs the URL written in the TwiML (``wss://calls.example.com/v1/twilio``). A server behind
    a TLS-terminating proxy sees something else: a plain ``http`` request to an inner address such as
    ``10.0.0.5:8000``. A signature checked against that URL never matches, so the public URL has to be
    rebuilt, in this order:

    1. ``public_url`` (the operator's ``--public-url https://calls.example.com``) wins: its scheme and
       host, and its path as a prefix (for a proxy that strips one), then ``path_qs``;
    2. else ``forwarded_proto`` / ``forwarded_host`` (``X-Forwarded-Proto`` / ``X-Forwarded-Host``),
       each on its own, and the first value of a comma-separated list (the hop Twilio reached). The
       caller passes them only when the peer is one of ``--trusted-proxies``: anyone else could make
       the server check a URL of their choosing;
    3. else the request's own ``scheme`` and ``host``.

    ``http`` becomes ``ws`` and ``https`` becomes ``wss``. A port is kept as given:
    :func:`twilio_signature_valid` tries the URL with and without it.

    Args:
        scheme: the request's scheme as the server sees it (``http``, ``https``, ``ws`` or ``wss``).
        host: the request's ``Host`` header (may carry a port).
        path_qs: the request's path and query string, e.g. ``/v1/twilio``.
        forwarded_proto: ``X-Forwarded-Proto`` from a trusted proxy, else None.
        forwarded_host: ``X-Forwarded-Host`` from a trusted proxy, else None.
        public_url: the operator's public base URL, else None.

    Returns:
        The WebSocket URL, e.g. ``wss://calls.example.com/v1/twilio``.

    Raises:
        ValueError: a scheme that is not http(s) or ws(s), or a ``public_url`` without a host.
    """
    if public_url:
        parts = urlsplit(public_url)
        if not parts.netloc:
            raise ValueError(f"public URL {public_url!r} has no host; give it as https://HOST")
        prefix = parts.path.rstrip("/")
        return _ws_scheme(parts.scheme) + "://" + parts.netloc + prefix + path_qs
    if forwarded_proto:
        scheme = forwarded_proto.split(",")[0].strip()
    if forwarded_host:
        host = forwarded_host.split(",")[0].strip()
    return urlunsplit((_ws_scheme(scheme), host, "", "", "")) + path_qs


def _ws_scheme(scheme: str) -> str:
    mapped = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(scheme.lower())
    if mapped is None:
        raise ValueError(f"scheme {scheme[:_CLIP_CHARS]!r} is not http, https, ws or wss")
    return mapped


def twilio_signature_valid(auth_token: str, url: str, signature: str | None) -> bool:
    """Whether ``X-Twilio-Signature`` is Twilio's for this URL.

    Checked with the official ``twilio.request_validator.RequestValidator`` and no parameters (an
    upgrade has no body). The validator tries the URL as given, without its port, and with the port
    it assumes, which is 80 for any scheme but ``https``; so for a ``wss://`` URL without a port the
    ``:443`` form is tried here as well. Signatures are compared in constant time by the validator.

    Args:
        auth_token: the account's Auth Token (``--twilio-auth-token``).
        url: the signed URL, from :func:`signed_url`.
        signature: the header's value, None when absent.

    Returns:
        True when it matches; False when it does not, when the signature or the token is empty, or
        when the URL's host or port is malformed.
    """
    if not signature or not auth_token:
        return False
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a malformed host or port (the validator would raise on it): nothing to match
        return False
    validator = RequestValidator(auth_token)
    if validator.validate(url, {}, signature):
        return True
    if parts.scheme == "wss" and port is None and parts.hostname:
        with_port = urlunsplit(parts._replace(netloc=parts.netloc + ":443"))
        return bool(validator.validate(with_port, {}, signature))
    return False
