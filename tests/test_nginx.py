"""Scale-out behind the real load balancer: nginx with deploy/nginx/stream-server.conf (ports rewritten
to free ones) in front of two real server processes (``python -m tests.lb_server``: the CLI's drain,
a fake engine), and real WebSocket clients through nginx.

Every client streams tones with silence between them (tests/synth.py), so each tone is one speech
segment owed exactly one final; every test checks that none is lost or doubled."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from stream_server.compat import timeout

from .conftest import scaled
from .serving import StreamResult
from .synth import pcm16, silence, tone

pytestmark = pytest.mark.e2e

NGINX = Path("/usr/sbin/nginx")
REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONF = REPO / "deploy" / "nginx" / "stream-server.conf"
# Every server: nginx (127.0.0.1) is a trusted proxy, and nothing closes a quiet test stream.
COMMON_FLAGS = (
    "--trusted-proxies",
    "127.0.0.1/32",
    "--idle-timeout-s",
    "300",
    "--no-audio-timeout-s",
    "300",
    "--admission",
    "false",
)

# The description of deploy/nginx/stream-server.conf's @no_replica answer.
NGINX_REFUSAL = "No server can take a new stream now; retry shortly."

TONE_MS = 800
GAP_MS = 1500  # after a tone: more than endpointing (500 ms) plus post-roll, so the segment closes
LEAD_MS = 400


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Backend:
    """One server process behind nginx."""

    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as http, http.get(self.base + path) as response:
            return response.status, await response.text()

    async def sessions(self) -> int:
        status, body = await self.get("/health")
        return int(json.loads(body)["sessions"])

    async def rejected(self, reason: str) -> float:
        """``stream_sessions_rejected_total{reason=...}``, read from this server's /metrics."""
        _, text = await self.get("/metrics")
        match = re.search(rf'^stream_sessions_rejected_total\{{reason="{reason}"\}} (\S+)$', text, re.M)
        return float(match.group(1)) if match else 0.0


@dataclass
class Cluster:
    url: str  # ws://127.0.0.1:PORT, nginx
    a: Backend  # the first upstream line (8001 as shipped)
    b: Backend

    async def placement(self) -> tuple[int, int]:
        return await self.a.sessions(), await self.b.sessions()


def nginx_config(tmp: Path, listen_port: int, port_a: int, port_b: int) -> Path:
    """The shipped config with its ports rewritten, included from a main config that keeps pid, logs and
    temp files under ``tmp`` (so nginx runs without root)."""
    shipped = SHIPPED_CONF.read_text()
    rewritten = shipped
    for old, new in (
        ("server 127.0.0.1:8001 ", f"server 127.0.0.1:{port_a} "),
        ("server 127.0.0.1:8002 ", f"server 127.0.0.1:{port_b} "),
        ("listen 8080;", f"listen 127.0.0.1:{listen_port};"),
    ):
        assert rewritten.count(old) == 1, f"the shipped config no longer has exactly one {old!r}"
        rewritten = rewritten.replace(old, new)
    snippet = tmp / "stream-server.conf"
    snippet.write_text(rewritten)
    temp = "\n".join(
        f"    {kind}_temp_path {tmp / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = tmp / "nginx.conf"
    main.write_text(
        f"pid {tmp / 'nginx.pid'};\n"
        f"error_log {tmp / 'error.log'} info;\n"
        "events {}\n"
        "http {\n"
        "    log_format upstreams '$request_uri $status upstream $upstream_addr $upstream_status';\n"
        f"    access_log {tmp / 'access.log'} upstreams;\n"
        f"{temp}\n"
        f"    include {snippet};\n"
        "}\n"
    )
    return main


async def until(check: Any, what: str, timeout_s: float = 20.0) -> None:
    """Poll the coroutine function ``check`` until it returns true, for at most ``timeout_s`` (scaled)."""
    try:
        async with timeout(scaled(timeout_s)):
            while True:
                try:
                    if await check():
                        return
                except (aiohttp.ClientError, OSError):
                    pass
                await asyncio.sleep(0.05)
    except asyncio.TimeoutError:  # not the builtin on 3.10 (stream_server/compat.py)
        raise AssertionError(f"timed out waiting for {what}") from None


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=scaled(10))


