"""Call-centre audio through a real server on 127.0.0.1: Twilio Media Streams in (the replay client
written from Twilio's documented messages), results out to a real webhook receiver and to a socket
following the call; a fake engine below."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from stream_server.compat import timeout
from stream_server.config import CallsConfig, Config
from stream_server.testing.twilio_replay import TwilioCallAudio, mulaw_encode, replay_call

from .conftest import scaled
from .fakes import FakeEngine
from .serving import collect, running_server
from .synth import silence, tone

pytestmark = pytest.mark.e2e

RATE_8K = 8000
# The caller speaks from 0.5 to 2.0 s, the agent from 2.5 to 3.5 s.
INBOUND = np.concatenate([silence(500, rate=RATE_8K), tone(1500, rate=RATE_8K), silence(2500, rate=RATE_8K)])
OUTBOUND = np.concatenate(
    [silence(2500, rate=RATE_8K), tone(1000, freq_hz=330, rate=RATE_8K), silence(1000, rate=RATE_8K)]
)
CALL = TwilioCallAudio(INBOUND, OUTBOUND)


class Receiver:
    """A real webhook receiver on 127.0.0.1 that records every POSTed JSON body."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.changed = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        self.headers.append(dict(request.headers))
        self.changed.set()
        return web.Response(status=204)

    async def wait_for(self, predicate: Any, timeout_s: float = 30.0) -> None:
        async with timeout(scaled(timeout_s)):
            while not predicate(self.bodies):
                self.changed.clear()
                await self.changed.wait()


@asynccontextmanager
async def webhook_receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    receiver.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield receiver
    finally:
        await runner.cleanup()


def calls_config(**calls: Any) -> Config:
    return Config(calls=CallsConfig(**calls))


def finals(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m.get("type") == "Results" and m["is_final"] and m["segment_id"]]


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise KeyError(name)


