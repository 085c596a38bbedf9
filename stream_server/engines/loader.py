"""Start-up: turn ``EngineConfig`` into a loaded, warmed-up engine.

``--model auto`` resolves through :mod:`.hub`: SenseVoice Small when it is cached or a hub answers, else
the bundled faster-whisper tiny.en. Every fallback is logged at WARNING with its reason and carried in
``EngineInfo.fallback_reason`` so ``/health`` and each session's metadata say it too. An explicit hub id
or folder never falls back: failing to load it is an :class:`~stream_server.errors.EngineError`.
"""

from __future__ import annotations

import logging
import time

from ..config import EngineConfig, batch_size_for
from ..errors import EngineError, ModelDownloadError
from .base import Engine
from .hub import HubProbe, resolve_model

logger = logging.getLogger(__name__)


def load_engine(
    config: EngineConfig,
    *,
    max_audio_s: float,
    max_batch_size: int,
    probe: HubProbe | None = None,
) -> Engine:
    """Resolve the model, load its engine and warm it up (when ``config.warmup``).

    Args:
        config: the engine settings.
        max_audio_s: the longest clip the session core sends (``max_segment_ms`` in seconds).
        max_batch_size: the largest batch the batcher sends (0: the engine's preferred size).
        probe: how ``auto`` asks whether a hub answers (default: one HTTP request); for tests.

    Returns:
        The loaded engine.

    Raises:
        ConfigError: settings that cannot work on this machine (e.g. int8 on CUDA).
        EngineError: an explicit model (hub id or folder) could not be loaded; or the fallback itself
            could not be loaded.
    """
    started_s = time.perf_counter()
    choice = resolve_model(config, probe=probe)
    if choice.fallback_reason is None:
        logger.info("model %r: %s", config.model, choice.detail)
    engine: Engine
    if choice.engine == "whisper":
        if choice.fallback_reason:
            logger.warning("FALLBACK: %s", choice.fallback_reason)
        engine = _load_whisper(config, choice.fallback_reason)
    else:
        try:
            engine = load_sensevoice(config, choice.model, max_audio_s=max_audio_s)
        except ModelDownloadError as exc:
            if not choice.auto:
                raise
            reason = (
                f"SenseVoice Small could not be downloaded ({exc}); "
                "running the bundled faster-whisper tiny.en (English only)"
            )
            logger.warning("FALLBACK: %s", reason)
            engine = _load_whisper(config, reason)
    loaded_s = time.perf_counter() - started_s
    if config.warmup:
        engine.warmup(batch_size_for(max_batch_size, engine.info.preferred_batch_size), max_audio_s)
    info = engine.info
    logger.info(
        "engine %s (%s) on %s, %s: loaded in %.1f s, ready in %.1f s",
        info.name,
        info.model,
        info.device,
        info.dtype,
        loaded_s,
        time.perf_counter() - started_s,
    )
    return engine


def resolve_backend(config: EngineConfig) -> str:
    """``onnx`` or ``torch`` for SenseVoice: ``auto`` is torch on a CUDA device (fp16) and ONNX Runtime on
    CPU (measured 1.5-2x faster than torch int8 there; README, Measurements)."""
    if config.backend != "auto":
        return config.backend
    if config.device.startswith("cuda"):
        return "torch"
    if config.device == "auto":
        import torch

        if torch.cuda.is_available():
            return "torch"
    return "onnx"


def load_sensevoice(config: EngineConfig, model: str, *, max_audio_s: float) -> Engine:
    """SenseVoice on the backend ``config.backend`` names (see :func:`resolve_backend`).

    With ``auto``, an ONNX backend that cannot be had (the export fails, onnxruntime is missing) falls
    back to torch, loudly; an explicit ``--backend onnx`` fails instead.

    Raises:
        ConfigError, EngineError: as the backends' ``load``.
    """
    backend = resolve_backend(config)
    if backend == "onnx":
        from .sensevoice_onnx import SenseVoiceOnnxEngine

        try:
            onnx_engine: Engine = SenseVoiceOnnxEngine.load(config, model=model, max_audio_s=max_audio_s)
            return onnx_engine
        except (EngineError, ImportError) as exc:
            if config.backend != "auto" or isinstance(exc, ModelDownloadError):
                raise
            logger.warning("FALLING BACK to the torch backend: the ONNX Runtime backend failed: %s", exc)
    from .sensevoice import SenseVoiceEngine

    torch_engine: Engine = SenseVoiceEngine.load(config, model=model, max_audio_s=max_audio_s)
    return torch_engine


def _load_whisper(config: EngineConfig, fallback_reason: str | None) -> Engine:
    """The bundled faster-whisper tiny.en (``model_dir=None``), imported only when it is needed."""
    from .whisper import WhisperEngine

    engine: Engine = WhisperEngine.load(
        config,
        model_dir=None,
        fallback_reason=fallback_reason,
        beam_size=config.whisper_beam_size,
        encoder_buckets_s=() if config.whisper_full_window else None,
        workers=config.workers or WHISPER_WORKERS,
    )
    return engine


WHISPER_WORKERS = 1
"""faster-whisper workers when ``--workers 0``: on 2 cores one call on both cores gave the lower p95
(2 x 1 threads: 25 % more throughput when calls overlap, but single calls 40-50 % slower)."""
