"""The ONNX Runtime backend: funasr's export gives torch's tokens, is cached, locked and loud about itself."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

from stream_server.config import EngineConfig
from stream_server.engines import onnx_export
from stream_server.engines.base import SAMPLE_RATE_HZ, CallAborted, TranscribeRequest, Transcript
from stream_server.engines.loader import load_sensevoice
from stream_server.engines.sensevoice import SenseVoiceCore, SenseVoiceEngine
from stream_server.engines.sensevoice_onnx import SenseVoiceOnnxEngine
from stream_server.errors import ConfigError, EngineError

pytestmark = pytest.mark.model

MAX_AUDIO_S = 10.0


def noise(seconds: float, seed: int, level: float = 0.1) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    return (level * rng.standard_normal(int(round(seconds * SAMPLE_RATE_HZ)))).astype(np.float32)


def onnx_config(folder: Path, cache: Path, **overrides: object) -> EngineConfig:
    settings: dict[str, object] = {
        "model": str(folder),
        "threads": 2,
        "workers": 1,
        "onnx_cache_dir": str(cache),
        **overrides,
    }
    return EngineConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def torch_engine(small_model_dir: Path) -> SenseVoiceEngine:
    return SenseVoiceEngine.load(
        EngineConfig(model=str(small_model_dir), threads=2, dtype="fp32"), max_audio_s=MAX_AUDIO_S
    )


@pytest.fixture(scope="module")
def onnx_fp32(small_model_dir: Path, onnx_cache: Path) -> SenseVoiceOnnxEngine:
    return SenseVoiceOnnxEngine.load(
        onnx_config(small_model_dir, onnx_cache, dtype="fp32"), max_audio_s=MAX_AUDIO_S
    )


def best_tokens(engine: SenseVoiceCore, requests: Sequence[TranscribeRequest]) -> list[list[int]]:
    """The per-frame best CTC token of every clip (query frames and padding excluded), from the engine's
    own forward pass."""
    seen: list[torch.Tensor] = []
    lengths_seen: list[list[int]] = []
    real = engine._forward

    def spy(batch: torch.Tensor, lengths: Sequence[int], **kwargs: object) -> torch.Tensor:
        logits = real(batch, lengths, **kwargs)  # type: ignore[arg-type]
        seen.append(logits.detach().clone())
        lengths_seen.append(list(lengths))
        return logits

    engine._forward = spy  # type: ignore[method-assign]
    try:
        engine.transcribe(list(requests))
    finally:
        del engine._forward
    (logits,), (lengths,) = seen, lengths_seen
    return [logits[row, 4 : 4 + n].argmax(-1).tolist() for row, n in enumerate(lengths)]


def same_transcripts(a: Sequence[Transcript], b: Sequence[Transcript]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.text == y.text
        assert x.confidence == pytest.approx(y.confidence, abs=1e-4)
        assert [(w.word, w.start_s, w.end_s) for w in x.words] == [
            (w.word, w.start_s, w.end_s) for w in y.words
        ]
        assert (x.language, x.emotion, x.audio_event) == (y.language, y.emotion, y.audio_event)


def test_fp32_export_gives_torchs_tokens_text_tags_and_words(
    torch_engine: SenseVoiceEngine, onnx_fp32: SenseVoiceOnnxEngine
) -> None:
    """On the same audio, funasr's fp32 ONNX export and the torch model pick the same token on every frame,
    so text, tags, confidence and word times are the same, with ITN on and off and a language given."""
    clips = [noise(d, seed) for seed, d in enumerate([1.0, 3.3, 0.6, 4.2, 7.5])]
    for language, use_itn in (("auto", False), ("auto", True), ("en", False)):
        requests = [TranscribeRequest(c, language=language, use_itn=use_itn) for c in clips]
        assert best_tokens(onnx_fp32, requests) == best_tokens(torch_engine, requests)
        same_transcripts(onnx_fp32.transcribe(requests), torch_engine.transcribe(requests))
    texts = {t.text for t in onnx_fp32.transcribe([TranscribeRequest(c) for c in clips])}
    assert len(texts) == len(clips)  # distinct, so equality above means something


def test_int8_is_the_cpu_default_and_the_engine_says_what_it_loaded(
    small_model_dir: Path, onnx_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """dtype auto loads the quantized export, and the log and info name the runtime, file and workers."""
    with caplog.at_level(logging.WARNING, logger="stream_server.engines.sensevoice_onnx"):
        engine = SenseVoiceOnnxEngine.load(onnx_config(small_model_dir, onnx_cache, workers=2, threads=1))
    info = engine.info
    assert (info.dtype, info.max_concurrent_calls) == ("int8", 2)
    assert info.extras["backend"] == "onnxruntime" and info.extras["onnx_file"] == "model_quant.onnx"
    assert engine.onnx_path.name == "model_quant.onnx" and engine.onnx_path.parent.parent == onnx_cache
    said = caplog.text
    assert "ONNX Runtime" in said and "model_quant.onnx" in said and "2 worker(s) x 1 thread(s)" in said
    transcript = engine.transcribe([TranscribeRequest(noise(2.0, 6))])[0]
    assert transcript.text and "<|" not in transcript.text and 0.0 < transcript.confidence <= 1.0


def test_workers_run_at_once_and_agree_with_one_at_a_time(small_model_dir: Path, onnx_cache: Path) -> None:
    """Two threads transcribing on one session at once get what each would get alone."""
    engine = SenseVoiceOnnxEngine.load(
        onnx_config(small_model_dir, onnx_cache, dtype="fp32", workers=2, threads=1)
    )
    batches = [[TranscribeRequest(noise(1.0 + k, 20 + k))] for k in range(6)]
    alone = [engine.transcribe(b)[0].text for b in batches]
    with ThreadPoolExecutor(max_workers=2) as pool:
        together = [t[0].text for t in pool.map(engine.transcribe, batches)]
    assert together == alone


def test_abort_stops_the_running_call_and_only_that_one(onnx_fp32: SenseVoiceOnnxEngine) -> None:
    """abort() on a call's requests makes ONNX Runtime's run of that call stop (CallAborted); the next
    call runs normally, and abort of requests that are not running does nothing."""
    requests = [TranscribeRequest(noise(3.0, 40))]
    assert not onnx_fp32.abort(requests), "nothing running"
    expected = onnx_fp32.transcribe(requests)[0].text
    real_features = onnx_fp32._features
    told: list[bool] = []

    def abort_then_features(audio: npt.NDArray[np.float32]) -> torch.Tensor:
        told.append(onnx_fp32.abort(requests))  # inside the call, before ONNX Runtime runs
        return real_features(audio)

    onnx_fp32._features = abort_then_features  # type: ignore[method-assign]
    try:
        with pytest.raises(CallAborted):
            onnx_fp32.transcribe(requests)
    finally:
        del onnx_fp32._features
    assert told == [True] and onnx_fp32._running == {}
    assert onnx_fp32.transcribe(requests)[0].text == expected


def test_export_is_cached_and_keyed_by_the_model_files(
    small_model_dir: Path, onnx_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second load reuses the export; a different model.pt gets its own export folder."""
    first = onnx_export.ensure_export(small_model_dir, onnx_cache)

    def no_export(*args: object) -> None:
        raise AssertionError("exported again although the cache holds this model")

    monkeypatch.setattr(onnx_export, "_run_export", no_export)
    assert onnx_export.ensure_export(small_model_dir, onnx_cache) == first
    assert onnx_export.read_manifest(first)["source_key"] == onnx_export.source_key(small_model_dir)

    edited = tmp_path / "edited"
    shutil.copytree(small_model_dir, edited)
    with (edited / "model.pt").open("ab") as stream:
        stream.write(b"\0")
    assert onnx_export.export_dir_for(edited, onnx_cache) != first
    with pytest.raises(AssertionError, match="exported again"):
        onnx_export.ensure_export(edited, onnx_cache)


