"""Live calls and where their results go: the webhook and the sockets that follow a call.

Twilio only listens, so a call's results (README, "Call-centre audio") leave by two other ways:

1. the webhook: every final, segment ``Error`` and the closing ``Metadata`` (and interims, when the
   server says so and the call asked for them) is POSTed by the :class:`~stream_server.webhook.
   WebhookSender`, in order per call, never blocking the stream;
2. subscribers (``/v1/calls/{callSid}``): each gets the call's events as the live API sends them, after
   the last :attr:`CallsConfig.subscriber_backlog` finals for one that joins late; a subscriber that
   falls more than :data:`MAX_SUBSCRIBER_QUEUE` messages behind is cut, never the call.

Every event carries, besides the live API's own fields, ``"twilio": {"callSid", "streamSid",
"track"}`` (``track`` is ``inbound`` on channel 0, ``outbound`` on channel 1). This module holds no
socket: the transport pumps a :class:`Subscriber`'s queue into its WebSocket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .metrics import Metrics
from .protocol import Error, Metadata, Results, ServerEvent, SpeechStarted, UtteranceEnd
from .twilio import TRACK_CHANNELS, TwilioStart, channels_for_tracks
from .webhook import WebhookSender

logger = logging.getLogger(__name__)

TRACK_NAMES = {channel: track for track, channel in TRACK_CHANNELS.items()}
MAX_SUBSCRIBER_QUEUE = 1000
"""Messages one subscriber may be behind before it is cut (1008): a slow reader never holds a call."""
MAX_SUBSCRIBERS_PER_CALL = 32
PRIVATE_PARAMETERS = frozenset({"webhook_url"})
"""customParameters that ``GET /v1/calls`` does not show."""


class Subscriber:
    """One socket following a call: a bounded queue of JSON texts, and whether the call is over."""

    def __init__(self, feed: CallFeed) -> None:
        self.feed = feed
        self.queue: deque[str] = deque()
        self.wake = asyncio.Event()
        self.ended = False
        self.dropped = False

    def put(self, text: str) -> bool:
        """Queue a message; False (and the subscriber is marked dropped) when it is too far behind."""
        if self.dropped:
            return False
        if len(self.queue) >= MAX_SUBSCRIBER_QUEUE:
            self.dropped = True
            self.queue.clear()
            self.wake.set()
            return False
        self.queue.append(text)
        self.wake.set()
        return True

    def end(self) -> None:
        self.ended = True
        self.wake.set()


@dataclass
class CallFeed:
    """One live call: its Twilio streams, subscribers, late-joiner backlog and webhook.

    Attributes:
        call_sid: Twilio's callSid.
        account_sid: the account it belongs to.
        started: ISO 8601 time the first stream of it started.
        tracks: the tracks its streams carry.
        custom_parameters: the first stream's customParameters (without private ones).
        webhook_url: where its results are POSTed, or None.
        webhook_interims: interims are POSTed too.
    """

    call_sid: str
    account_sid: str
    started: str
    tracks: tuple[str, ...]
    custom_parameters: Mapping[str, str]
    webhook_url: str | None
    webhook_interims: bool
    backlog: deque[str] = field(default_factory=deque)
    subscribers: set[Subscriber] = field(default_factory=set)
    stream_sids: list[str] = field(default_factory=list)
    started_s: float = field(default_factory=time.monotonic)
    finals: int = 0

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/calls`` shows of it."""
        return {
            "call_sid": self.call_sid,
            "account_sid": self.account_sid,
            "stream_sids": list(self.stream_sids),
            "tracks": list(self.tracks),
            "channels": channels_for_tracks(self.tracks) if self.tracks else 1,
            "started": self.started,
            "duration": round(time.monotonic() - self.started_s, 3),
            "finals": self.finals,
            "subscribers": len(self.subscribers),
            "custom_parameters": dict(self.custom_parameters),
        }


def call_payload(event: ServerEvent, call_sid: str, stream_sid: str) -> dict[str, Any]:
    """The live API's JSON for an event, plus the ``twilio`` object naming the call and track."""
    payload = event.to_json()
    twilio: dict[str, Any] = {"callSid": call_sid, "streamSid": stream_sid}
    channel: tuple[int, int] | None = None
    if isinstance(event, Results | UtteranceEnd | SpeechStarted):
        channel = event.channel_index
    elif isinstance(event, Error):
        channel = event.channel_index
    if channel is not None:
        twilio["track"] = TRACK_NAMES.get(channel[0], str(channel[0]))
    payload["twilio"] = twilio
    return payload


