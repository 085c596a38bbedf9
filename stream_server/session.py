"""Deepgram's live API as a front end onto a :class:`~stream_server.stream.Stream`. No I/O.

A :class:`Session` is one ``/v1/listen`` stream (README, "Architecture"). It imports no asyncio,
aiohttp, torch or funasr. The transport feeds it:

- ``receive_audio(bytes)`` and ``receive_text(str)`` for every WebSocket message,
- ``receive_result(job_id, transcript)`` / ``receive_failure(job_id, code, description)`` /
  ``receive_skipped(job_id)`` when the batcher answers a job,
- ``receive_idle_timeout()``, ``receive_shutdown()``, ``receive_disconnect()`` for what happens around it;

and drains it with ``jobs_to_run()`` (audio for the model), ``events_to_send()`` (JSON events for the
client, in order) and ``close`` (set once everything owed to the client has been sent).

What is Deepgram's lives here: binary frames of interleaved PCM (decoded, resampled to 16 kHz, and
either mixed down to one channel or, with ``multichannel=true``, split into one channel core each),
the JSON control messages (``KeepAlive``, ``Finalize`` with an optional ``channel``, ``CloseStream``),
the ``Finalize`` rate limit and the stream's audio limit. Segmentation, ordering and closing are the
stream's and its channels' (:mod:`stream_server.stream`, :mod:`stream_server.channel`).
"""

from __future__ import annotations

from collections.abc import Callable

from .audio import AudioDecoder
from .channel import Job, JobKind, SegmentKey, segmenter_settings
from .errors import ClientError, CloseCode, ProtocolViolation
from .protocol import CloseStream, Error, Finalize, KeepAlive, StreamOptions, parse_client_message
from .stream import CloseRequest, SessionIdentity, SessionSettings, Stream, guarded
from .vad import FrameVad

__all__ = [
    "CloseRequest",
    "Job",
    "JobKind",
    "SegmentKey",
    "Session",
    "SessionIdentity",
    "SessionSettings",
    "segmenter_settings",
]


class Session(Stream):
    """One Deepgram-protocol stream; see the module docstring.

    Args:
        options: the client's validated query options.
        settings: server-side endpointing, interim and limit settings.
        vad: the first channel's frame classifier.
        identity: request id, creation time and model identity for the events.
        vad_factory: makes the classifier of every further channel (``multichannel`` streams).
    """

    def __init__(
        self,
        options: StreamOptions,
        settings: SessionSettings,
        vad: FrameVad,
        identity: SessionIdentity,
        *,
        vad_factory: Callable[[], FrameVad] | None = None,
    ) -> None:
        super().__init__(options, settings, vad, identity, vad_factory=vad_factory)
        self._decoder = AudioDecoder(
            options.encoding,
            options.sample_rate_hz,
            options.channels,
            demultiplex=options.multichannel and options.channels > 1,
        )
        self._warned_audio_after_close = False
        # Finalize limits (README, "Protocol"): messages take a token bucket refilled by the audio
        # received (no clock: the core stays pure).
        self._finalize_tokens = float(settings.finalize_burst)
        self._finalize_refilled_s = 0.0

    @property
    def audio_duration_s(self) -> float:
        """Seconds of audio received, at the client's sample rate."""
        return self._decoder.input_duration_s

    @guarded
    def receive_audio(self, data: bytes) -> None:
        """Take one binary frame (any size; a sample may straddle frames). An empty frame means
        CloseStream, as in Deepgram's API."""
        if self._closing is not None:
            if not self._warned_audio_after_close:
                self._warned_audio_after_close = True
                self._client_error(
                    ProtocolViolation(
                        "AUDIO_AFTER_CLOSE",
                        "Audio arrived after CloseStream (or after a fatal error) and was not transcribed.",
                    )
                )
            return
        if len(data) == 0:
            self._close_stream(CloseRequest(CloseCode.NORMAL, "CloseStream"), metadata=True)
            return
        if len(data) > self.settings.max_frame_bytes:
            self.receive_frame_too_large(len(data))
            return
        self._feed(self._decoder.decode(data))
        limit = self.settings.max_session_s
        if limit and self._decoder.input_duration_s > limit:
            self.receive_session_too_long()

    @guarded
    def receive_text(self, text: str) -> None:
        """Take one text frame: a JSON control message."""
        if self._closing is not None:
            return  # the stream is ending; late messages change nothing and need no answer
        try:
            message = parse_client_message(text)
        except ClientError as exc:
            self._client_error(exc)
            return
        if isinstance(message, KeepAlive):
            return
        if isinstance(message, Finalize):
            if message.channel is not None and message.channel >= len(self.channels):
                self._client_error(
                    ProtocolViolation(
                        "INVALID_MESSAGE",
                        f"Finalize channel {message.channel} does not exist; this stream transcribes "
                        + (
                            f"channels 0 to {len(self.channels) - 1}."
                            if len(self.channels) > 1
                            else "channel 0 only."
                        ),
                    )
                )
                return
            if not self._take_finalize_token():
                self._client_error(
                    ProtocolViolation(
                        "RATE_LIMITED",
                        f"More than {self.settings.finalize_burst} Finalize messages at once, or more than "
                        f"{self.settings.max_finalize_per_s:g} per second of audio; this one was ignored "
                        "(its audio stays in the open segment). Send Finalize when speech ends, not with "
                        "every chunk.",
                    )
                )
                return
            self._finalize(message.channel)
        elif isinstance(message, CloseStream):
            self._close_stream(CloseRequest(CloseCode.NORMAL, "CloseStream"), metadata=True)

    def _take_finalize_token(self) -> bool:
        """Whether a Finalize is within ``max_finalize_per_s`` per second of audio (after a burst of
        ``finalize_burst``); takes its token if so."""
        rate = self.settings.max_finalize_per_s
        if rate <= 0:
            return True
        audio_s = self._decoder.input_duration_s
        refill = (audio_s - self._finalize_refilled_s) * rate
        self._finalize_tokens = min(float(self.settings.finalize_burst), self._finalize_tokens + refill)
        self._finalize_refilled_s = audio_s
        if self._finalize_tokens < 1.0:
            return False
        self._finalize_tokens -= 1.0
        return True

    def _end_input(self) -> None:
        """What the resampler still holds is fed; a dangling partial sample is reported."""
        tail = self._decoder.flush()
        if len(tail):
            self._feed(tail)
        dangling = self._decoder.pending_bytes
        if dangling:
            self._immediate.append(
                Error(
                    "INCOMPLETE_SAMPLE",
                    f"The stream ended with {dangling} byte(s) that do not form a whole sample "
                    f"({self._decoder.bytes_per_frame} bytes each); they were ignored.",
                )
            )