def test_two_loaders_never_export_at_once(
    small_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two concurrent ensure_export calls on an empty cache run one export; the other waits and reuses it."""
    running = 0
    overlapped = False
    exports = 0
    lock = threading.Lock()

    def fake_export(folder: Path, out: Path, timeout_s: float) -> None:
        nonlocal running, overlapped, exports
        with lock:
            running += 1
            exports += 1
            overlapped = overlapped or running > 1
        time.sleep(0.5)  # long enough for the second caller to reach the lock
        for name in (onnx_export.FP32_FILE, onnx_export.INT8_FILE):
            (out / name).write_bytes(b"onnx")
        (out / onnx_export.MANIFEST_FILE).write_text("{}")
        with lock:
            running -= 1

    monkeypatch.setattr(onnx_export, "_run_export", fake_export)
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda _: onnx_export.ensure_export(small_model_dir, cache), range(2)))
    assert results[0] == results[1] and onnx_export.is_complete(results[0])
    assert (exports, overlapped) == (1, False)
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_a_folder_holding_funasrs_export_loads_without_model_pt(
    small_model_dir: Path,
    onnx_cache: Path,
    onnx_fp32: SenseVoiceOnnxEngine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A funasr-onnx style folder (config.yaml, am.mvn, tokenizer, model.onnx; no model.pt) is used as is."""
    exported = onnx_export.ensure_export(small_model_dir, onnx_cache)
    folder = tmp_path / "SenseVoiceSmall-onnx"
    folder.mkdir()
    for name in ("config.yaml", "configuration.json", "am.mvn", "chn_jpn_yue_eng_ko_spectok.bpe.model"):
        shutil.copy(small_model_dir / name, folder / name)
    for path in exported.glob("model*"):
        shutil.copy(path, folder / path.name)
    monkeypatch.setattr(onnx_export, "ensure_export", lambda *a, **k: pytest.fail("must not export"))
    engine = SenseVoiceOnnxEngine.load(
        onnx_config(folder, tmp_path / "unused", dtype="fp32"), max_audio_s=MAX_AUDIO_S
    )
    assert engine.onnx_path == folder / "model.onnx"
    clips = [TranscribeRequest(noise(2.5, 31)), TranscribeRequest(noise(1.2, 32))]
    same_transcripts(engine.transcribe(clips), onnx_fp32.transcribe(clips))


def test_a_broken_model_pt_fails_with_the_exporters_log(small_model_dir: Path, tmp_path: Path) -> None:
    """When funasr cannot export, loading fails with an EngineError quoting the child's log."""
    folder = tmp_path / "broken"
    shutil.copytree(small_model_dir, folder)
    (folder / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(EngineError, match="ONNX export of .* failed"):
        SenseVoiceOnnxEngine.load(onnx_config(folder, tmp_path / "cache"))
    assert not list((tmp_path / "cache").glob(".broken-*"))  # the half export was removed


def test_cpu_only_settings_are_config_errors(small_model_dir: Path, tmp_path: Path) -> None:
    """CUDA and fp16 are refused by the ONNX backend before anything loads, naming the setting."""
    with pytest.raises(ConfigError, match="backend"):
        SenseVoiceOnnxEngine.load(onnx_config(small_model_dir, tmp_path, device="cuda"))
    with pytest.raises(ConfigError, match="dtype"):
        SenseVoiceOnnxEngine.load(onnx_config(small_model_dir, tmp_path, dtype="fp16"))


def test_auto_falls_back_to_torch_loudly_but_onnx_does_not(
    small_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With backend auto an ONNX failure loads torch and says so; with backend onnx it is an error."""

    def broken(*args: object, **kwargs: object) -> SenseVoiceOnnxEngine:
        raise EngineError("the export failed")

    monkeypatch.setattr(SenseVoiceOnnxEngine, "load", broken)
    with caplog.at_level(logging.WARNING):
        engine = load_sensevoice(
            onnx_config(small_model_dir, tmp_path), str(small_model_dir), max_audio_s=5.0
        )
    assert isinstance(engine, SenseVoiceEngine)
    assert "FALLING BACK to the torch backend" in caplog.text and "the export failed" in caplog.text
    with pytest.raises(EngineError, match="the export failed"):
        load_sensevoice(
            onnx_config(small_model_dir, tmp_path, backend="onnx"), str(small_model_dir), max_audio_s=5.0
        )


def test_warmup_runs_the_largest_batch_in_every_worker_at_once(
    small_model_dir: Path, onnx_cache: Path
) -> None:
    """With two workers, warm-up runs two largest batches at once (the most the batcher ever runs), so
    memory reaches its ceiling before the first client."""
    engine = SenseVoiceOnnxEngine.load(onnx_config(small_model_dir, onnx_cache, workers=2, threads=1))
    seen: list[tuple[str, int]] = []
    real = engine._run_batch

    def spy(audios: Sequence[npt.NDArray[np.float32]], **kwargs: object) -> list[Transcript]:
        seen.append((threading.current_thread().name, len(audios)))
        return real(audios, **kwargs)  # type: ignore[arg-type]

    engine._run_batch = spy  # type: ignore[method-assign]
    engine.warmup(3, 5.0)
    assert len(seen) == 2 and {n for _, n in seen} == {3} and len({t for t, _ in seen}) == 2
    assert engine.info.max_batch_size == 3
