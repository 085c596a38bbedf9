"""A real server on 127.0.0.1, a real WebSocket client, and a fake engine below."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import replace

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from stream_server.config import BatchConfig, Config, LimitsConfig
from stream_server.engines.base import Engine

from .conftest import scaled
from .fakes import FakeEngine
from .serving import collect, running_server, stream_bytes
from .synth import pcm16, silence, tone

pytestmark = pytest.mark.e2e

TWO_SEGMENTS = pcm16(np.concatenate([silence(1000), tone(2000), silence(1000), tone(1500), silence(1000)]))


def http_url(ws_url: str) -> str:
    return ws_url.replace("ws://", "http://")


async def test_stream_gets_finals_metadata_and_normal_close() -> None:
    """Streaming two bursts and CloseStream yields two finals, then Metadata, then close 1000."""
    async with running_server(FakeEngine()) as (_, url):
        result = await stream_bytes(f"{url}/v1/listen", TWO_SEGMENTS)
    assert [m["type"] for m in result.messages] == ["Results", "Results", "Metadata"]
    assert result.close_code == 1000
    first = result.finals()[0]
    assert first["channel"]["alternatives"][0]["transcript"].startswith("clip ")
    assert abs(first["start"] - 0.7) < 0.031
    meta = result.of_type("Metadata")[0]
    assert meta["duration"] == 6.5 and meta["segments"] == 2
    assert meta["model_details"]["name"] == "fake-engine"


async def test_request_id_header_matches_events() -> None:
    """The dg-request-id handshake header names the stream in every Results and in Metadata."""
    async with running_server(FakeEngine()) as (_, url):
        async with connect(f"{url}/v1/listen") as ws:
            request_id = ws.response.headers["dg-request-id"]
            await ws.send(TWO_SEGMENTS)
            await ws.send('{"type": "CloseStream"}')
            result = await collect(ws)
    assert {m["metadata"]["request_id"] for m in result.finals()} == {request_id}
    assert result.of_type("Metadata")[0]["request_id"] == request_id


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("encoding=opus", "UNSUPPORTED_ENCODING"),
        ("sample_rate=96000", "INVALID_PARAMETER"),
        ("sample_rate=abc", "INVALID_PARAMETER"),
        ("multichannel=true&channels=21", "UNSUPPORTED_CHANNELS"),
        ("language=fr", "UNSUPPORTED_LANGUAGE"),
        ("endpointing=-5", "INVALID_PARAMETER"),
        ("utterance_end_ms=10", "INVALID_PARAMETER"),
        ("interim_results=maybe", "INVALID_PARAMETER"),
        ("sample_rat=8000", "UNKNOWN_PARAMETER"),
        ("sample_rate=8000&sample_rate=16000", "INVALID_PARAMETER"),
        # Control characters and non-ASCII in a key must not break the dg-error header (issue 8).
        ("bad%01key=1", "UNKNOWN_PARAMETER"),
        ("k%0D%0AX-Injected:%20yes=1", "UNKNOWN_PARAMETER"),
        ("caf%C3%A9=1", "UNKNOWN_PARAMETER"),
        ("encoding=%7F%00", "UNSUPPORTED_ENCODING"),
    ],
)
async def test_absurd_query_parameters_get_http_400_with_reason(query: str, code: str) -> None:
    """Each invalid query parameter is refused at the handshake with HTTP 400 and a specific code."""
    async with running_server(FakeEngine()) as (_, url):
        with pytest.raises(InvalidStatus) as info:
            async with connect(f"{url}/v1/listen?{query}"):
                pass
        response = info.value.response
        assert response.status_code == 400
        body = json.loads(response.body or b"{}")
        assert body["code"] == code and body["description"]
        header = response.headers["dg-error"]
        assert header and all(32 <= ord(c) < 127 for c in header), "printable ASCII only"
        assert "X-Injected" not in response.headers
        # The server is still up: a good stream works.
        result = await stream_bytes(f"{url}/v1/listen", TWO_SEGMENTS)
        assert len(result.finals()) == 2


async def test_deepgram_params_are_accepted_and_reported_as_ignored() -> None:
    """Deepgram parameters this server does not implement are accepted and listed in Metadata."""
    async with running_server(FakeEngine()) as (_, url):
        result = await stream_bytes(
            f"{url}/v1/listen?model=nova-2&diarize=true&smart_format=true", TWO_SEGMENTS
        )
    assert result.of_type("Metadata")[0]["ignored_params"] == ["diarize", "model"]


async def test_plain_http_get_on_listen_says_websocket_required() -> None:
    """A plain HTTP GET on the stream endpoint is told to use WebSocket (426)."""
    async with running_server(FakeEngine()) as (_, url):
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{http_url(url)}/v1/listen") as response:
                assert response.status == 426
                assert (await response.json())["code"] == "WEBSOCKET_REQUIRED"


async def test_health_reports_model_and_readiness() -> None:
    """/health names the model and device and says ready."""
    async with running_server(FakeEngine(fallback_reason="no hub")) as (_, url):
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{http_url(url)}/health") as response:
                body = await response.json()
    assert response.status == 200 and body["ready"] is True
    assert body["model"]["name"] == "fake-engine" and body["model"]["device"] == "cpu"
    assert body["model"]["fallback"] is True and "fallback fake-engine" in body["model"]["fallback_reason"]
    assert "no hub" not in json.dumps(body), "the real reason is in the log only (test_auth: nothing leaks)"


async def test_loading_model_gives_503_until_ready() -> None:
    """While the model loads, /health and /v1/listen answer 503; afterwards both work."""
    gate = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_loader() -> Engine:
        asyncio.run_coroutine_threadsafe(gate.wait(), loop).result()
        return FakeEngine()

    async with running_server(engine_loader=slow_loader, wait_ready=False) as (server, url):
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{http_url(url)}/health") as response:
                assert response.status == 503 and (await response.json())["status"] == "loading"
        with pytest.raises(InvalidStatus) as info:
            async with connect(f"{url}/v1/listen"):
                pass
        assert json.loads(info.value.response.body or b"{}")["code"] == "MODEL_LOADING"
        gate.set()
        await server.wait_ready(scaled(10))
        result = await stream_bytes(f"{url}/v1/listen", TWO_SEGMENTS)
        assert len(result.finals()) == 2


async def test_failed_model_load_is_reported() -> None:
    """A model that cannot load leaves /health at 503 saying so (the exception only in the log), and
    streams are refused."""

    def broken_loader() -> Engine:
        raise RuntimeError("weights missing")

    async with running_server(engine_loader=broken_loader, wait_ready=False) as (server, url):
        with pytest.raises(RuntimeError):
            await server.wait_ready(scaled(10))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{http_url(url)}/health") as response:
                body = await response.json()
        assert response.status == 503 and body["status"] == "failed"
        assert "could not be loaded" in body["error"]
        assert "weights missing" not in json.dumps(body)


async def test_metrics_endpoint_counts_streams() -> None:
    """/metrics exposes Prometheus text with audio seconds, segments and batch sizes."""
    async with running_server(FakeEngine()) as (_, url):
        await stream_bytes(f"{url}/v1/listen", TWO_SEGMENTS)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{http_url(url)}/metrics") as response:
                text = await response.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("stream_audio_seconds_total", ())] == pytest.approx(6.5)
    assert samples[("stream_segments_finalized_total", ())] == 2
    # Each segment's final came from a final batch or an adopted speculative one (which, is timing).
    finals = samples[("stream_batch_size_count", (("kind", "final"),))]
    assert finals + samples[("stream_batch_size_count", (("kind", "speculative"),))] >= 2
    assert samples[("stream_final_latency_seconds_count", ())] == 2
    assert samples[("stream_sessions_total", (("outcome", "completed"),))] == 1
    assert samples[("process_resident_memory_bytes", ())] > 10_000_000
    # Both segments ended on a pause with nothing after the early start: each speculation was used, or
    # refused because the other segment's final was still waiting (this client sends faster than real
    # time), which of the two depends on timing. Every outcome's series exists from the start.
    used = samples[("stream_speculative_finals_total", (("outcome", "used"),))]
    refused = samples[("stream_speculative_finals_total", (("outcome", "refused"),))]
    assert used + refused == 2
    assert samples[("stream_speculative_finals_total", (("outcome", "wasted"),))] == 0


async def test_bad_messages_get_errors_and_other_session_is_undisturbed() -> None:
    """Garbage text frames get Error events on one stream while a second stream runs normally."""
    async with running_server(FakeEngine()) as (_, url):
        async with connect(f"{url}/v1/listen") as bad:
            good = asyncio.ensure_future(stream_bytes(f"{url}/v1/listen", TWO_SEGMENTS, pace_s=0.002))
            await bad.send("not json at all")
            await bad.send('{"type": "Dance"}')
            await bad.send('{"no_type": 1}')
            await bad.send(pcm16(tone(500))[:-1])  # odd byte count: the half sample waits for the next frame
            await bad.send(b"\x00" + pcm16(silence(700)))
            await bad.send('{"type": "CloseStream"}')
            bad_result = await collect(bad)
            good_result = await good
    codes = [m["code"] for m in bad_result.of_type("Error")]
    assert codes == ["INVALID_JSON", "UNKNOWN_MESSAGE_TYPE", "INVALID_MESSAGE"]
    assert bad_result.close_code == 1000 and len(bad_result.finals()) == 1
    assert len(good_result.finals()) == 2 and good_result.close_code == 1000


async def test_too_many_bad_messages_close_1008() -> None:
    """A client that keeps sending invalid messages is closed with 1008 and TOO_MANY_ERRORS."""
    config = Config(limits=LimitsConfig(max_client_errors=3))
    async with running_server(FakeEngine(), config) as (_, url):
        async with connect(f"{url}/v1/listen") as ws:
            for _ in range(5):
                await ws.send("{")
            result = await collect(ws)
    assert result.close_code == 1008 and result.close_reason == "TOO_MANY_ERRORS"
    assert result.of_type("Error")[-1]["code"] == "TOO_MANY_ERRORS"


async def test_oversized_frame_is_refused_with_1009() -> None:
    """An audio frame above the size limit gets FRAME_TOO_LARGE and close 1009; the server stays up."""
    config = Config(limits=LimitsConfig(max_frame_bytes=64 * 1024))
    async with running_server(FakeEngine(), config) as (_, url):
        async with connect(f"{url}/v1/listen", max_size=None) as ws:
            await ws.send(b"\x00\x00" * 40000)
            result = await collect(ws)
        assert result.close_code == 1009
        assert result.of_type("Error")[0]["code"] == "FRAME_TOO_LARGE"
        assert len((await stream_bytes(f"{url}/v1/listen", TWO_SEGMENTS)).finals()) == 2


async def test_idle_stream_is_closed_after_timeout() -> None:
    """A stream that sends nothing is told IDLE_TIMEOUT and closed with 1008; KeepAlive prevents it."""
    idle_s = scaled(0.5)
    config = Config(limits=LimitsConfig(idle_timeout_s=idle_s))
    async with running_server(FakeEngine(), config) as (_, url):
        async with connect(f"{url}/v1/listen") as ws:
            for _ in range(6):  # 1.2 idle timeouts in all, a fifth of one apart (a margin for a busy box)
                await ws.send('{"type": "KeepAlive"}')
                await asyncio.sleep(idle_s / 5)
            assert ws.close_code is None, "KeepAlive keeps the stream open"
            result = await collect(ws, timeout_s=5)
    assert result.close_code == 1008
    assert [m["code"] for m in result.of_type("Error")] == ["IDLE_TIMEOUT"]


async def test_capacity_limit_gives_503() -> None:
    """Beyond max_sessions the handshake gets HTTP 503 AT_CAPACITY with Retry-After."""
    config = Config(limits=LimitsConfig(max_sessions=1))
    async with running_server(FakeEngine(), config) as (_, url):
        async with connect(f"{url}/v1/listen"):
            with pytest.raises(InvalidStatus) as info:
                async with connect(f"{url}/v1/listen"):
                    pass
            assert info.value.response.status_code == 503
            assert info.value.response.headers["Retry-After"] == "2"
            assert json.loads(info.value.response.body or b"{}")["code"] == "AT_CAPACITY"


async def test_measured_capacity_refuses_the_stream_too_many_and_health_says_so() -> None:
    """With the engine's speed known, streams are admitted up to the capacity /health reports; the next
    gets 503 AT_CAPACITY with Retry-After; closing one frees its seat. Admitted streams keep working."""
    config = Config(limits=LimitsConfig(idle_timeout_s=30))
    async with running_server(FakeEngine(), config) as (server, url):
        assert server.capacity is not None
        # A model that takes 0.05 s + 0.05 s per second of audio, on one worker.
        server.capacity.calibrate([(x, 0.05 + 0.05 * x) for x in (1.0, 2.0, 4.0, 8.0)] * 2)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{http_url(url)}/health") as response:
                health = await response.json()
            capacity = health["capacity"]
            assert capacity["accepting"] is True and capacity["workers"] == 1
            assert capacity["call_s"] == {"fixed": 0.05, "per_audio_second": 0.05}
            seats = capacity["sessions_left"]
            assert 1 <= seats == capacity["capacity_sessions"] <= 20
            streams = [await connect(f"{url}/v1/listen") for _ in range(seats)]
            try:
                with pytest.raises(InvalidStatus) as info:
                    await connect(f"{url}/v1/listen")
                assert info.value.response.status_code == 503
                assert info.value.response.headers["Retry-After"] == "5"
                body = json.loads(info.value.response.body or b"{}")
                assert body["code"] == "AT_CAPACITY" and "latency target" in body["description"]
                async with http.get(f"{http_url(url)}/health") as response:
                    full = (await response.json())["capacity"]
                assert (full["accepting"], full["sessions_left"]) == (False, 0)
                async with http.get(f"{http_url(url)}/metrics") as response:
                    metrics = await response.text()
                assert "stream_capacity_sessions_left 0.0" in metrics
                assert 'stream_sessions_rejected_total{reason="capacity"} 1.0' in metrics
                # An admitted stream still transcribes.
                await streams[0].send(TWO_SEGMENTS)
                await streams[0].send(json.dumps({"type": "CloseStream"}))
                result = await collect(streams[0])
                assert len(result.finals()) == 2 and result.close_code == 1000
                deadline = time.monotonic() + scaled(5)
                while len(server.connections) >= seats and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                again = await connect(f"{url}/v1/listen")
                streams.append(again)
            finally:
                for ws in streams:
                    await ws.close()


async def test_engine_failure_becomes_segment_error_and_stream_continues() -> None:
    """A segment the model fails on becomes an Error with its span; the next segment still gets a final."""
    engine = FakeEngine(fail_when=lambda r: len(r.audio) > 40000)
    async with running_server(engine) as (_, url):
        result = await stream_bytes(f"{url}/v1/listen", TWO_SEGMENTS)
    kinds = [m["type"] for m in result.messages]
    assert kinds == ["Error", "Results", "Metadata"], "only the failing segment gets an error"
    error = result.of_type("Error")[0]
    assert error["code"] == "TRANSCRIPTION_FAILED" and error["fatal"] is False
    assert "fake engine failure" not in json.dumps(error)
    assert abs(error["start"] - 0.7) < 0.031
    assert result.close_code == 1000


async def test_client_vanishing_mid_segment_leaves_server_healthy() -> None:
    """A client that drops its TCP connection mid-segment is cleaned up; the next stream works."""
    engine = FakeEngine(delay_s=0.2)
    async with running_server(engine) as (server, url):
        port = int(url.rsplit(":", 1)[1])
        ws = await connect(f"{url}/v1/listen")
        await ws.send(pcm16(np.concatenate([silence(300), tone(1500), silence(700), tone(800)])))
        await asyncio.sleep(0.1)
        ws.transport.abort()  # no close frame, no CloseStream: the client is simply gone
        deadline = time.monotonic() + scaled(5)
        while server.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert not server.connections
        result = await stream_bytes(f"{url}/v1/listen", TWO_SEGMENTS)
        assert len(result.finals()) == 2
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            pass


async def test_fast_client_keeps_pending_finals_bounded_and_loses_nothing() -> None:
    """A client far faster than the model has at most max_pending_finals waiting, the rest waits in the
    spool, and every segment still gets its final, in order."""
    engine = FakeEngine(delay_s=0.05)
    config = Config(limits=LimitsConfig(max_pending_finals=2), batch=BatchConfig(max_batch_size=1))
    burst = np.concatenate([silence(300), tone(700), silence(600)])
    audio = pcm16(np.concatenate([burst] * 30))
    async with running_server(engine, config) as (server, url):
        peak = 0
        spooled = 0

        async def watch() -> None:
            nonlocal peak, spooled
            while True:
                for conn in list(server.connections):
                    peak = max(peak, conn.session.pending_finals)
                    spooled = max(spooled, conn.spool.bytes_waiting)
                await asyncio.sleep(0.005)

        watcher = asyncio.ensure_future(watch())
        result = await stream_bytes(f"{url}/v1/listen", audio, frame_bytes=32000)
        watcher.cancel()
    assert len(result.finals()) == 30
    assert peak <= 2 + 1  # the frame being processed may close one more segment
    assert spooled > 0, "the audio ahead of the model waited in the spool"
    starts = [f["start"] for f in result.finals()]
    assert starts == sorted(starts)


SEGMENTS_30 = pcm16(np.concatenate([np.concatenate([silence(300), tone(400), silence(700)])] * 30))


async def stream_with_keepalive(url: str, ping_s: float) -> tuple[int | None, int]:
    """Send 30 segments unpaced with websockets' keepalive on (ping every ping_s, pong due within ping_s
    x 2, as the library's 20 s / 20 s default scaled down); return the close code and finals received."""
    async with connect(url, max_size=None, ping_interval=ping_s, ping_timeout=2 * ping_s) as ws:
        reader = asyncio.ensure_future(collect(ws, 60))
        for i in range(0, len(SEGMENTS_30), 3200):
            await ws.send(SEGMENTS_30[i : i + 3200])
        await ws.send(json.dumps({"type": "CloseStream"}))
        result = await reader
    return result.close_code, len(result.finals())


