"""Webhook delivery against a real aiohttp server on 127.0.0.1, and the URL checks."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from stream_server.webhook import (
    DELIVERY_HEADER,
    JITTER,
    WebhookSender,
    backoff_s,
    parse_webhook_url,
    webhook_url_allowed,
)
from tests.conftest import scaled

LOGGER = "stream_server.webhook"


@dataclass(frozen=True)
class Hang:
    """Answer only once ``gate`` is set (the receiver sets every gate at teardown), then with ``status``."""

    gate: asyncio.Event
    status: int = 200


@dataclass(frozen=True)
class Answer:
    """Answer with a status and headers."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)


Action = int | Answer | Hang


@dataclass(frozen=True)
class Received:
    """One request as the receiver saw it."""

    path: str
    query: str
    headers: dict[str, str]
    body: Any
    at_s: float


class Receiver:
    """A webhook receiver: records each request, answers per path from a plan (200 when the plan is out)."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.plans: dict[str, list[Action]] = {}
        self.forever: dict[str, Action] = {}
        self.gates: list[asyncio.Event] = []
        self.port = 0

    def url(self, path: str = "/hook", query: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}" + (f"?{query}" if query else "")

    def gate(self) -> asyncio.Event:
        event = asyncio.Event()
        self.gates.append(event)
        return event

    def bodies(self, path: str) -> list[Any]:
        return [r.body for r in self.requests if r.path == path]

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.requests.append(
            Received(
                request.path, request.query_string, dict(request.headers), json.loads(raw), time.monotonic()
            )
        )
        plan = self.plans.get(request.path)
        action: Action = plan.pop(0) if plan else self.forever.get(request.path, 200)
        if isinstance(action, Hang):
            await action.gate.wait()
            action = action.status
        if isinstance(action, int):
            action = Answer(action)
        return web.Response(status=action.status, headers=action.headers)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A running receiver on 127.0.0.1, port 0."""
    recv = Receiver()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", recv.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    recv.port = runner.addresses[0][1]
    try:
        yield recv
    finally:
        for gate in recv.gates:
            gate.set()
        await runner.cleanup()


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait (bounded, scaled) until ``condition()`` holds."""
    deadline = time.monotonic() + scaled(timeout_s)
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def sender(outcomes: list[str], **options: Any) -> WebhookSender:
    """A sender with small backoffs that records its outcomes."""
    settings: dict[str, Any] = {"first_backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": scaled(5.0)}
    settings.update(options)
    return WebhookSender(on_outcome=outcomes.append, **settings)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


async def test_delivers_json_with_headers(receiver: Receiver) -> None:
    """A payload arrives as its JSON body with Content-Type, User-Agent, attempt number and the query."""
    outcomes: list[str] = []
    hooks = sender(outcomes, user_agent="test-agent/1")
    await hooks.start()
    payload = {"call": "CA1", "text": "héllo", "final": True, "words": [1, 2]}
    assert hooks.send("CA1", receiver.url("/hook", "token=abc"), payload)
    await wait_until(lambda: outcomes == ["delivered"])
    await hooks.close()
    (got,) = receiver.requests
    assert got.body == payload
    assert got.query == "token=abc"
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["User-Agent"] == "test-agent/1"
    assert got.headers[DELIVERY_HEADER] == "1"
    assert hooks.queued == 0


async def test_payload_is_serialized_when_sent(receiver: Receiver) -> None:
    """A payload changed after send() is delivered as it was when sent."""
    outcomes: list[str] = []
    hooks = sender(outcomes)
    payload: dict[str, Any] = {"text": "before"}
    assert hooks.send("CA1", receiver.url(), payload)  # queued before start: delivered once started
    payload["text"] = "after"
    await hooks.start()
    await wait_until(lambda: outcomes == ["delivered"])
    await hooks.close()
    assert receiver.bodies("/hook") == [{"text": "before"}]


async def test_order_per_key_under_retries(receiver: Receiver) -> None:
    """A retrying delivery holds back the later ones of its key, in order, but not those of other keys."""
    outcomes: list[str] = []
    hooks = sender(outcomes)
    await hooks.start()
    second_failure = receiver.gate()
    receiver.plans["/a"] = [500, Hang(second_failure, 500)]
    for n in range(3):
        assert hooks.send("A", receiver.url("/a"), {"n": n})
    for n in range(2):
        assert hooks.send("B", receiver.url("/b"), {"n": n})
    # A's first delivery waits in its second attempt: B's are delivered meanwhile, A's later ones wait.
    await wait_until(lambda: len(receiver.bodies("/b")) == 2 and len(receiver.bodies("/a")) == 2)
    assert receiver.bodies("/a") == [{"n": 0}, {"n": 0}]
    assert hooks.queued == 3
    second_failure.set()
    await wait_until(lambda: outcomes.count("delivered") == 5)
    await hooks.close()
    assert receiver.bodies("/a") == [{"n": 0}, {"n": 0}, {"n": 0}, {"n": 1}, {"n": 2}]
    assert [r.headers[DELIVERY_HEADER] for r in receiver.requests if r.path == "/a"] == [
        "1",
        "2",
        "3",
        "1",
        "1",
    ]
    assert receiver.bodies("/b") == [{"n": 0}, {"n": 1}]
    assert outcomes.count("retried") == 2


@pytest.mark.parametrize("status", [400, 403, 404, 422, 307])
async def test_final_answers_are_not_retried(
    receiver: Receiver, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A 4xx other than 408/429 (or a redirect, not followed) is rejected at once; the key goes on."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    outcomes: list[str] = []
    hooks = sender(outcomes)
    await hooks.start()
    receiver.plans["/hook"] = [Answer(status, {"Location": receiver.url("/elsewhere")})]
    assert hooks.send("CA1", receiver.url(), {"n": 0})
    assert hooks.send("CA1", receiver.url(), {"n": 1})
    await wait_until(lambda: len(outcomes) == 2)
    await hooks.close()
    assert outcomes == ["rejected", "delivered"]
    assert receiver.bodies("/hook") == [{"n": 0}, {"n": 1}]
    assert receiver.bodies("/elsewhere") == []
    assert any(f"HTTP {status}" in m and "rejected" in m for m in warnings_of(caplog))


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503])
async def test_retryable_answers_are_retried(receiver: Receiver, status: int) -> None:
    """408, 429 and 5xx are retried, and the next attempt says it is attempt 2."""
    outcomes: list[str] = []
    hooks = sender(outcomes)
    await hooks.start()
    receiver.plans["/hook"] = [status]
    assert hooks.send("CA1", receiver.url(), {"n": 0})
    await wait_until(lambda: "delivered" in outcomes)
    await hooks.close()
    assert outcomes == ["retried", "delivered"]
    assert [r.headers[DELIVERY_HEADER] for r in receiver.requests] == ["1", "2"]


async def test_gives_up_after_max_attempts(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    """After max_attempts failures the delivery is failed, logged once without the query or user info."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    outcomes: list[str] = []
    hooks = sender(outcomes, max_attempts=3)
    await hooks.start()
    receiver.forever["/hook"] = 500
    assert hooks.send("CA-secret-test", receiver.url("/hook", "token=s3cr3t"), {"n": 0})
    await wait_until(lambda: "failed" in outcomes)
    await hooks.close()
    assert outcomes == ["retried", "retried", "failed"]
    assert len(receiver.requests) == 3
    (message,) = warnings_of(caplog)
    assert f"http://127.0.0.1:{receiver.port}/hook " in message
    assert "CA-secret-test" in message and "HTTP 500" in message and "3 attempts" in message
    assert "s3cr3t" not in message and "token" not in message


