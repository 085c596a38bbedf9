"""Fair limits and timeouts against hostile and broken clients (issue 8): pure rules, then a real
server on 127.0.0.1 with real clients from several loopback addresses."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from stream_server.config import AuthConfig, Config, LimitsConfig
from stream_server.engines.base import TranscribeRequest, Transcript
from stream_server.errors import ConfigError
from stream_server.limits import FairShare, client_address, parse_networks
from stream_server.testing.raw_ws import OP_BINARY, OP_TEXT, RawClient, frame
from stream_server.transport import Server

from .conftest import scaled
from .fakes import FakeEngine
from .serving import collect, running_server
from .synth import pcm16, silence, tone

# ----------------------------------------------------------------------------------------------
# Pure rules


def test_forwarded_for_is_ignored_from_an_untrusted_peer() -> None:
    """A client that is not a trusted proxy cannot choose its address with X-Forwarded-For."""
    trusted = parse_networks("10.0.0.0/8")
    assert client_address("203.0.113.7", ["198.51.100.1"], trusted) == "203.0.113.7"
    assert client_address("203.0.113.7", ["198.51.100.1"], ()) == "203.0.113.7"


def test_forwarded_for_from_trusted_proxies_gives_the_rightmost_untrusted_hop() -> None:
    """Behind trusted proxies the client is the right-most hop that is not itself a trusted proxy;
    a spoofed entry the client put on the left is not believed."""
    trusted = parse_networks("10.0.0.0/8, 127.0.0.1")
    assert client_address("10.1.2.3", ["198.51.100.1"], trusted) == "198.51.100.1"
    # client sent "X-Forwarded-For: 1.2.3.4"; the proxy appended the real peer
    assert client_address("10.1.2.3", ["1.2.3.4, 198.51.100.9"], trusted) == "198.51.100.9"
    # two proxies: the outer one is trusted too
    assert client_address("127.0.0.1", ["198.51.100.9", "10.0.0.5"], trusted) == "198.51.100.9"
    # every hop trusted: the left-most
    assert client_address("10.1.2.3", ["10.9.9.9"], trusted) == "10.9.9.9"
    # garbage from a trusted proxy: count the proxy itself
    assert client_address("10.1.2.3", ["not-an-ip"], trusted) == "10.1.2.3"
    assert client_address(None, [], trusted) == "unknown"


def test_bad_trusted_proxy_entry_is_a_config_error_naming_it() -> None:
    """A trusted_proxies entry that is not an address fails validation, naming the field and entry."""
    with pytest.raises(ConfigError, match="trusted_proxies.*'10.0.0.300'"):
        LimitsConfig(trusted_proxies="127.0.0.1, 10.0.0.300")


def test_fair_share_counts_per_address_and_per_key_and_forgets_empty_ones() -> None:
    """Limits apply per address and per key (a key's own limit beats the default); closing gives the
    seat back and leaves no entry behind."""
    fair = FairShare(max_per_ip=2, max_per_key=1)
    assert fair.refusal("a", None) is None
    fair.open("a", None)
    fair.open("a", "k1")
    refused = fair.refusal("a", None)
    assert refused is not None and refused.reason == "per_ip" and refused.code == "TOO_MANY_SESSIONS"
    refused = fair.refusal("b", "k1")
    assert refused is not None and refused.reason == "per_key"
    assert fair.refusal("b", "k1", key_max=3) is None
    assert fair.refusal("b", "k2") is None
    fair.close("a", "k1")
    fair.close("a", None)
    assert fair.addresses == 0 and fair.streams_of_key("k1") == 0
    assert fair.refusal("a", "k1") is None


# ----------------------------------------------------------------------------------------------
# A real server

SPEECH = pcm16(np.concatenate([silence(500), tone(1500), silence(1000)]))


def metric(server: Server, name: str, labels: Sequence[tuple[str, str]] = ()) -> float:
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(server.metrics.render().decode())
        for s in family.samples
    }
    return float(samples.get((name, tuple(sorted(labels))), 0.0))


def limits_config(**limits: object) -> Config:
    return replace(Config(), limits=replace(LimitsConfig(admission=False), **limits))


async def wait_until(condition: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + scaled(timeout_s)
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return True
        await asyncio.sleep(0.02)
    return bool(callable(condition) and condition())


async def test_per_address_limit_refuses_with_429_and_frees_on_close() -> None:
    """Beyond max_sessions_per_ip one address gets HTTP 429 TOO_MANY_SESSIONS with Retry-After, other
    addresses are unaffected, and the seat comes back when a stream ends."""
    async with running_server(FakeEngine(), limits_config(max_sessions_per_ip=1)) as (server, url):
        async with connect(f"{url}/v1/listen") as first:
            with pytest.raises(InvalidStatus) as info:
                async with connect(f"{url}/v1/listen"):
                    pass
            response = info.value.response
            assert response.status_code == 429
            assert json.loads(response.body or b"{}")["code"] == "TOO_MANY_SESSIONS"
            assert response.headers["Retry-After"]
            # another loopback address is another client
            async with connect(f"{url}/v1/listen", local_addr=("127.0.0.2", 0)) as other:
                await other.send(SPEECH)
                await other.send('{"type": "CloseStream"}')
                assert len((await collect(other)).finals()) == 1
            await first.send('{"type": "CloseStream"}')
            await collect(first)
        assert await wait_until(lambda: not server.connections, 5)
        async with connect(f"{url}/v1/listen") as again:
            await again.send(SPEECH)
            await again.send('{"type": "CloseStream"}')
            assert len((await collect(again)).finals()) == 1
        assert metric(server, "stream_sessions_rejected_total", [("reason", "per_ip")]) == 1


async def test_forwarded_for_counts_only_behind_a_trusted_proxy() -> None:
    """X-Forwarded-For separates clients only when the peer is a trusted proxy; otherwise a client
    that sends the header is still counted by its own address."""
    headers = {"X-Forwarded-For": "198.51.100.1"}
    other = {"X-Forwarded-For": "198.51.100.2"}
    async with running_server(FakeEngine(), limits_config(max_sessions_per_ip=1)) as (_, url):
        async with connect(f"{url}/v1/listen", additional_headers=headers):
            with pytest.raises(InvalidStatus) as info:
                async with connect(f"{url}/v1/listen", additional_headers=other):
                    pass
            assert info.value.response.status_code == 429
    config = limits_config(max_sessions_per_ip=1, trusted_proxies="127.0.0.1")
    async with running_server(FakeEngine(), config) as (_, url):
        async with connect(f"{url}/v1/listen", additional_headers=headers):
            async with connect(f"{url}/v1/listen", additional_headers=other):
                with pytest.raises(InvalidStatus) as info:
                    async with connect(f"{url}/v1/listen", additional_headers=headers):
                        pass
                assert info.value.response.status_code == 429


async def keepalives(ws: ClientConnection, seconds: float) -> bool:
    """Send KeepAlive every 0.1 s for ``seconds``; False when the server closed the stream first."""
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            await ws.send('{"type": "KeepAlive"}')
            await asyncio.sleep(0.1)
    except ConnectionClosed:
        return False
    return True


async def test_keepalive_alone_does_not_hold_a_stream_that_never_sent_audio() -> None:
    """A stream that sends only KeepAlive is closed after the no-audio timeout with NO_AUDIO and 1008,
    while one that has sent audio is held by KeepAlive."""
    config = limits_config(no_audio_timeout_s=0.5, idle_timeout_s=5.0)
    async with running_server(FakeEngine(), config) as (server, url):
        async with connect(f"{url}/v1/listen") as silent, connect(f"{url}/v1/listen") as talker:
            await talker.send(SPEECH[:3200])
            reader = asyncio.ensure_future(collect(silent, 10))
            silent_held, talker_held = await asyncio.gather(
                keepalives(silent, scaled(4)), keepalives(talker, 1.5)
            )
            result = await reader
            assert not silent_held and talker_held
            assert result.close_code == 1008
            assert [e["code"] for e in result.of_type("Error")] == ["NO_AUDIO"]
            await talker.send('{"type": "CloseStream"}')
            assert (await collect(talker)).close_code == 1000
        assert metric(server, "stream_sessions_total", [("outcome", "NO_AUDIO")]) == 1


async def test_max_session_length_counts_wall_clock_too() -> None:
    """max_session_s ends a stream that holds its seat on KeepAlive after a little audio."""
    async with running_server(FakeEngine(), limits_config(max_session_s=1.0)) as (_, url):
        async with connect(f"{url}/v1/listen") as ws:
            await ws.send(SPEECH[: 16000 * 2 // 4])  # 0.25 s of audio
            reader = asyncio.ensure_future(collect(ws, 10))
            held = await keepalives(ws, scaled(6))
            result = await reader
    assert not held, "KeepAlive held the stream past max_session_s"
    assert result.close_code == 1008
    assert result.of_type("Error")[-1]["code"] == "SESSION_TOO_LONG"


async def test_frame_far_over_the_limit_gets_frame_too_large_after_the_finals_owed() -> None:
    """A message several times over max_frame_bytes (which aiohttp refuses from its header) still
    ends the stream in order: the finals of audio sent before it, then FRAME_TOO_LARGE, then 1009."""
    engine = FakeEngine(delay_s=0.3)  # the finals are still owed when the big frame arrives
    config = limits_config(max_frame_bytes=4096)
    async with running_server(engine, config) as (server, url):
        async with connect(f"{url}/v1/listen", max_size=None) as ws:
            for i in range(0, len(SPEECH) * 2, 3200):
                await ws.send((SPEECH + SPEECH)[i : i + 3200])
            await ws.send(b"\x00" * (5 * 4096))
            result = await collect(ws, 20)
        assert len(result.finals()) == 2
        assert result.messages[-1]["type"] == "Error"
        assert result.messages[-1]["code"] == "FRAME_TOO_LARGE"
        assert result.close_code == 1009
        assert await wait_until(lambda: not server.connections, 5)


class HugeTranscripts(FakeEngine):
    """Every final is ~64 KB of text, so a client that stops reading fills its socket quickly."""

    def transcribe(self, requests: Sequence[TranscribeRequest]) -> list[Transcript]:
        out = super().transcribe(requests)
        return [replace(t, text="word " * 13000) for t in out]


def many_segments(count: int) -> bytes:
    return pcm16(np.concatenate([np.concatenate([tone(400), silence(700)]) for _ in range(count)]))


async def never_reading_client(url: str, audio: bytes) -> None:
    """Connect without ever reading, send ``audio`` quickly, then KeepAlive until the server cuts the
    connection (bounded: about 20 s)."""
    host, port = url.removeprefix("ws://").split(":")
    client = await RawClient.open(host, int(port), rcvbuf=4096)
    assert client.status == 101
    try:
        for i in range(0, len(audio), 32000):
            client.send(frame(OP_BINARY, audio[i : i + 32000]))
            await client.drain()
        for _ in range(400):
            client.send(frame(OP_TEXT, b'{"type": "KeepAlive"}'))
            await client.drain()
            await asyncio.sleep(0.05)
    except (ConnectionError, asyncio.TimeoutError):
        return
    finally:
        client.abort()
    raise AssertionError("the server kept a client that never read")


async def test_client_that_stops_reading_is_cut_after_the_write_timeout_and_freed() -> None:
    """A client that sends audio but never reads is closed once a write has waited write_timeout_s;
    its seat is freed, the outcome is counted, and other streams keep working."""
    config = limits_config(write_timeout_s=0.5, max_pending_finals=64)
    async with running_server(HugeTranscripts(), config) as (server, url):
        await never_reading_client(url, many_segments(200))  # 200 finals of 64 KB: more than sockets hold
        assert await wait_until(lambda: not server.connections, 10)
        assert metric(server, "stream_sessions_total", [("outcome", "slow_reader")]) == 1
        async with connect(f"{url}/v1/listen", max_size=None) as honest:
            await honest.send(SPEECH)
            await honest.send('{"type": "CloseStream"}')
            assert len((await collect(honest)).finals()) == 1


async def test_client_with_too_many_messages_waiting_is_cut() -> None:
    """When more than max_outgoing_events messages wait for a client, it is closed as a slow reader
    even before a write has waited write_timeout_s."""
    config = limits_config(write_timeout_s=60, max_outgoing_events=16, max_pending_finals=64)
    async with running_server(HugeTranscripts(), config) as (server, url):
        await never_reading_client(url, many_segments(200))
        assert await wait_until(lambda: not server.connections, 10)
        assert metric(server, "stream_sessions_total", [("outcome", "slow_reader")]) == 1


@pytest.mark.parametrize("trickle", [False, True])
async def test_slow_or_silent_handshake_is_closed_after_the_handshake_timeout(trickle: bool) -> None:
    """A connection that sends no request, or sends its headers a byte at a time (slowloris), is
    closed by the server after handshake_timeout_s."""
    async with running_server(FakeEngine(), limits_config(handshake_timeout_s=0.5)) as (_, url):
        host, port = url.removeprefix("ws://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        header = b"GET /v1/listen HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nX-Pad: " + b"a" * 200
        closed = False
        started = time.monotonic()
        try:
            for i in range(len(header)):
                if trickle:
                    writer.write(header[i : i + 1])
                try:
                    data = await asyncio.wait_for(reader.read(1024), 0.05)
                except asyncio.TimeoutError:
                    continue
                if data == b"" or data.startswith(b"HTTP/1.1 408"):
                    closed = True
                    break
        except ConnectionError:
            closed = True
        finally:
            writer.close()
        assert closed, "the server kept a connection that never completed its request"
        assert time.monotonic() - started < scaled(10)


async def test_a_client_that_vanishes_gives_its_seat_back_before_its_finals_would_drain() -> None:
    """When a client disconnects while its final is still being computed, its seat is free at once
    (a reconnecting page is not refused by a stream nobody reads)."""
    engine = FakeEngine(delay_s=scaled(3))
    config = limits_config(max_sessions=1)
    async with running_server(engine, config) as (server, url):
        ws = await connect(f"{url}/v1/listen")
        await ws.send(SPEECH)  # one segment: its final takes 3 s
        assert await wait_until(lambda: engine.batches, 5)
        ws.transport.abort()
        assert await wait_until(lambda: not server.connections, 1.5)
        async with connect(f"{url}/v1/listen") as again:
            await again.send('{"type": "CloseStream"}')
            assert (await collect(again, 20)).close_code == 1000


async def test_per_key_limit_counts_the_keys_tokens_and_the_keys_own_limit() -> None:
    """A key with max_sessions=1 may hold one stream, a grant token of it counts against it, and
    another key is not affected; --max-sessions-per-key applies to keys without a limit of their own."""
    key_a, key_b = "key-a-0123456789abcdef", "key-b-0123456789abcdef"
    config = replace(
        limits_config(max_sessions_per_key=2),
        auth=AuthConfig(api_keys=(f"alpha:{key_a} max_sessions=1", f"beta:{key_b}")),
    )
    async with running_server(FakeEngine(), config) as (server, url):
        async with aiohttp.ClientSession() as http:
            async with http.post(
                url.replace("ws://", "http://") + "/v1/auth/grant",
                headers={"Authorization": f"Token {key_a}"},
            ) as response:
                assert response.status == 200
                token = (await response.json())["access_token"]
        a = {"Authorization": f"Token {key_a}"}
        b = {"Authorization": f"Token {key_b}"}
        async with connect(f"{url}/v1/listen", additional_headers=a):
            for refused in (a, {"Authorization": f"Bearer {token}"}):
                with pytest.raises(InvalidStatus) as info:
                    async with connect(f"{url}/v1/listen", additional_headers=refused):
                        pass
                assert info.value.response.status_code == 429
                assert json.loads(info.value.response.body or b"{}")["code"] == "TOO_MANY_SESSIONS"
            async with connect(f"{url}/v1/listen", additional_headers=b):
                async with connect(f"{url}/v1/listen", additional_headers=b):
                    with pytest.raises(InvalidStatus) as info:
                        async with connect(f"{url}/v1/listen", additional_headers=b):
                            pass
                    assert info.value.response.status_code == 429
        assert metric(server, "stream_sessions_rejected_total", [("reason", "per_key")]) == 3


async def test_empty_finalize_acknowledgement_is_not_counted_as_a_final() -> None:
    """A Finalize with no segment open is acknowledged, but the finalized-segments counter and the
    latency histogram count only real finals."""
    async with running_server(FakeEngine(), limits_config()) as (server, url):
        async with connect(f"{url}/v1/listen") as ws:
            await ws.send(SPEECH[:3200])  # silence only: no segment opens
            await ws.send('{"type": "Finalize"}')
            await ws.send('{"type": "CloseStream"}')
            result = await collect(ws)
        assert [m.get("from_finalize") for m in result.finals()] == [True]
        assert metric(server, "stream_segments_finalized_total") == 0
        assert metric(server, "stream_final_latency_seconds_count") == 0


async def test_answers_name_no_library_versions_and_the_page_is_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Server header says stream-server, not Python's and aiohttp's versions; the captions page
    is read from disk once, not on every request."""
    import stream_server.transport as transport

    (tmp_path / "index.html").write_text("<html>first</html>")
    monkeypatch.setattr(transport, "web_dir", lambda: tmp_path)
    async with running_server(FakeEngine(), limits_config()) as (_, url):
        async with aiohttp.ClientSession() as http:
            base = url.replace("ws://", "http://")
            async with http.get(f"{base}/health") as response:
                assert response.headers["Server"] == "stream-server"
            async with http.get(f"{base}/") as response:
                assert "first" in await response.text()
            (tmp_path / "index.html").write_text("<html>second</html>")
            async with http.get(f"{base}/") as response:
                assert "first" in await response.text()
                assert "aiohttp" not in response.headers.get("Server", "")
