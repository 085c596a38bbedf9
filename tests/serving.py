"""Run a real server on 127.0.0.1 inside a test and talk to it with a real WebSocket client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from stream_server.compat import timeout
from stream_server.config import Config, ServerConfig
from stream_server.engines.base import Engine
from stream_server.transport import Server

from .conftest import scaled


@asynccontextmanager
async def running_server(
    engine: Engine | None = None,
    config: Config | None = None,
    *,
    engine_loader: Callable[[], Engine] | None = None,
    wait_ready: bool = True,
) -> AsyncIterator[tuple[Server, str]]:
    """A Server listening on 127.0.0.1 with a free port; yields it and its ws:// base URL."""
    config = config or Config()
    config = replace(config, server=replace(config.server or ServerConfig(), host="127.0.0.1", port=0))
    server = Server(config, engine=engine, engine_loader=engine_loader)
    host, port = await server.start()
    try:
        if wait_ready:
            await server.wait_ready(scaled(600))
        yield server, f"ws://{host}:{port}"
    finally:
        await server.stop()


@dataclass
class StreamResult:
    messages: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == kind]

    def finals(self) -> list[dict[str, Any]]:
        return [m for m in self.of_type("Results") if m["is_final"]]

    def transcript(self) -> str:
        return " ".join(
            m["channel"]["alternatives"][0]["transcript"]
            for m in self.finals()
            if m["channel"]["alternatives"][0]["transcript"]
        )


async def collect(ws: ClientConnection, timeout_s: float = 60.0) -> StreamResult:
    """Read every message until the server closes the stream."""
    result = StreamResult()
    try:
        async with timeout(scaled(timeout_s)):
            async for raw in ws:
                assert isinstance(raw, str), "the server only sends text frames"
                result.messages.append(json.loads(raw))
    except ConnectionClosed:
        pass
    if ws.close_code is None:
        await ws.wait_closed()
    result.close_code = ws.close_code
    result.close_reason = ws.close_reason or ""
    return result


async def stream_bytes(
    url: str,
    data: bytes,
    *,
    frame_bytes: int = 3200,
    pace_s: float = 0.0,
    close: bool = True,
    timeout_s: float = 60.0,
) -> StreamResult:
    """Open a stream, send the audio in frames, send CloseStream, and collect everything until close."""
    async with connect(url, max_size=None) as ws:
        reader = asyncio.ensure_future(collect(ws, timeout_s))
        for i in range(0, len(data), frame_bytes):
            await ws.send(data[i : i + frame_bytes])
            if pace_s:
                await asyncio.sleep(pace_s)
        if close:
            await ws.send(json.dumps({"type": "CloseStream"}))
        return await reader