async def test_connection_errors_are_retried_then_failed(caplog: pytest.LogCaptureFixture) -> None:
    """A URL where nothing listens is retried and then failed, logged with the exception's class."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    outcomes: list[str] = []
    hooks = sender(outcomes, max_attempts=2)
    await hooks.start()
    assert hooks.send("CA1", f"http://127.0.0.1:{port}/hook?token=s3cr3t", {"n": 0})
    await wait_until(lambda: "failed" in outcomes)
    await hooks.close()
    assert outcomes == ["retried", "failed"]
    (message,) = warnings_of(caplog)
    assert "Error" in message and "2 attempts" in message and "s3cr3t" not in message


async def test_timeout_per_attempt(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    """An attempt that gets no answer within timeout_s is abandoned and retried."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    outcomes: list[str] = []
    hooks = sender(outcomes, timeout_s=scaled(0.2), max_attempts=3)
    await hooks.start()
    receiver.plans["/slow"] = [Hang(receiver.gate())]
    receiver.forever["/never"] = Hang(receiver.gate())
    assert hooks.send("A", receiver.url("/slow"), {"n": 0})
    assert hooks.send("B", receiver.url("/never"), {"n": 0})
    await wait_until(lambda: "delivered" in outcomes and "failed" in outcomes)
    await hooks.close()
    assert sorted(outcomes) == ["delivered", "failed", "retried", "retried", "retried"]
    assert [r.headers[DELIVERY_HEADER] for r in receiver.requests if r.path == "/slow"] == ["1", "2"]
    assert len(receiver.bodies("/never")) == 3
    (message,) = warnings_of(caplog)
    assert "/never" in message and "Timeout" in message


