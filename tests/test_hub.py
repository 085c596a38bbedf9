"""Model resolution for ``--model``, cache detection, the hub probe, downloads and the loader's fallbacks.

Nothing here touches the network: probes are injected, and the HTTP probe is pointed at local sockets.
"""

from __future__ import annotations

import http.server
import logging
import socket
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream_server.config import EngineConfig
from stream_server.engines import hub
from stream_server.engines.base import EngineInfo, TranscribeRequest, Transcript
from stream_server.engines.hub import (
    ModelChoice,
    download_model,
    find_cached_sensevoice,
    http_probe,
    resolve_model,
)
from stream_server.engines.loader import load_engine
from stream_server.errors import EngineError, ModelDownloadError

from .conftest import scaled

CACHE_ENV = ("MODELSCOPE_CACHE", "MS_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME", "HF_ENDPOINT")


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test sees an empty home and no cache variables, so the real user's caches never leak in."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in CACHE_ENV:
        monkeypatch.delenv(name, raising=False)
    return home


def make_model_dir(folder: Path, *, weights: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("model: SenseVoiceSmall\n")
    (folder / "configuration.json").write_text("{}\n")
    if weights:
        (folder / "model.pt").write_bytes(b"\0")
    return folder


class ProbeSpy:
    """A probe that answers as told and records what it was asked."""

    def __init__(self, error: str | None) -> None:
        self.error = error
        self.calls: list[tuple[str, float]] = []

    def __call__(self, hub_name: hub.Hub, timeout_s: float) -> str | None:
        self.calls.append((hub_name, timeout_s))
        return self.error


# -- resolve_model ----------------------------------------------------------------------------------


def test_tiny_en_is_the_bundled_whisper() -> None:
    """--model tiny.en picks the bundled faster-whisper, with no fallback reason."""
    choice = resolve_model(EngineConfig(model="tiny.en"), probe=ProbeSpy("unused"))
    assert choice == ModelChoice("whisper", "tiny.en", None, choice.detail, auto=False)


def test_local_folder_is_sensevoice(tmp_path: Path) -> None:
    """An existing folder is loaded as SenseVoice from that folder, without probing any hub."""
    folder = make_model_dir(tmp_path / "sv")
    probe = ProbeSpy("unused")
    choice = resolve_model(EngineConfig(model=str(folder)), probe=probe)
    assert (choice.engine, choice.model, choice.fallback_reason, choice.auto) == (
        "sensevoice",
        str(folder),
        None,
        False,
    )
    assert probe.calls == []


def test_hub_id_is_sensevoice_from_the_hub() -> None:
    """owner/name that is not a local path is a hub id for SenseVoice, not probed."""
    probe = ProbeSpy("unused")
    choice = resolve_model(EngineConfig(model="iic/SenseVoiceSmall"), probe=probe)
    assert (choice.engine, choice.model, choice.auto) == ("sensevoice", "iic/SenseVoiceSmall", False)
    assert probe.calls == []


def test_missing_absolute_path_stays_a_folder(tmp_path: Path) -> None:
    """A path that does not exist is still taken as a folder (loading it then says it is missing)."""
    choice = resolve_model(EngineConfig(model=str(tmp_path / "gone")), probe=ProbeSpy(None))
    assert (choice.engine, choice.model) == ("sensevoice", str(tmp_path / "gone"))


def test_auto_uses_the_modelscope_cache_without_probing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auto finds SenseVoice in $MODELSCOPE_CACHE's current layout and never probes the hub."""
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    folder = make_model_dir(tmp_path / "ms" / "models" / "iic--SenseVoiceSmall" / "snapshots" / "master")
    probe = ProbeSpy("should not be asked")
    choice = resolve_model(EngineConfig(model="auto"), probe=probe)
    assert (choice.engine, choice.model, choice.fallback_reason, choice.auto) == (
        "sensevoice",
        str(folder),
        None,
        True,
    )
    assert probe.calls == []


def test_auto_finds_the_legacy_modelscope_default_cache(isolated_caches: Path) -> None:
    """auto finds SenseVoice where older ModelScope SDKs put it (~/.cache/modelscope/hub/models)."""
    folder = make_model_dir(
        isolated_caches / ".cache" / "modelscope" / "hub" / "models" / "iic" / "SenseVoiceSmall"
    )
    assert find_cached_sensevoice("ms") == folder
    assert resolve_model(EngineConfig(model="auto"), probe=ProbeSpy("down")).model == str(folder)


def test_auto_finds_the_hugging_face_cache_snapshot_refs_main_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auto finds SenseVoice in $HF_HOME/hub, preferring the snapshot refs/main points at."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo = tmp_path / "hf" / "hub" / "models--FunAudioLLM--SenseVoiceSmall"
    old = make_model_dir(repo / "snapshots" / "aaa111")
    current = make_model_dir(repo / "snapshots" / "bbb222")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("bbb222")
    old.touch()  # the newest mtime must not win over refs/main
    choice = resolve_model(EngineConfig(model="auto", hub="hf"), probe=ProbeSpy("down"))
    assert choice.model == str(current)


def test_incomplete_cache_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached folder without model.pt (an interrupted download) does not count: the hub is probed."""
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    make_model_dir(tmp_path / "ms" / "models" / "iic" / "SenseVoiceSmall", weights=False)
    probe = ProbeSpy(None)
    choice = resolve_model(EngineConfig(model="auto", hub_timeout_s=2.5), probe=probe)
    assert probe.calls == [("ms", 2.5)]
    assert (choice.engine, choice.model) == ("sensevoice", "iic/SenseVoiceSmall")


def test_auto_downloads_when_the_hub_answers() -> None:
    """Not cached but the hub answers: SenseVoice by its id on the configured hub, no fallback."""
    for hub_name, model_id in (("ms", "iic/SenseVoiceSmall"), ("hf", "FunAudioLLM/SenseVoiceSmall")):
        probe = ProbeSpy(None)
        choice = resolve_model(EngineConfig(model="auto", hub=hub_name), probe=probe)  # type: ignore[arg-type]
        assert (choice.engine, choice.model, choice.fallback_reason, choice.auto) == (
            "sensevoice",
            model_id,
            None,
            True,
        )
        assert probe.calls == [(hub_name, 5.0)]


def test_auto_falls_back_to_whisper_with_a_reason_when_no_hub_answers() -> None:
    """Not cached and the probe fails: bundled whisper, with a reason naming the host and the error."""
    choice = resolve_model(EngineConfig(model="auto"), probe=ProbeSpy("[Errno -2] Name or service not known"))
    assert (choice.engine, choice.model, choice.auto) == ("whisper", "tiny.en", True)
    assert choice.fallback_reason == (
        "SenseVoice Small is not cached and no model hub is reachable "
        "(modelscope.cn: [Errno -2] Name or service not known); "
        "running the bundled faster-whisper tiny.en (English only)"
    )


# -- The HTTP probe, against local sockets -----------------------------------------------------------


@pytest.fixture
def local_http_server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            status = 404 if "missing" in self.path else 200
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_probe_succeeds_when_the_endpoint_answers(
    local_http_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe reports success when the (mirror) endpoint answers 200."""
    monkeypatch.setenv("HF_ENDPOINT", local_http_server)
    assert http_probe("hf", 2.0) is None


def test_http_probe_reports_an_http_error(local_http_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe reports an HTTP error status as the failure."""
    monkeypatch.setenv("HF_ENDPOINT", local_http_server + "/missing")
    assert http_probe("hf", 2.0) == "HTTP 404"


def test_http_probe_gives_up_at_its_deadline_on_a_silent_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts but never answers costs the probe its timeout, not more."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        started_s = time.monotonic()
        error = http_probe("hf", 0.3)
        took_s = time.monotonic() - started_s
    finally:
        silent.close()
    assert error is not None and ("0.3" in error or "timed out" in error)
    assert took_s < scaled(1.5)


def test_http_probe_reports_a_refused_connection_quickly(monkeypatch: pytest.MonkeyPatch) -> None:
    """A closed port is reported as a failure at once."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    started_s = time.monotonic()
    error = http_probe("hf", 3.0)
    assert error is not None and "refused" in error.lower()
    assert time.monotonic() - started_s < scaled(2.0)


# -- download_model ----------------------------------------------------------------------------------


def test_download_uses_a_complete_cached_copy_without_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A complete cached copy is returned as is; the hub SDK is never called."""
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    folder = make_model_dir(tmp_path / "ms" / "models" / "iic" / "SenseVoiceSmall")
    fake_sdk = types.ModuleType("modelscope.hub.snapshot_download")
    fake_sdk.snapshot_download = lambda *a, **k: pytest.fail("must not download")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "modelscope.hub.snapshot_download", fake_sdk)
    assert download_model("iic/SenseVoiceSmall", "ms") == folder


def test_download_failure_is_an_actionable_model_download_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing hub SDK becomes a ModelDownloadError that names the model, the hub and what to do."""

    def unreachable(*args: object, **kwargs: object) -> str:
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    fake_sdk = types.ModuleType("huggingface_hub")
    fake_sdk.snapshot_download = unreachable  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake_sdk)
    with pytest.raises(ModelDownloadError) as caught:
        download_model("FunAudioLLM/SenseVoiceSmall", "hf")
    message = str(caught.value)
    assert "FunAudioLLM/SenseVoiceSmall" in message and "Hugging Face" in message
    assert "Failed to resolve" in message and "--model /path" in message
    assert isinstance(caught.value, EngineError)


# -- load_engine's fallbacks, with a fake whisper engine -----------------------------------------------


class FakeWhisper:
    loads: list[dict[str, object]] = []
    options: dict[str, object] = {}

    def __init__(self, fallback_reason: str | None) -> None:
        self.fallback_reason = fallback_reason
        self.warmups: list[tuple[int, float]] = []

    @classmethod
    def load(
        cls,
        config: EngineConfig,
        *,
        model_dir: str | None = None,
        fallback_reason: str | None = None,
        beam_size: int = 5,
        encoder_buckets_s: tuple[float, ...] | None = None,
        workers: int = 1,
    ) -> FakeWhisper:
        cls.loads.append({"model_dir": model_dir, "fallback_reason": fallback_reason})
        cls.options = {"beam_size": beam_size, "encoder_buckets_s": encoder_buckets_s, "workers": workers}
        return cls(fallback_reason)

    @property
    def info(self) -> EngineInfo:
        return EngineInfo("faster-whisper-tiny.en", "bundled", "cpu", "int8", ("en",), self.fallback_reason)

    def transcribe(self, requests: list[TranscribeRequest]) -> list[Transcript]:
        return [Transcript("", 0.0) for _ in requests]

    def warmup(self, max_batch_size: int, max_audio_s: float) -> None:
        self.warmups.append((max_batch_size, max_audio_s))


@pytest.fixture
def fake_whisper(monkeypatch: pytest.MonkeyPatch) -> type[FakeWhisper]:
    FakeWhisper.loads = []
    FakeWhisper.options = {}
    module = types.ModuleType("stream_server.engines.whisper")
    module.WhisperEngine = FakeWhisper  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "stream_server.engines.whisper", module)
    return FakeWhisper


