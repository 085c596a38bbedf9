"""Shared test settings: one timeout scale for slow machines."""

from __future__ import annotations

import os


def scaled(seconds: float) -> float:
    """A timeout, multiplied by STREAM_SERVER_TEST_TIMEOUT_SCALE (default 1) for slow or busy machines."""
    return seconds * float(os.environ.get("STREAM_SERVER_TEST_TIMEOUT_SCALE", "1"))