async def test_retry_after_is_honoured(receiver: Receiver) -> None:
    """A 429 with a numeric Retry-After waits that long (when under max_backoff_s) before retrying."""
    outcomes: list[str] = []
    hooks = sender(outcomes, max_backoff_s=scaled(5.0))
    await hooks.start()
    receiver.plans["/hook"] = [Answer(429, {"Retry-After": "1"})]
    assert hooks.send("CA1", receiver.url(), {"n": 0})
    await wait_until(lambda: "delivered" in outcomes)
    await hooks.close()
    first, second = receiver.requests
    assert second.at_s - first.at_s >= 0.95  # a lower bound: a sleep never ends early


@pytest.mark.parametrize("retry_after", ["3600", "Wed, 21 Oct 2099 07:28:00 GMT", "-5", "nan"])
async def test_retry_after_is_bounded(receiver: Receiver, retry_after: str) -> None:
    """A Retry-After beyond max_backoff_s, or not a number of seconds, never stretches the wait past it."""
    outcomes: list[str] = []
    hooks = sender(outcomes, max_backoff_s=0.05)
    await hooks.start()
    receiver.plans["/hook"] = [Answer(503, {"Retry-After": retry_after})]
    assert hooks.send("CA1", receiver.url(), {"n": 0})
    await wait_until(lambda: "delivered" in outcomes)  # an hour's wait would time this out
    await hooks.close()
    assert outcomes == ["retried", "delivered"]


