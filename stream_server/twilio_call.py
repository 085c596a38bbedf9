"""Twilio Media Streams as a front end onto a :class:`~stream_server.stream.Stream`. No I/O.

A :class:`TwilioCall` is one ``/v1/twilio`` WebSocket: the stream of one call that Twilio opens for a
``<Start><Stream>`` (docs/twilio.md). Twilio sends JSON text frames only (:mod:`stream_server.twilio`
parses them); the call's results go to the webhook and the call's subscribers, never back to Twilio.

- ``start`` makes the channels: one per track, ``inbound`` on channel 0 and ``outbound`` on channel 1
  (``channel_index: [0, 2]`` / ``[1, 2]`` with ``both_tracks``). Its ``customParameters`` may set
  :data:`CALL_OPTIONS` over the server's defaults (``--twilio-options``); an invalid one is logged and
  counted, and the default is used instead.
- ``media`` is placed on its track's timeline by ``timestamp`` (gaps become silence), decoded from
  8 kHz mu-law and fed to the track's channel.
- ``stop`` ends the call: every segment is finalized, then ``Metadata`` closes it. A socket that closes
  without ``stop`` (:meth:`TwilioCall.receive_hangup`) ends the same way, since the call's results are
  read elsewhere.
- Bad input (media before ``start``, an unknown event, bad base64, a binary frame) is logged and
  counted (:attr:`TwilioCall.input_errors`) and skipped: the call goes on. Only a ``start`` that cannot
  be used, or the stream's own limits, end it, with an ``Error`` delivered like its finals.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from .audio import AudioDecoder
from .engines.base import LANGUAGES
from .errors import BadRequest, ClientError, CloseCode, ProtocolViolation
from .protocol import StreamOptions, parse_options
from .stream import CloseRequest, SessionIdentity, SessionSettings, Stream, guarded
from .twilio import (
    DEFAULT_MAX_GAP_MS,
    TRACK_CHANNELS,
    TrackTimeline,
    TwilioConnected,
    TwilioDtmf,
    TwilioInputError,
    TwilioMark,
    TwilioMedia,
    TwilioStart,
    TwilioStop,
    channels_for_tracks,
    parse_twilio_message,
)
from .vad import FrameVad

logger = logging.getLogger(__name__)

CALL_OPTIONS = frozenset(
    {"language", "endpointing", "interim_results", "utterance_end_ms", "punctuate", "smart_format", "words"}
)
"""The live API's options a call may set in ``customParameters`` (or the server in
``--twilio-options``); the audio's own (encoding, rate, channels) come from Twilio's ``start``."""

LOGGED_PER_CODE = 5
"""Bad messages of one kind logged per call; the rest are only counted."""


def call_options(
    defaults: Mapping[str, str],
    custom: Mapping[str, str],
    channels: int,
    *,
    supported_languages: Sequence[str] = LANGUAGES[1:],
) -> tuple[StreamOptions, list[str]]:
    """A call's options: the server's defaults, then its ``customParameters`` where they name a
    :data:`CALL_OPTIONS` entry.

    Args:
        defaults: the server's ``--twilio-options`` (already valid).
        custom: the call's ``customParameters``.
        channels: the call's channel count (from its tracks).
        supported_languages: what the engine accepts besides ``auto``.

    Returns:
        The options, and a sentence for each custom parameter that was invalid and left at its default.
    """
    audio = {"encoding": "mulaw", "sample_rate": "8000", "channels": str(channels), "multichannel": "true"}
    asked = {k: v for k, v in custom.items() if k in CALL_OPTIONS}
    chosen = {**defaults, **asked}
    problems: list[str] = []
    for name in sorted(asked):
        try:
            parse_options({name: [chosen[name]]}, supported_languages=supported_languages)
        except BadRequest as exc:
            problems.append(exc.description)
            if name in defaults:
                chosen[name] = defaults[name]
            else:
                del chosen[name]
    query = {key: [value] for key, value in {**chosen, **audio}.items()}
    return parse_options(query, supported_languages=supported_languages), problems


class TwilioCall(Stream):
    """One Twilio Media Stream; see the module docstring.

    Args:
        settings: server-side endpointing, interim and limit settings.
        vad: the first channel's frame classifier.
        identity: request id, creation time and model identity for the events.
        vad_factory: makes the classifier of the second track's channel.
        defaults: the server's ``--twilio-options`` (names of :data:`CALL_OPTIONS`, valid values).
        supported_languages: what the engine accepts besides ``auto``.
        max_gap_ms: the most silence one gap in a track is filled with.
    """

    def __init__(
        self,
        settings: SessionSettings,
        vad: FrameVad,
        identity: SessionIdentity,
        *,
        vad_factory: Callable[[], FrameVad],
        defaults: Mapping[str, str] | None = None,
        supported_languages: Sequence[str] = LANGUAGES[1:],
        max_gap_ms: int = DEFAULT_MAX_GAP_MS,
    ) -> None:
        options = StreamOptions(encoding="mulaw", sample_rate_hz=8000)
        super().__init__(options, settings, vad, identity, vad_factory=vad_factory, open_channels=False)
        self._defaults = dict(defaults or {})
        self._languages = tuple(supported_languages)
        self._max_gap_ms = max_gap_ms
        self.start: TwilioStart | None = None
        """The call's ``start`` message, once it came."""
        self.input_errors: Counter[str] = Counter()
        """Bad messages by code (the transport exports them as a counter and reads them at the end)."""
        self._timelines: dict[int, TrackTimeline] = {}
        self._decoders: dict[int, AudioDecoder] = {}
        self.metadata_after_fatal = True  # the webhook and followers always get the call's end

    @property
    def audio_duration_s(self) -> float:
        """Seconds of the call received: the longest track's timeline."""
        return max((t.position_ms for t in self._timelines.values()), default=0.0) / 1000

    @property
    def gap_ms_filled(self) -> float:
        """Silence filled in for lost chunks, over every track."""
        return sum(t.gap_ms_filled for t in self._timelines.values())

    @guarded
    def receive_text(self, text: str) -> None:
        """Take one text frame: a Twilio message."""
        if self._closing is not None:
            return  # the call is ending (stop, a fatal error, shutdown): late messages change nothing
        try:
            message = parse_twilio_message(text)
        except TwilioInputError as exc:
            if exc.close_code is not None and self.start is None:
                self._fatal(exc)
            else:
                self._bad_input(exc)
            return
        if isinstance(message, TwilioMedia):
            self._media(message)
        elif isinstance(message, TwilioStart):
            self._start(message)
        elif isinstance(message, TwilioStop):
            self._close_stream(CloseRequest(CloseCode.NORMAL, "stop"), metadata=True)
        elif isinstance(message, TwilioDtmf):
            logger.debug("call %s: DTMF %r", self.identity.request_id, message.digit[:4])
        elif not isinstance(message, TwilioConnected | TwilioMark):  # nothing to do for these
            raise AssertionError(f"unhandled Twilio message {message!r}")

    @guarded
    def receive_audio(self, data: bytes) -> None:
        """A binary frame: Twilio never sends one; counted and skipped."""
        self._bad_input(
            ProtocolViolation(
                "UNEXPECTED_BINARY",
                "Twilio Media Streams send JSON text frames only; a binary frame was ignored.",
            )
        )

    @guarded
    def receive_hangup(self) -> None:
        """The socket closed without ``stop``: the call is over, and what it sent is finalized for the
        webhook and the subscribers (they, not the socket, read the results)."""
        if self._closing is None:
            logger.info("call %s: the socket closed without stop; finalizing", self.identity.request_id)
            self._close_stream(CloseRequest(CloseCode.GOING_AWAY, "hangup"), metadata=True)

    def _start(self, start: TwilioStart) -> None:
        if self.start is not None:
            self._bad_input(ProtocolViolation("DUPLICATE_START", "A second start message was ignored."))
            return
        channels = channels_for_tracks(start.tracks)
        options, problems = call_options(
            self._defaults, start.custom_parameters, channels, supported_languages=self._languages
        )
        for problem in problems:
            self._bad_input(ProtocolViolation("BAD_PARAMETER", f"{problem} The default is used."))
        self.start = start
        self._open_channels(options)
        for track in start.tracks:
            channel = TRACK_CHANNELS[track]
            self._timelines[channel] = TrackTimeline(self._max_gap_ms)
            self._decoders[channel] = AudioDecoder("mulaw", 8000, 1)
        logger.info(
            "call %s: start callSid=%s streamSid=%s tracks=%s options=%s",
            self.identity.request_id,
            start.call_sid,
            start.stream_sid,
            ",".join(start.tracks),
            options,
        )

    def _media(self, media: TwilioMedia) -> None:
        if self.start is None:
            self._bad_input(
                ProtocolViolation(
                    "MEDIA_BEFORE_START", "A media message came before start; its audio was dropped."
                )
            )
            return
        channel = TRACK_CHANNELS[media.track]
        timeline = self._timelines.get(channel)
        decoder = self._decoders.get(channel)
        if timeline is None or decoder is None:
            self._bad_input(
                ProtocolViolation(
                    "UNKNOWN_TRACK",
                    f"Media of track {media.track!r}, which start did not list, was dropped.",
                )
            )
            return
        if len(media.payload) > self.settings.max_frame_bytes:
            self.receive_frame_too_large(len(media.payload))
            return
        placed = timeline.place(media.timestamp_ms, media.payload)
        if placed:
            self.channels[channel].receive_samples(decoder.decode(placed))
        limit = self.settings.max_session_s
        if limit and self.audio_duration_s > limit:
            self.receive_session_too_long()

    def _end_input(self) -> None:
        """Each track's resampler tail is fed to its channel."""
        for channel, decoder in self._decoders.items():
            tail = decoder.flush()
            if len(tail):
                self.channels[channel].receive_samples(tail)

    def _bad_input(self, exc: ClientError) -> None:
        """Log (the first few of a kind) and count a message that was skipped."""
        self.input_errors[exc.code] += 1
        if self.input_errors[exc.code] <= LOGGED_PER_CODE:
            logger.info("call %s: %s: %s", self.identity.request_id, exc.code, exc.description)