async def test_a_fast_client_with_keepalive_is_never_dropped() -> None:
    """Streaming unpaced far ahead of a slow model, a client whose keepalive pings must be answered
    within 0.6 s finishes normally with every final: the socket is read all along, so its pings are
    answered while its audio waits in the spool (4.5 s of model work)."""
    engine = FakeEngine(delay_s=0.15)
    config = Config(limits=LimitsConfig(max_pending_finals=1), batch=BatchConfig(max_batch_size=1))
    async with running_server(engine, config) as (_, url):
        close_code, finals = await stream_with_keepalive(f"{url}/v1/listen", 0.3)
    assert (close_code, finals) == (1000, 30)


async def test_without_the_spool_tcp_backpressure_starves_the_keepalive() -> None:
    """The mechanism the spool replaces: with max_spool_mb 0 the server stops reading, the client's ping
    waits behind its own audio in the socket buffers, and websockets gives up on the stream (1011
    "keepalive ping timeout", or 1006 when even its close frame cannot get through)."""
    engine = FakeEngine(delay_s=0.15)
    config = Config(
        limits=LimitsConfig(max_pending_finals=1, max_spool_mb=0), batch=BatchConfig(max_batch_size=1)
    )
    async with running_server(engine, config) as (_, url):
        close_code, finals = await stream_with_keepalive(f"{url}/v1/listen", 0.3)
    assert close_code in (1006, 1011) and finals < 30


