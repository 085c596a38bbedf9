"""What differs between the Python versions the package claims (3.10 and later): scripts/test.sh runs this
file, with the rest of the fast layer, on every version in pyproject's classifiers."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect

from stream_server.compat import timeout
from stream_server.engines.base import TranscribeRequest, Transcript

from .conftest import scaled
from .fakes import FakeEngine
from .serving import collect, running_server
from .synth import pcm16, silence, tone

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself depends on tomli before 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


class GatedEngine(FakeEngine):
    """Once ``gate`` is armed, every call waits until it is opened (a model stuck on a long call)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.gate = threading.Event()
        self.entered = threading.Event()

    def transcribe(self, requests: Sequence[TranscribeRequest]) -> list[Transcript]:
        if self.armed:
            self.entered.set()
            self.gate.wait(scaled(30))
        return super().transcribe(requests)


async def test_timeout_raises_what_asyncio_timeout_error_catches() -> None:
    """compat.timeout ends the block with asyncio.TimeoutError on every version (3.10 has no
    asyncio.timeout)."""
    with pytest.raises(asyncio.TimeoutError):
        async with timeout(0.01):
            await asyncio.Event().wait()


async def test_a_drain_that_runs_out_of_time_returns() -> None:
    """Shutting down while a stream's final is stuck in the model gives up after the drain and finalize
    timeouts instead of raising (on 3.10 asyncio.wait_for's timeout is not the builtin TimeoutError)."""
    engine = GatedEngine()
    async with running_server(engine) as (server, url):
        engine.armed = True
        async with connect(f"{url}/v1/listen") as ws:
            reader = asyncio.ensure_future(collect(ws))
            await ws.send(pcm16(np.concatenate([silence(300), tone(1000), silence(1000)])))
            await asyncio.get_running_loop().run_in_executor(None, engine.entered.wait, scaled(10))
            assert engine.entered.is_set(), "the final reached the model"
            await server.drain(0.05, finalize_timeout_s=0.05)  # both waits run out
            engine.gate.set()
            await reader


def test_the_classifiers_claim_the_versions_requires_python_admits() -> None:
    """pyproject's classifiers (the versions scripts/test.sh tests) start at requires-python's minimum and
    include the running interpreter."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    prefix = "Programming Language :: Python :: 3."
    minors = sorted(int(c.removeprefix(prefix)) for c in project["classifiers"] if c.startswith(prefix))
    assert project["requires-python"] == f">=3.{minors[0]}"
    assert minors == list(range(minors[0], minors[-1] + 1)), "no version left out between"
    assert sys.version_info[1] in minors
