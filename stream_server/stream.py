"""The stream around the channel cores: channels, ordering across them, errors and closing. No I/O.

A :class:`Stream` holds one :class:`~stream_server.channel.ChannelCore` per transcribed channel (one
for a mono stream or a mixed-down one, N for ``multichannel=true&channels=N``, two for a Twilio call's
tracks) and everything that belongs to the stream rather than to a channel: routing the model's answers
to the channel that asked, merging the channels' events, protocol errors, the stream's limits, and the
close (README, "Architecture"). It imports no asyncio, aiohttp, torch or funasr.

A front end makes it speak a wire protocol: :class:`~stream_server.session.Session` (Deepgram's live
API: binary audio, JSON control messages) and :class:`~stream_server.twilio_call.TwilioCall` (Twilio
Media Streams: JSON messages with base64 audio per track). The transport feeds a front end with
``receive_*`` and drains it with ``jobs_to_run()``, ``jobs_to_cancel()``, ``segments_closed()``,
``events_to_send()`` and ``close``.

Ordering (README, "Protocol: ordering"): within a channel, ``Results``, ``UtteranceEnd`` and a segment's
``Error`` leave in the order of the audio they describe; the channels' events interleave as they become
ready, each batch merged by audio time. Protocol ``Error`` events leave at once. What ends the stream
(``Metadata``, a fatal ``Error``, ``SERVER_SHUTTING_DOWN``) leaves only after every channel's finals.

Guarantees: every segment a channel closes gets exactly one final ``Results`` or one ``Error`` naming
its time span and channel; no ``receive_*`` raises (bad input becomes an ``Error`` event, an
unexpected exception becomes ``INTERNAL_ERROR`` and close 1011); memory is bounded per channel by the
settings, not by the stream's length.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar

from .audio import FloatArray
from .channel import ChannelCore, ChannelSettings, Job, SegmentKey
from .config import InterimConfig, SegmenterConfig
from .engines.base import Transcript
from .errors import ClientError, CloseCode, ProtocolViolation
from .protocol import (
    Error,
    Metadata,
    ModelInfo,
    Results,
    ServerEvent,
    SpeechStarted,
    StreamOptions,
    UtteranceEnd,
    serialize,
)
from .vad import FrameVad

logger = logging.getLogger(__name__)

P = ParamSpec("P")
S = TypeVar("S", bound="Stream")


@dataclass(frozen=True)
class CloseRequest:
    """The stream should now be closed with this code and reason."""

    code: CloseCode
    reason: str


@dataclass(frozen=True)
class SessionIdentity:
    """What the stream reports about itself and the model.

    Attributes:
        request_id: unique id of this stream (also sent as the ``dg-request-id`` header).
        created: ISO 8601 time the stream opened.
        model: model identity for ``Results.metadata``.
        model_details: engine details for ``Metadata`` (device, dtype, fallback reason...).
        warnings: said once in ``Metadata`` (e.g. that a fallback model is running).
    """

    request_id: str
    created: str
    model: ModelInfo
    model_details: Mapping[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class SessionSettings:
    """Server-side settings a stream needs (from :class:`~stream_server.config.Config`; the limits
    as in :class:`~stream_server.config.LimitsConfig`)."""

    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    interim: InterimConfig = field(default_factory=InterimConfig)
    max_client_errors: int = 16
    max_session_s: float = 0.0
    max_frame_bytes: int = 1 << 20
    max_finalize_per_s: float = 5.0
    finalize_burst: int = 10


def guarded(method: Callable[Concatenate[S, P], None]) -> Callable[Concatenate[S, P], None]:
    """``receive_*`` never raises: an unexpected exception is logged once with its traceback, the
    client gets ``INTERNAL_ERROR`` (no internals), and the stream closes with 1011."""

    def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> None:
        if self._dead:
            return
        try:
            method(self, *args, **kwargs)
        except Exception:
            logger.exception("stream %s: internal error in %s", self.identity.request_id, method.__name__)
            self._internal_error()

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


def _event_time_s(event: ServerEvent) -> float:
    """Where in the audio an event stands, to merge the channels' events."""
    if isinstance(event, Results):
        return event.start_s + event.duration_s
    if isinstance(event, UtteranceEnd):
        return event.last_word_end_s
    if isinstance(event, SpeechStarted):
        return event.timestamp_s
    if isinstance(event, Error) and event.start_s is not None and event.duration_s is not None:
        return event.start_s + event.duration_s
    return 0.0