async def test_concurrent_streams_do_not_cross_talk() -> None:
    """Several streams at once each receive only their own segments."""
    async with running_server(FakeEngine(delay_s=0.01), Config(batch=BatchConfig(max_wait_ms=20))) as (
        _,
        url,
    ):
        lengths_ms = [600, 900, 1200, 1500, 1800]
        audios = [pcm16(np.concatenate([silence(400), tone(ms), silence(800)])) for ms in lengths_ms]
        results = await asyncio.gather(*(stream_bytes(f"{url}/v1/listen", a, pace_s=0.001) for a in audios))
    for ms, result in zip(lengths_ms, results, strict=True):
        (final,) = result.finals()
        assert abs(final["duration"] - (ms + 600) / 1000) < 0.07, (ms, final["duration"])


async def test_unsupported_language_for_english_only_engine() -> None:
    """An English-only model refuses language=zh at the handshake, naming what it supports."""
    async with running_server(FakeEngine(languages=("en",))) as (_, url):
        with pytest.raises(InvalidStatus) as info:
            async with connect(f"{url}/v1/listen?language=zh"):
                pass
    body = json.loads(info.value.response.body or b"{}")
    assert body["code"] == "UNSUPPORTED_LANGUAGE" and "auto, en" in body["description"]


async def test_drain_finalizes_open_streams_and_closes_1012() -> None:
    """When the drain runs out, an open stream gets its pending final, a SERVER_SHUTTING_DOWN error and
    close 1012 (service restart: reconnect elsewhere)."""
    async with running_server(FakeEngine()) as (server, url):
        async with connect(f"{url}/v1/listen") as ws:
            await ws.send(pcm16(np.concatenate([silence(300), tone(1000)])))
            deadline = time.monotonic() + scaled(5)  # the server has read all of it (no fixed sleep)
            while time.monotonic() < deadline and not any(
                c.session.audio_duration_s >= 1.3 for c in server.connections
            ):
                await asyncio.sleep(0.01)
            reader = asyncio.ensure_future(collect(ws))
            await server.drain(0.0)
            result = await reader
        with pytest.raises(InvalidStatus) as info:
            async with connect(f"{url}/v1/listen"):
                pass
        assert info.value.response.status_code == 503
    assert result.close_code == 1012
    assert [m["type"] for m in result.messages] == ["Results", "Error", "Metadata"]
    assert result.messages[1]["code"] == "SERVER_SHUTTING_DOWN", "the final owed goes first"


async def test_server_config_replace_keeps_other_sections() -> None:
    """The test helper's host/port override leaves the other config sections as given."""
    config = Config(limits=LimitsConfig(max_sessions=3))
    async with running_server(FakeEngine(), config) as (server, _):
        assert server.config.limits.max_sessions == 3
        assert server.config.server.host == "127.0.0.1"
    assert replace(config).limits.max_sessions == 3


async def test_page_and_client_files_are_served_but_not_tests_or_node_modules() -> None:
    """GET / serves the captions page and /static/ its modules, never client_js/test or node_modules."""
    async with running_server(FakeEngine()) as (_, url):
        base = http_url(url)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/") as page:
                assert page.status == 200 and "<html" in (await page.text()).lower()
            async with http.get(f"{base}/static/stream-client.js") as module:
                assert module.status == 200 and "javascript" in module.content_type
            for path in (
                "/static/test/unit/dsp.test.js",
                "/static/node_modules/.package-lock.json",
                "/static/__init__.py",
                "/static/..%2Fpyproject.toml",
            ):
                async with http.get(f"{base}{path}") as response:
                    assert response.status == 404, path
            async with http.get(f"{base}/health") as health:
                assert health.headers["Access-Control-Allow-Origin"] == "*"