async def wait_for_call(base: str, call_sid: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, timeout(scaled(20)):
        while True:
            async with http.get(f"{base}/v1/calls") as response:
                listed = (await response.json())["calls"]
            for call in listed:
                if call["call_sid"] == call_sid:
                    return dict(call)
            await asyncio.sleep(0.02)


async def test_a_two_track_call_reaches_the_webhook_and_a_follower_per_track() -> None:
    """A both_tracks call's caller finals come back on channel_index [0, 2] as track inbound and the
    agent's on [1, 2] as outbound, on the webhook and on a socket following the call; Twilio's socket
    gets nothing back and is closed with 1000 after stop."""
    async with (
        webhook_receiver() as hook,
        running_server(FakeEngine(), calls_config(webhook_url=hook.url)) as (_, url),
    ):
        base = url.replace("ws://", "http://")
        replay = asyncio.ensure_future(
            replay_call(f"{url}/v1/twilio", CALL, speed=4.0, call_sid="CA" + "1" * 32, custom_parameters={})
        )
        listed = await wait_for_call(base, "CA" + "1" * 32)
        assert listed["tracks"] == ["inbound", "outbound"] and listed["channels"] == 2
        async with connect(f"{url}/v1/calls/{'CA' + '1' * 32}") as follower:
            followed = await collect(follower)
        report = await replay
        assert report.close_code == 1000 and report.binary_frames_received == 0
        assert report.received_text == (), "nothing is sent to Twilio"
        assert followed.close_code == 1000
        assert followed.messages[0]["type"] == "Call"
        assert followed.messages[-1]["type"] == "Metadata"
        await hook.wait_for(lambda bodies: any(b.get("type") == "Metadata" for b in bodies))
    for messages in (followed.messages, hook.bodies):
        got = finals(messages)
        by_track = {m["twilio"]["track"]: m for m in got}
        assert sorted(by_track) == ["inbound", "outbound"] and len(got) == 2, got
        inbound, outbound = by_track["inbound"], by_track["outbound"]
        assert inbound["channel_index"] == [0, 2] and outbound["channel_index"] == [1, 2]
        assert inbound["start"] < 0.5 < 2.0 < inbound["start"] + inbound["duration"] < 2.5
        assert outbound["start"] < 2.5 < 3.5 < outbound["start"] + outbound["duration"]
        assert all(m["twilio"]["callSid"] == "CA" + "1" * 32 for m in got)
    assert [b["type"] for b in hook.bodies][-1] == "Metadata"
    assert hook.bodies[-1]["channels"] == 2


async def test_the_twilio_signature_is_checked_with_the_auth_token() -> None:
    """With --twilio-auth-token, an unsigned or wrongly signed upgrade gets 403 and a signed one streams."""
    token = "twilio-auth-token-0123456789abcdef"
    async with running_server(FakeEngine(), calls_config(twilio_auth_token=token)) as (_, url):
        for headers in ({}, {"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"}):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(f"{url}/v1/twilio", additional_headers=headers):
                    pass
            assert refused.value.response.status_code == 403
            assert json.loads(refused.value.response.body)["code"] == "TWILIO_SIGNATURE_INVALID"
        wrong = await _refused_replay(f"{url}/v1/twilio", auth_token="some-other-token")
        assert wrong == 403
        report = await replay_call(f"{url}/v1/twilio", CALL, speed=0, auth_token=token)
        assert report.close_code == 1000


async def _refused_replay(url: str, auth_token: str) -> int:
    try:
        await replay_call(url, CALL, speed=0, auth_token=auth_token)
    except InvalidStatus as exc:
        return exc.response.status_code
    return 0


async def test_a_server_with_api_keys_refuses_twilio_without_its_auth_token() -> None:
    """A server that requires API keys refuses /v1/twilio (Twilio cannot send a key) unless it checks
    Twilio's signature instead."""
    from stream_server.config import AuthConfig

    config = Config(auth=AuthConfig(api_keys=("k1:secret-key-0123456789abcdef",)))
    async with running_server(FakeEngine(), config) as (_, url):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{url}/v1/twilio"):
                pass
        assert refused.value.response.status_code == 403
        assert json.loads(refused.value.response.body)["code"] == "TWILIO_AUTH_NOT_CONFIGURED"
        async with aiohttp.ClientSession() as http:
            async with http.get(url.replace("ws://", "http://") + "/v1/calls") as response:
                assert response.status == 401, "the live calls are listed only to a key holder"
            headers = {"Authorization": "Token secret-key-0123456789abcdef"}
            async with http.get(url.replace("ws://", "http://") + "/v1/calls", headers=headers) as response:
                assert response.status == 200 and (await response.json()) == {"calls": []}


async def test_bad_twilio_input_is_counted_and_the_call_goes_on() -> None:
    """Media before start, an unknown event, bad base64 and a binary frame are skipped and counted;
    the call's finals still come, and a second call at the same time is undisturbed."""
    async with running_server(FakeEngine()) as (server, url):
        call_sid = "CA" + "2" * 32
        messages = list(CALL.messages(call_sid, "MZ" + "2" * 32, "AC" + "2" * 32, {}))
        bad = [
            json.dumps(
                {
                    "event": "media",
                    "media": {
                        "track": "inbound",
                        "chunk": "1",
                        "timestamp": "0",
                        "payload": base64.b64encode(b"\xff" * 160).decode(),
                    },
                }
            ),
            json.dumps({"event": "mystery", "streamSid": "MZ"}),
        ]
        broken_payload = json.dumps(
            {
                "event": "media",
                "streamSid": "MZ",
                "media": {"track": "inbound", "chunk": "9", "timestamp": "100", "payload": "%%%"},
            }
        )
        other = asyncio.ensure_future(
            replay_call(f"{url}/v1/twilio", CALL, speed=0, call_sid="CA" + "3" * 32)
        )
        async with connect(f"{url}/v1/twilio") as ws:
            await ws.send(bad[0])  # media before start
            for _, text in messages[:2]:  # connected, start
                await ws.send(text)
            await ws.send(bad[1])
            await ws.send(broken_payload)
            await ws.send(b"\x00\x01")
            feed = None
            async with timeout(scaled(10)):
                while feed is None:
                    await asyncio.sleep(0.01)
                    feed = server.calls.get(call_sid)
            async with connect(f"{url}/v1/calls/{call_sid}") as follower:
                for _, text in messages[2:]:
                    await ws.send(text)
                followed = await collect(follower)
            await ws.wait_closed()
            assert ws.close_code == 1000
        other_report = await other
        assert other_report.close_code == 1000
        async with aiohttp.ClientSession() as http:
            async with http.get(url.replace("ws://", "http://") + "/metrics") as response:
                text = await response.text()
    assert len(finals(followed.messages)) == 2
    for code in ("MEDIA_BEFORE_START", "UNKNOWN_EVENT", "BAD_PAYLOAD", "UNEXPECTED_BINARY"):
        assert metric(text, "stream_twilio_input_errors_total", code=code) == 1, code


async def test_a_call_whose_socket_closes_without_stop_still_delivers_its_finals() -> None:
    """When Twilio's socket closes without stop, what the call sent is finalized and delivered to
    its follower, then Metadata, then a close with 1000."""
    async with running_server(FakeEngine()) as (server, url):
        call_sid = "CA" + "4" * 32
        messages = [text for _, text in CALL.messages(call_sid, "MZ" + "4" * 32, "AC" + "4" * 32, {})]
        media = [m for m in messages if json.loads(m)["event"] == "media"]
        # up to 1.6 s of audio: the caller is still speaking when the line drops
        cut = [m for m in media if int(json.loads(m)["media"]["timestamp"]) < 1600]
        async with connect(f"{url}/v1/twilio") as ws:
            for text in messages[:2]:
                await ws.send(text)
            async with timeout(scaled(10)):
                while server.calls.get(call_sid) is None:
                    await asyncio.sleep(0.01)
            follower = await connect(f"{url}/v1/calls/{call_sid}")
            for text in cut:
                await ws.send(text)
        followed = await collect(follower)
    got = finals(followed.messages)
    assert [m["twilio"]["track"] for m in got] == ["inbound"], got
    assert got[0]["from_finalize"] and got[0]["start"] + got[0]["duration"] == pytest.approx(1.6, abs=0.05)
    assert followed.messages[-1]["type"] == "Metadata" and followed.close_code == 1000


async def test_lost_chunks_become_silence_and_times_stay_on_the_call_clock() -> None:
    """Chunks lost on the way (a gap in timestamps) are filled with silence, so the agent's final still
    starts where the agent spoke on the call's clock."""
    async with running_server(FakeEngine()) as (server, url):
        call_sid = "CA" + "5" * 32
        lost = [("outbound", n) for n in range(20, 60)]  # 0.8 s of the agent's silence lost
        task = asyncio.ensure_future(
            replay_call(f"{url}/v1/twilio", CALL, speed=0, call_sid=call_sid, drop_chunks=lost)
        )
        async with timeout(scaled(10)):
            while server.calls.get(call_sid) is None:
                await asyncio.sleep(0.005)
        async with connect(f"{url}/v1/calls/{call_sid}") as follower:
            followed = await collect(follower)
        await task
    outbound = [m for m in finals(followed.messages) if m["twilio"]["track"] == "outbound"]
    assert len(outbound) == 1
    assert outbound[0]["start"] < 2.5 < 3.5 < outbound[0]["start"] + outbound[0]["duration"]


async def test_a_calls_own_webhook_must_be_on_the_allowed_hosts() -> None:
    """A call's webhook_url parameter is used when its host is allowed; another host is refused
    (counted) and the call's results go nowhere but its followers."""
    async with webhook_receiver() as hook:
        allowed = CallsConfig(webhook_allowed_hosts="127.0.0.1:" + hook.url.split(":")[2].split("/")[0])
        async with running_server(FakeEngine(), Config(calls=allowed)) as (server, url):
            await replay_call(f"{url}/v1/twilio", CALL, speed=0, custom_parameters={"webhook_url": hook.url})
            await hook.wait_for(lambda bodies: any(b.get("type") == "Metadata" for b in bodies))
            assert len(finals(hook.bodies)) == 2
            before = len(hook.bodies)
            await replay_call(
                f"{url}/v1/twilio",
                CALL,
                speed=0,
                custom_parameters={"webhook_url": hook.url.replace("127.0.0.1", "localhost")},
            )
            await asyncio.sleep(scaled(0.5))
            assert len(hook.bodies) == before
            async with aiohttp.ClientSession() as http:
                async with http.get(url.replace("ws://", "http://") + "/metrics") as response:
                    text = await response.text()
            assert metric(text, "stream_twilio_input_errors_total", code="WEBHOOK_NOT_ALLOWED") == 1


async def test_call_options_come_from_custom_parameters_over_the_servers_defaults() -> None:
    """customParameters set a call's options (interim_results) over --twilio-options; an invalid one
    is counted and left at its default."""
    config = calls_config(twilio_options="interim_results=false&language=en")
    async with running_server(FakeEngine(), config) as (server, url):
        call_sid = "CA" + "6" * 32
        task = asyncio.ensure_future(
            replay_call(
                f"{url}/v1/twilio",
                CALL,
                speed=2.0,
                call_sid=call_sid,
                custom_parameters={"interim_results": "true", "language": "klingon", "agent": "42"},
            )
        )
        listed = await wait_for_call(url.replace("ws://", "http://"), call_sid)
        assert listed["custom_parameters"] == {
            "interim_results": "true",
            "language": "klingon",
            "agent": "42",
        }
        async with connect(f"{url}/v1/calls/{call_sid}") as follower:
            followed = await collect(follower)
        await task
        async with aiohttp.ClientSession() as http:
            async with http.get(url.replace("ws://", "http://") + "/metrics") as response:
                text = await response.text()
    assert metric(text, "stream_twilio_input_errors_total", code="BAD_PARAMETER") == 1
    interims = [m for m in followed.messages if m.get("type") == "Results" and not m["is_final"]]
    assert interims, "the call asked for interims"
    assert all(m["twilio"]["track"] in ("inbound", "outbound") for m in interims)


async def test_following_an_unknown_call_is_404() -> None:
    """/v1/calls/{callSid} of a call that is not live is refused with 404 CALL_NOT_FOUND."""
    async with running_server(FakeEngine()) as (_, url):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{url}/v1/calls/CA0000"):
                pass
        assert refused.value.response.status_code == 404
        assert json.loads(refused.value.response.body)["code"] == "CALL_NOT_FOUND"


def test_mulaw_of_the_replay_client_is_what_the_server_decodes() -> None:
    """The replay client's mu-law of silence is Twilio's 0xFF (a sanity check of the test audio)."""
    assert mulaw_encode(np.zeros(4, dtype=np.float32)) == b"\xff" * 4


async def test_a_call_that_goes_silent_ends_with_its_finals_then_idle_timeout() -> None:
    """A call that stops sending (no stop, socket open) is finalized at the idle timeout: its follower
    gets the final it is owed, then the fatal IDLE_TIMEOUT, then Metadata."""
    from stream_server.config import LimitsConfig

    config = Config(limits=LimitsConfig(idle_timeout_s=1.0))
    async with running_server(FakeEngine(), config) as (server, url):
        call_sid = "CA" + "8" * 32
        messages = [text for _, text in CALL.messages(call_sid, "MZ" + "8" * 32, "AC" + "8" * 32, {})]
        cut = [m for m in messages[2:] if int(json.loads(m).get("media", {}).get("timestamp", 10**6)) < 1600]
        async with connect(f"{url}/v1/twilio") as ws:
            for text in messages[:2]:
                await ws.send(text)
            async with timeout(scaled(10)):
                while server.calls.get(call_sid) is None:
                    await asyncio.sleep(0.01)
            async with connect(f"{url}/v1/calls/{call_sid}") as follower:
                for text in cut:
                    await ws.send(text)
                followed = await collect(follower)
            await ws.wait_closed()
            assert ws.close_code == 1008
    kinds = [m["type"] for m in followed.messages]
    assert kinds[-2:] == ["Error", "Metadata"] and followed.messages[-2]["code"] == "IDLE_TIMEOUT"
    assert [m["twilio"]["track"] for m in finals(followed.messages)] == ["inbound"]


async def test_admission_counts_a_call_as_its_tracks() -> None:
    """A both_tracks call counts as two streams of load while it runs, an inbound-only call as one."""
    async with running_server(FakeEngine()) as (server, url):
        for audio, sid, weight in (
            (CALL, "CA" + "a" * 32, 2),
            (TwilioCallAudio(INBOUND), "CA" + "b" * 32, 1),
        ):
            task = asyncio.ensure_future(replay_call(f"{url}/v1/twilio", audio, speed=2.0, call_sid=sid))
            await wait_for_call(url.replace("ws://", "http://"), sid)
            assert server.capacity is not None
            assert server.capacity.state(asyncio.get_running_loop().time()).sessions == weight
            await task
