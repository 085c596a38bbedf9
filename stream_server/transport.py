"""The only module that touches sockets: the aiohttp app, admission, the pump, closing.

Routes (README, "Protocol" and "Observability"):

- ``GET /v1/listen`` - the WebSocket stream (README, "Protocol").
- ``GET /v1/twilio`` - a Twilio Media Stream of a call (README, "Call-centre audio").
- ``GET /v1/calls`` - the live calls; ``GET /v1/calls/{callSid}`` - a WebSocket following one.
- ``GET /health`` - model, device, readiness; 200 when ready, 503 while loading or failed.
- ``GET /metrics`` - Prometheus text.
- ``GET /`` - the live-captions page, when the package carries it.

Each stream runs two tasks around its :class:`~stream_server.session.Session`: a reader, which reads
its socket all the time (so keepalive pings are answered) and feeds the session WebSocket messages,
keeping those beyond ``max_pending_finals`` waiting finals in the stream's
:class:`~stream_server.spool.Spool` on disk (it stops reading only when the spool is full or the disk
fails: README, "Back-pressure"), and a writer, the only task that sends. Jobs go to the shared
:class:`~stream_server.batcher.Batcher`; each answer is fed back to the session and wakes the writer.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import WebSocketError, WSCloseCode, WSMsgType, web

from . import __version__
from .auth import MAX_GRANT_BODY_BYTES, WWW_AUTHENTICATE, Authenticator, Principal, parse_grant_body
from .batcher import Batcher, BatchReport
from .calls import CallFeed, CallHub, Subscriber
from .capacity import CapacityModel, CapacitySettings, calibration_clips
from .config import Config, default_threads
from .engines.base import SAMPLE_RATE_HZ, Engine, EngineInfo, TranscribeRequest, Transcript
from .engines.hub import is_hub_id
from .errors import AuthError, BadRequest, BatcherClosed, InterimSkipped
from .funasr import FunasrSession
from .limits import FairShare, client_address, is_trusted, parse_networks
from .metrics import Metrics
from .protocol import (
    AUTH_PARAMS,
    Error,
    ModelInfo,
    Results,
    ServerEvent,
    StreamOptions,
    parse_options,
)
from .session import Job, JobKind, SegmentKey, Session, SessionIdentity, SessionSettings
from .spool import BINARY, OVERSIZED, TEXT, Spool
from .stream import Stream
from .twilio import signed_url, twilio_signature_valid
from .twilio_call import TwilioCall
from .vad import FrameVad, MinSpeechRun, NoiseGate, WebRtcVad
from .webhook import WebhookSender, webhook_url_allowed

logger = logging.getLogger(__name__)

STATIC_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*\.(?:js|mjs|css|html|svg|png|ico)")

READY = "ready"
LOADING = "loading"
FAILED = "failed"

BULK_LEAD_S = 5.0
"""A stream whose audio runs this far ahead of the wall clock is an upload, not a live stream."""

DEFAULT_TARGET_LATENCY_MS = 1000
"""End of speech to final that admission protects with SenseVoice (endpointing included)."""
FALLBACK_TARGET_LATENCY_MS = 1500
"""The same for the faster-whisper fallback: a slower model, judged by a looser target (issue 7)."""

RETRY_AFTER_CAPACITY_S = 5
"""``Retry-After`` on a refusal at capacity: streams end and quiet ones are re-measured within seconds."""


def capacity_servers(info: EngineInfo, cores: int) -> int:
    """Engine calls that run at once on cores of their own: the workers, or one when their threads
    together want more cores than there are (ONNX workers that may each use every core)."""
    workers = max(1, info.max_concurrent_calls)
    try:
        threads = max(1, int(info.extras.get("threads", "1")))
    except ValueError:
        threads = 1
    return workers if workers * threads <= max(1, cores) else max(1, min(workers, cores // threads))


def measure_engine_speed(engine: Engine, at_once: int = 1) -> list[tuple[float, float]]:
    """Time calls per calibration length on low noise, ``at_once`` at a time (run off the event loop,
    after warm-up), twice.

    With workers on cores of their own, they run all at once, because that is the speed that matters
    when finals queue (they still share memory bandwidth). Workers that share the cores are one server
    (:func:`capacity_servers`), timed one call at a time.

    Returns:
        ``(audio seconds, call seconds)`` pairs for :meth:`CapacityModel.calibrate`.
    """
    workers = max(1, at_once)
    rng = np.random.default_rng(0)

    def timed(clip: np.ndarray) -> float:
        started = time.perf_counter()
        engine.transcribe([TranscribeRequest(clip)])
        return time.perf_counter() - started

    samples: list[tuple[float, float]] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="calibrate") as pool:
        for audio_s in calibration_clips(engine.info.max_audio_s):
            clip = (0.01 * rng.standard_normal(int(audio_s * SAMPLE_RATE_HZ))).astype(np.float32)
            for _ in range(2):
                samples.extend((audio_s, t) for t in pool.map(timed, [clip] * workers))
    logger.info(
        "engine speed (%d at once): %s", workers, ", ".join(f"{x:g} s in {t:.3f} s" for x, t in samples)
    )
    return samples


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


MAX_HEADER_CHARS = 1024


def header_safe(text: str) -> str:
    """``text`` as a header value: printable ASCII only (control and non-ASCII characters escaped as
    ``\\xNN``/``\\uNNNN``, so a client's query cannot break or inject headers), at most
    ``MAX_HEADER_CHARS``."""
    safe = "".join(
        c if 32 <= ord(c) < 127 else (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")
        for c in text[:MAX_HEADER_CHARS]
    )
    return safe[:MAX_HEADER_CHARS]


def _json_error(status: int, code: str, description: str, **headers: str) -> web.Response:
    body = json.dumps({"type": "Error", "code": code, "description": description, "message": description})
    return web.Response(
        status=status,
        text=body,
        content_type="application/json",
        headers={"dg-error": header_safe(description), **headers},
    )


# What clients learn about the engine (/health, Metadata, refusals): nothing internal. Local paths,
# library versions and exception text go to the log only (README, "Authentication": what is disclosed).
PUBLIC_EXTRAS = frozenset(
    {
        "backend",
        "threads",
        "workers",
        "length_buckets_s",
        "beam_size",
        "retry_beam_size",
        "encoder_buckets_s",
        "encoder_margin_s",
        "batch_encoder",
        "compute_type",
        "multilingual_model",
    }
)
"""Engine extras that say how it runs, not where from; any other extra (a version, a file) stays private."""
LOCAL_MODEL = "local folder"
MODEL_FAILED_DESCRIPTION = "The model could not be loaded; the server's log says why."


def public_model_id(model: str) -> str:
    """A hub id as it is (``iic/SenseVoiceSmall``); anything else, which is a path, as ``local folder``."""
    return model if is_hub_id(model) and not Path(model).exists() else LOCAL_MODEL


def public_extras(extras: dict[str, str]) -> dict[str, str]:
    """The allowed extras (``PUBLIC_EXTRAS``), and only values that hold no path."""
    return {k: v for k, v in extras.items() if k in PUBLIC_EXTRAS and "/" not in v and "\\" not in v}


def public_fallback_reason(info: EngineInfo) -> str | None:
    """Why a fallback runs, for clients: a fixed sentence (the real reason, with hub errors and paths,
    is in the log)."""
    if info.fallback_reason is None:
        return None
    languages = ", ".join(info.languages) or "auto"
    return (
        f"The server could not load its main model and runs the fallback {info.name} ({languages}); "
        "its log says why."
    )


def _request_key(name: str, kind: type[Any]) -> Any:
    """aiohttp's typed request key where it has one (from 3.14 a plain str key warns), else the name."""
    make = getattr(web, "RequestKey", None)
    return make(name, kind) if make is not None else name


PRINCIPAL_KEY: Any = _request_key("principal", Principal)
"""``request[PRINCIPAL_KEY]``: who an authenticated stream handshake is (absent on a server without keys)."""
WS_PROTOCOLS_KEY: Any = _request_key("ws_protocols", tuple)
"""``request[WS_PROTOCOLS_KEY]``: the subprotocol the handshake selects (``()`` or one)."""


async def _read_body(request: web.Request) -> bytes:
    """A request's body, but no more than one byte past ``MAX_GRANT_BODY_BYTES``."""
    body = b""
    while len(body) <= MAX_GRANT_BODY_BYTES:
        chunk = await request.content.read(MAX_GRANT_BODY_BYTES + 1 - len(body))
        if not chunk:
            break
        body += chunk
    return body


async def _hide_server_software(_: web.Request, response: web.StreamResponse) -> None:
    """No library versions in answers (aiohttp's default ``Server`` header names Python's and its own)."""
    response.headers["Server"] = "stream-server"


def web_dir() -> Path | None:
    """Where the browser client and captions page are installed (``client_js/`` in the source tree,
    packaged as ``stream_server.web``), or None when absent."""
    spec = importlib.util.find_spec("stream_server.web")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)))
    return path if path.is_dir() else None


