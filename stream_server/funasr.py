"""FunASR's WebSocket protocol as a front end onto a :class:`~stream_server.stream.Stream`. No I/O.

FunASR's clients (its ``funasr_wss_client.py`` and html5 demo, the ``funasr-client`` and
``funasr-python`` packages) speak the protocol of FunASR's runtime (``runtime/docs/websocket_protocol.md``;
where its servers differ, the C++ 2pass server ``runtime/websocket/bin/websocket-server-2pass.cpp`` is
the reference). docs/funasr.md is the user's page. In short:

- a first text message configures a *file*: ``mode`` (``offline``, ``online``, ``2pass``),
  ``wav_name``, ``wav_format`` (``pcm``; ``wav`` with its RIFF header skipped), ``audio_fs``,
  ``is_speaking: true``, ``chunk_size``, ``chunk_interval``, ``hotwords``, ``itn``, ``svs_lang``,
  ``svs_itn``; then binary 16-bit mono PCM; ``{"is_speaking": false}`` ends the file. Every segment's
  result is sent, then one last message with ``"is_final": true`` (and ``"is_end": true``); the socket
  stays open, and a new first message starts the next file, as FunASR's client does for a list of wavs;
- results are ``{"mode", "wav_name", "text", "is_final", "timestamp", "stamp_sents"}`` with
  ``timestamp`` a JSON-encoded *string* of ``[[start_ms, end_ms], ...]``. As the C++ 2pass server
  labels them, a segment's result is ``2pass-offline`` (``offline`` and ``2pass`` modes) and an
  interim ``2pass-online`` (``2pass`` and ``online``), carrying only the text that is new since the
  segment's last one (FunASR clients concatenate them). ``is_final`` is true only on the last message of
  a file, after ``is_speaking: false`` (the C++ server's behaviour; its Python server gets it wrong);
- an error is ``{"mode": "error", "wav_name", "text": <a sentence>, "is_final": true, "code"}``, and a
  fatal one closes the socket.

Segmentation, endpointing, batching, limits and flat memory are the server's own
(:mod:`stream_server.stream`); this module maps the modes onto them: ``offline`` asks for no interims,
``2pass`` and ``online`` for interims.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .audio import AudioDecoder
from .engines.base import LANGUAGES
from .errors import CloseCode, ProtocolViolation
from .protocol import (
    MAX_CONTROL_MESSAGE_CHARS,
    MAX_SAMPLE_RATE_HZ,
    MIN_SAMPLE_RATE_HZ,
    Error,
    Metadata,
    Results,
    ServerEvent,
    StreamOptions,
    parse_language,
)
from .stream import SessionIdentity, SessionSettings, Stream, guarded
from .vad import FrameVad

logger = logging.getLogger(__name__)

Mode = Literal["offline", "online", "2pass"]
MODES: tuple[Mode, ...] = ("offline", "online", "2pass")
IGNORED_FIELDS = ("chunk_size", "chunk_interval", "encoder_chunk_look_back", "decoder_chunk_look_back")
"""Accepted for compatibility; segment and interim timing are the server's (README, "FunASR clients")."""


@dataclass(frozen=True)
class FileConfig:
    """One file's first message, validated.

    Attributes:
        mode: ``offline``, ``online`` or ``2pass``.
        wav_name: echoed in every result.
        wav_format: ``pcm`` or ``wav``.
        sample_rate_hz: ``audio_fs`` (16000 when not given).
        options: what the stream core is asked for.
        hotwords: the client sent hotwords (which SenseVoice cannot use; logged).
    """

    mode: Mode
    wav_name: str
    wav_format: str
    sample_rate_hz: int
    options: StreamOptions
    hotwords: bool


def _violation(code: str, description: str, fatal: bool = True) -> ProtocolViolation:
    return ProtocolViolation(code, description, CloseCode.POLICY_VIOLATION if fatal else None)


