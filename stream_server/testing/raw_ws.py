"""A bare WebSocket client on a plain socket, for hostile-client tests and the protocol fuzzer.

Standard clients are polite: they read in the background, answer pings, and refuse to send broken
frames. This one does exactly what it is told: it can stop reading, send a frame header that claims
gigabytes, send reserved opcodes, or trickle its handshake one byte at a time.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bool = True) -> bytes:
    """One WebSocket frame (RFC 6455 section 5.2); clients must mask, so ``mask`` defaults to True."""
    head = bytes([(0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0xF)])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if n < 32 else _mask(payload, key)
    return head + key + masked


def _mask(payload: bytes, key: bytes) -> bytes:
    import numpy as np

    data = np.frombuffer(payload, dtype=np.uint8)
    pad = np.resize(np.frombuffer(key, dtype=np.uint8), len(data))
    return (data ^ pad).tobytes()


def frame_header_claiming(opcode: int, length: int) -> bytes:
    """Only the header of a masked frame that claims ``length`` payload bytes (no payload)."""
    return bytes([0x80 | opcode, 0x80 | 127]) + struct.pack("!Q", length) + os.urandom(4)


def handshake_request(
    host: str, port: int, path: str = "/v1/listen", headers: dict[str, str] | None = None
) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class RawClient:
    """A WebSocket connection that only does what it is told.

    Use :meth:`open`; then :meth:`send` frames, :meth:`read_frames` when (and if) you want to read.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int, head: bytes):
        self.reader = reader
        self.writer = writer
        self.status = status
        self.head = head

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        path: str = "/v1/listen",
        *,
        local_addr: tuple[str, int] | None = None,
        headers: dict[str, str] | None = None,
        rcvbuf: int = 0,
        timeout_s: float = 10.0,
    ) -> RawClient:
        """Connect and send the handshake; ``status`` is the server's HTTP status (101 when open)."""
        import socket

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if local_addr is not None:
            sock.bind(local_addr)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        writer.write(handshake_request(host, port, path, headers))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
        status = int(head.split(b" ", 2)[1])
        return cls(reader, writer, status, head)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self, timeout_s: float = 10.0) -> None:
        await asyncio.wait_for(self.writer.drain(), timeout_s)

    async def read_frames(self, timeout_s: float) -> list[tuple[int, bytes]]:
        """Read frames until the server closes or ``timeout_s`` passes; (opcode, payload) each."""
        frames: list[tuple[int, bytes]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    break
                b0, b1 = await asyncio.wait_for(self.reader.readexactly(2), left)
                n = b1 & 0x7F
                if n == 126:
                    (n,) = struct.unpack("!H", await self.reader.readexactly(2))
                elif n == 127:
                    (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
                payload = await self.reader.readexactly(n)
                frames.append((b0 & 0xF, payload))
                if b0 & 0xF == OP_CLOSE:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass
        return frames

    def abort(self) -> None:
        transport = self.writer.transport
        transport.abort()