@asynccontextmanager
async def cluster(
    tmp: Path, a_flags: Sequence[str] = (), b_flags: Sequence[str] = ()
) -> AsyncIterator[Cluster]:
    """nginx with the shipped config in front of two lb_server processes, all on 127.0.0.1."""
    assert NGINX.exists(), f"{NGINX} is missing: these tests need nginx (scripts/test.sh installs it)"
    procs: list[subprocess.Popen[bytes]] = []
    backends: list[Backend] = []
    logs = []
    try:
        for name, flags in (("a", a_flags), ("b", b_flags)):
            port = free_port()
            log = tmp / f"server-{name}.log"
            logs.append(log)
            cmd = [sys.executable, "-m", "tests.lb_server", "--host", "127.0.0.1", "--port", str(port)]
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [*cmd, *COMMON_FLAGS, *flags], cwd=REPO, stdout=out, stderr=subprocess.STDOUT
                )
            procs.append(proc)
            backends.append(Backend(port, proc, log))
        listen_port = free_port()
        main = nginx_config(tmp, listen_port, backends[0].port, backends[1].port)
        nginx_log = tmp / "nginx.out"
        logs += [nginx_log, tmp / "error.log"]
        with nginx_log.open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [str(NGINX), "-c", str(main), "-p", str(tmp), "-g", "daemon off;"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        for backend in backends:

            async def ready(backend: Backend = backend) -> bool:
                assert backend.proc.poll() is None, backend.log.read_text()
                return (await backend.get("/readyz"))[0] == 200

            await until(ready, f"server on port {backend.port}", 60)

        async def nginx_up() -> bool:
            assert procs[-1].poll() is None, nginx_log.read_text() + (tmp / "error.log").read_text()
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{listen_port}/livez") as r,
            ):
                return r.status == 200

        await until(nginx_up, "nginx", 20)
        yield Cluster(f"ws://127.0.0.1:{listen_port}", backends[0], backends[1])
    except BaseException:
        for log in logs:  # what each process said, in the failure report
            if log.exists():
                sys.stderr.write(f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}\n")
        raise
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM if proc is procs[-1] else signal.SIGKILL)
        for proc in procs:
            try:
                proc.wait(timeout=scaled(10))
            except subprocess.TimeoutExpired:
                stop(proc)


@dataclass
class Caller:
    """One client stream: the audio it sent (tone spans on the stream's clock) and what came back."""

    ws: ClientConnection
    result: StreamResult = field(default_factory=StreamResult)
    tones: list[tuple[float, float]] = field(default_factory=list)
    sent_s: float = 0.0
    reader: asyncio.Task[None] | None = None

    async def send(self, samples: np.ndarray) -> None:
        await self.ws.send(pcm16(samples))
        self.sent_s += len(samples) / 16000

    async def send_phrase(self) -> None:
        """Silence, a tone and enough silence after it that the server closes the segment."""
        await self.send(silence(LEAD_MS))
        start = self.sent_s
        await self.send(tone(TONE_MS))
        self.tones.append((start, self.sent_s))
        await self.send(silence(GAP_MS))

    async def send_open_tone(self) -> None:
        """A tone with no silence after it: its segment is still open, and its final is owed."""
        await self.send(silence(LEAD_MS))
        start = self.sent_s
        await self.send(tone(TONE_MS))
        self.tones.append((start, self.sent_s))

    async def close_stream(self) -> None:
        await self.ws.send(json.dumps({"type": "CloseStream"}))

    def finals(self) -> list[dict[str, Any]]:
        return [m for m in self.result.finals() if m["channel"]["alternatives"][0]["transcript"]]

    async def until_finals(self, count: int) -> None:
        async def enough() -> bool:
            return len(self.finals()) >= count

        await until(enough, f"{count} finals")

    async def ended(self) -> StreamResult:
        assert self.reader is not None
        async with timeout(scaled(60)):
            await self.reader
        return self.result

    def assert_every_tone_has_one_final(self) -> None:
        """Each tone sent came back as exactly one final (``clip <seconds>``), and no final is extra."""
        finals = self.finals()
        spans = [(m["start"], m["start"] + m["duration"]) for m in finals]
        for start, end in self.tones:
            covering = [s for s in spans if s[0] < end and s[1] > start]
            assert len(covering) == 1, f"tone {start:.2f}-{end:.2f} s: finals {covering} of {spans}"
        assert len(finals) == len(self.tones), (self.tones, spans)
        assert all(m["channel"]["alternatives"][0]["transcript"].startswith("clip ") for m in finals)


async def _read(caller: Caller) -> None:
    try:
        async for raw in caller.ws:
            assert isinstance(raw, str)
            caller.result.messages.append(json.loads(raw))
    except ConnectionClosed:
        pass
    await caller.ws.wait_closed()
    caller.result.close_code = caller.ws.close_code
    caller.result.close_reason = caller.ws.close_reason or ""


