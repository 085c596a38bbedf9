"""Webhook delivery: transcripts POSTed as JSON to an HTTP(S) URL, for calls (Twilio Media Streams).

:class:`WebhookSender` guarantees:

- **never blocks the stream**: :meth:`WebhookSender.send` only enqueues; it never waits and never raises.
  It answers False when the delivery is not accepted: ``max_queued`` deliveries already wait (or are in
  progress), the sender is closed, or the URL or payload cannot be sent;
- **a bounded queue**: at most ``max_queued`` deliveries are held at once, over all keys; beyond that a
  delivery is dropped (outcome ``dropped``, logged at WARNING at most once per ``DROP_LOG_INTERVAL_S``);
- **order per key**: the deliveries of one ``key`` (a call) are made one at a time, in the order sent; a
  delivery being retried holds back the later ones of its key. Different keys are delivered concurrently:
  one task per key that has something queued, which ends when its queue is empty (an idle key costs
  nothing);
- **bounded retries**: a delivery is attempted at most ``max_attempts`` times, each attempt bounded by
  ``timeout_s``. Connection errors, timeouts, 408, 429 and 5xx are retried after an exponential backoff
  (``first_backoff_s * 2**k``, jitter of +-20 %, never more than ``max_backoff_s``; a numeric
  ``Retry-After`` on 429 or 503 is honoured up to ``max_backoff_s``). Any other answer that is not 2xx
  (other 4xx, and 3xx: redirects are not followed, so a webhook cannot be bounced to a host that the
  allowlist refuses) is final;
- **bounded shutdown**: :meth:`WebhookSender.close` delivers what is queued for at most its
  ``timeout_s``, then gives up on the rest (counted as ``dropped`` and logged);
- **one outcome per event**, to ``on_outcome`` (for metrics): ``delivered``, ``retried`` (each retry),
  ``rejected`` (a final non-2xx answer, or a URL or payload that cannot be sent), ``failed`` (after
  ``max_attempts``), ``dropped`` (not accepted or given up on: queue full, closed). A hook that raises
  is logged once and does not disturb delivery.

Logs never carry a URL's query string, fragment or user info (a token often rides there), nor exception
text: a URL is logged as ``scheme://host[:port]/path``, an error as its HTTP status or exception class.

Each attempt carries ``Content-Type: application/json``, the sender's ``User-Agent`` and
``X-Stream-Server-Delivery: <n>``, the attempt's number (1, 2, ...), so a receiver can tell a retry.

:func:`webhook_url_allowed` checks a URL given per call against an operator's allowlist of hosts;
:func:`parse_webhook_url` validates the operator's own URL (the ``--webhook-url`` flag).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import re
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

logger = logging.getLogger(__name__)

WebhookOutcome = Literal["delivered", "retried", "rejected", "failed", "dropped"]

DELIVERY_HEADER = "X-Stream-Server-Delivery"
"""The request header that numbers the attempt of a delivery: 1, 2, ..."""

MAX_CONNECTIONS = 100
"""Attempts in flight at once, over all keys; the others wait for a slot before their timeout starts."""

DROP_LOG_INTERVAL_S = 10.0
"""At most one WARNING about dropped deliveries this often (a flood must not flood the log)."""

JITTER = 0.2
"""Each backoff is multiplied by a random factor in [1 - JITTER, 1 + JITTER)."""

_DEFAULT_PORTS = {"http": 80, "https": 443}
_FORBIDDEN_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
_HOST_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")


def backoff_s(retry: int, first_backoff_s: float, max_backoff_s: float, rand: float | None = None) -> float:
    """How long to wait before a retry: exponential, with jitter, capped.

    Args:
        retry: which retry this is, from 0 (the wait after the first failed attempt).
        first_backoff_s: the wait before the first retry, before jitter.
        max_backoff_s: no wait is longer.
        rand: a number in [0, 1) that picks the jitter; a fresh random one when None.

    Returns:
        ``min(first_backoff_s * 2**retry * (1 +- JITTER), max_backoff_s)``, in seconds.
    """
    if rand is None:
        rand = random.random()
    base = min(first_backoff_s * 2.0 ** min(retry, 64), max_backoff_s)
    return min(base * (1.0 - JITTER + 2.0 * JITTER * rand), max_backoff_s)


def _retry_after_s(value: str | None, max_backoff_s: float) -> float | None:
    """A numeric ``Retry-After`` in seconds, capped at ``max_backoff_s``; None when absent or a date."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, max_backoff_s)


