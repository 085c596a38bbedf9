"""Draining, as operators need it: a real server on 127.0.0.1 and real clients (a fake engine below),
and the real ``stream-server`` process stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from stream_server.compat import timeout
from stream_server.config import Config, ServerConfig

from .conftest import scaled
from .fakes import FakeEngine
from .serving import collect, running_server
from .synth import pcm16, silence, tone

pytestmark = pytest.mark.e2e

SPEECH = pcm16(np.concatenate([silence(300), tone(1000)]))  # a segment still open: the final is owed


async def status(base: str, path: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(base + path) as response:
        return response.status


async def until_read(server: object, streams: int) -> None:
    """Until the server has read the audio of ``streams`` streams (no fixed sleep)."""
    async with timeout(scaled(10)):
        while sum(1 for c in server.connections if c.session.audio_duration_s >= 1.25) < streams:  # type: ignore[attr-defined]
            await asyncio.sleep(0.01)


async def test_a_drain_lets_streams_finish_refuses_new_ones_and_closes_the_rest_with_1012() -> None:
    """During the drain a stream that ends by itself ends normally (1000, its final, Metadata), a new
    stream gets 503 and /readyz 503 while /livez stays 200; when the drain runs out, the stream still
    open gets its final, SERVER_SHUTTING_DOWN and a close with 1012; then the drain returns."""
    config = Config(server=ServerConfig(drain_timeout_s=scaled(1.5)))
    async with running_server(FakeEngine(), config) as (server, url):
        base = url.replace("ws://", "http://")
        assert await status(base, "/readyz") == 200
        async with connect(f"{url}/v1/listen") as finishing, connect(f"{url}/v1/listen") as lingering:
            await finishing.send(SPEECH)
            await lingering.send(SPEECH)
            await until_read(server, 2)
            lingering_result = asyncio.ensure_future(collect(lingering))
            drain = asyncio.ensure_future(server.drain(config.server.drain_timeout_s))
            await asyncio.sleep(0.05)
            with pytest.raises(InvalidStatus) as refused:
                async with connect(f"{url}/v1/listen"):
                    pass
            assert refused.value.response.status_code == 503
            assert json.loads(refused.value.response.body)["code"] == "SHUTTING_DOWN"
            assert await status(base, "/readyz") == 503 and await status(base, "/livez") == 200
            await finishing.send(json.dumps({"type": "CloseStream"}))
            finished = await collect(finishing)
            assert not drain.done(), "the drain waits for the stream still open"
            async with timeout(scaled(10)):
                await drain
            lingered = await lingering_result
    assert finished.close_code == 1000
    assert [m["type"] for m in finished.messages] == ["Results", "Metadata"]
    assert lingered.close_code == 1012
    assert [m["type"] for m in lingered.messages] == ["Results", "Error", "Metadata"]
    assert lingered.messages[1]["code"] == "SERVER_SHUTTING_DOWN"


async def test_a_drain_without_streams_returns_at_once() -> None:
    """With no stream open, a drain of a minute returns at once."""
    async with running_server(FakeEngine()) as (server, _):
        started = time.monotonic()
        async with timeout(scaled(5)):
            await server.drain(60.0)
        assert time.monotonic() - started < scaled(5)
        assert server.readiness() == (False, "draining")


@pytest.mark.model
def test_sigterm_drains_the_real_process_and_it_exits_when_the_last_stream_is_gone() -> None:
    """SIGTERM to stream-server: the socket stays open and answers 503 to a new stream, the open stream
    goes on until the drain timeout, then gets its final and 1012, and the process exits 0 right after."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "STREAM_SERVER_DRAIN_TIMEOUT_S": "3"}
    cmd = [sys.executable, "-m", "stream_server", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--model", "tiny.en", "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        asyncio.run(_sigterm_scenario(proc, port))
        code = proc.wait(timeout=scaled(30))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, proc.stderr.read().decode() if proc.stderr else code


async def _sigterm_scenario(proc: subprocess.Popen[bytes], port: int) -> None:
    base = f"http://127.0.0.1:{port}"
    async with timeout(scaled(180)):
        while True:
            try:
                if await status(base, "/readyz") == 200:
                    break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    async with connect(f"ws://127.0.0.1:{port}/v1/listen") as ws:
        await ws.send(SPEECH)
        await asyncio.sleep(scaled(0.5))
        reader = asyncio.ensure_future(collect(ws, timeout_s=60))
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(scaled(0.5))
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"ws://127.0.0.1:{port}/v1/listen"):
                pass
        assert refused.value.response.status_code == 503
        assert await status(base, "/livez") == 200 and await status(base, "/readyz") == 503
        result = await reader
    assert time.monotonic() - signalled >= 3.0 - 0.2, "the open stream was given the drain timeout"
    assert result.close_code == 1012
    assert [m["type"] for m in result.messages][-2:] == ["Error", "Metadata"]