async def open_caller(url: str, **kwargs: Any) -> Caller:
    """A stream through nginx, its messages read in the background."""
    ws = await connect(
        f"{url}/v1/listen?encoding=linear16&sample_rate=16000", open_timeout=scaled(10), **kwargs
    )
    caller = Caller(ws)
    caller.reader = asyncio.ensure_future(_read(caller))
    return caller


async def open_tracked(c: Cluster, callers: dict[str, list[Caller]]) -> Caller:
    """Open a stream through nginx and record which backend took it (from each backend's /health)."""
    before = await c.placement()
    caller = await open_caller(c.url)

    async def placed() -> bool:
        return sum(await c.placement()) == sum(before) + 1

    await until(placed, "the new stream on a backend")
    after = await c.placement()
    callers["a" if after[0] > before[0] else "b"].append(caller)
    return caller


async def finish_normally(caller: Caller) -> None:
    """CloseStream, then: close 1000, Metadata last, and one final for every tone sent."""
    await caller.close_stream()
    result = await caller.ended()
    assert result.close_code == 1000, (result.close_code, result.messages)
    assert result.messages[-1]["type"] == "Metadata"
    assert not result.of_type("Error"), result.of_type("Error")
    caller.assert_every_tone_has_one_final()


async def upgraded_after_503(tmp: Path) -> bool:
    """Whether nginx's access log has a WebSocket handshake answered 503 by one backend and 101 by the
    next (``$upstream_status`` lists every backend tried)."""
    log = tmp / "access.log"
    return (
        log.exists()
        and re.search(r"^/v1/listen\S* 101 upstream \S+, \S+ 503, 101$", log.read_text(), re.M) is not None
    )


async def test_streams_spread_over_both_backends(tmp_path: Path) -> None:
    """Four streams through nginx (least_conn) land two on each backend, and each gets all its finals."""
    async with cluster(tmp_path) as c:
        callers: dict[str, list[Caller]] = {"a": [], "b": []}
        for _ in range(4):
            await open_tracked(c, callers)
        assert (len(callers["a"]), len(callers["b"])) == (2, 2)
        assert await c.placement() == (2, 2)
        everyone = callers["a"] + callers["b"]
        for caller in everyone:
            await caller.send_phrase()
        for caller in everyone:
            await finish_normally(caller)


async def test_sigterm_drains_one_backend_and_new_streams_go_to_the_other(tmp_path: Path) -> None:
    """SIGTERM to one backend mid-stream: its stream that sends CloseStream ends normally, a new stream
    is retried by nginx on the other backend (a normal session, never the 503), the stream still open at
    the drain timeout gets every final it is owed, SERVER_SHUTTING_DOWN and 1012, the other backend's
    streams never notice, and once the drained process exited nginx still serves new streams."""
    drain_s = scaled(5)
    async with cluster(tmp_path, a_flags=("--drain-timeout-s", str(drain_s))) as c:
        callers: dict[str, list[Caller]] = {"a": [], "b": []}
        for _ in range(4):
            await open_tracked(c, callers)
        assert (len(callers["a"]), len(callers["b"])) == (2, 2)
        everyone = callers["a"] + callers["b"]
        for caller in everyone:
            await caller.send_phrase()
            await caller.send_phrase()
        for caller in everyone:
            await caller.until_finals(2)

        finishing, lingering = callers["a"]
        c.a.proc.send_signal(signal.SIGTERM)

        async def draining() -> bool:
            return (await c.a.get("/readyz"))[0] == 503

        await until(draining, "the backend to drain")
        assert await c.a.sessions() == 2, "the drain keeps open streams"

        # Streams on the draining backend go on: more audio, one segment left open.
        for caller in (finishing, lingering):
            await caller.send_phrase()
            await caller.send_open_tone()
        await finish_normally(finishing)  # ended by itself within the drain timeout

        # Now nginx holds 1 connection to the draining backend and 2 to the other: least_conn asks the
        # draining one first, gets 503 SHUTTING_DOWN, and passes the handshake to the other.
        newcomer = await open_caller(c.url)
        await newcomer.send_phrase()
        assert await c.a.rejected("draining") >= 1, "nginx never asked the draining backend"
        assert await c.b.sessions() == 3
        await finish_normally(newcomer)
        await until(lambda: upgraded_after_503(tmp_path), "nginx's log line of the retried handshake")

        lingered = await lingering.ended()  # the drain timeout: its finals, then the shutdown
        assert lingered.close_code == 1012, (lingered.close_code, lingered.messages)
        assert [m["type"] for m in lingered.messages[-2:]] == ["Error", "Metadata"]
        assert lingered.messages[-2]["code"] == "SERVER_SHUTTING_DOWN"
        assert len(lingered.of_type("Error")) == 1
        lingering.assert_every_tone_has_one_final()

        assert c.a.proc.wait(timeout=scaled(30)) == 0, (
            "the drained server exits 0 once its last stream is gone"
        )

        # The drained backend's port is closed now: nginx passes the next stream to the other one.
        late = await open_caller(c.url)
        await late.send_phrase()
        await finish_normally(late)
        for caller in callers["b"]:  # the other backend's streams never noticed
            await caller.send_phrase()
            await finish_normally(caller)