class CallHub:
    """The live calls of this server, by callSid.

    Args:
        metrics: where call, subscriber and webhook figures go.
        backlog: finals kept per call for late subscribers.
        webhook: the sender, or None when no webhook can be configured.
    """

    def __init__(self, metrics: Metrics, *, backlog: int = 100, webhook: WebhookSender | None = None) -> None:
        self.metrics = metrics
        self.backlog = backlog
        self.webhook = webhook
        self._calls: dict[str, CallFeed] = {}
        self._streams: dict[str, int] = {}  # callSid -> streams of it still open

    def open(self, start: TwilioStart, *, webhook_url: str | None, webhook_interims: bool) -> CallFeed:
        """A Twilio stream started: its call's feed (made with the call's first stream)."""
        feed = self._calls.get(start.call_sid)
        if feed is None:
            feed = CallFeed(
                call_sid=start.call_sid,
                account_sid=start.account_sid,
                started=datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                tracks=tuple(start.tracks),
                custom_parameters={
                    k: v for k, v in start.custom_parameters.items() if k not in PRIVATE_PARAMETERS
                },
                webhook_url=webhook_url,
                webhook_interims=webhook_interims,
                backlog=deque(maxlen=self.backlog),
            )
            self._calls[start.call_sid] = feed
        else:
            feed.tracks = tuple(dict.fromkeys((*feed.tracks, *start.tracks)))
        feed.stream_sids.append(start.stream_sid)
        self._streams[start.call_sid] = self._streams.get(start.call_sid, 0) + 1
        self.metrics.calls_active.set(len(self._calls))
        return feed

    def publish(self, feed: CallFeed, stream_sid: str, event: ServerEvent) -> None:
        """One of the call's events: to its subscribers, its backlog (finals) and its webhook."""
        payload = call_payload(event, feed.call_sid, stream_sid)
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        final = isinstance(event, Results) and event.is_final
        if final:
            feed.finals += 1
            feed.backlog.append(text)
        for subscriber in list(feed.subscribers):
            if not subscriber.put(text):
                logger.info("call %s: a subscriber fell too far behind; cutting it", feed.call_sid)
                self.metrics.subscribers_dropped.inc()
                self.unsubscribe(subscriber)
        if self.webhook is not None and feed.webhook_url:
            wanted = (
                final
                or isinstance(event, Metadata)
                or (isinstance(event, Error) and event.segment_id is not None)
                or (isinstance(event, Error) and event.close_code is not None)
                or (isinstance(event, Results) and feed.webhook_interims)
            )
            if wanted:
                self.webhook.send(feed.call_sid, feed.webhook_url, payload)
                self.metrics.webhook_queued.set(self.webhook.queued)

    def end(self, feed: CallFeed) -> None:
        """One of the call's streams is over; with the last one the call ends for its subscribers."""
        left = self._streams.get(feed.call_sid, 1) - 1
        if left > 0:
            self._streams[feed.call_sid] = left
            return
        self._streams.pop(feed.call_sid, None)
        if self._calls.get(feed.call_sid) is feed:
            del self._calls[feed.call_sid]
        for subscriber in list(feed.subscribers):
            subscriber.end()
        self.metrics.calls_active.set(len(self._calls))

    def get(self, call_sid: str) -> CallFeed | None:
        return self._calls.get(call_sid)

    def live(self) -> list[dict[str, Any]]:
        """Every live call, oldest first, as ``GET /v1/calls`` shows them."""
        return [feed.describe() for feed in sorted(self._calls.values(), key=lambda f: f.started_s)]

    def subscribe(self, feed: CallFeed) -> Subscriber | None:
        """A new subscriber, its queue holding the call's backlog; None when the call has too many."""
        if len(feed.subscribers) >= MAX_SUBSCRIBERS_PER_CALL:
            return None
        subscriber = Subscriber(feed)
        for text in feed.backlog:
            subscriber.put(text)
        feed.subscribers.add(subscriber)
        self.metrics.call_subscribers.inc()
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in subscriber.feed.subscribers:
            subscriber.feed.subscribers.discard(subscriber)
            self.metrics.call_subscribers.dec()