def default_vad_factory(config: Config) -> Callable[[], FrameVad]:
    """The per-session VAD the config asks for."""
    seg = config.segmenter
    base: Callable[[], FrameVad]
    if seg.vad == "fsmn":
        from .fsmn_vad import FsmnVadModel

        fsmn = FsmnVadModel.load(threads=1)
        return lambda: fsmn.session_vad(frame_ms=seg.frame_ms, chunk_ms=seg.fsmn_chunk_ms)
    if seg.vad == "silero":
        from .silero_vad import SileroVadModel

        silero = SileroVadModel.load(threads=1)  # one ONNX Runtime session, shared by every stream
        base = lambda: silero.session_vad(frame_ms=seg.frame_ms, threshold=seg.silero_threshold)  # noqa: E731
    else:
        base = lambda: WebRtcVad(seg.vad_aggressiveness, seg.frame_ms, seg.min_energy_dbfs)  # noqa: E731

    def build() -> FrameVad:
        # The gate and the blip filter (load_tests/vad_lag.py measures both): speech ends where the
        # level falls back to the room's, and a click in a pause does not restart the endpointing.
        vad: FrameVad = base()
        if seg.noise_floor_margin_db > 0:
            vad = NoiseGate(vad, margin_db=seg.noise_floor_margin_db)
        if seg.min_speech_run_frames > 1:
            vad = MinSpeechRun(vad, min_frames=seg.min_speech_run_frames)
        return vad

    return build


