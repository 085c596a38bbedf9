"""SenseVoiceEngine on a small random-weight SenseVoice folder: the real funasr code path, gibberish text."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pytest
import torch

from stream_server.config import EngineConfig
from stream_server.engines.base import SAMPLE_RATE_HZ, Engine, TranscribeRequest
from stream_server.engines.sensevoice import (
    SenseVoiceCore,
    SenseVoiceEngine,
    _Piece,
    default_length_buckets_s,
    fine_length_buckets_s,
    group_words,
    parse_sensevoice_text,
)
from stream_server.engines.sensevoice_onnx import SenseVoiceOnnxEngine
from stream_server.errors import ConfigError, EngineError
from stream_server.testing.sensevoice_random import (
    SPECIAL_TOKEN_IDS,
    STAMP_FILE,
    VOCAB_SIZE,
    build_random_sensevoice,
)

MAX_AUDIO_S = 10.0


def noise(seconds: float, seed: int, level: float = 0.1) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    return (level * rng.standard_normal(int(round(seconds * SAMPLE_RATE_HZ)))).astype(np.float32)


def load_backend(
    backend: str, folder: Path, onnx_cache: Path, *, length_buckets_s: list[float] | None = None
) -> SenseVoiceCore:
    """The torch engine, or the ONNX Runtime engine on the fp32 export (same outputs: test_engine_onnx)."""
    if backend == "torch":
        return SenseVoiceEngine.load(
            EngineConfig(model=str(folder), threads=2),
            max_audio_s=MAX_AUDIO_S,
            length_buckets_s=length_buckets_s,
        )
    config = EngineConfig(
        model=str(folder), dtype="fp32", threads=2, workers=1, onnx_cache_dir=str(onnx_cache)
    )
    return SenseVoiceOnnxEngine.load(config, max_audio_s=MAX_AUDIO_S, length_buckets_s=length_buckets_s)


@pytest.fixture(scope="session", params=["torch", "onnx"])
def engine(request: pytest.FixtureRequest, small_model_dir: Path, onnx_cache: Path) -> SenseVoiceCore:
    """Each backend in turn: everything below the network is shared, so every behaviour must hold on both."""
    return load_backend(request.param, small_model_dir, onnx_cache)


class CtcSpy:
    """Records the CTC logits (and so the batch shape) of every model call, whatever the backend."""

    def __init__(self, engine: SenseVoiceCore) -> None:
        self.calls: list[torch.Tensor] = []
        self._engine = engine
        real = engine._forward

        def recording(batch: torch.Tensor, lengths: Any, **kwargs: Any) -> torch.Tensor:
            logits = real(batch, lengths, **kwargs)
            self.calls.append(logits.detach().clone())
            return logits

        engine._forward = recording  # type: ignore[method-assign]

    def close(self) -> None:
        del self._engine._forward


@pytest.fixture
def spy(engine: SenseVoiceCore) -> Iterator[CtcSpy]:
    recorder = CtcSpy(engine)
    yield recorder
    recorder.close()


# -- Pure parts: no model ---------------------------------------------------------------------------


def test_tags_are_parsed_and_removed_from_text() -> None:
    """SenseVoice's language, emotion, event and ITN tags become fields and never stay in the text."""
    parsed = parse_sensevoice_text("<|en|><|NEUTRAL|><|Speech|><|withitn|>Hello, world.")
    assert (parsed.text, parsed.language, parsed.emotion, parsed.audio_event) == (
        "Hello, world.",
        "en",
        "neutral",
        "speech",
    )
    odd = parse_sensevoice_text("<|yue|><|EMO_UNKNOWN|><|Event_UNK|><|woitn|>a <|BGM|> b<|nospeech|>")
    assert (odd.text, odd.language, odd.emotion, odd.audio_event) == ("a b", "yue", "unknown", "unknown")
    assert parse_sensevoice_text("<|zh|><|HAPPY|><|Laughter|><|woitn|>").text == ""