def _loggable_url(url: URL) -> str:
    """``scheme://host[:port]/path``: without user info, query or fragment, which may carry a token."""
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{url.explicit_port}" if url.explicit_port is not None else ""
    return f"{url.scheme}://{host}{port}{url.raw_path}"


def _url_problem(url: str) -> tuple[URL | None, str]:
    """Parse a webhook URL.

    Returns:
        The parsed URL and "", or None and a sentence naming the problem (without the URL, which may
        carry a token).
    """
    if _FORBIDDEN_CHARS.search(url):
        return None, "the webhook URL must not contain spaces, control characters or backslashes"
    try:
        parsed = URL(url)
        port = parsed.port
    except (ValueError, TypeError):
        return None, "the webhook URL cannot be parsed (check its host and port)"
    if parsed.scheme not in _DEFAULT_PORTS:
        return None, "the webhook URL must start with http:// or https://"
    if "@" in urlsplit(url).netloc:  # also an empty user info (``http://@host``), which yarl drops
        return None, "the webhook URL must not carry a user name or password (user:pass@)"
    host = (parsed.raw_host or "").lower()
    if not host:
        return None, "the webhook URL has no host"
    if ":" not in host:  # a name or IPv4 address (yarl has checked IPv6 literals)
        labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
        if not all(_HOST_LABEL.fullmatch(label) for label in labels):
            return None, "the webhook URL's host is not a valid host name"
    if port is None or not 0 < port < 65536:
        return None, "the webhook URL's port must be between 1 and 65535"
    return parsed, ""


def parse_webhook_url(url: str) -> str:
    """Validate an operator-given webhook URL (the ``--webhook-url`` flag).

    Args:
        url: the URL as given; surrounding whitespace is ignored.

    Returns:
        The URL, stripped of surrounding whitespace.

    Raises:
        ValueError: the URL is not http or https, has no host, a bad port or host, user info, or
            characters that a URL cannot hold; the message names the problem (never the URL itself).
    """
    url = url.strip()
    parsed, problem = _url_problem(url)
    if parsed is None:
        raise ValueError(f"{problem}.")
    return url


def _split_entry(entry: str) -> tuple[str, int | None]:
    """An allowlist entry as (host, port or None): ``host``, ``host:8080``, ``[::1]:8080``, ``*.x.com``."""
    entry = entry.strip().lower()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            return "", None
    elif entry.count(":") == 1:
        host, _, port_text = entry.partition(":")
    else:
        host, port_text = entry, ""
    if host.endswith("."):
        host = host[:-1]
    if not port_text:
        return host, None
    if not port_text.isdigit():
        return "", None
    return host, int(port_text)


def webhook_url_allowed(url: str, allowed_hosts: Sequence[str]) -> bool:
    """Whether a webhook URL points at a host the operator allows.

    Args:
        url: the URL to check (for example one a call's parameters ask for).
        allowed_hosts: entries: a host name (``hooks.example.com``, case-insensitive, a trailing dot
            ignored), ``*.example.com`` for any subdomain of example.com (not example.com itself), or
            either with a port (``hooks.example.com:8080``), which the URL's port must then equal (80 or
            443 when the URL names none). An IPv6 address is written in brackets (``[::1]:8080``).
            International names are written in their ``xn--`` form.

    Returns:
        True only for an http or https URL with a valid host, no user info (``user:pass@``), and a host
        (and port) that an entry allows.
    """
    parsed, _ = _url_problem(url)
    if parsed is None:
        return False
    host = (parsed.raw_host or "").lower()
    if host.endswith("."):
        host = host[:-1]
    port = parsed.port
    for entry in allowed_hosts:
        entry_host, entry_port = _split_entry(entry)
        if not entry_host or (entry_port is not None and entry_port != port):
            continue
        if entry_host.startswith("*."):
            suffix = entry_host[1:]
            if "*" not in suffix and host.endswith(suffix) and len(host) > len(suffix):
                return True
        elif "*" not in entry_host and host == entry_host:
            return True
    return False


@dataclass(frozen=True)
class _Delivery:
    """One payload for one URL, serialized when sent (later changes to the payload do not leak in)."""

    key: str
    url: URL
    log_url: str
    body: bytes