def parse_first_message(
    payload: Mapping[str, Any], supported_languages: Sequence[str] = LANGUAGES[1:]
) -> FileConfig:
    """Validate a file's first message.

    Raises:
        ProtocolViolation: ``UNKNOWN_MODE``, ``UNSUPPORTED_FORMAT``, ``INVALID_MESSAGE`` (a field of the
            wrong type or value), each fatal.
    """
    mode = payload.get("mode", "2pass")
    if mode not in MODES:
        raise _violation(
            "UNKNOWN_MODE", f"Unknown mode {str(mode)[:40]!r}; use one of: offline, online, 2pass."
        )
    wav_name = payload.get("wav_name", "wav-default-id")
    if not isinstance(wav_name, str):
        raise _violation("INVALID_MESSAGE", "wav_name must be a string.")
    wav_format = payload.get("wav_format", "pcm")
    if not isinstance(wav_format, str) or wav_format.lower() not in ("pcm", "wav"):
        raise _violation(
            "UNSUPPORTED_FORMAT",
            f"wav_format {str(wav_format)[:40]!r} is not supported: send 16-bit mono PCM (pcm), or a "
            "WAV file of it (wav).",
        )
    audio_fs = payload.get("audio_fs", 16000)
    if (
        isinstance(audio_fs, bool)
        or not isinstance(audio_fs, int)
        or not MIN_SAMPLE_RATE_HZ <= audio_fs <= MAX_SAMPLE_RATE_HZ
    ):
        raise _violation(
            "INVALID_MESSAGE",
            f"audio_fs must be a sample rate from {MIN_SAMPLE_RATE_HZ} to {MAX_SAMPLE_RATE_HZ} Hz.",
        )
    if payload.get("is_speaking", True) is not True:
        raise _violation("INVALID_MESSAGE", 'A first message has "is_speaking": true.')
    itn = payload.get("svs_itn", payload.get("itn", True))
    if not isinstance(itn, bool):
        raise _violation("INVALID_MESSAGE", "itn and svs_itn are true or false.")
    lang = payload.get("svs_lang", "auto")
    if not isinstance(lang, str):
        raise _violation("INVALID_MESSAGE", "svs_lang must be a language code such as auto, zh or en.")
    try:
        language = parse_language(lang, supported_languages)
    except Exception as exc:  # BadRequest: the same sentence as /v1/listen's
        raise _violation("INVALID_MESSAGE", getattr(exc, "description", str(exc))) from None
    hotwords = payload.get("hotwords")
    options = StreamOptions(
        encoding="linear16",
        sample_rate_hz=audio_fs,
        interim_results=mode != "offline",
        language=language,
        punctuate=itn,
        words=True,
    )
    return FileConfig(mode, wav_name, wav_format.lower(), audio_fs, options, bool(hotwords))