async def test_queue_bound_drops(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    """Beyond max_queued held deliveries, send() returns False and drops, logging once per interval."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    outcomes: list[str] = []
    hooks = sender(outcomes, max_queued=2)
    await hooks.start()
    gate = receiver.gate()
    receiver.plans["/hook"] = [Hang(gate)]
    assert hooks.send("A", receiver.url("/hook", "token=s3cr3t"), {"n": 0})
    assert hooks.send("B", receiver.url("/hook", "token=s3cr3t"), {"n": 1})
    assert hooks.queued == 2
    for n in range(50):
        assert not hooks.send(f"C{n}", receiver.url("/hook", "token=s3cr3t"), {"n": n})
    assert outcomes == ["dropped"] * 50
    (message,) = warnings_of(caplog)
    assert "dropped" in message and "C0" in message and f"127.0.0.1:{receiver.port}/hook" in message
    assert "s3cr3t" not in message
    gate.set()
    await wait_until(lambda: hooks.queued == 0)
    assert hooks.send("D", receiver.url(), {"n": 2})  # room again
    await wait_until(lambda: outcomes.count("delivered") == 3)
    await hooks.close()


async def test_close_delivers_what_is_queued(receiver: Receiver) -> None:
    """close() delivers what is queued before it returns, and send() afterwards is refused."""
    outcomes: list[str] = []
    hooks = sender(outcomes)
    await hooks.start()
    receiver.plans["/hook"] = [500]
    for n in range(3):
        assert hooks.send("CA1", receiver.url(), {"n": n})
    assert hooks.send("CA2", receiver.url(), {"n": 3})
    await asyncio.wait_for(hooks.close(timeout_s=scaled(5.0)), scaled(10.0))
    assert outcomes.count("delivered") == 4
    assert sorted(b["n"] for b in receiver.bodies("/hook")) == [0, 0, 1, 2, 3]
    assert not hooks.send("CA1", receiver.url(), {"n": 4})
    assert outcomes[-1] == "dropped"
    assert hooks.queued == 0


async def test_close_gives_up_on_a_server_that_never_answers(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """close() gives up after its timeout on deliveries that cannot finish, counting them as dropped."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    outcomes: list[str] = []
    hooks = sender(outcomes, timeout_s=scaled(60.0))
    await hooks.start()
    receiver.forever["/hook"] = Hang(receiver.gate())
    assert hooks.send("A", receiver.url(), {"n": 0})
    assert hooks.send("A", receiver.url(), {"n": 1})
    assert hooks.send("B", receiver.url(), {"n": 2})
    await wait_until(lambda: len(receiver.requests) == 2)  # A's first and B's are in flight
    await asyncio.wait_for(hooks.close(timeout_s=0.2), scaled(10.0))
    assert outcomes == ["dropped"] * 3
    assert hooks.queued == 0
    assert any("gave up on 3 deliveries for 2 keys" in m for m in warnings_of(caplog))
    await asyncio.wait_for(hooks.close(), scaled(5.0))  # a second close returns at once


async def test_close_before_start_drops_what_was_queued() -> None:
    """A sender closed without being started reports what was queued as dropped."""
    outcomes: list[str] = []
    hooks = sender(outcomes)
    assert hooks.send("CA1", "http://127.0.0.1:9/hook", {"n": 0})
    await hooks.close()
    assert outcomes == ["dropped"]
    with pytest.raises(RuntimeError):
        await hooks.start()


async def test_idle_key_leaves_no_task(receiver: Receiver) -> None:
    """Once a key's queue is empty its delivery task ends."""
    outcomes: list[str] = []
    hooks = sender(outcomes)
    await hooks.start()
    for key in ("A", "B", "C"):
        assert hooks.send(key, receiver.url(), {"key": key})

    def delivery_tasks() -> int:
        return sum(1 for t in asyncio.all_tasks() if t.get_name() == "webhook-delivery" and not t.done())

    assert delivery_tasks() == 3
    await wait_until(lambda: outcomes.count("delivered") == 3 and delivery_tasks() == 0)
    assert hooks.send("A", receiver.url(), {"key": "A"})  # a key seen before starts again
    await wait_until(lambda: outcomes.count("delivered") == 4)
    await hooks.close()


async def test_raising_on_outcome_does_not_break_delivery(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """An on_outcome hook that raises is logged once and deliveries go on."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    calls: list[str] = []

    def hook(outcome: str) -> None:
        calls.append(outcome)
        raise RuntimeError("metrics broke")

    hooks = WebhookSender(first_backoff_s=0.01, max_backoff_s=0.05, on_outcome=hook)
    await hooks.start()
    receiver.plans["/hook"] = [500]
    for n in range(3):
        assert hooks.send("CA1", receiver.url(), {"n": n})
    await wait_until(lambda: calls.count("delivered") == 3)
    await hooks.close()
    assert receiver.bodies("/hook") == [{"n": 0}, {"n": 0}, {"n": 1}, {"n": 2}]
    errors = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.ERROR]
    assert len(errors) == 1 and "on_outcome" in errors[0].getMessage()


@pytest.mark.parametrize(
    ("url", "payload"),
    [
        ("ftp://127.0.0.1/hook", {"n": 0}),
        ("http://user:pw@127.0.0.1/hook", {"n": 0}),
        ("not a url", {"n": 0}),
        ("http://127.0.0.1/hook", {"n": object()}),
        ("http://127.0.0.1/hook", {"n": float("nan")}),
    ],
)
async def test_send_refuses_what_cannot_be_sent(url: str, payload: dict[str, Any]) -> None:
    """send() returns False (outcome rejected) for a URL or payload that cannot be sent, and never raises."""
    outcomes: list[str] = []
    hooks = sender(outcomes)
    await hooks.start()
    assert not hooks.send("CA1", url, payload)
    assert outcomes == ["rejected"]
    assert hooks.queued == 0
    await hooks.close()


@pytest.mark.parametrize(
    "options",
    [
        {"max_attempts": 0},
        {"first_backoff_s": -1.0},
        {"first_backoff_s": 2.0, "max_backoff_s": 1.0},
        {"timeout_s": 0.0},
        {"timeout_s": float("inf")},
        {"max_queued": 0},
    ],
)
def test_bad_options_are_refused(options: dict[str, Any]) -> None:
    """Out-of-range limits raise ValueError naming the argument."""
    with pytest.raises(ValueError, match=next(iter(options))):
        WebhookSender(**options)


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    """The backoff doubles per retry within +-20 % jitter, never exceeds the cap, and varies."""
    for retry in range(10):
        base = min(0.5 * 2**retry, 8.0)
        low = backoff_s(retry, 0.5, 8.0, rand=0.0)
        high = backoff_s(retry, 0.5, 8.0, rand=0.999999)
        assert low == pytest.approx(base * (1 - JITTER))
        assert high == pytest.approx(min(base * (1 + JITTER), 8.0), rel=1e-5)
        samples = [backoff_s(retry, 0.5, 8.0) for _ in range(200)]
        assert all(low <= s <= high for s in samples)
        assert len(set(samples)) > 1
    assert backoff_s(1000, 0.5, 8.0) <= 8.0


ALLOWED = ["hooks.example.com", "*.calls.example.org", "api.example.net:8443", "[::1]:8080", "plain.test"]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://hooks.example.com/t?token=1", True),
        ("https://HOOKS.Example.COM/t", True),
        ("https://hooks.example.com./t", True),
        ("http://hooks.example.com:9000/t", True),  # an entry without a port allows any port
        ("https://evil-hooks.example.com/t", False),
        ("https://hooks.example.com.evil.com/t", False),
        ("https://a.calls.example.org/t", True),
        ("https://a.b.calls.example.org/t", True),
        ("https://calls.example.org/t", False),
        ("https://xcalls.example.org/t", False),
        ("https://api.example.net:8443/t", True),
        ("https://api.example.net/t", False),
        ("http://api.example.net:8080/t", False),
        ("http://[::1]:8080/t", True),
        ("http://[::1]/t", False),
        ("https://user:pw@hooks.example.com/t", False),
        ("https://user@hooks.example.com/t", False),
        ("https://@hooks.example.com/t", False),
        ("https://hooks.example.com\\@evil.com/t", False),
        ("https://evil.com\\@hooks.example.com/t", False),
        ("ftp://hooks.example.com/t", False),
        ("javascript://hooks.example.com/t", False),
        ("hooks.example.com/t", False),
        ("https:///t", False),
        ("https://hooks.example.com:99999/t", False),
        ("https://hooks.example.com:x/t", False),
        ("https://%68ooks.example.com/t", False),
        ("https://hooks.example.com /t", False),
        ("", False),
        ("http://plain.test:80/", True),
    ],
)
def test_webhook_url_allowed(url: str, expected: bool) -> None:
    """Only http(s) URLs without user info whose host (and port, where the entry has one) is listed pass."""
    assert webhook_url_allowed(url, ALLOWED) is expected


@pytest.mark.parametrize(
    ("url", "entry", "expected"),
    [
        ("http://hooks.example.com/t", "hooks.example.com:80", True),
        ("https://hooks.example.com/t", "hooks.example.com:443", True),
        ("https://hooks.example.com/t", "hooks.example.com:80", False),
        ("https://hooks.example.com:443/t", "hooks.example.com:443", True),
        ("https://a.example.com:8443/t", "*.example.com:8443", True),
        ("https://a.example.com/t", "*.example.com:8443", False),
        ("https://hooks.example.com/t", "HOOKS.EXAMPLE.COM.", True),
        ("https://hooks.example.com/t", "*", False),
        ("https://hooks.example.com/t", "*example.com", False),
        ("https://hooks.example.com/t", "hooks.*.com", False),
        ("https://hooks.example.com/t", "hooks.example.com:x", False),
    ],
)
def test_webhook_url_allowed_entries(url: str, entry: str, expected: bool) -> None:
    """Entries match with default ports, case and trailing dots ignored; malformed entries match nothing."""
    assert webhook_url_allowed(url, [entry]) is expected


def test_webhook_url_allowed_with_no_entries() -> None:
    """An empty allowlist allows nothing."""
    assert not webhook_url_allowed("https://hooks.example.com/t", [])


def test_parse_webhook_url_accepts_http_and_https() -> None:
    """A good http or https URL comes back, stripped of surrounding whitespace."""
    assert (
        parse_webhook_url(" https://hooks.example.com/t?token=1\n") == "https://hooks.example.com/t?token=1"
    )
    assert parse_webhook_url("http://127.0.0.1:8080/") == "http://127.0.0.1:8080/"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://hooks.example.com/t?token=s3cr3t", "http:// or https://"),
        ("hooks.example.com/t?token=s3cr3t", "http:// or https://"),
        ("https:///t?token=s3cr3t", "no host"),
        ("https://user:s3cr3t@hooks.example.com/t", "user name or password"),
        ("https://hooks.example.com:0/t?token=s3cr3t", "port"),
        ("https://hooks.example.com:70000/t?token=s3cr3t", "port"),
        ("https://hooks example.com/t?token=s3cr3t", "spaces"),
        ("https://hooks.exa%6dple.com/t?token=s3cr3t", "host"),
    ],
)
def test_parse_webhook_url_names_the_problem(url: str, problem: str) -> None:
    """A bad URL raises ValueError with a sentence naming the problem, without echoing the URL's secret."""
    with pytest.raises(ValueError, match=problem) as caught:
        parse_webhook_url(url)
    assert "s3cr3t" not in str(caught.value)
    assert str(caught.value).endswith(".")