class WebhookSender:
    """Delivers JSON payloads to webhook URLs: ordered per key, concurrent across keys, bounded.

    Use from the event loop's thread: ``await start()``, then ``send(...)`` as results come,
    ``await close()`` at shutdown. See the module docstring for what it guarantees.
    """

    def __init__(
        self,
        *,
        max_attempts: int = 5,
        first_backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        timeout_s: float = 5.0,
        max_queued: int = 10000,
        on_outcome: Callable[[str], None] | None = None,
        user_agent: str = "stream-server",
    ) -> None:
        """Set up a sender; nothing is sent before :meth:`start`.

        Args:
            max_attempts: attempts per delivery, the first included (at least 1).
            first_backoff_s: the wait before the first retry; it doubles with each retry.
            max_backoff_s: no wait between attempts is longer (a ``Retry-After`` included).
            timeout_s: the limit of one attempt, from connecting to the answer's status line.
            max_queued: deliveries held at once (waiting or in progress), over all keys; beyond that
                :meth:`send` drops.
            on_outcome: called with ``delivered``, ``retried``, ``rejected``, ``failed`` or ``dropped``
                (see the module docstring), for metrics.
            user_agent: the ``User-Agent`` header of every attempt.

        Raises:
            ValueError: a limit is out of range; the message names the argument.
        """
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts}.")
        if not (math.isfinite(first_backoff_s) and first_backoff_s >= 0):
            raise ValueError(f"first_backoff_s must be a number of seconds >= 0, not {first_backoff_s}.")
        if not (math.isfinite(max_backoff_s) and max_backoff_s >= first_backoff_s):
            raise ValueError(f"max_backoff_s must be at least first_backoff_s, not {max_backoff_s}.")
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a number of seconds > 0, not {timeout_s}.")
        if max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, not {max_queued}.")
        self._max_attempts = max_attempts
        self._first_backoff_s = first_backoff_s
        self._max_backoff_s = max_backoff_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_queued = max_queued
        self._on_outcome = on_outcome
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self._queues: dict[str, deque[_Delivery]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._queued = 0
        self._closing = False
        self._closed = asyncio.Event()
        self._hook_failed = False
        self._drops_unlogged = 0
        self._drop_logged_s = -math.inf

    @property
    def queued(self) -> int:
        """Deliveries accepted and not yet finished (waiting or in progress), over all keys."""
        return self._queued

    async def start(self) -> None:
        """Open the HTTP client and start delivering what was sent before. A second call does nothing.

        Raises:
            RuntimeError: the sender is closed.
        """
        if self._closing:
            raise RuntimeError("the webhook sender is closed")
        if self._session is not None:
            return
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS),
            timeout=self._timeout,
            headers={"User-Agent": self._user_agent},
            cookie_jar=aiohttp.DummyCookieJar(),  # calls must not share cookies
            trust_env=False,
        )
        for key in self._queues:
            self._start_key(key)

    def send(self, key: str, url: str, payload: Mapping[str, Any]) -> bool:
        """Queue a payload for delivery to a URL, after the earlier ones of the same key. Never blocks.

        Args:
            key: what orders deliveries (a call's id): those of one key are made one at a time, in order.
            url: an http or https URL (check it with :func:`webhook_url_allowed` first when it comes
                from a client).
            payload: serialized to JSON now.

        Returns:
            True when queued. False when not: ``max_queued`` deliveries already held or the sender closed
            (outcome ``dropped``), or a URL or payload that cannot be sent (outcome ``rejected``).
        """
        try:
            return self._send(key, url, payload)
        except Exception:  # the stream must go on whatever happens here
            logger.exception("webhook delivery for key %r could not be queued", key)
            return False

    def _send(self, key: str, url: str, payload: Mapping[str, Any]) -> bool:
        parsed, problem = _url_problem(url)
        if parsed is None:
            logger.warning("webhook delivery for key %r rejected: %s", key, problem)
            self._report("rejected")
            return False
        log_url = _loggable_url(parsed)
        if self._closing or self._queued >= self._max_queued:
            self._log_drop(key, log_url, "the sender is closed" if self._closing else "the queue is full")
            self._report("dropped")
            return False
        try:
            body = json.dumps(payload, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            logger.warning(
                "webhook delivery to %s for key %r rejected: the payload is not JSON (%s)",
                log_url,
                key,
                type(exc).__name__,
            )
            self._report("rejected")
            return False
        self._queues.setdefault(key, deque()).append(_Delivery(key, parsed, log_url, body))
        self._queued += 1
        if key not in self._tasks and self._session is not None:
            self._start_key(key)
        return True

    def _start_key(self, key: str) -> None:
        self._tasks[key] = asyncio.get_running_loop().create_task(self._run_key(key), name="webhook-delivery")

    async def _run_key(self, key: str) -> None:
        """Deliver a key's queue in order; end (and forget the key) when it is empty."""
        queue = self._queues[key]
        try:
            while queue:
                await self._deliver(queue[0])
                queue.popleft()
                self._queued -= 1
        finally:
            if not queue:  # no await between this check and send(): a new delivery starts a new task
                del self._queues[key]
            del self._tasks[key]

    async def _deliver(self, delivery: _Delivery) -> None:
        """Make up to ``max_attempts`` attempts; report one final outcome (and each retry)."""
        last_error = ""
        for attempt in range(1, self._max_attempts + 1):
            delay_s: float | None = None
            try:
                status, retry_after = await self._attempt(delivery, attempt)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                last_error = type(exc).__name__
            except Exception as exc:  # a bug, or an error we did not foresee: do not retry blindly
                logger.debug("webhook attempt raised", exc_info=True)
                self._finish(delivery, "failed", type(exc).__name__, attempt)
                return
            else:
                if 200 <= status < 300:
                    self._report("delivered")
                    return
                if status not in (408, 429) and status < 500:
                    self._finish(delivery, "rejected", f"HTTP {status}", attempt)
                    return
                last_error = f"HTTP {status}"
                if status in (429, 503):
                    delay_s = _retry_after_s(retry_after, self._max_backoff_s)
            if attempt == self._max_attempts:
                break
            self._report("retried")
            if delay_s is None:
                delay_s = backoff_s(attempt - 1, self._first_backoff_s, self._max_backoff_s)
            await asyncio.sleep(delay_s)
        self._finish(delivery, "failed", last_error, self._max_attempts)

    async def _attempt(self, delivery: _Delivery, attempt: int) -> tuple[int, str | None]:
        """One POST. Returns the status and the ``Retry-After`` header; raises what aiohttp raises."""
        assert self._session is not None and self._slots is not None
        async with self._slots:
            async with self._session.post(
                delivery.url,
                data=delivery.body,
                headers={"Content-Type": "application/json", DELIVERY_HEADER: str(attempt)},
                allow_redirects=False,
            ) as response:
                return response.status, response.headers.get("Retry-After")

    def _finish(self, delivery: _Delivery, outcome: WebhookOutcome, error: str, attempts: int) -> None:
        logger.warning(
            "webhook delivery to %s for key %r %s: %s after %d attempt%s",
            delivery.log_url,
            delivery.key,
            outcome,
            error,
            attempts,
            "" if attempts == 1 else "s",
        )
        self._report(outcome)

    def _log_drop(self, key: str, log_url: str, reason: str) -> None:
        now = time.monotonic()
        if now - self._drop_logged_s < DROP_LOG_INTERVAL_S:
            self._drops_unlogged += 1
            return
        more = f" ({self._drops_unlogged} more dropped since the last report)" if self._drops_unlogged else ""
        logger.warning("webhook delivery to %s for key %r dropped: %s%s", log_url, key, reason, more)
        self._drop_logged_s = now
        self._drops_unlogged = 0

    def _report(self, outcome: WebhookOutcome) -> None:
        if self._on_outcome is None:
            return
        try:
            self._on_outcome(outcome)
        except Exception:
            if not self._hook_failed:
                self._hook_failed = True
                logger.exception("the webhook on_outcome hook raised (logged once; delivery goes on)")

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop taking deliveries, deliver what is queued for at most ``timeout_s``, give up on the rest.

        What is given up on (in progress or still waiting) is reported as ``dropped`` and logged once.
        A second call waits for the first to finish.

        Args:
            timeout_s: how long to keep delivering before giving up.
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            tasks = list(self._tasks.values())
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=max(timeout_s, 0.0))
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            abandoned = self._queued
            keys = len(self._queues)
            self._queues.clear()
            self._tasks.clear()  # a task cancelled before it ran never reached its own clean-up
            self._queued = 0
            if abandoned:
                logger.warning(
                    "webhook sender closed: gave up on %d deliveries for %d keys after %.1f s",
                    abandoned,
                    keys,
                    timeout_s,
                )
                for _ in range(abandoned):
                    self._report("dropped")
        finally:
            if self._session is not None:
                await self._session.close()
            self._closed.set()
