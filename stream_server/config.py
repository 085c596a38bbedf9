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

from .errors import ConfigError

Dtype = Literal["auto", "fp32", "fp16", "int8"]
VadKind = Literal["webrtc", "fsmn"]


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
        dtype: ``auto`` (fp16 on CUDA, fp32 on CPU), ``fp32``, ``fp16`` (CUDA only) or ``int8``
            (CPU only: dynamic quantization of the Linear layers).
        threads: CPU threads for the model (torch intra-op); 0 means every core this process may use.
        warmup: run the largest batch of the longest clip at start-up so memory peaks before clients.
        hub_timeout_s: how long ``auto`` waits for a model hub before falling back.
    """

    model: str = "auto"
    hub: Literal["ms", "hf"] = "ms"
    device: str = "auto"
    dtype: Dtype = "auto"
    threads: int = 0
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
        _check(0 <= self.threads <= 512, "threads", f"must be 0..512, not {self.threads}")
        _check(0 < self.hub_timeout_s <= 120, "hub_timeout_s", "must be in (0, 120]")

    @property
    def resolved_threads(self) -> int:
        return self.threads or default_threads()


@dataclass(frozen=True)
class Config:
    """All settings."""

    engine: EngineConfig = field(default_factory=EngineConfig)