class Stream:
    """One stream's channels and its life; see the module docstring.

    ``metadata_after_fatal``: a fatal ``Error`` is followed by ``Metadata`` (a call's webhook and
    followers always learn that it ended); the live API closes right after the Error, as Deepgram does.

    Args:
        options: the validated options (what the client asked for).
        settings: server-side endpointing, interim and limit settings.
        vad: the first channel's frame classifier.
        identity: request id, creation time and model identity for the events.
        vad_factory: makes the classifier of every further channel (required for more than one).
        open_channels: make the channels now (False: the front end calls ``_open_channels`` once it
            knows its options).
    """

    def __init__(
        self,
        options: StreamOptions,
        settings: SessionSettings,
        vad: FrameVad,
        identity: SessionIdentity,
        *,
        vad_factory: Callable[[], FrameVad] | None = None,
        open_channels: bool = True,
    ) -> None:
        self.options = options
        self.settings = settings
        self.identity = identity
        self._vad: FrameVad | None = vad
        self._vad_factory = vad_factory
        self._next_job_id = 1
        self.channels: list[ChannelCore] = []
        self._immediate: list[ServerEvent] = []
        self._tail: list[ServerEvent] = []  # after every channel's finals: Metadata, a fatal Error
        self._closing: CloseRequest | None = None
        self._dead = False
        self._client_errors = 0
        self.metadata_after_fatal = False
        if open_channels:
            self._open_channels(options)

    def _open_channels(self, options: StreamOptions) -> None:
        """Make one channel core per transcribed channel of ``options`` (a front end that learns its
        options after the handshake, as Twilio's does at ``start``, calls this then)."""
        self.options = options
        count = options.transcribed_channels
        if count > 1 and self._vad_factory is None:
            raise ValueError(f"{count} channels need a vad_factory for every channel after the first")
        for index in range(count):
            channel_settings = ChannelSettings(
                segmenter=self.settings.segmenter,
                interim=self.settings.interim,
                request_id=self.identity.request_id,
                model=self.identity.model,
                channel_index=(index, count),
            )
            vad = self._vad
            self._vad = None  # the first channel's; every other one gets its own
            if vad is None:
                assert self._vad_factory is not None
                vad = self._vad_factory()
            self.channels.append(ChannelCore(options, channel_settings, vad, self._new_job_id))

    def _new_job_id(self) -> int:
        job_id = self._next_job_id
        self._next_job_id += 1
        return job_id

    # ------------------------------------------------------------------------------------------
    # What the transport reads

    @property
    def close(self) -> CloseRequest | None:
        """Set once the stream should be closed and everything owed to the client has been drained."""
        if self._closing is None:
            return None
        if self._dead:
            return self._closing
        if self._tail or self._immediate or not all(channel.drained for channel in self.channels):
            return None
        return self._closing

    @property
    def closing(self) -> bool:
        """The stream is ending (its client ended it, a fatal error, shutdown); no more audio is taken."""
        return self._closing is not None

    @property
    def pending_finals(self) -> int:
        """Final jobs handed out and not yet answered (the transport stops reading above a limit)."""
        return sum(channel.pending_finals for channel in self.channels)

    @property
    def audio_duration_s(self) -> float:
        """Seconds of audio received (the front end says how it counts them)."""
        return 0.0

    @property
    def segments_finalized(self) -> int:
        return sum(channel.segments_finalized for channel in self.channels)

    @property
    def speculations_used(self) -> int:
        """Finals delivered from a speculative job (the model had started before the pause ran out)."""
        return sum(channel.speculations_used for channel in self.channels)

    @property
    def speculations_wasted(self) -> int:
        """Speculative jobs thrown away because speech resumed."""
        return sum(channel.speculations_wasted for channel in self.channels)

    @property
    def events_waiting(self) -> int:
        """Events held for the client, ready or not (the transport closes a client too slow to read)."""
        return len(self._immediate) + len(self._tail) + sum(c.events_waiting for c in self.channels)

    def jobs_to_run(self) -> list[Job]:
        """Jobs created since the last call; each must be answered with exactly one ``receive_*``
        (``Job.channel`` says which channel asked)."""
        if len(self.channels) == 1:
            return self.channels[0].jobs_to_run()
        return [job for channel in self.channels for job in channel.jobs_to_run()]

    def jobs_to_cancel(self) -> list[int]:
        """Ids of handed-out jobs whose answers are no longer wanted (speculation that speech overtook)."""
        return [job_id for channel in self.channels for job_id in channel.jobs_to_cancel()]

    def segments_closed(self) -> list[SegmentKey]:
        """``(channel, segment_id)`` of segments whose end was decided since the last call (for the
        latency metric; match them with ``Results.channel_index[0]`` and ``Results.segment_id``)."""
        return [(c.channel, segment_id) for c in self.channels for segment_id in c.segments_closed()]

    def events_to_send(self) -> list[ServerEvent]:
        """Events ready for the client, in the order they must be sent."""
        out = self._immediate
        self._immediate = []
        if len(self.channels) == 1:
            out.extend(self.channels[0].events_to_send())
        else:
            ready = [channel.events_to_send() for channel in self.channels]
            out.extend(heapq.merge(*ready, key=_event_time_s))
        if self._tail and all(channel.drained for channel in self.channels):
            out.extend(self._tail)
            self._tail = []
        return out

    def to_text(self, event: ServerEvent) -> str | None:
        """The text frame that carries ``event`` to the client (the live API's JSON), or None when the
        front end's protocol has no message for it."""
        return serialize(event)

    # ------------------------------------------------------------------------------------------
    # Inputs every front end shares

    @guarded
    def receive_result(self, job_id: int, transcript: Transcript) -> None:
        """The model answered a job."""
        channel = self._owner(job_id)
        if channel is not None:
            channel.receive_result(job_id, transcript)

    @guarded
    def receive_failure(self, job_id: int, code: str, description: str) -> None:
        """A job could not be transcribed (the model failed, or the server is shutting down)."""
        channel = self._owner(job_id)
        if channel is not None:
            channel.receive_failure(job_id, code, description)

    @guarded
    def receive_skipped(self, job_id: int) -> None:
        """An interim or speculative job was refused because the model is busy."""
        channel = self._owner(job_id)
        if channel is not None:
            channel.receive_skipped(job_id)

    @guarded
    def receive_idle_timeout(self) -> None:
        """Neither audio nor KeepAlive arrived for the idle timeout."""
        self._fatal(
            ProtocolViolation(
                "IDLE_TIMEOUT",
                'No audio or KeepAlive arrived in time; send {"type": "KeepAlive"} every few seconds '
                "while there is no audio.",
                CloseCode.POLICY_VIOLATION,
            )
        )

    @guarded
    def receive_no_audio_timeout(self) -> None:
        """The stream has sent no audio since it opened, for the no-audio timeout (KeepAlive alone does
        not hold a stream that never sent audio, as in Deepgram's API)."""
        self._fatal(
            ProtocolViolation(
                "NO_AUDIO",
                "No audio arrived since the stream opened; send audio within a few seconds of "
                "connecting (KeepAlive alone does not hold a stream that has sent none).",
                CloseCode.POLICY_VIOLATION,
            )
        )

    @guarded
    def receive_frame_too_large(self, nbytes: int | None = None) -> None:
        """A message over ``max_frame_bytes`` arrived (the transport calls this itself for one it
        refused to read at all; ``nbytes`` None when its size is not known)."""
        size = "A message" if nbytes is None else f"A message of {nbytes} bytes"
        self._fatal(
            ProtocolViolation(
                "FRAME_TOO_LARGE",
                f"{size} exceeds this server's limit of {self.settings.max_frame_bytes} bytes; send "
                "audio in smaller frames (20-250 ms each).",
                CloseCode.MESSAGE_TOO_BIG,
            )
        )

    @guarded
    def receive_session_too_long(self) -> None:
        """The stream reached ``max_session_s``, in audio or on the wall clock."""
        self._fatal(
            ProtocolViolation(
                "SESSION_TOO_LONG",
                f"This server limits a stream to {self.settings.max_session_s:g} s of audio or of "
                "connection time; open a new stream to continue.",
                CloseCode.POLICY_VIOLATION,
            )
        )

    @guarded
    def receive_shutdown(self) -> None:
        """The server's drain ran out: finalize what was received, then close with 1012 (service
        restart), so the client reconnects, to another server behind the same address."""
        if self._closing is None:
            # The finals still owed go first, then this Error, then Metadata (issue 8: a client that
            # stops at the first fatal error must not lose them).
            close = CloseRequest(CloseCode.SERVICE_RESTART, "server restarting")
            self._close_stream(close, metadata=False)
            self._tail.append(
                Error(
                    "SERVER_SHUTTING_DOWN",
                    "The server is shutting down; what this stream sent has been transcribed. "
                    "Reconnect to continue.",
                    CloseCode.SERVICE_RESTART,
                )
            )
            self._tail.append(self._metadata())

    def receive_disconnect(self) -> list[int]:
        """The client vanished. Returns the ids of jobs whose answers nobody will read."""
        if self._dead:
            return []
        self._dead = True
        open_segments = sum(1 for channel in self.channels if channel.in_segment)
        abandoned = [job_id for channel in self.channels for job_id in channel.disconnect()]
        if abandoned or open_segments:
            logger.info(
                "stream %s: client went away with %d job(s) in flight%s",
                self.identity.request_id,
                len(abandoned),
                f" and {open_segments} segment(s) open" if open_segments else "",
            )
        self._immediate.clear()
        self._tail.clear()
        if self._closing is None:
            self._closing = CloseRequest(CloseCode.GOING_AWAY, "client went away")
        return abandoned

    # ------------------------------------------------------------------------------------------
    # For front ends

    def _feed(self, samples: FloatArray) -> None:
        """16 kHz samples: mono for one channel, ``(samples, channels)`` for a demultiplexed stream."""
        if samples.ndim == 1:
            self.channels[0].receive_samples(samples)
            return
        for index, channel in enumerate(self.channels):
            channel.receive_samples(samples[:, index])

    def _finalize(self, channel: int | None) -> None:
        """A client ``Finalize``: end the open segment of one channel, or of every channel."""
        targets = self.channels if channel is None else [self.channels[channel]]
        for target in targets:
            target.finalize()

    def _end_input(self) -> None:
        """The stream ends: feed what the front end still holds (a resampler's tail, say)."""

    def _close_stream(self, close: CloseRequest, *, metadata: bool) -> None:
        if self._closing is not None:
            return
        self._end_input()
        for channel in self.channels:
            channel.end()
        self._closing = close
        if metadata:
            self._tail.append(self._metadata())

    def _metadata(self) -> Metadata:
        return Metadata(
            request_id=self.identity.request_id,
            created=self.identity.created,
            duration_s=self.audio_duration_s,
            channels=self.options.channels,
            model=self.identity.model,
            model_details=self.identity.model_details,
            warnings=self.identity.warnings,
            ignored_params=self.options.ignored_params,
            segments=self.segments_finalized,
        )

    def _owner(self, job_id: int) -> ChannelCore | None:
        for channel in self.channels:
            if channel.owns(job_id):
                return channel
        return None

    def _client_error(self, exc: ClientError) -> None:
        if exc.close_code is not None:
            self._fatal(exc)
            return
        self._client_errors += 1
        logger.info("stream %s: %s", self.identity.request_id, exc)
        self._immediate.append(Error(exc.code, exc.description))
        if self._client_errors >= self.settings.max_client_errors:
            self._fatal(
                ProtocolViolation(
                    "TOO_MANY_ERRORS",
                    f"{self._client_errors} invalid messages on this stream; closing it. "
                    "Check the client against the README's protocol section.",
                    CloseCode.POLICY_VIOLATION,
                )
            )

    def _fatal(self, exc: ClientError) -> None:
        if self._closing is not None:
            return
        assert exc.close_code is not None
        logger.info("stream %s: closing: %s", self.identity.request_id, exc)
        # Audio already accepted is still transcribed, and its finals go out before the fatal Error: a
        # client that stops reading at the first fatal error must not lose the finals it is owed.
        self._close_stream(CloseRequest(exc.close_code, exc.code), metadata=False)
        self._tail.append(Error(exc.code, exc.description, exc.close_code))
        if self.metadata_after_fatal:
            self._tail.append(self._metadata())

    def _internal_error(self) -> None:
        self._dead = True
        for channel in self.channels:
            channel.clear()
        self._tail.clear()
        self._immediate = [
            Error(
                "INTERNAL_ERROR",
                "The server failed on this stream; it has been logged.",
                CloseCode.INTERNAL_ERROR,
            )
        ]
        self._closing = CloseRequest(CloseCode.INTERNAL_ERROR, "INTERNAL_ERROR")