def test_default_buckets_step_by_at_most_one_and_a_half_up_to_max_audio() -> None:
    """The default buckets run 1, 1.5, 2, 3, 4, 6... seconds and end at max_audio_s."""
    assert default_length_buckets_s(30.0) == (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 30.0)
    assert default_length_buckets_s(25.0) == (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 25.0)
    assert default_length_buckets_s(0.5) == (0.5,)


def test_onnx_buckets_step_by_half_a_second_up_to_max_audio() -> None:
    """The ONNX backend's buckets are every 0.5 s and end at max_audio_s, never past it."""
    assert fine_length_buckets_s(3.0) == (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
    assert fine_length_buckets_s(2.2) == (0.5, 1.0, 1.5, 2.0, 2.2)
    assert fine_length_buckets_s(0.3) == (0.3,)
    assert len(fine_length_buckets_s(20.0)) == 40


def test_pieces_group_into_words_like_funasr_post() -> None:
    """Word-start pieces open words, ASCII pieces continue them, punctuation attaches, CJK stands alone."""
    b = "\u2581"
    pieces = [
        _Piece(b + "hel", 0, 2, 1.8, 2),
        _Piece("lo", 2, 3, 0.5, 1),
        _Piece(",", 3, 4, 0.9, 1),
        _Piece(b, 4, 5, 0.9, 1),
        _Piece(b + "World", 5, 7, 1.0, 2),
        _Piece("你", 8, 9, 0.7, 1),
        _Piece("好", 9, 10, 0.6, 1),
        _Piece(".", 10, 11, 1.0, 1),
    ]
    words = group_words(pieces, frame_s=0.06, total_frames=20)
    assert [(w.word, w.punctuated_word) for w in words] == [
        ("hello", "hello,"),
        ("world", "World"),
        ("你", "你"),
        ("好", "好."),
    ]
    hello = words[0]
    assert hello.start_s == 0.0  # max(0 * 0.06 - 0.03, 0)
    assert hello.end_s == pytest.approx(4 * 0.06 - 0.03)
    assert hello.confidence == pytest.approx((1.8 + 0.5 + 0.9) / 4)
    assert words[1].start_s == pytest.approx(5 * 0.06 - 0.03)


def test_fp16_on_cpu_is_a_config_error(tmp_path: Path) -> None:
    """fp16 without CUDA is refused with a ConfigError naming the dtype field."""
    with pytest.raises(ConfigError, match="dtype"):
        SenseVoiceEngine.load(EngineConfig(model=str(tmp_path), device="cpu", dtype="fp16"))


def test_int8_on_cuda_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """int8 on a CUDA device is refused with a ConfigError naming the dtype field, before anything loads."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="dtype: int8"):
        SenseVoiceEngine.load(EngineConfig(model=str(tmp_path), device="cuda", dtype="int8"))


def test_buckets_must_hold_max_audio(tmp_path: Path) -> None:
    """Length buckets that cannot hold max_audio_s are a ConfigError naming length_buckets_s."""
    with pytest.raises(ConfigError, match="length_buckets_s"):
        SenseVoiceEngine.load(
            EngineConfig(model=str(tmp_path)), max_audio_s=30.0, length_buckets_s=[5.0, 10.0]
        )


def test_folder_without_config_is_an_actionable_engine_error(tmp_path: Path) -> None:
    """A folder lacking config.yaml fails with an EngineError that names the missing file."""
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(EngineError, match="config.yaml"):
        SenseVoiceEngine.load(EngineConfig(model=str(tmp_path)))


def test_missing_folder_is_an_engine_error(tmp_path: Path) -> None:
    """A path that does not exist (and is no hub id) fails with an EngineError saying so."""
    with pytest.raises(EngineError, match="does not exist"):
        SenseVoiceEngine.load(EngineConfig(model=str(tmp_path / "nope")))


# -- The random folder ------------------------------------------------------------------------------


@pytest.mark.model
def test_random_folder_loads_through_automodel(small_model_dir: Path) -> None:
    """The random folder loads through funasr.AutoModel as the release does, tags at funasr's ids."""
    from funasr import AutoModel
    from funasr.models.sense_voice.model import SenseVoiceSmall

    auto_model = AutoModel(
        model=str(small_model_dir), disable_update=True, device="cpu", ncpu=2, disable_pbar=True
    )
    assert isinstance(auto_model.model, SenseVoiceSmall)
    tokenizer = auto_model.kwargs["tokenizer"]
    assert tokenizer.get_vocab_size() == VOCAB_SIZE
    assert auto_model.model.ctc.ctc_lo.out_features == VOCAB_SIZE
    assert auto_model.kwargs["frontend"].cmvn.shape == (2, 560)
    for token_id, piece in SPECIAL_TOKEN_IDS.items():
        assert tokenizer.sp.piece_to_id(piece) == token_id
    assert (
        auto_model.model.lid_int_dict[SPECIAL_TOKEN_IDS_BY_PIECE["<|en|>"]] == auto_model.model.lid_dict["en"]
    )


SPECIAL_TOKEN_IDS_BY_PIECE = {piece: token_id for token_id, piece in SPECIAL_TOKEN_IDS.items()}


@pytest.mark.model
def test_build_is_idempotent(small_model_dir: Path) -> None:
    """Building again with the same settings rewrites nothing; other settings rebuild."""
    before = {f: f.stat().st_mtime_ns for f in small_model_dir.rglob("*") if f.is_file()}
    build_random_sensevoice(small_model_dir, num_blocks=2, tp_blocks=1)
    after = {f: f.stat().st_mtime_ns for f in small_model_dir.rglob("*") if f.is_file()}
    assert after == before, "no file written, added or removed"
    assert '"num_blocks": 2' in (small_model_dir / STAMP_FILE).read_text()


# -- Transcription ----------------------------------------------------------------------------------


@pytest.mark.model
def test_engine_satisfies_protocol_and_reports_itself(engine: SenseVoiceCore, small_model_dir: Path) -> None:
    """The engine is an Engine and its info names the model, device, dtype, languages and buckets."""
    assert isinstance(engine, Engine)
    info = engine.info
    assert (info.name, info.model, info.device, info.dtype) == (
        "sensevoice-small",
        str(small_model_dir),
        "cpu",
        "fp32",
    )
    assert info.languages == ("zh", "en", "ja", "ko", "yue")
    assert info.max_audio_s == MAX_AUDIO_S
    assert info.extras["threads"] == "2"
    expected = fine_length_buckets_s if info.extras["backend"] == "onnxruntime" else default_length_buckets_s
    assert info.extras["length_buckets_s"] == ",".join(f"{b:g}" for b in expected(MAX_AUDIO_S))
    assert info.extras["backend"] == engine.backend in ("torch", "onnxruntime")


@pytest.mark.model
def test_transcribe_returns_one_transcript_per_request_in_order(engine: SenseVoiceCore) -> None:
    """A batch gives one transcript per request, in request order, each as if transcribed alone."""
    clips = [noise(d, seed) for seed, d in enumerate([1.0, 3.3, 0.6, 4.2])]
    batch = engine.transcribe([TranscribeRequest(c) for c in clips])
    alone = [engine.transcribe([TranscribeRequest(c)])[0] for c in clips]
    assert len(batch) == len(clips)
    assert [t.text for t in batch] == [t.text for t in alone]
    assert len({t.text for t in batch}) == len(clips)  # distinct, so the order check means something
    for transcript in batch:
        assert transcript.text and "<|" not in transcript.text and "|>" not in transcript.text
        assert 0.0 < transcript.confidence <= 1.0


@pytest.mark.model
def test_mixed_batch_keys_are_split_into_one_model_call_each(engine: SenseVoiceCore, spy: CtcSpy) -> None:
    """Requests with different (language, use_itn) run as one model call per key, results in order."""
    requests = [
        TranscribeRequest(noise(1.0, 10), language="auto"),
        TranscribeRequest(noise(2.0, 11), language="en", use_itn=True),
        TranscribeRequest(noise(1.5, 12), language="auto"),
        TranscribeRequest(noise(0.8, 13), language="zh"),
    ]
    mixed = engine.transcribe(requests)
    assert [call.shape[0] for call in spy.calls] == [2, 1, 1]
    separate = [engine.transcribe([r])[0] for r in requests]
    assert [t.text for t in mixed] == [t.text for t in separate]
    assert mixed[1].language == "en" and mixed[3].language == "zh"


@pytest.mark.model
def test_padding_to_a_bucket_does_not_change_the_output(
    small_model_dir: Path, onnx_cache: Path, engine: SenseVoiceCore
) -> None:
    """A clip padded to a 10 s bucket gives the same text, words and CTC posteriors as unpadded."""
    backend = "torch" if engine.backend == "torch" else "onnx"
    exact = load_backend(backend, small_model_dir, onnx_cache, length_buckets_s=[2.2, 10.0])
    clip = noise(2.2, 42)
    unpadded_spy, padded_spy = CtcSpy(exact), CtcSpy(engine)
    try:
        unpadded = exact.transcribe([TranscribeRequest(clip)])[0]
        # Padded twice over: to the 3 s bucket alone, and to 10 s next to a 9 s clip.
        padded = engine.transcribe([TranscribeRequest(clip)])[0]
        padded_in_batch = engine.transcribe([TranscribeRequest(clip), TranscribeRequest(noise(9.0, 43))])[0]
    finally:
        unpadded_spy.close()
        padded_spy.close()

    frames = unpadded_spy.calls[0].shape[1]
    assert frames == 37 + 4  # 2.2 s: 218 fbank frames, 37 LFR frames, 4 query frames: no padding
    assert (
        padded_spy.calls[0].shape[1] > frames and padded_spy.calls[1].shape[1] > padded_spy.calls[0].shape[1]
    )
    reference = torch.log_softmax(unpadded_spy.calls[0][0], dim=-1)
    for call in padded_spy.calls:
        posteriors = torch.log_softmax(call[0, :frames], dim=-1)
        assert torch.equal(posteriors.argmax(-1), reference.argmax(-1))
        assert torch.allclose(posteriors.exp(), reference.exp(), atol=1e-5)
    for other in (padded, padded_in_batch):
        assert other.text == unpadded.text
        assert other.confidence == pytest.approx(unpadded.confidence, rel=1e-3)
        assert [w.word for w in other.words] == [w.word for w in unpadded.words]
        assert [w.start_s for w in other.words] == [w.start_s for w in unpadded.words]


@pytest.mark.model
def test_words_lie_inside_the_clip_and_can_be_turned_off(engine: SenseVoiceCore) -> None:
    """Word times are ordered and inside the clip; word_timestamps=False gives no words."""
    clip = noise(4.0, 7)
    with_words, without = engine.transcribe(
        [TranscribeRequest(clip), TranscribeRequest(clip, word_timestamps=False)]
    )
    assert with_words.words and not without.words
    assert with_words.text == without.text
    previous_end_s = 0.0
    for word in with_words.words:
        assert previous_end_s <= word.start_s <= word.end_s <= 4.0
        assert 0.0 <= word.confidence <= 1.0 and word.word and word.word in with_words.text.lower()
        previous_end_s = word.end_s


@pytest.mark.model
def test_alignment_failure_costs_only_that_clips_words(
    engine: SenseVoiceCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When forced alignment raises for one clip, that clip gets no words and the batch still succeeds."""
    import funasr.models.sense_voice.utils.ctc_alignment as alignment

    real = alignment.ctc_forced_align
    calls = []

    def fail_first(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 1:
            raise IndexError("too few frames")
        result: torch.Tensor = real(*args, **kwargs)
        return result

    monkeypatch.setattr(alignment, "ctc_forced_align", fail_first)
    first, second = engine.transcribe([TranscribeRequest(noise(2.0, 1)), TranscribeRequest(noise(2.0, 2))])
    assert first.text and not first.words
    assert second.words


@pytest.mark.model
def test_too_long_clip_is_an_error(engine: SenseVoiceCore) -> None:
    """A clip longer than max_audio_s fails the batch with an EngineError naming max_audio_s."""
    with pytest.raises(EngineError, match="max_audio_s"):
        engine.transcribe([TranscribeRequest(noise(1.0, 0)), TranscribeRequest(noise(MAX_AUDIO_S + 0.5, 1))])


@pytest.mark.model
def test_empty_and_tiny_clips_do_not_fail(engine: SenseVoiceCore) -> None:
    """An empty clip gives an empty transcript and a 10 ms clip still runs, in the same batch."""
    empty, tiny, normal = engine.transcribe(
        [
            TranscribeRequest(np.zeros(0, dtype=np.float32)),
            TranscribeRequest(noise(0.01, 3)),
            TranscribeRequest(noise(1.0, 4)),
        ]
    )
    assert (empty.text, empty.confidence, empty.words) == ("", 0.0, ())
    assert normal.text
    assert "<|" not in tiny.text


@pytest.mark.model
def test_emitted_tags_become_fields_not_text(small_model_dir: Path) -> None:
    """When the model emits only an emotion tag, the transcript is empty with that emotion."""
    engine = SenseVoiceEngine.load(
        EngineConfig(model=str(small_model_dir), threads=2), max_audio_s=MAX_AUDIO_S
    )
    model: Any = engine.model
    ctc_layer = model.ctc.ctc_lo
    with torch.no_grad():
        ctc_layer.bias[SPECIAL_TOKEN_IDS_BY_PIECE["<|HAPPY|>"]] += 1e4
    transcript = engine.transcribe([TranscribeRequest(noise(1.0, 5))])[0]
    assert (transcript.text, transcript.emotion, transcript.words, transcript.confidence) == (
        "",
        "happy",
        (),
        0.0,
    )


@pytest.mark.model
def test_int8_runs_on_cpu(small_model_dir: Path) -> None:
    """dtype int8 quantizes the Linear layers dynamically and still transcribes."""
    engine = SenseVoiceEngine.load(
        EngineConfig(model=str(small_model_dir), dtype="int8", threads=2), max_audio_s=MAX_AUDIO_S
    )
    assert engine.info.dtype == "int8"
    modules = list(engine.model.modules())
    assert not any(type(m) is torch.nn.Linear for m in modules)
    assert sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in modules) >= 10
    transcript = engine.transcribe([TranscribeRequest(noise(2.0, 6))])[0]
    assert transcript.text and "<|" not in transcript.text
    assert 0.0 < transcript.confidence <= 1.0


@pytest.mark.model
def test_warmup_records_the_batch_it_was_warmed_for(small_model_dir: Path) -> None:
    """warmup runs the largest batch of the largest bucket and info reports that batch size."""
    engine = SenseVoiceEngine.load(
        EngineConfig(model=str(small_model_dir), threads=2), max_audio_s=MAX_AUDIO_S
    )
    spy = CtcSpy(engine)
    try:
        engine.warmup(3, MAX_AUDIO_S)
    finally:
        spy.close()
    assert engine.info.max_batch_size == 3
    # 10 s: 1 + (160000 - 400) // 160 = 998 fbank frames, ceil(998 / 6) = 167 LFR frames, + 4 queries.
    assert spy.calls[0].shape[:2] == (3, 167 + 4)


@pytest.mark.model
@pytest.mark.parametrize(
    ("backend", "expected"), [("auto", SenseVoiceOnnxEngine), ("torch", SenseVoiceEngine)]
)
def test_loader_loads_and_warms_a_sensevoice_folder(
    small_model_dir: Path, onnx_cache: Path, backend: Literal["auto", "torch"], expected: type
) -> None:
    """load_engine with a folder loads SenseVoice (ONNX Runtime by default on CPU, torch when asked), warms
    it for the batch size given, and never falls back."""
    from stream_server.engines.loader import load_engine

    def no_probe(hub_name: str, timeout_s: float) -> str | None:
        raise AssertionError("a folder must not probe any hub")

    config = EngineConfig(
        model=str(small_model_dir), threads=2, backend=backend, onnx_cache_dir=str(onnx_cache)
    )
    engine = load_engine(config, max_audio_s=5.0, max_batch_size=2, probe=no_probe)
    assert type(engine) is expected
    assert (engine.info.max_batch_size, engine.info.max_audio_s, engine.info.fallback_reason) == (
        2,
        5.0,
        None,
    )