def _spaced(text: str) -> str:
    """A segment's text, with a trailing space when it ends in a word of a space-separated language
    (clients concatenate segments: ``funasr_client.merge_messages`` does ``text +=``)."""
    if text and text[-1].isascii() and not text[-1].isspace():
        return text + " "
    return text


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class FunasrSession(Stream):
    """One FunASR-protocol connection (one file after another); see the module docstring.

    Args:
        settings: server-side endpointing, interim and limit settings.
        vad: the first file's frame classifier.
        identity: request id, creation time and model identity.
        vad_factory: makes the classifier of every later file.
        supported_languages: what the engine accepts besides ``auto``.
    """

    def __init__(
        self,
        settings: SessionSettings,
        vad: FrameVad,
        identity: SessionIdentity,
        *,
        vad_factory: Callable[[], FrameVad],
        supported_languages: Sequence[str] = LANGUAGES[1:],
    ) -> None:
        super().__init__(
            StreamOptions(), settings, vad, identity, vad_factory=vad_factory, open_channels=False
        )
        self._languages = tuple(supported_languages)
        self.config: FileConfig | None = None
        """The file being received (or the last one)."""
        self._decoder: AudioDecoder | None = None
        self._header = b""  # a WAV file's first bytes until its header is skipped
        self._header_done = True
        self._speaking = False  # between a first message and is_speaking false
        self._online_sent: dict[int, str] = {}  # segment id -> text sent in 2pass-online messages
        self._audio_s = 0.0  # every file's audio so far
        self.files = 0

    @property
    def audio_duration_s(self) -> float:
        current = self._decoder.input_duration_s if self._decoder is not None else 0.0
        return self._audio_s + current

    # ------------------------------------------------------------------------------------------
    # Inputs

    @guarded
    def receive_text(self, text: str) -> None:
        """A text frame: a file's first message, ``{"is_speaking": false}``, or a mistake."""
        if self._closing is not None:
            return
        if len(text) > MAX_CONTROL_MESSAGE_CHARS:
            self._fatal(_violation("MESSAGE_TOO_LONG", "A text message is too long; send audio as binary."))
            return
        try:
            payload = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            self._fatal(
                _violation(
                    "INVALID_JSON",
                    "A text message was not JSON: start with the JSON first message "
                    '({"mode": "2pass", "wav_name": ..., "is_speaking": true}), then send binary PCM.',
                )
            )
            return
        if not isinstance(payload, dict):
            self._fatal(_violation("INVALID_MESSAGE", "A text message must be a JSON object."))
            return
        if self._speaking:
            if payload.get("is_speaking") is False:
                self._end_file()
                return
            self._fatal(
                _violation(
                    "TEXT_INSTEAD_OF_AUDIO",
                    'While a file is sent, text messages are only {"is_speaking": false}; audio goes in '
                    "binary messages.",
                )
            )
            return
        if payload.get("is_speaking") is False:
            return  # nothing open: an end without a file changes nothing (FunASR's servers ignore it)
        if not self._drained():
            self._fatal(
                _violation("FILE_IN_PROGRESS", "Wait for the last file's is_final result before the next.")
            )
            return
        try:
            config = parse_first_message(payload, self._languages)
        except ProtocolViolation as exc:
            self._fatal(exc)
            return
        self._start_file(config)

    @guarded
    def receive_audio(self, data: bytes) -> None:
        """A binary frame: PCM of the open file."""
        if self._closing is not None:
            return
        if not self._speaking or self._decoder is None:
            self._fatal(
                _violation(
                    "FIRST_MESSAGE_REQUIRED",
                    "Audio came before the JSON first message "
                    '({"mode": "2pass", "wav_name": ..., "is_speaking": true}); send that first.',
                )
            )
            return
        if len(data) > self.settings.max_frame_bytes:
            self.receive_frame_too_large(len(data))
            return
        if not self._header_done:
            data = self._skip_wav_header(data)
            if not data:
                return
        self._feed(self._decoder.decode(data))
        limit = self.settings.max_session_s
        if limit and self.audio_duration_s > limit:
            self.receive_session_too_long()

    # ------------------------------------------------------------------------------------------
    # Files

    def _drained(self) -> bool:
        return not self._tail and all(channel.drained for channel in self.channels)

    def _start_file(self, config: FileConfig) -> None:
        if self._decoder is not None:
            self._audio_s += self._decoder.input_duration_s
        self.config = config
        self.channels = []
        self._online_sent.clear()
        self._open_channels(config.options)
        self._decoder = AudioDecoder("linear16", config.sample_rate_hz, 1)
        self._header, self._header_done = b"", config.wav_format != "wav"
        self._speaking = True
        self.files += 1
        logger.info(
            "funasr %s: file %r, mode %s, %d Hz%s",
            self.identity.request_id,
            config.wav_name[:80],
            config.mode,
            config.sample_rate_hz,
            "; hotwords ignored (SenseVoice cannot use them)" if config.hotwords else "",
        )

    def _end_file(self) -> None:
        """``is_speaking: false``: every segment is finalized; the file's last message follows them."""
        self._end_input()
        self._speaking = False
        for channel in self.channels:
            channel.end()
        self._tail.append(self._metadata())  # becomes the file's is_final message (to_text)

    def _end_input(self) -> None:
        """The open file's resampler tail is fed (at is_speaking false, or when the stream ends)."""
        if self._decoder is not None and self._speaking:
            tail = self._decoder.flush()
            if len(tail):
                self._feed(tail)

    def _skip_wav_header(self, data: bytes) -> bytes:
        """Drop a RIFF/WAVE header (up to the ``data`` chunk) from the first bytes of a ``wav`` file."""
        self._header += data
        buf = self._header
        if len(buf) < 12:
            return b""
        if buf[:4] != b"RIFF" or buf[8:12] != b"WAVE":
            self._header_done = True  # no header after all: it was PCM
            self._header = b""
            return buf
        pos = 12
        while pos + 8 <= len(buf):
            size = int.from_bytes(buf[pos + 4 : pos + 8], "little")
            if buf[pos : pos + 4] == b"data":
                self._header_done = True
                self._header = b""
                return buf[pos + 8 :]
            pos += 8 + size + (size & 1)
            if pos > 1 << 16:
                break
        if len(buf) > 1 << 16:  # no data chunk in 64 KiB: not a WAV header
            self._fatal(_violation("UNSUPPORTED_FORMAT", "The WAV file has no data chunk in its header."))
        return b""

    # ------------------------------------------------------------------------------------------
    # Output

    def to_text(self, event: ServerEvent) -> str | None:
        """FunASR's JSON for an event, or None for one FunASR's protocol has no message for."""
        config = self.config
        wav_name = config.wav_name if config is not None else "wav-default-id"
        if isinstance(event, Results):
            message = self._result(event, wav_name)
        elif isinstance(event, Metadata):
            mode = "2pass-online" if config is not None and config.mode == "online" else "2pass-offline"
            message = {
                "mode": mode,
                "wav_name": wav_name,
                "text": "",
                "is_final": True,
                "is_end": True,
                "timestamp": "[]",
                "stamp_sents": [],
            }
        elif isinstance(event, Error):
            message = {
                "mode": "error",
                "wav_name": wav_name,
                "text": event.description,
                "is_final": event.close_code is not None,
                "code": event.code,
            }
        else:
            return None  # SpeechStarted, UtteranceEnd: not in FunASR's protocol
        if message is None:
            return None
        return json.dumps(message, ensure_ascii=False, separators=(",", ":"))

    def _result(self, event: Results, wav_name: str) -> dict[str, Any] | None:
        config = self.config
        mode = config.mode if config is not None else "2pass"
        key = event.segment_id
        if not event.is_final:
            sent = self._online_sent.get(key, "")
            if not event.transcript.startswith(sent):
                return None  # a revision: FunASR's online results only grow; the segment's end corrects it
            delta = event.transcript[len(sent) :]
            if not delta:
                return None
            self._online_sent[key] = event.transcript
            return {"mode": "2pass-online", "wav_name": wav_name, "text": delta, "is_final": False}
        if event.is_acknowledgement:
            return None
        sent = self._online_sent.pop(key, "")
        if not event.transcript:
            return None  # nothing heard: FunASR's servers send no empty result
        if mode == "online":
            text = _spaced(event.transcript[_common_prefix(sent, event.transcript) :])
            return (
                {"mode": "2pass-online", "wav_name": wav_name, "text": text, "is_final": False}
                if text
                else None
            )
        words = [[round(w.start_s * 1000), round(w.end_s * 1000)] for w in event.words]
        start_ms = round(event.start_s * 1000)
        end_ms = round((event.start_s + event.duration_s) * 1000)
        return {
            "mode": "2pass-offline",
            "wav_name": wav_name,
            "text": _spaced(event.transcript),
            "is_final": False,
            "timestamp": json.dumps(words),
            "stamp_sents": [
                {"text_seg": event.transcript, "punc": "", "start": start_ms, "end": end_ms, "ts_list": words}
            ]
            if event.transcript
            else [],
        }