async def test_a_full_backend_sends_new_streams_to_the_other(tmp_path: Path) -> None:
    """A backend at --max-sessions answers 503 AT_CAPACITY, nginx retries the handshake on the other, and
    every client gets a normal session with all its finals."""
    async with cluster(tmp_path, a_flags=("--max-sessions", "1")) as c:
        callers: dict[str, list[Caller]] = {"a": [], "b": []}
        # Until the full backend holds its one stream and the other holds two: least_conn then offers
        # the next stream to the full one (fewer connections) first, unless a refusal while these
        # opened already took it out for fail_timeout; either way one handshake was refused and retried.
        while len(callers["a"]) < 1 or len(callers["b"]) < 2:
            await open_tracked(c, callers)
            assert len(callers["a"]) <= 1 and len(callers["a"]) + len(callers["b"]) <= 4
        probe = await open_caller(c.url)
        await probe.send_phrase()
        assert await c.placement() == (1, 3)
        assert await c.a.rejected("max_sessions") >= 1, "nginx never asked the full backend"
        await finish_normally(probe)
        everyone = [*callers["a"], *callers["b"]]
        for caller in everyone:
            await caller.send_phrase()
        for caller in everyone:
            await finish_normally(caller)
        # nginx logs a WebSocket when it closes: the retried one, whichever it was, is logged by now.
        await until(lambda: upgraded_after_503(tmp_path), "nginx's log line of the retried handshake")


async def test_the_servers_see_each_clients_own_address_through_nginx(tmp_path: Path) -> None:
    """With --max-sessions-per-ip 1 on both backends, each client address holds one stream per backend
    and a third from it gets 429 TOO_MANY_SESSIONS, while other addresses, and one claiming a full
    address in its own X-Forwarded-For, are admitted: the servers count the address nginx saw."""
    flags = ("--max-sessions-per-ip", "1")
    async with cluster(tmp_path, a_flags=flags, b_flags=flags) as c:
        admitted = [await open_caller(c.url, local_addr=(address, 0)) for address in ("127.0.0.5",) * 2]
        assert await c.placement() == (1, 1)
        admitted += [await open_caller(c.url, local_addr=("127.0.0.6", 0)) for _ in range(2)]
        assert await c.placement() == (2, 2)
        admitted.append(
            await open_caller(
                c.url, local_addr=("127.0.0.7", 0), additional_headers={"X-Forwarded-For": "127.0.0.5"}
            )
        )
        with pytest.raises(InvalidStatus) as refused:
            await open_caller(c.url, local_addr=("127.0.0.5", 0))
        assert refused.value.response.status_code == 429
        assert json.loads(refused.value.response.body)["code"] == "TOO_MANY_SESSIONS"
        for caller in admitted:
            await caller.send_phrase()
            await finish_normally(caller)


async def test_when_both_backends_are_full_the_client_gets_503_at_capacity_with_retry_after(
    tmp_path: Path,
) -> None:
    """Both backends full: a new stream gets 503 AT_CAPACITY with Retry-After, first as the last server
    asked wrote it, then (the first server now marked failed) from nginx's own @no_replica answer."""
    flags = ("--max-sessions", "1")
    async with cluster(tmp_path, a_flags=flags, b_flags=flags) as c:
        held = [await open_caller(c.url) for _ in range(2)]
        assert await c.placement() == (1, 1)
        descriptions = []
        for _ in range(2):
            with pytest.raises(InvalidStatus) as refused:
                await open_caller(c.url)
            response = refused.value.response
            assert response.status_code == 503
            body = json.loads(response.body)
            assert body["code"] == "AT_CAPACITY"
            assert int(response.headers["Retry-After"]) > 0
            descriptions.append(body["description"])
        # nginx counts a 503 against a server (max_fails) only when it went on to the next one: the
        # first refusal marks the first server asked, so the second handshake finds one server left,
        # is refused there too, and nginx, with no server left to try, answers itself.
        assert descriptions[0] != NGINX_REFUSAL and descriptions[1] == NGINX_REFUSAL, descriptions
        assert await c.a.rejected("max_sessions") >= 1 and await c.b.rejected("max_sessions") >= 1
        for caller in held:
            await caller.send_phrase()
            await finish_normally(caller)