def test_loader_falls_back_loudly_when_no_hub_answers(
    fake_whisper: type[FakeWhisper], caplog: pytest.LogCaptureFixture
) -> None:
    """auto with no cache and no hub loads whisper with the reason, logs a WARNING and warms it up."""
    with caplog.at_level(logging.WARNING, logger="stream_server.engines.loader"):
        engine = load_engine(
            EngineConfig(model="auto"), max_audio_s=20.0, max_batch_size=4, probe=ProbeSpy("timed out")
        )
    assert isinstance(engine, FakeWhisper)
    assert engine.info.fallback_reason is not None and "timed out" in engine.info.fallback_reason
    assert fake_whisper.loads == [{"model_dir": None, "fallback_reason": engine.info.fallback_reason}]
    assert engine.warmups == [(4, 20.0)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "tiny.en" in warnings[0].getMessage()


def test_loader_falls_back_when_the_auto_download_fails(
    fake_whisper: type[FakeWhisper], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """auto chose SenseVoice (hub answered) but the download fails: whisper runs, the reason says why."""

    def failing_download(model_id: str, hub_name: hub.Hub) -> Path:
        raise ModelDownloadError(f"could not download {model_id}: connection reset")

    monkeypatch.setattr(hub, "download_model", failing_download)
    with caplog.at_level(logging.WARNING):
        engine = load_engine(
            EngineConfig(model="auto", warmup=False), max_audio_s=20.0, max_batch_size=4, probe=ProbeSpy(None)
        )
    assert isinstance(engine, FakeWhisper)
    assert engine.info.fallback_reason is not None
    assert "connection reset" in engine.info.fallback_reason and "tiny.en" in engine.info.fallback_reason
    assert engine.warmups == []
    assert any(r.levelno == logging.WARNING and "FALLBACK" in r.getMessage() for r in caplog.records)


def test_loader_raises_for_an_explicit_hub_id_that_cannot_be_downloaded(
    fake_whisper: type[FakeWhisper], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An explicit hub id never falls back: the download failure is an EngineError."""

    def failing_download(model_id: str, hub_name: hub.Hub) -> Path:
        raise ModelDownloadError("could not download iic/SenseVoiceSmall from ModelScope")

    monkeypatch.setattr(hub, "download_model", failing_download)
    with pytest.raises(EngineError, match="could not download"):
        load_engine(EngineConfig(model="iic/SenseVoiceSmall"), max_audio_s=20.0, max_batch_size=4)
    assert fake_whisper.loads == []


def test_loader_loads_tiny_en_without_a_fallback_reason(fake_whisper: type[FakeWhisper]) -> None:
    """--model tiny.en loads the bundled whisper with no fallback reason and no probe."""
    probe = ProbeSpy("unused")
    engine = load_engine(EngineConfig(model="tiny.en"), max_audio_s=30.0, max_batch_size=2, probe=probe)
    assert isinstance(engine, FakeWhisper) and engine.info.fallback_reason is None
    assert probe.calls == [] and engine.warmups == [(2, 30.0)]
    # The CPU defaults: beam 5, the engine's own encoder windows, one worker.
    assert fake_whisper.options == {"beam_size": 5, "encoder_buckets_s": None, "workers": 1}


def test_loader_passes_the_whisper_options(fake_whisper: type[FakeWhisper]) -> None:
    """--whisper-beam-size, --whisper-full-window and --workers reach the whisper engine."""
    config = EngineConfig(
        model="tiny.en", whisper_beam_size=1, whisper_full_window=True, workers=3, warmup=False
    )
    load_engine(config, max_audio_s=30.0, max_batch_size=2, probe=ProbeSpy("unused"))
    assert fake_whisper.options == {"beam_size": 1, "encoder_buckets_s": (), "workers": 3}
