"""Shared test settings: one timeout scale for slow machines."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def scaled(seconds: float) -> float:
    """A timeout, multiplied by STREAM_SERVER_TEST_TIMEOUT_SCALE (default 1) for slow or busy machines."""
    return seconds * float(os.environ.get("STREAM_SERVER_TEST_TIMEOUT_SCALE", "1"))


REQUIRE_ALL = bool(os.environ.get("STREAM_SERVER_REQUIRE_ALL"))
"""Set by scripts/test.sh (and so in CI): a test whose tool is missing must fail, not skip."""


def skip_unless(available: bool, reason: str) -> pytest.MarkDecorator:
    """Skip when a tool is missing on a developer's machine; in the full test run, let the test fail."""
    return pytest.mark.skipif(not available and not REQUIRE_ALL, reason=reason)


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SenseVoice Small folder with random weights and 2 encoder blocks: funasr's real code path, fast."""
    from stream_server.testing.sensevoice_random import build_random_sensevoice

    cache = os.environ.get("STREAM_SERVER_TEST_CACHE")
    base = Path(cache) if cache else tmp_path_factory.mktemp("models")
    return build_random_sensevoice(base / "sensevoice-small-random", num_blocks=2, tp_blocks=1)


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the ONNX backend caches its exports in tests (kept across runs under STREAM_SERVER_TEST_CACHE,
    so the small model is exported once, about 30 s)."""
    cache = os.environ.get("STREAM_SERVER_TEST_CACHE")
    path = (Path(cache) if cache else tmp_path_factory.mktemp("onnx")) / "onnx-exports"
    path.mkdir(parents=True, exist_ok=True)
    return path
