"""The wire format, and nothing else: query options, client messages, server events, close codes.

No sockets here. ``parse_options`` turns the handshake's query string into :class:`StreamOptions`
(or raises :class:`~stream_server.errors.BadRequest`, answered with HTTP 400); ``parse_client_message``
turns a text frame into a typed message (or raises :class:`~stream_server.errors.ProtocolViolation`);
every server event is a frozen dataclass with ``to_json()``.

The protocol is a drop-in for Deepgram's live API where features overlap (README, "Protocol"):
the same query parameters, the same ``KeepAlive`` / ``Finalize`` / ``CloseStream`` messages, and the same
``Results`` / ``SpeechStarted`` / ``UtteranceEnd`` / ``Metadata`` events. SenseVoice's extras (detected
language, emotion, audio event) travel in a separate ``tags`` object, never inside the transcript.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .engines.base import LANGUAGES, Language
from .errors import BadRequest, CloseCode, ProtocolViolation

Encoding = Literal["linear16", "mulaw", "alaw"]
ENCODINGS: tuple[Encoding, ...] = ("linear16", "mulaw", "alaw")

MIN_SAMPLE_RATE_HZ = 8000
MAX_SAMPLE_RATE_HZ = 48000
MIN_ENDPOINTING_MS = 10
MAX_ENDPOINTING_MS = 10000
MIN_UTTERANCE_END_MS = 1000
MAX_UTTERANCE_END_MS = 60000
MAX_CHANNELS = 20
"""Channels in one stream (Deepgram's limit); each transcribed channel has its own segments and VAD."""

# Deepgram parameters that this server accepts and ignores (README, "Protocol: parameters"): clients
# written for Deepgram send them routinely, and refusing them would break drop-in use. They are listed
# back in the session's Metadata under ``ignored_params`` so nothing is silently different.
IGNORED_DEEPGRAM_PARAMS = frozenset(
    {
        "model",
        "version",
        "tier",
        "alternatives",
        "callback",
        "callback_method",
        "detect_entities",
        "diarize",
        "diarize_version",
        "dictation",
        "extra",
        "filler_words",
        "keyterm",
        "keywords",
        "mip_opt_out",
        "no_delay",
        "numerals",
        "profanity_filter",
        "redact",
        "replace",
        "search",
        "tag",
        "topics",
        "intents",
        "sentiment",
    }
)
# Parameters that authenticate rather than configure; the transport consumes them.
AUTH_PARAMS = frozenset({"token", "access_token"})
KNOWN_PARAMS = frozenset(
    {
        "encoding",
        "sample_rate",
        "channels",
        "multichannel",
        "interim_results",
        "endpointing",
        "utterance_end_ms",
        "vad_events",
        "language",
        "punctuate",
        "smart_format",
        "words",
    }
)

_LANGUAGE_ALIASES: dict[str, Language] = {
    "multi": "auto",
    "auto": "auto",
    "zh": "zh",
    "zh-cn": "zh",
    "zh-hans": "zh",
    "zh-tw": "zh",
    "zh-hant": "zh",
    "cmn": "zh",
    "en": "en",
    "ja": "ja",
    "ko": "ko",
    "yue": "yue",
    "zh-hk": "yue",
}


# --------------------------------------------------------------------------------------------------
# Query options


@dataclass(frozen=True)
class StreamOptions:
    """What a client asked for at the handshake (README, "Protocol: parameters").

    Attributes:
        encoding: ``linear16`` (little-endian signed 16-bit), ``mulaw`` or ``alaw`` (8-bit G.711).
        sample_rate_hz: the client's sample rate, 8000..48000; resampled to 16 kHz server-side.
        channels: interleaved channels in the audio (1..``MAX_CHANNELS``); without ``multichannel`` they
            are mixed down to one.
        multichannel: transcribe each channel on its own (its own segments, endpointing and finals,
            ``channel_index: [i, N]`` on its Results), as Deepgram's ``multichannel=true``.
        interim_results: send ``is_final=false`` Results while a segment is still open.
        endpointing_ms: trailing silence that ends a segment (``speech_final=true``), or None when the
            client sent ``endpointing=false``; None also when not given (the server default applies).
        endpointing_disabled: the client sent ``endpointing=false``.
        utterance_end_ms: send ``UtteranceEnd`` after this long without speech, or None.
        vad_events: send ``SpeechStarted`` when speech begins.
        language: ``auto`` or a language code the model knows.
        punctuate: punctuation and inverse text normalisation (``punctuate`` or ``smart_format``).
        words: include per-word times in Results (default true, as Deepgram does).
        ignored_params: Deepgram parameters that were given and are ignored here.
    """

    encoding: Encoding = "linear16"
    sample_rate_hz: int = 16000
    channels: int = 1
    multichannel: bool = False
    interim_results: bool = False
    endpointing_ms: int | None = None
    endpointing_disabled: bool = False
    utterance_end_ms: int | None = None
    vad_events: bool = False
    language: Language = "auto"
    punctuate: bool = False
    words: bool = True
    ignored_params: tuple[str, ...] = ()

    @property
    def bytes_per_sample(self) -> int:
        return 2 if self.encoding == "linear16" else 1

    @property
    def bytes_per_frame(self) -> int:
        """Bytes in one sample of every channel (one PCM frame)."""
        return self.bytes_per_sample * self.channels

    @property
    def transcribed_channels(self) -> int:
        """Channels transcribed on their own: ``channels`` with ``multichannel``, else 1 (mixed down).
        Each one is a stream's worth of load for admission."""
        return self.channels if self.multichannel else 1


def _one(query: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(
            "INVALID_PARAMETER", f"Query parameter '{name}' was given {len(values)} times; give it once."
        )
    return values[0].strip()


def _bool(query: Mapping[str, Sequence[str]], name: str, default: bool) -> bool:
    raw = _one(query, name)
    if raw is None or raw == "":
        return default
    lowered = raw.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise BadRequest("INVALID_PARAMETER", f"Query parameter '{name}' must be true or false, not {raw!r}.")


def _int(query: Mapping[str, Sequence[str]], name: str, low: int, high: int) -> int | None:
    raw = _one(query, name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(
            "INVALID_PARAMETER", f"Query parameter '{name}' must be a whole number, not {raw!r}."
        ) from None
    if not low <= value <= high:
        raise BadRequest(
            "INVALID_PARAMETER", f"Query parameter '{name}' must be between {low} and {high}, not {value}."
        )
    return value


def parse_language(raw: str, supported: Sequence[str]) -> Language:
    """Map a client's language code onto one the model takes.

    Args:
        raw: what the client sent, e.g. ``en``, ``en-US``, ``zh-CN``, ``multi``.
        supported: languages the loaded engine accepts besides ``auto``.

    Returns:
        ``auto`` or a code in ``supported``.

    Raises:
        BadRequest: UNSUPPORTED_LANGUAGE, naming what is supported.
    """
    lowered = raw.strip().lower()
    language = _LANGUAGE_ALIASES.get(lowered) or _LANGUAGE_ALIASES.get(lowered.split("-")[0])
    if language is None or (language != "auto" and language not in supported):
        choices = ", ".join(["auto", *supported])
        raise BadRequest(
            "UNSUPPORTED_LANGUAGE",
            f"Language {raw!r} is not supported by the loaded model; use one of: {choices}.",
        )
    return language


def parse_options(
    query: Mapping[str, Sequence[str]], *, supported_languages: Sequence[str] = LANGUAGES[1:]
) -> StreamOptions:
    """Parse and validate the handshake's query parameters.

    Args:
        query: every query parameter with all its values (``urllib.parse.parse_qs`` shape).
        supported_languages: the languages the loaded engine accepts besides ``auto``.

    Returns:
        The validated options.

    Raises:
        BadRequest: with a stable code (``INVALID_PARAMETER``, ``UNKNOWN_PARAMETER``,
            ``UNSUPPORTED_ENCODING``, ``UNSUPPORTED_CHANNELS``, ``UNSUPPORTED_LANGUAGE``) and a sentence
            naming the parameter and what it accepts.
    """
    unknown = sorted(set(query) - KNOWN_PARAMS - IGNORED_DEEPGRAM_PARAMS - AUTH_PARAMS)
    if unknown:
        raise BadRequest(
            "UNKNOWN_PARAMETER",
            f"Unknown query parameter(s): {', '.join(unknown)}. "
            "See the README's protocol section for the list.",
        )

    encoding = (_one(query, "encoding") or "linear16").lower()
    if encoding not in ENCODINGS:
        raise BadRequest(
            "UNSUPPORTED_ENCODING",
            f"Encoding {encoding!r} is not supported; "
            f"use one of: {', '.join(ENCODINGS)} (raw, headerless audio).",
        )
    sample_rate = _int(query, "sample_rate", MIN_SAMPLE_RATE_HZ, MAX_SAMPLE_RATE_HZ)
    if sample_rate is None:
        sample_rate = 8000 if encoding in ("mulaw", "alaw") else 16000
    raw_channels = _one(query, "channels")
    if raw_channels is not None and raw_channels.strip().isdigit() and int(raw_channels) > MAX_CHANNELS:
        raise BadRequest(
            "UNSUPPORTED_CHANNELS",
            f"channels={int(raw_channels)} is more than this server takes in one stream ({MAX_CHANNELS}); "
            "split the channels over several streams.",
        )
    channels = _int(query, "channels", 1, MAX_CHANNELS) or 1
    multichannel = _bool(query, "multichannel", False)

    endpointing_raw = _one(query, "endpointing")
    endpointing_ms: int | None = None
    endpointing_disabled = False
    if endpointing_raw is not None and endpointing_raw != "":
        if endpointing_raw.lower() == "false":
            endpointing_disabled = True
        elif endpointing_raw.lower() == "true":
            endpointing_ms = None
        else:
            endpointing_ms = _int(query, "endpointing", MIN_ENDPOINTING_MS, MAX_ENDPOINTING_MS)

    utterance_end_ms = _int(query, "utterance_end_ms", MIN_UTTERANCE_END_MS, MAX_UTTERANCE_END_MS)
    language = parse_language(_one(query, "language") or "auto", supported_languages)
    punctuate = _bool(query, "punctuate", False) or _bool(query, "smart_format", False)
    ignored = tuple(sorted(set(query) & IGNORED_DEEPGRAM_PARAMS))

    return StreamOptions(
        encoding=encoding,  # checked against ENCODINGS above
        sample_rate_hz=sample_rate,
        channels=channels,
        multichannel=multichannel,
        interim_results=_bool(query, "interim_results", False),
        endpointing_ms=endpointing_ms,
        endpointing_disabled=endpointing_disabled,
        utterance_end_ms=utterance_end_ms,
        vad_events=_bool(query, "vad_events", False),
        language=language,
        punctuate=punctuate,
        words=_bool(query, "words", True),
        ignored_params=ignored,
    )


# --------------------------------------------------------------------------------------------------
# Client messages (text frames)


@dataclass(frozen=True)
class KeepAlive:
    """Keeps an idle stream open; no answer."""


@dataclass(frozen=True)
class Finalize:
    """End the open segment now; its final Results carries ``from_finalize=true``.

    Attributes:
        channel: the only channel to finalize (a multichannel stream), or None for every channel.
    """

    channel: int | None = None


@dataclass(frozen=True)
class CloseStream:
    """Finalize everything, send ``Metadata``, close with 1000."""


ClientMessage = KeepAlive | Finalize | CloseStream
MAX_CONTROL_MESSAGE_CHARS = 4096


def parse_client_message(text: str) -> ClientMessage:
    """Parse one text frame.

    Args:
        text: the frame's text.

    Returns:
        The typed message.

    Raises:
        ProtocolViolation: ``MESSAGE_TOO_LONG``, ``INVALID_JSON``, ``INVALID_MESSAGE`` (not an object
            with a string ``type``) or ``UNKNOWN_MESSAGE_TYPE``. None of these close the stream.
    """
    if len(text) > MAX_CONTROL_MESSAGE_CHARS:
        raise ProtocolViolation(
            "MESSAGE_TOO_LONG",
            f"Text frames carry small JSON control messages (at most {MAX_CONTROL_MESSAGE_CHARS} "
            "characters); send audio as binary frames.",
        )
    try:
        payload = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise ProtocolViolation(
            "INVALID_JSON",
            "A text frame was not valid JSON. Text frames carry control messages such as "
            '{"type": "KeepAlive"}; audio goes in binary frames.',
        ) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("type"), str):
        raise ProtocolViolation(
            "INVALID_MESSAGE",
            'A control message must be a JSON object with a string "type", e.g. {"type": "Finalize"}.',
        )
    kind = payload["type"]
    if kind == "KeepAlive":
        return KeepAlive()
    if kind == "Finalize":
        channel = payload.get("channel")
        if channel is not None and (isinstance(channel, bool) or not isinstance(channel, int) or channel < 0):
            raise ProtocolViolation(
                "INVALID_MESSAGE",
                f"Finalize's channel must be a channel number (0, 1, ...), not {str(channel)[:40]!r}.",
            )
        return Finalize(channel)
    if kind == "CloseStream":
        return CloseStream()
    raise ProtocolViolation(
        "UNKNOWN_MESSAGE_TYPE",
        f"Unknown message type {kind[:40]!r}; this server understands KeepAlive, Finalize and CloseStream.",
    )


# --------------------------------------------------------------------------------------------------
# Server events


@dataclass(frozen=True)
class WordTiming:
    """One word in session time (seconds since the stream began)."""

    word: str
    punctuated_word: str
    start_s: float
    end_s: float
    confidence: float

    def to_json(self) -> dict[str, Any]:
        return {
            "word": self.word,
            "start": round(self.start_s, 3),
            "end": round(self.end_s, 3),
            "confidence": round(self.confidence, 4),
            "punctuated_word": self.punctuated_word,
        }


@dataclass(frozen=True)
class ModelInfo:
    """Which model answered, for ``Results.metadata`` and ``Metadata``."""

    name: str
    version: str
    arch: str
    uuid: str


@dataclass(frozen=True)
class Results:
    """A transcript of one span of audio (README, "Protocol: Results").

    ``is_final`` marks the one final transcript of a segment; ``speech_final`` that the segment ended
    because the speaker paused; ``from_finalize`` that a client ``Finalize`` (or ``CloseStream``) ended it.
    ``segment_id`` names the segment (from 1); it is 0 on the empty final that acknowledges a ``Finalize``
    which ended no segment (:attr:`is_acknowledgement`).
    """

    request_id: str
    model: ModelInfo
    start_s: float
    duration_s: float
    is_final: bool
    speech_final: bool
    from_finalize: bool
    transcript: str
    confidence: float
    words: tuple[WordTiming, ...] = ()
    language: str | None = None
    emotion: str | None = None
    audio_event: str | None = None
    segment_id: int = 0
    channel_index: tuple[int, int] = (0, 1)

    def to_json(self) -> dict[str, Any]:
        alternative: dict[str, Any] = {
            "transcript": self.transcript,
            "confidence": round(self.confidence, 4),
            "words": [w.to_json() for w in self.words],
        }
        if self.language:
            alternative["languages"] = [self.language]
        return {
            "type": "Results",
            "channel_index": list(self.channel_index),
            "duration": round(self.duration_s, 3),
            "start": round(self.start_s, 3),
            "is_final": self.is_final,
            "speech_final": self.speech_final,
            "from_finalize": self.from_finalize,
            "channel": {"alternatives": [alternative]},
            "metadata": {
                "request_id": self.request_id,
                "model_info": {
                    "name": self.model.name,
                    "version": self.model.version,
                    "arch": self.model.arch,
                },
                "model_uuid": self.model.uuid,
            },
            "tags": {"language": self.language, "emotion": self.emotion, "audio_event": self.audio_event},
            "segment_id": self.segment_id,
        }

    @property
    def is_acknowledgement(self) -> bool:
        """The final acknowledges a ``Finalize`` and ends no segment (nothing, or too little, was open):
        not a finalized segment for metrics or latency."""
        return self.is_final and self.segment_id == 0


@dataclass(frozen=True)
class SpeechStarted:
    """The VAD heard speech begin at ``timestamp_s`` (sent when ``vad_events=true``); ``channel``
    is sent as ``[i]`` (Deepgram's shape for mono, ``[0]``)."""

    timestamp_s: float
    channel_index: tuple[int, int] = (0, 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "SpeechStarted",
            "channel": [self.channel_index[0]],
            "timestamp": round(self.timestamp_s, 3),
        }


@dataclass(frozen=True)
class UtteranceEnd:
    """No speech for ``utterance_end_ms`` after the last finalized word of a channel (sent when asked)."""

    last_word_end_s: float
    channel_index: tuple[int, int] = (0, 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "UtteranceEnd",
            "channel": list(self.channel_index),
            "last_word_end": round(self.last_word_end_s, 3),
        }


@dataclass(frozen=True)
class Metadata:
    """Sent once, after ``CloseStream``, before the close (and kept by clients for the record)."""

    request_id: str
    created: str
    duration_s: float
    channels: int
    model: ModelInfo
    model_details: Mapping[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    ignored_params: tuple[str, ...] = ()
    segments: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "Metadata",
            "transaction_key": "deprecated",
            "request_id": self.request_id,
            "sha256": "",
            "created": self.created,
            "duration": round(self.duration_s, 3),
            "channels": self.channels,
            "models": [self.model.uuid],
            "model_info": {
                self.model.uuid: {
                    "name": self.model.name,
                    "version": self.model.version,
                    "arch": self.model.arch,
                }
            },
            "model_details": dict(self.model_details),
            "warnings": list(self.warnings),
            "ignored_params": list(self.ignored_params),
            "segments": self.segments,
        }


@dataclass(frozen=True)
class Error:
    """Something went wrong (README, "Protocol: errors").

    Attributes:
        code: stable, machine-readable, e.g. ``INVALID_JSON``.
        description: a sentence a person can act on.
        close_code: set when the server is about to close the stream because of it.
        start_s: with ``duration_s``, the span of audio the error concerns (a segment that could not be
            transcribed), else None.
        segment_id: the segment that error ends in place of its final (as ``Results.segment_id``),
            else None.
        channel_index: with ``segment_id``, the segment's channel ``(i, N)`` (sent as
            ``channel_index``), else None.
    """

    code: str
    description: str
    close_code: CloseCode | None = None
    start_s: float | None = None
    duration_s: float | None = None
    segment_id: int | None = None
    channel_index: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "type": "Error",
            "code": self.code,
            "description": self.description,
            "message": self.description,
            "variant": self.code,
            "fatal": self.close_code is not None,
        }
        if self.start_s is not None and self.duration_s is not None:
            payload["start"] = round(self.start_s, 3)
            payload["duration"] = round(self.duration_s, 3)
        if self.segment_id is not None:
            payload["segment_id"] = self.segment_id
        if self.channel_index is not None:
            payload["channel_index"] = list(self.channel_index)
        return payload


ServerEvent = Results | SpeechStarted | UtteranceEnd | Metadata | Error


def serialize(event: ServerEvent) -> str:
    """Encode an event as the JSON text frame sent to the client."""
    return json.dumps(event.to_json(), ensure_ascii=False, separators=(",", ":"))
