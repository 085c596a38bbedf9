"""The one way this package builds a ``funasr.AutoModel`` (SenseVoice and FSMN-VAD both use it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_automodel(folder: Path, *, threads: int, device: str) -> Any:
    """Load a funasr model from a local folder with the flags every load needs.

    Args:
        folder: a complete model folder (config.yaml, model.pt, ...).
        threads: funasr's ``ncpu``; funasr calls ``torch.set_num_threads`` with it.
        device: ``cpu`` or ``cuda:N``.

    Returns:
        The ``funasr.AutoModel``.

    Raises:
        Exception: whatever funasr raises; callers wrap it in an EngineError that names the folder.
    """
    from funasr import AutoModel

    return AutoModel(
        model=str(folder),
        disable_update=True,  # else funasr asks PyPI for a newer version at start-up, with no timeout
        disable_pbar=True,
        disable_log=True,
        ncpu=threads,
        device=device,
    )