class Server:
    """The whole server: model, batcher, metrics and the aiohttp app.

    Args:
        config: all settings.
        engine_loader: loads the engine (called once, off the event loop); ignored when ``engine``
            is given.
        engine: an already loaded engine (tests pass fakes here).
        vad_factory: builds each session's VAD (default: from the config).
        on_fatal: called when the engine cannot be loaded (the CLI exits non-zero).
    """

    def __init__(
        self,
        config: Config,
        *,
        engine_loader: Callable[[], Engine] | None = None,
        engine: Engine | None = None,
        vad_factory: Callable[[], FrameVad] | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        if engine is None and engine_loader is None:
            raise ValueError("give an engine or an engine_loader")
        self.config = config
        self.metrics = Metrics()
        self._engine_loader = engine_loader
        self.engine: Engine | None = engine
        self.batcher: Batcher | None = None
        self.capacity: CapacityModel | None = None
        self._calibration: list[tuple[float, float]] = []
        self._vad_factory = vad_factory or default_vad_factory(config)
        self._on_fatal = on_fatal
        self.state = LOADING
        self.load_error: str | None = None
        self.started_s = time.monotonic()
        self.connections: set[_Connection] = set()
        limits = config.limits
        self.fair = FairShare(limits.max_sessions_per_ip, limits.max_sessions_per_key)
        self._trusted_proxies = parse_networks(limits.trusted_proxies)
        self._index_html: str | None = None
        self.draining = False
        self._runner: web.AppRunner | None = None
        self._load_task: asyncio.Task[None] | None = None
        self.auth = Authenticator.from_config(config.auth)  # reads --api-keys-file (ConfigError)
        calls = config.calls
        self.webhook: WebhookSender | None = None
        if calls.webhook_url or calls.webhook_hosts:
            self.webhook = WebhookSender(
                max_attempts=calls.webhook_max_attempts,
                timeout_s=calls.webhook_timeout_s,
                on_outcome=lambda outcome: self.metrics.webhook_deliveries.labels(outcome).inc(),
                user_agent=f"stream-server/{__version__}",
            )
        self.calls = CallHub(self.metrics, backlog=calls.subscriber_backlog, webhook=self.webhook)
        self.app = self._build_app()

    # ------------------------------------------------------------------------------------------
    # Lifecycle

    def _build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/listen", self._listen)
        app.router.add_get("/v1/twilio", self._twilio)
        app.router.add_get("/v1/calls", self._calls)
        app.router.add_get("/v1/calls/{call_sid}", self._follow_call)
        app.router.add_get("/health", self._health)
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_post("/v1/auth/grant", self._grant)
        app.router.add_route("OPTIONS", "/v1/auth/grant", self._grant_preflight)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/", self._root)
        app.router.add_get("/v1/funasr", self._funasr)
        app.router.add_get("/static/{name}", self._static)
        app.on_startup.append(self._on_startup)
        app.on_response_prepare.append(_hide_server_software)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, _: web.Application) -> None:
        if self.webhook is not None:
            await self.webhook.start()
        if self.engine is not None:
            self._engine_ready(self.engine)
        else:
            self._load_task = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        assert self._engine_loader is not None
        started = time.monotonic()
        try:
            loop = asyncio.get_running_loop()
            engine = await loop.run_in_executor(None, self._engine_loader)
            if self.config.engine.warmup:
                servers = capacity_servers(engine.info, default_threads())
                self._calibration = await loop.run_in_executor(None, measure_engine_speed, engine, servers)
        except Exception as exc:
            self.state = FAILED
            self.load_error = str(exc) or type(exc).__name__
            logger.error("model could not be loaded: %s", self.load_error, exc_info=True)
            if self._on_fatal is not None:
                self._on_fatal(exc)
            return
        logger.info("model loaded in %.1f s", time.monotonic() - started)
        self._engine_ready(engine)

    def _engine_ready(self, engine: Engine) -> None:
        self.engine = engine
        self.batcher = Batcher(engine, self.config.batch, on_batch=self._on_batch)
        self.batcher.start()
        self.capacity = CapacityModel(
            self._capacity_settings(capacity_servers(engine.info, default_threads()))
        )
        self.capacity.calibrate(self._calibration)
        self.metrics.engine_workers.set(self.batcher.workers)
        info = engine.info
        if info.device.startswith("cuda"):
            index = int(info.device.split(":")[1]) if ":" in info.device else 0
            self.metrics.watch_gpu(index)
        self.state = READY
        self.metrics.model_ready.set(1)
        if info.fallback_reason:
            logger.warning("RUNNING THE FALLBACK MODEL %s: %s", info.name, info.fallback_reason)
        logger.info("ready: %s (%s) on %s, %s", info.name, info.model, info.device, info.dtype)
        state = self.capacity.state(time.monotonic())
        a, b = state.call_s
        logger.info(
            "capacity: %d worker(s) as %d server(s); a call takes %.3f s + %.3f s per audio second; "
            "about %s typical streams at the %d ms target (typical: %.0f %% speech in %.1f s segments)%s",
            self.batcher.workers,
            self.capacity.settings.workers,
            a,
            b,
            state.capacity_sessions if self.capacity.typical_demand() > 0 else "unlimited",
            self.target_latency_ms,
            100 * self.config.limits.typical_speech_ratio,
            self.config.limits.typical_segment_ms / 1000,
            "" if self.config.limits.admission else " (admission by capacity is off)",
        )

    @property
    def target_latency_ms(self) -> int:
        """The latency admission protects: the configured one, or the engine's own default."""
        if self.config.limits.target_latency_ms:
            return self.config.limits.target_latency_ms
        name = self.engine.info.name if self.engine is not None else ""
        return FALLBACK_TARGET_LATENCY_MS if name.startswith("faster-whisper") else DEFAULT_TARGET_LATENCY_MS

    def _capacity_settings(self, workers: int) -> CapacitySettings:
        seg, limits = self.config.segmenter, self.config.limits
        return CapacitySettings(
            workers=workers,
            admission=limits.admission,
            target_latency_s=self.target_latency_ms / 1000,
            endpointing_s=seg.endpointing_ms / 1000,
            speculative_s=seg.speculative_final_ms / 1000,
            speech_ratio=limits.typical_speech_ratio,
            segment_s=limits.typical_segment_ms / 1000,
            max_segment_s=seg.max_segment_ms / 1000,
        )

    def _on_batch(self, report: BatchReport) -> None:
        self.metrics.record_batch(report)
        # A timed-out call's time is how long a hung engine held the worker, not a speed to fit.
        if self.capacity is not None and not report.timed_out:
            self.capacity.observe_call(
                time.monotonic(),
                audio_s=report.audio_s,
                seconds=report.inference_s,
                size=report.size,
                interim=report.interim,
                aborted=report.aborted,
                queue_wait_s=report.queue_wait_s,
            )

    def capacity_state(self) -> dict[str, Any] | None:
        """The capacity report of ``/health`` (None before the model is ready)."""
        if self.capacity is None:
            return None
        state = self.capacity.state(time.monotonic())
        self._export_capacity_metrics()
        a, b = state.call_s
        return {
            "accepting": state.accepting,
            "sessions_left": state.sessions_left,
            "capacity_sessions": state.capacity_sessions,
            "load": round(state.load, 3) if math.isfinite(state.load) else None,
            "utilization": round(state.utilization, 3),
            "max_utilization": round(state.max_load, 3),
            "target_latency_ms": self.target_latency_ms,
            "admission": self.config.limits.admission,
            "final_p95_ms": None if state.final_p95_s is None else round(1000 * state.final_p95_s),
            "workers": self.batcher.workers if self.batcher is not None else 0,
            "servers": self.capacity.settings.workers,
            "call_s": {"fixed": round(a, 4), "per_audio_second": round(b, 4)},
        }

    def _export_capacity_metrics(self) -> None:
        if self.capacity is None:
            return
        state = self.capacity.state(time.monotonic())
        m = self.metrics
        m.capacity_sessions.set(state.capacity_sessions)
        m.capacity_sessions_left.set(state.sessions_left)
        m.capacity_load.set(state.load if math.isfinite(state.load) else 0.0)
        m.engine_utilization.set(state.utilization)
        a, b = state.call_s
        m.engine_call_seconds.labels("fixed").set(a)
        m.engine_call_seconds.labels("per_audio_second").set(b)
        m.spooled_bytes.set(sum(c.spool.bytes_waiting for c in self.connections))

    async def _on_shutdown(self, _: web.Application) -> None:
        await self.drain(self.config.server.drain_timeout_s)

    async def _on_cleanup(self, _: web.Application) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.batcher is not None:
            await self.batcher.stop()
        if self.webhook is not None:
            await self.webhook.close(self.config.calls.webhook_timeout_s * 2)

    async def drain(self, timeout_s: float, finalize_timeout_s: float | None = None) -> None:
        """Stop admitting, let open streams end by themselves for up to ``timeout_s``, then finalize
        the rest and close them with 1012 (README, "Deploying: draining").

        New streams get 503 ``SHUTTING_DOWN`` and ``/readyz`` 503 from the first moment, while the
        listening socket stays open (a load balancer sees the 503 and retries elsewhere). Returns as soon
        as the last stream is gone: at once without streams, at most ``timeout_s`` plus
        ``finalize_timeout_s`` (default: the engine call timeout, or 30 s) later otherwise.
        """
        self.draining = True
        open_at_start = len(self.connections)
        if open_at_start:
            logger.info("draining: %d stream(s) may go on for up to %.0f s", open_at_start, timeout_s)
        ended_early = await self._wait_for_streams(timeout_s)
        left = [c for c in list(self.connections) if not c.finished.is_set()]
        if not left:
            if open_at_start:
                logger.info("drained: every stream ended by itself (%d)", ended_early)
            return
        logger.warning(
            "drain timeout (%.0f s): finalizing %d stream(s) and closing them with 1012 (%d ended by "
            "themselves)",
            timeout_s,
            len(left),
            ended_early,
        )
        for conn in left:
            conn.session.receive_shutdown()
            conn.after_input()
        if finalize_timeout_s is None:
            finalize_timeout_s = self.config.batch.engine_call_timeout_s or 30.0
        await self._wait_for_streams(finalize_timeout_s)
        stuck = [c for c in list(self.connections) if not c.finished.is_set()]
        for conn in stuck:  # their finals did not come in time: cut them so the process can exit
            conn.cut("drain_timeout", "its finals did not arrive within the finalize timeout")
        if stuck:
            logger.error("drain: cut %d stream(s) whose finals did not arrive in time", len(stuck))

    async def _wait_for_streams(self, timeout_s: float) -> int:
        """Wait until no stream is open or ``timeout_s`` passed; returns how many ended meanwhile."""
        open_before = [c for c in list(self.connections) if not c.finished.is_set()]
        deadline = time.monotonic() + timeout_s
        while True:
            waiting = [c for c in list(self.connections) if not c.finished.is_set()]
            remaining = deadline - time.monotonic()
            if not waiting or remaining <= 0:
                return sum(1 for c in open_before if c.finished.is_set())
            tasks = [asyncio.ensure_future(c.finished.wait()) for c in waiting]
            _, pending = await asyncio.wait(tasks, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()

    async def start(self) -> tuple[str, int]:
        """Listen on the configured host and port (0 picks one). Returns the bound address."""
        self._runner = web.AppRunner(
            self.app,
            handle_signals=False,
            access_log=None,
            # aiohttp closes a connection that has not sent a whole request this long after it
            # opened (or after its last response): the handshake timeout against slowloris.
            keepalive_timeout=self.config.limits.handshake_timeout_s,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.server.host, self.config.server.port)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        host, port = server.sockets[0].getsockname()[:2]  # type: ignore[attr-defined]
        return str(host), int(port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Wait until the model is loaded (raises RuntimeError if loading failed)."""
        deadline = time.monotonic() + timeout_s
        while self.state == LOADING:
            if time.monotonic() > deadline:
                raise TimeoutError("model did not load in time")
            await asyncio.sleep(0.05)
        if self.state == FAILED:
            raise RuntimeError(f"model failed to load: {self.load_error}")

    # ------------------------------------------------------------------------------------------
    # HTTP

    def model_info(self) -> ModelInfo:
        assert self.engine is not None
        info = self.engine.info
        return ModelInfo(
            name=info.name,
            version=__version__,
            arch=info.name.split("-")[0],
            uuid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"stream-server:{info.name}:{info.model}")),
        )

    def engine_details(self, info: EngineInfo) -> dict[str, Any]:
        """The engine as clients see it (``/health``, ``Metadata.model_details``): no local paths,
        library versions or exception text (``public_model_id``, ``public_extras``)."""
        return {
            "name": info.name,
            "model": public_model_id(info.model),
            "device": info.device,
            "dtype": info.dtype,
            "languages": list(info.languages),
            "fallback": info.fallback_reason is not None,
            "fallback_reason": public_fallback_reason(info),
            "max_batch_size": info.max_batch_size,
            "max_audio_s": info.max_audio_s,
            **public_extras(info.extras),
        }

    async def _health(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = {
            "status": self.state if not self.draining else "draining",
            "ready": self.state == READY and not self.draining,
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started_s, 1),
            "sessions": len(self.connections),
            "max_sessions": self.config.limits.max_sessions,
        }
        if self.engine is not None:
            body["model"] = self.engine_details(self.engine.info)
        if self.batcher is not None:
            body["queue_depth"] = self.batcher.queue_depth
            health = self.batcher.health  # degraded: still serving (200); failed: 503; the reason is logged
            if health.status != "ok" and body["ready"]:
                logger.info("health %s: %s", health.status, health.reason)
                body["status"], body["ready"] = health.status, health.status == "degraded"
        capacity = self.capacity_state()
        if capacity is not None:
            body["capacity"] = capacity
        if self.load_error:
            body["error"] = MODEL_FAILED_DESCRIPTION  # the exception, which may name paths, is logged
        body["auth_required"] = self.auth.enabled
        status = 200 if body["ready"] else 503
        # Pages on other origins (a dashboard, the browser client hosted elsewhere) may read it when
        # --allowed-origins lets them (every origin while no key is configured).
        cors = self.auth.cors_headers(request.headers.get("Origin"), request.headers.get("Host"))
        return web.json_response(body, status=status, headers=cors)

    async def _livez(self, _: web.Request) -> web.Response:
        """Liveness: 200 while the event loop answers, however busy the server is (a probe must never
        kill a server for being at capacity or draining)."""
        return web.json_response({"status": "alive"}, headers={"Cache-Control": "no-store"})

    def readiness(self) -> tuple[bool, str]:
        """Whether a load balancer should send this server new streams, and why not."""
        if self.draining:
            return False, "draining"
        if self.state != READY or self.batcher is None:
            return False, self.state
        health = self.batcher.health
        if health.status == "failed":
            return False, "failed"
        if len(self.connections) >= self.config.limits.max_sessions:
            return False, "max_sessions"
        if self.config.limits.admission and self.capacity is not None:
            if not self.capacity.state(time.monotonic()).accepting:
                return False, "at_capacity"
        return True, "ready"

    async def _readyz(self, _: web.Request) -> web.Response:
        """Readiness: 200 while this server takes new streams; 503 while loading, failed, draining or at
        capacity (README, "Deploying")."""
        ready, why = self.readiness()
        return web.json_response(
            {"ready": ready, "status": why},
            status=200 if ready else 503,
            headers={"Cache-Control": "no-store"},
        )

    async def _metrics(self, _: web.Request) -> web.Response:
        self.metrics.event_loop_tasks.set(len(asyncio.all_tasks()))
        if self.batcher is not None:
            self.metrics.queue_depth.labels("final").set(self.batcher.finals_waiting)
            self.metrics.queue_depth.labels("interim").set(self.batcher.interims_waiting)
        self._export_capacity_metrics()
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def _root(self, request: web.Request) -> web.StreamResponse:
        """``GET /``: FunASR's clients connect to the bare host and port; a browser gets the page."""
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._funasr(request)
        return await self._index(request)

    async def _funasr(self, request: web.Request) -> web.StreamResponse:
        """A FunASR-protocol stream (README, "FunASR clients"): its clients cannot set headers, so an API
        key may come as ``?token=KEY`` here (it then appears in access logs)."""
        refused = self._refuse_unready()
        if refused is not None:
            return refused
        assert self.engine is not None
        token = request.query.get("token")
        headers = request.headers
        try:
            self.auth.check_origin(headers.get("Origin"), headers.get("Host"))
            authorization = headers.get("Authorization") or (f"Token {token}" if token else None)
            principal, subprotocol = self.auth.authenticate(
                authorization, headers.get("Sec-WebSocket-Protocol")
            )
        except AuthError as exc:
            self.metrics.sessions_rejected.labels("origin" if exc.status == 403 else "unauthorized").inc()
            return self._refuse(request, exc)
        if principal.method != "none":
            self.metrics.auth_accepted.labels(principal.name, principal.method).inc()
        protocols = ("binary", subprotocol) if subprotocol else ("binary",)
        ws = self._stream_socket(request, protocols)
        if ws is None:
            return _json_error(
                426, "WEBSOCKET_REQUIRED", "FunASR's protocol is a WebSocket; use ws:// or wss://."
            )
        client = self._client(request)
        keyed = principal.method != "none"
        key_name = principal.name if keyed else None
        key_max = principal.max_sessions if keyed else None
        refused = self._refuse_over_limits(request, client, key_name, key_max, 1)
        if refused is not None:
            return refused
        request_id = str(uuid.uuid4())
        session = FunasrSession(
            self._settings(),
            self._vad_factory(),
            self._identity(request_id),
            vad_factory=self._vad_factory,
            supported_languages=self.engine.info.languages,
        )
        conn = _Connection(self, ws, session, request, client, key_name)
        return await self._serve(conn, request, 1, "FunASR protocol")

    async def _index(self, _: web.Request) -> web.StreamResponse:
        if self._index_html is None:  # read once: the page does not change while the server runs
            static = web_dir()
            page = static / "index.html" if static is not None else None
            self._index_html = (
                page.read_text(encoding="utf-8")
                if page is not None and page.is_file()
                else "stream_server: stream audio to ws://HOST/v1/listen (see the README)\n"
            )
        content_type = "text/html" if self._index_html.lstrip().startswith("<") else "text/plain"
        return web.Response(text=self._index_html, content_type=content_type)

    async def _static(self, request: web.Request) -> web.StreamResponse:
        """The browser client's own files: top-level files of ``client_js/`` with a web extension only
        (never its tests or node_modules)."""
        name = request.match_info["name"]
        static = web_dir()
        if static is None or not STATIC_NAME.fullmatch(name) or not (static / name).is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(static / name, headers={"Cache-Control": "no-cache"})

    # ------------------------------------------------------------------------------------------
    # Authentication (README, "Authentication"; the checks themselves are in auth.py)

    def _refuse(
        self, request: web.Request, exc: AuthError, headers: dict[str, str] | None = None
    ) -> web.Response:
        """Answer an :class:`AuthError`: its status and code, ``WWW-Authenticate`` on a 401; counted and
        logged by code (never with the credential)."""
        self.metrics.auth_failures.labels(exc.reason).inc()
        logger.info(
            "refused %s %s: %s: %s", request.remote, request.path, exc.code, header_safe(exc.description)
        )
        extra = dict(headers or {})
        if exc.status == 401:
            extra["WWW-Authenticate"] = WWW_AUTHENTICATE
        return _json_error(exc.status, exc.code, exc.description, **extra)

    def _authenticate(self, request: web.Request) -> Principal | web.Response:
        """Who a stream handshake is: the page's origin, then the key or token.

        Keeps the principal as ``request[PRINCIPAL_KEY]`` (absent on a server without keys, where
        everyone is ``anonymous``), and the subprotocol the handshake selects as
        ``request[WS_PROTOCOLS_KEY]``.

        Returns:
            The principal, or the refusal to send (401 or 403).
        """
        headers = request.headers
        try:
            self.auth.check_origin(headers.get("Origin"), headers.get("Host"))
            principal, subprotocol = self.auth.authenticate(
                headers.get("Authorization"),
                headers.get("Sec-WebSocket-Protocol"),
                query_credentials=any(name in request.query for name in AUTH_PARAMS),
            )
        except AuthError as exc:
            self.metrics.sessions_rejected.labels("origin" if exc.status == 403 else "unauthorized").inc()
            return self._refuse(request, exc)
        request[WS_PROTOCOLS_KEY] = (subprotocol,) if subprotocol else ()
        if principal.method != "none":
            request[PRINCIPAL_KEY] = principal
            self.metrics.auth_accepted.labels(principal.name, principal.method).inc()
        return principal

    async def _grant(self, request: web.Request) -> web.Response:
        """``POST /v1/auth/grant``: a short-lived token for an API key, in Deepgram's shape
        (``{"access_token": ..., "expires_in": 30}``; the body may ask ``{"ttl_seconds": N}``), for
        pages that must never hold the key itself."""
        origin, host = request.headers.get("Origin"), request.headers.get("Host")
        cors = self.auth.cors_headers(origin, host)
        if not self.auth.enabled:
            return _json_error(
                404,
                "AUTH_NOT_CONFIGURED",
                "This server has no API keys, so it grants no tokens: connect to /v1/listen without "
                "credentials.",
                **cors,
            )
        try:
            self.auth.check_origin(origin, host)
            principal = self.auth.authenticate_key(request.headers.get("Authorization"))
        except AuthError as exc:
            return self._refuse(request, exc, cors)
        try:
            body = await asyncio.wait_for(_read_body(request), self.config.limits.handshake_timeout_s)
            ttl_s = parse_grant_body(body)
        except BadRequest as exc:
            return _json_error(400, exc.code, exc.description, **cors)
        except asyncio.TimeoutError:
            return _json_error(408, "REQUEST_TIMEOUT", "The request body did not arrive in time.", **cors)
        token = self.auth.issue(principal, ttl_s)
        self.metrics.auth_grants.labels(principal.name).inc()
        logger.info("granted a %d s token to key=%s (%s)", ttl_s, principal.name, request.remote)
        return web.json_response(
            {"access_token": token, "expires_in": ttl_s}, headers={**cors, "Cache-Control": "no-store"}
        )

    async def _grant_preflight(self, request: web.Request) -> web.Response:
        """CORS preflight of a grant from a browser page: allowed origins may send ``Authorization``."""
        origin, host = request.headers.get("Origin"), request.headers.get("Host")
        cors = self.auth.cors_headers(origin, host, preflight=True)
        if "Access-Control-Allow-Origin" not in cors:
            try:
                self.auth.check_origin(origin, host)
            except AuthError as exc:
                return self._refuse(request, exc, cors)
        return web.Response(status=204, headers=cors)

    def _refuse_unready(self) -> web.Response | None:
        """The 503 for a server that is draining, loading or failed; None when it takes streams."""
        if self.draining:
            self.metrics.sessions_rejected.labels("draining").inc()
            return _json_error(
                503, "SHUTTING_DOWN", "The server is shutting down; retry shortly.", **{"Retry-After": "5"}
            )
        if self.state != READY or self.engine is None or self.batcher is None:
            self.metrics.sessions_rejected.labels("not_ready").inc()
            if self.state == FAILED:
                return _json_error(503, "MODEL_FAILED", MODEL_FAILED_DESCRIPTION)
            return _json_error(
                503, "MODEL_LOADING", "The model is still loading; retry shortly.", **{"Retry-After": "5"}
            )
        return None

    def _stream_socket(self, request: web.Request, protocols: tuple[str, ...] = ()) -> _StreamSocket | None:
        """The WebSocket of a stream, or None when the request is no WebSocket upgrade."""
        ws = _StreamSocket(
            protocols=protocols,
            # aiohttp refuses a larger message from its header, before buffering any of it; the
            # stream then ends with FRAME_TOO_LARGE after the finals it is owed (_StreamSocket).
            max_msg_size=self.config.limits.max_frame_bytes + 1,
            # Pings find peers that vanished without a FIN. Generous, because in the last resort of
            # back-pressure (a full spool) the socket is not read, so a pong can sit behind queued audio.
            heartbeat=60.0,
        )
        return ws if ws.can_prepare(request).ok else None

    def _refuse_over_limits(
        self, request: web.Request, client: str, key_name: str | None, key_max: int | None, weight: int
    ) -> web.Response | None:
        """The 429 or 503 for a stream of ``weight`` channels beyond a limit: the client's or the key's
        fair share, ``max_sessions``, or the measured capacity (README, "Admission"); None to admit."""
        refusal = self.fair.refusal(client, key_name, key_max)
        if refusal is not None:
            self.metrics.sessions_rejected.labels(refusal.reason).inc()
            logger.info("refused %s (key %s): %s", client, key_name or "-", refusal.description)
            return _json_error(429, refusal.code, refusal.description, **{"Retry-After": "5"})
        if len(self.connections) >= self.config.limits.max_sessions:
            self.metrics.sessions_rejected.labels("max_sessions").inc()
            return _json_error(
                503,
                "AT_CAPACITY",
                f"The server is at its limit of {self.config.limits.max_sessions} streams; retry shortly "
                "or use another server.",
                **{"Retry-After": "2"},
            )
        assert self.capacity is not None
        if self.config.limits.admission:
            state = self.capacity.state(time.monotonic(), weight=weight)
            if not state.accepting:
                self.metrics.sessions_rejected.labels("capacity").inc()
                logger.info("refused %s: at capacity: %s", request.remote, state.reason)
                streams = "one more stream" if weight == 1 else f"a stream of {weight} channels"
                return _json_error(
                    503,
                    "AT_CAPACITY",
                    f"The server is at its measured capacity: {streams} would push finals past "
                    f"its {self.target_latency_ms} ms latency target. Retry shortly or use "
                    "another server.",
                    **{"Retry-After": str(RETRY_AFTER_CAPACITY_S)},
                )
        return None

    async def _serve(
        self, conn: _Connection, request: web.Request, weight: int, what: str
    ) -> web.StreamResponse:
        """Take the seat ``conn`` was admitted to, run it, and give the seat back."""
        assert self.capacity is not None
        # Counted before the first await, so simultaneous handshakes cannot all pass the checks above.
        self.connections.add(conn)
        self.capacity.open(conn, time.monotonic(), weight=weight)
        self.fair.open(conn.client, conn.key_name)
        self.metrics.sessions_active.set(len(self.connections))
        try:
            await conn.ws.prepare(request)
            logger.info(
                "stream %s opened from %s (key %s): %s",
                conn.session.identity.request_id,
                conn.client,
                conn.key_name or "-",
                what,
            )
            await conn.run()
        finally:
            self.release(conn)
            conn.spool.close()
        return conn.ws

    def _client(self, request: web.Request) -> str:
        return client_address(
            request.remote, request.headers.getall("X-Forwarded-For", []), self._trusted_proxies
        )

    async def _listen(self, request: web.Request) -> web.StreamResponse:
        refused = self._refuse_unready()
        if refused is not None:
            return refused
        assert self.engine is not None
        authenticated = self._authenticate(request)  # also kept as request[PRINCIPAL_KEY]
        if isinstance(authenticated, web.Response):
            return authenticated
        # the "token" or "bearer" subprotocol offered (auth.py)
        ws = self._stream_socket(request, request[WS_PROTOCOLS_KEY])
        if ws is None:
            return _json_error(
                426, "WEBSOCKET_REQUIRED", "This endpoint speaks WebSocket; connect with ws:// or wss://."
            )
        query = {key: request.query.getall(key) for key in request.query.keys()}
        try:
            options = parse_options(query, supported_languages=self.engine.info.languages)
        except BadRequest as exc:
            self.metrics.sessions_rejected.labels("bad_request").inc()
            logger.info(
                "refused %s: %s", request.remote, header_safe(str(exc))
            )  # no raw control characters in logs
            return _json_error(400, exc.code, exc.description)
        client = self._client(request)
        principal: Principal | None = request.get(PRINCIPAL_KEY)
        keyed = principal is not None and principal.method != "none"  # a server without keys has none
        key_name = principal.name if keyed and principal is not None else None
        key_max = principal.max_sessions if keyed and principal is not None else None
        weight = options.transcribed_channels
        refused = self._refuse_over_limits(request, client, key_name, key_max, weight)
        if refused is not None:
            return refused
        request_id = str(uuid.uuid4())
        ws.headers["dg-request-id"] = request_id
        session = self._new_session(options, request_id)
        conn = _Connection(self, ws, session, request, client, key_name)
        return await self._serve(conn, request, weight, str(options))

    # ------------------------------------------------------------------------------------------
    # Calls: Twilio Media Streams in, results out to the webhook and subscribers

    def _check_twilio(self, request: web.Request) -> web.Response | None:
        """The 403 for a Twilio upgrade this server must not take; None to take it (README,
        "Call-centre audio: security")."""
        calls = self.config.calls
        if not calls.twilio_auth_token:
            if self.auth.enabled:
                self.metrics.sessions_rejected.labels("unauthorized").inc()
                return _json_error(
                    403,
                    "TWILIO_AUTH_NOT_CONFIGURED",
                    "This server requires API keys, and Twilio cannot send one: start it with "
                    "--twilio-auth-token so that Twilio's signed requests are accepted.",
                )
            return None
        peer_trusted = is_trusted(request.remote, self._trusted_proxies)
        headers = request.headers
        try:
            url = signed_url(
                request.scheme,
                request.host,
                request.path_qs,
                forwarded_proto=headers.get("X-Forwarded-Proto") if peer_trusted else None,
                forwarded_host=headers.get("X-Forwarded-Host") if peer_trusted else None,
                public_url=calls.public_url or None,
            )
        except ValueError:
            url = ""
        if url and twilio_signature_valid(calls.twilio_auth_token, url, headers.get("X-Twilio-Signature")):
            return None
        self.metrics.sessions_rejected.labels("twilio_signature").inc()
        logger.info(
            "refused %s %s: X-Twilio-Signature %s for %s",
            request.remote,
            request.path,
            "invalid" if headers.get("X-Twilio-Signature") else "missing",
            header_safe(url)[:200],
        )
        return _json_error(
            403,
            "TWILIO_SIGNATURE_INVALID",
            "This endpoint takes only Twilio Media Streams signed with the account's Auth Token "
            "(X-Twilio-Signature); behind a proxy, set --public-url to the wss:// address Twilio "
            "connects to.",
        )

    async def _twilio(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/twilio``: one Twilio Media Stream (a call's tracks) as a stream of two channels."""
        refused = self._refuse_unready() or self._check_twilio(request)
        if refused is not None:
            return refused
        ws = self._stream_socket(request)
        if ws is None:
            return _json_error(
                426, "WEBSOCKET_REQUIRED", "This endpoint speaks WebSocket (Twilio Media Streams, wss://)."
            )
        client = self._client(request)
        weight = 2  # both tracks, until start says (a call is admitted before it says which it has)
        refused = self._refuse_over_limits(request, client, None, None, weight)
        if refused is not None:
            return refused
        request_id = str(uuid.uuid4())
        call = self._new_call(request_id)
        conn = _Connection(self, ws, call, request, client, None, sink=_CallSink(self, call))
        return await self._serve(conn, request, weight, "Twilio Media Stream")

    def _new_call(self, request_id: str) -> TwilioCall:
        assert self.engine is not None
        identity, settings = self._identity(request_id), self._settings()
        calls = self.config.calls
        return TwilioCall(
            settings,
            self._vad_factory(),
            identity,
            vad_factory=self._vad_factory,
            defaults=calls.defaults,
            supported_languages=self.engine.info.languages,
            max_gap_ms=calls.max_gap_ms,
        )

    def open_call(self, call: TwilioCall) -> CallFeed:
        """The feed of a call whose ``start`` came: its webhook is the server's, or the call's own
        ``webhook_url`` parameter when its host is on ``--webhook-allowed-hosts``."""
        start = call.start
        assert start is not None
        calls = self.config.calls
        url: str | None = calls.webhook_url or None
        asked = start.custom_parameters.get("webhook_url")
        if asked:
            if webhook_url_allowed(asked, calls.webhook_hosts):
                url = asked
            else:
                call.input_errors["WEBHOOK_NOT_ALLOWED"] += 1
                logger.warning(
                    "call %s: its webhook_url names a host not on --webhook-allowed-hosts; %s",
                    start.call_sid,
                    "using the server's" if url else "no webhook",
                )
        interims = calls.webhook_interim_results and call.options.interim_results
        feed = self.calls.open(start, webhook_url=url, webhook_interims=interims)
        logger.info(
            "call %s (stream %s) is live: tracks %s, webhook %s",
            start.call_sid,
            call.identity.request_id,
            ",".join(start.tracks),
            "on" if url else "off",
        )
        capacity = self.capacity
        if capacity is not None:
            capacity.reweigh(self._connection_of(call), call.options.transcribed_channels)
        return feed

    def _connection_of(self, session: Stream) -> _Connection | None:
        for conn in self.connections:
            if conn.session is session:
                return conn
        return None

    async def _calls(self, request: web.Request) -> web.Response:
        """``GET /v1/calls``: the live calls (authorized like ``/v1/listen``)."""
        authenticated = self._authenticate(request)
        if isinstance(authenticated, web.Response):
            return authenticated
        return web.json_response({"calls": self.calls.live()}, headers={"Cache-Control": "no-store"})

    async def _follow_call(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/calls/{callSid}``: a WebSocket that gets the call's events as they come (the last
        finals first), then ``Metadata`` and a close with 1000 when the call ends."""
        authenticated = self._authenticate(request)
        if isinstance(authenticated, web.Response):
            return authenticated
        call_sid = request.match_info["call_sid"]
        feed = self.calls.get(call_sid)
        if feed is None:
            self.metrics.sessions_rejected.labels("not_found").inc()
            return _json_error(
                404,
                "CALL_NOT_FOUND",
                f"No live call {header_safe(call_sid)[:40]!r} on this server; GET /v1/calls lists them.",
            )
        ws = web.WebSocketResponse(protocols=request[WS_PROTOCOLS_KEY], heartbeat=30.0, max_msg_size=4096)
        if not ws.can_prepare(request).ok:
            return _json_error(
                426, "WEBSOCKET_REQUIRED", "This endpoint speaks WebSocket; connect with ws:// or wss://."
            )
        subscriber = self.calls.subscribe(feed)
        if subscriber is None:
            return _json_error(
                429, "TOO_MANY_SUBSCRIBERS", "This call has as many followers as it may; try later."
            )
        try:
            await ws.prepare(request)
            await ws.send_str(json.dumps({"type": "Call", **feed.describe()}, separators=(",", ":")))
            await _pump_subscriber(ws, subscriber, self.config.limits.write_timeout_s)
        finally:
            self.calls.unsubscribe(subscriber)
        return ws

    def release(self, conn: _Connection) -> None:
        """Give back the seat ``conn`` holds (its slot, capacity share and fair-limit counts), once:
        when it ends, or as soon as its client is gone (its model work was cancelled)."""
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        if self.capacity is not None:
            self.capacity.close(conn, time.monotonic())
        self.fair.close(conn.client, conn.key_name)
        self.metrics.sessions_active.set(len(self.connections))

    def _identity(self, request_id: str) -> SessionIdentity:
        assert self.engine is not None
        info = self.engine.info
        warnings: tuple[str, ...] = ()
        if info.fallback_reason:
            warnings = (f"Fallback model {info.name} is running: {public_fallback_reason(info)}",)
        return SessionIdentity(
            request_id=request_id,
            created=_now_iso(),
            model=self.model_info(),
            model_details=self.engine_details(info),
            warnings=warnings,
        )

    def _settings(self) -> SessionSettings:
        return SessionSettings(
            segmenter=self.config.segmenter,
            interim=self.config.interim,
            max_client_errors=self.config.limits.max_client_errors,
            max_session_s=self.config.limits.max_session_s,
            max_frame_bytes=self.config.limits.max_frame_bytes,
            max_finalize_per_s=self.config.limits.max_finalize_per_s,
            finalize_burst=self.config.limits.finalize_burst,
        )

    def _new_session(self, options: StreamOptions, request_id: str) -> Session:
        return Session(
            options,
            self._settings(),
            self._vad_factory(),
            self._identity(request_id),
            vad_factory=self._vad_factory,
        )


async def _pump_subscriber(ws: web.WebSocketResponse, subscriber: Subscriber, write_timeout_s: float) -> None:
    """Send a subscriber's queue as it fills; close 1000 when the call ends, 1008 when it fell behind.
    Whatever the follower sends is read and ignored (its close ends this)."""

    async def read() -> None:
        async for _ in ws:
            pass
        subscriber.wake.set()

    reader = asyncio.get_running_loop().create_task(read())
    try:
        while not ws.closed:
            await subscriber.wake.wait()
            subscriber.wake.clear()
            if subscriber.dropped:
                await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"SLOW_READER")
                return
            while subscriber.queue and not ws.closed:
                try:
                    await asyncio.wait_for(ws.send_str(subscriber.queue.popleft()), write_timeout_s)
                except (asyncio.TimeoutError, ConnectionResetError):
                    return
            if subscriber.ended and not subscriber.queue:
                await ws.close(code=WSCloseCode.OK, message=b"call ended")
                return
    finally:
        reader.cancel()


class _CallSink:
    """Where a Twilio stream's events go instead of its socket: the call's feed (subscribers, backlog,
    webhook), opened once the call's ``start`` came."""

    def __init__(self, server: Server, call: TwilioCall) -> None:
        self.server = server
        self.call = call
        self.feed: CallFeed | None = None

    def sync(self) -> None:
        """Open the call's feed as soon as its ``start`` came (it is listed and can be followed)."""
        if self.feed is None and self.call.start is not None:
            self.feed = self.server.open_call(self.call)

    def publish(self, event: ServerEvent) -> None:
        start = self.call.start
        if start is None or self.feed is None:
            if isinstance(event, Error):  # e.g. NO_AUDIO before any start: nowhere to deliver it but the log
                logger.info("call stream %s: %s before start", self.call.identity.request_id, event.code)
            return
        self.server.calls.publish(self.feed, start.stream_sid, event)

    def finish(self) -> None:
        counters = self.call.input_errors
        for code, count in counters.items():
            self.server.metrics.twilio_input_errors.labels(code).inc(count)
        self.server.metrics.twilio_gap_seconds.inc(self.call.gap_ms_filled / 1000)
        self.server.metrics.audio_seconds.inc(self.call.audio_duration_s)
        self.sync()
        if self.feed is not None:
            self.server.calls.end(self.feed)


class _StreamSocket(web.WebSocketResponse):
    """aiohttp's WebSocket, except that a message over ``max_msg_size`` does not close it at once.

    aiohttp closes with 1009 itself as soon as it reads such a message's header, before the stream
    could send the finals it owes or say why (issue 8). Here that close is put off: the reader sees
    the error, the session ends the stream with ``FRAME_TOO_LARGE`` after the finals owed, and the
    writer closes with 1009. The rest of the oversized message is never read or buffered.
    """

    refused_too_big = False

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
        if code == WSCloseCode.MESSAGE_TOO_BIG and not message and not self.refused_too_big:
            self.refused_too_big = True  # aiohttp's own close from receive(); ours carry a reason
            return False
        return await super().close(code=code, message=message, drain=drain)


class _Connection:
    """The pump between one WebSocket, its session and the batcher.

    The socket is read all the time (so the client's pings are answered at once, README
    "Back-pressure"); a message goes to the session when it has room (fewer than
    ``max_pending_finals`` finals waiting for the model), else to the stream's :class:`Spool`, which is
    drained into the session, in order, as finals come back. Only when the spool is full does reading
    stop.
    """

    def __init__(
        self,
        server: Server,
        ws: _StreamSocket,
        session: Session | TwilioCall | FunasrSession,
        request: web.Request,
        client: str,
        key_name: str | None,
        *,
        sink: _CallSink | None = None,
    ) -> None:
        self.server = server
        self.ws = ws
        self.session = session
        self.sink = sink
        self.request = request
        self.client = client
        self.key_name = key_name
        self.wake = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()
        self.finished = asyncio.Event()
        limits = server.config.limits
        self.spool = Spool(limits.max_spool_mb << 20, limits.spool_dir or None)
        self._held: tuple[int, bytes | str] | None = None  # the one message the spool could not take
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._closed_by_us = False
        self._final_started: dict[SegmentKey, float] = {}
        self._outcome = "client_closed"
        self._bytes_per_second = session.options.sample_rate_hz * session.options.bytes_per_frame
        self._opened_s = time.monotonic()
        self._aborted = False  # we cut the connection (a client that stopped reading)

    async def run(self) -> None:
        writer = asyncio.get_running_loop().create_task(self._write_loop())
        try:
            await self._read_loop()
        finally:
            if self.sink is not None and isinstance(self.session, TwilioCall) and not self._closed_by_us:
                # A call's results are read elsewhere: a socket gone without stop still ends the call
                # with every final it is owed, delivered to the webhook and the subscribers.
                self.session.receive_hangup()
                self.after_input()
            elif not self._closed_by_us and not (self.ws.refused_too_big and not self._aborted):
                self._client_gone()
            await writer
            for task in self._tasks.values():
                task.cancel()
            self.server.metrics.sessions_total.labels(self._outcome).inc()
            self.server.metrics.speculations.labels("used").inc(self.session.speculations_used)
            self.server.metrics.speculations.labels("wasted").inc(self.session.speculations_wasted)
            self.finished.set()
            logger.info(
                "stream %s closed (%s): %.1f s of audio, %d segment(s)%s",
                self.session.identity.request_id,
                self._outcome,
                self.session.audio_duration_s,
                self.session.segments_finalized,
                f", spooled up to {self.spool.peak_bytes / 2**20:.1f} MiB" if self.spool.peak_bytes else "",
            )

    def _client_gone(self) -> None:
        """Nobody will read this stream any more: cancel its model work and give its seat back now,
        not after the work it asked for would have drained."""
        for job_id in self.session.receive_disconnect():
            task = self._tasks.pop(job_id, None)
            if task is not None:
                task.cancel()
        self.server.release(self)
        self.wake.set()

    def _abort(self, outcome: str, why: str) -> None:
        """Cut a client that stopped reading: no close handshake (it would wait behind the unread
        data), its seat and everything it holds are freed."""
        if self._aborted or self.ws.closed:
            return
        self._aborted = True
        self._outcome = outcome
        logger.info("stream %s: %s; closing it", self.session.identity.request_id, why)
        transport = self.request.transport
        if transport is not None:
            transport.abort()
        self._client_gone()

    def cut(self, outcome: str, why: str) -> None:
        """End this stream now without a close handshake (a drain whose finals did not come)."""
        if not self.ws.closed:
            self._abort(outcome, why)
            return
        self._outcome = outcome  # a call whose socket is gone but whose finals were still awaited
        logger.info("stream %s: %s; ending it", self.session.identity.request_id, why)
        self._client_gone()

    @property
    def bulk(self) -> bool:
        """The client sends faster than real time (an upload): its finals yield to live streams'."""
        return self.session.audio_duration_s > time.monotonic() - self._opened_s + BULK_LEAD_S

    def _read_deadline(self) -> tuple[float | None, Callable[[], None]]:
        """How long the next read may wait, and what its timeout means: the idle timeout, the
        no-audio timeout or the wall-clock session limit, whichever comes first."""
        limits = self.server.config.limits
        session = self.session
        if session.closing:
            return None, lambda: None
        now = time.monotonic()
        deadlines: list[tuple[float, Callable[[], None]]] = []
        if not (self.spool.pending or self._held is not None):  # audio waits: the client is not idle
            deadlines.append((now + limits.idle_timeout_s, session.receive_idle_timeout))
        if session.audio_duration_s == 0 and not self.spool.pending:
            deadlines.append((self._opened_s + limits.no_audio_timeout_s, session.receive_no_audio_timeout))
        if limits.max_session_s:
            deadlines.append((self._opened_s + limits.max_session_s, session.receive_session_too_long))
        if not deadlines:
            return None, lambda: None
        at, expired = min(deadlines, key=lambda d: d[0])
        return max(0.0, at - now), expired

    async def _read_loop(self) -> None:
        metrics = self.server.metrics
        while not self.ws.closed:
            await self.room.wait()  # cleared only while the spool is full (or failed)
            timeout, expired = self._read_deadline()
            try:
                msg = await asyncio.wait_for(self.ws.receive(), timeout)
            except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
                expired()
                self.after_input()
                continue
            except ConnectionResetError:  # aiohttp answering a ping on a socket that just went away
                break
            if msg.type == WSMsgType.BINARY:
                data: bytes = msg.data
                metrics.audio_seconds.inc(len(data) / self._bytes_per_second)
                self._take(BINARY, data)
            elif msg.type == WSMsgType.TEXT:
                self._take(TEXT, msg.data)
            elif self.ws.refused_too_big and isinstance(msg.data, WebSocketError):
                # Over max_frame_bytes: in its place in the stream's order (behind spooled audio),
                # then the finals owed, FRAME_TOO_LARGE and 1009. The socket is not read again.
                self._take(OVERSIZED, b"")
                self.after_input()
                break
            else:  # CLOSE, CLOSING, CLOSED, ERROR: the client (or the close we started) ends it
                if msg.type == WSMsgType.ERROR:
                    logger.info("stream %s: socket error: %s", self.session.identity.request_id, msg.data)
                break
            self.after_input()

    def _has_room(self) -> bool:
        return self.session.pending_finals < self.server.config.limits.max_pending_finals

    def _take(self, kind: int, data: bytes | str) -> None:
        """A message from the socket: to the session now, or behind what already waits."""
        if self._held is None and not self.spool.pending and self._has_room():
            self._feed(kind, data)
            return
        payload = data if isinstance(data, bytes) else data.encode()
        if self._held is None and self.spool.push(kind, payload):
            return
        # The spool is full (or the disk failed): keep this one message and stop reading until room.
        self._held = (kind, data)
        self.room.clear()
        logger.info(
            "stream %s: spool full (%.0f MiB); not reading until the model catches up",
            self.session.identity.request_id,
            self.spool.bytes_waiting / 2**20,
        )

    def _feed(self, kind: int, data: bytes | str) -> None:
        if kind == OVERSIZED:
            self.session.receive_frame_too_large()
        elif kind == BINARY:
            self.session.receive_audio(data if isinstance(data, bytes) else data.encode())
        else:
            self.session.receive_text(data if isinstance(data, str) else data.decode())
        self._dispatch_jobs()

    def after_input(self) -> None:
        """Hand new jobs to the batcher, feed the session from the spool while it has room, and wake the
        writer (call after every ``receive_*``)."""
        self._dispatch_jobs()
        while self._has_room() and not self.session.close:
            popped = self.spool.pop()
            if popped is not None:
                kind, payload = popped
                self._feed(kind, payload)
            elif self._held is not None:
                kind, data = self._held
                self._held = None
                self._feed(kind, data)
                self.room.set()
            else:
                break
        limit = self.server.config.limits.max_outgoing_events
        if self.session.events_waiting > limit:
            self._abort(
                "slow_reader",
                f"{self.session.events_waiting} messages wait for a client that reads too slowly",
            )
        self.wake.set()

    def _dispatch_jobs(self) -> None:
        now = time.monotonic()
        for key in self.session.segments_closed():
            self._final_started[key] = now
        for job_id in self.session.jobs_to_cancel():
            task = self._tasks.pop(job_id, None)
            if task is not None:
                task.cancel()  # a speculation that speech overtook: if still queued, it never runs
        for job in self.session.jobs_to_run():
            self._dispatch(job)

    def _dispatch(self, job: Job) -> None:
        batcher = self.server.batcher
        assert batcher is not None
        loop = asyncio.get_running_loop()
        if job.kind is JobKind.FINAL:
            bulk = self.bulk
            # The coroutine is made inside the task: a task cancelled before it starts leaves none
            # behind un-awaited.
            self._tasks[job.job_id] = loop.create_task(
                self._run(job, lambda: batcher.submit_final(job.request, bulk=bulk))
            )
            return
        if job.kind is JobKind.SPECULATIVE:
            future = batcher.submit_speculative(job.request)
            if future is None:
                self.server.metrics.speculations.labels("refused").inc()
        else:
            future = batcher.submit_interim(job.request)
            if future is None:
                self.server.metrics.interims_skipped.inc()
        if future is None:
            self.session.receive_skipped(job.job_id)
            return
        answer = future
        self._tasks[job.job_id] = loop.create_task(self._run(job, lambda: answer))

    async def _run(self, job: Job, pending: Callable[[], Awaitable[Transcript]]) -> None:
        try:
            transcript = await pending()
        except asyncio.CancelledError:
            raise
        except InterimSkipped:
            self.server.metrics.interims_skipped.inc()
            self.session.receive_skipped(job.job_id)
        except BatcherClosed:
            self.session.receive_failure(
                job.job_id,
                "SERVER_SHUTTING_DOWN",
                "The server shut down before this segment could be transcribed.",
            )
        except Exception:
            # The batcher logged the cause once; the client gets a stable code, no internals.
            self.session.receive_failure(
                job.job_id, "TRANSCRIPTION_FAILED", "The model failed on this segment; the server logged why."
            )
        else:
            self.session.receive_result(job.job_id, transcript)
        finally:
            self._tasks.pop(job.job_id, None)
        self.after_input()

    async def _write_loop(self) -> None:
        metrics = self.server.metrics
        sink = self.sink
        while True:
            await self.wake.wait()
            self.wake.clear()
            if sink is not None:
                sink.sync()
            for event in self.session.events_to_send():
                if isinstance(event, Results):
                    if event.is_final and event.is_acknowledgement:
                        pass  # a Finalize that ended no segment: no final of a segment, no latency
                    elif event.is_final:
                        metrics.segments_finalized.inc()
                        started = self._final_started.pop((event.channel_index[0], event.segment_id), None)
                        now = time.monotonic()
                        if started is not None:
                            metrics.final_latency_seconds.observe(now - started)
                        capacity = self.server.capacity
                        if capacity is not None and not self.bulk:  # an upload's backlog is no latency
                            capacity.observe_final(self, now, event.duration_s)
                            if started is not None:
                                capacity.observe_latency(now, now - started)
                    else:
                        metrics.interims_sent.inc()
                elif isinstance(event, Error):
                    metrics.client_errors.labels(event.code).inc()
                    if event.segment_id is not None:  # the Error a segment ends in, instead of a final
                        channel = event.channel_index[0] if event.channel_index is not None else 0
                        metrics.segment_errors.inc()
                        self._final_started.pop((channel, event.segment_id), None)
                if sink is not None:
                    sink.publish(event)  # never on the socket: Twilio rejects anything but its own messages
                    continue
                if self.ws.closed or self._aborted:
                    break
                text = self.session.to_text(event)
                if text is None:
                    continue
                if not await self._send(text):
                    break
            if self._aborted:
                return
            close = self.session.close
            if sink is not None:
                if close is None:
                    continue
                sink.finish()
                if not self.ws.closed:
                    self._closed_by_us = True
                    self._outcome = close.reason if close.code != 1000 else "completed"
                    await self.ws.close(code=int(close.code), message=close.reason.encode()[:120])
                return
            if close is not None or self.ws.closed:
                if close is not None and not self.ws.closed:
                    self._closed_by_us = True
                    self._outcome = close.reason if close.code != 1000 else "completed"
                    await self.ws.close(code=int(close.code), message=close.reason.encode()[:120])
                return

    async def _send(self, text: str) -> bool:
        """Send one message; False when the client has stopped reading (then it is cut) or is gone."""
        timeout_s = self.server.config.limits.write_timeout_s
        try:
            await asyncio.wait_for(self.ws.send_str(text), timeout_s)
        except asyncio.TimeoutError:
            self._abort("slow_reader", f"the client took no message for {timeout_s:g} s")
            return False
        except ConnectionResetError:
            return False
        return True
