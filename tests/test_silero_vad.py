"""Silero VAD (``stream_server.silero_vad``) and the VAD wrappers of ``stream_server.vad``.

The Silero tests run the real ONNX weights of the ``silero-vad`` package on real recorded speech and on
synthetic silence and noise; the chunk and context bookkeeping is also checked against a scripted fake
model, whose inputs are recorded. The wrappers (:class:`NoiseGate`, :class:`MinSpeechRun`) are checked
on a scripted inner classifier.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from stream_server.config import SegmenterConfig
from stream_server.errors import ConfigError, EngineError
from stream_server.protocol import StreamOptions
from stream_server.session import JobKind, Session, SessionSettings
from stream_server.silero_vad import (
    CHUNK_SAMPLES,
    CONTEXT_SAMPLES,
    SileroFrameVad,
    SileroVadModel,
    packaged_model_path,
)
from stream_server.testing.speech import read_wav, recorded_speech
from stream_server.testing.truth import speech_runs
from stream_server.vad import MinSpeechRun, NoiseFloor, NoiseGate, frame_energy_dbfs
from tests.conftest import skip_unless
from tests.synth import IDENTITY

RATE = 16000
FRAME = 480
Pcm = npt.NDArray[np.int16]

needs_silero = skip_unless(
    importlib.util.find_spec("silero_vad") is not None,
    "silero-vad missing (pip install --no-deps silero-vad==6.2.3)",
)


def frames_of(pcm: Pcm, size: int = FRAME) -> list[Pcm]:
    return [pcm[i : i + size] for i in range(0, len(pcm) - size + 1, size)]


def classify_all(vad: Any, pcm: Pcm, size: int = FRAME) -> list[bool]:
    """Feed every whole frame, then flush; check the answers never lag more than promised."""
    flags: list[bool] = []
    fed = 0
    for frame in frames_of(pcm, size):
        fed += 1
        flags += vad.classify(frame)
        assert 0 <= fed - len(flags) <= vad.max_lag_frames, (fed, len(flags))
    flags += vad.flush()
    assert len(flags) == fed
    return flags


def noise(ms: int, dbfs: float, exponent: float = 0.0, seed: int = 0) -> Pcm:
    """White (0), pink (1) or brown (2) noise with RMS ``dbfs``."""
    n = RATE * ms // 1000
    rng = np.random.default_rng(seed)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / RATE)
    freqs[0] = freqs[1]
    shaped = np.fft.irfft(spectrum / freqs ** (exponent / 2), n)
    shaped *= 10 ** (dbfs / 20) / np.sqrt(np.mean(shaped**2))
    return np.round(shaped * 32768).astype(np.int16)


# --------------------------------------------------------------------------------------------------
# The real model


@pytest.fixture(scope="module")
def model() -> SileroVadModel:
    return SileroVadModel.load()


@pytest.fixture(scope="module")
def lecture() -> Pcm:
    samples, rate_hz, channels = read_wav(recorded_speech("lecture"))
    assert (rate_hz, channels) == (RATE, 1)
    return samples[: 30 * RATE]


@needs_silero
def test_packaged_model_is_found_without_importing_the_package() -> None:
    """The ONNX file is located through the package's folder; the package itself (and torch) is not
    imported."""
    import sys

    path = packaged_model_path()
    assert path.name == "silero_vad.onnx" and path.is_file()
    assert "silero_vad" not in sys.modules


@needs_silero
def test_recorded_speech_is_speech_and_its_pauses_are_not(model: SileroVadModel, lecture: Pcm) -> None:
    """On a real lecture, frames inside loud runs are mostly speech and frames deep in pauses are not."""
    flags = np.array(classify_all(model.session_vad(), lecture))
    runs = speech_runs(lecture, min_pause_ms=500)
    inside = np.zeros(len(flags), dtype=bool)
    pause = np.ones(len(flags), dtype=bool)
    for run in runs:
        first, last = round(run.start_s * RATE) // FRAME, round(run.end_s * RATE) // FRAME
        inside[first:last] = True
        pause[max(0, first - 10) : last + 10] = False  # 300 ms from any loud frame
    assert inside.sum() > 500 and pause.sum() > 20
    assert flags[inside].mean() > 0.75
    assert flags[pause].mean() < 0.1


@needs_silero
@pytest.mark.parametrize(
    ("label", "pcm"),
    [
        ("digital silence", np.zeros(5 * RATE, dtype=np.int16)),
        ("white noise -45 dBFS", noise(5000, -45.0)),
        ("pink noise -35 dBFS", noise(5000, -35.0, 1.0)),
        ("brown noise -30 dBFS", noise(5000, -30.0, 2.0)),
        (
            "1 kHz tone -20 dBFS",
            np.round(np.sin(2 * np.pi * 1000 * np.arange(5 * RATE) / RATE) * 3277).astype(np.int16),
        ),
    ],
)
def test_silence_noise_and_tones_are_not_speech(model: SileroVadModel, label: str, pcm: Pcm) -> None:
    """Silero calls no frame of silence, stationary noise or a steady tone speech."""
    assert not any(classify_all(model.session_vad(), pcm)), label


@needs_silero
def test_one_model_serves_interleaved_streams(model: SileroVadModel, lecture: Pcm) -> None:
    """Two streams fed alternately through one shared model get the flags each gets alone."""
    a, b = lecture[: 8 * RATE], lecture[10 * RATE : 18 * RATE]
    alone_a = classify_all(model.session_vad(), a)
    alone_b = classify_all(model.session_vad(), b)
    vad_a, vad_b = model.session_vad(), model.session_vad()
    got_a: list[bool] = []
    got_b: list[bool] = []
    for fa, fb in zip(frames_of(a), frames_of(b), strict=True):
        got_a += vad_a.classify(fa)
        got_b += vad_b.classify(fb)
    got_a += vad_a.flush()
    got_b += vad_b.flush()
    assert (got_a, got_b) == (alone_a, alone_b)
    assert any(alone_a) and any(alone_b)


@needs_silero
def test_flush_resets_for_a_new_stream(model: SileroVadModel, lecture: Pcm) -> None:
    """After flush the classifier answers a stream exactly as a fresh one does."""
    vad = model.session_vad()
    classify_all(vad, lecture[: 3 * RATE + 100 * FRAME // 7])
    assert classify_all(vad, lecture[5 * RATE : 9 * RATE]) == classify_all(
        model.session_vad(), lecture[5 * RATE : 9 * RATE]
    )


@needs_silero
@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_any_frame_size_lags_at_most_max_lag(model: SileroVadModel, lecture: Pcm, frame_ms: int) -> None:
    """10, 20 and 30 ms frames are all answered in order, within max_lag_frames, and flush answers all."""
    vad = model.session_vad(frame_ms=frame_ms)
    assert vad.max_lag_frames == {10: 3, 20: 2, 30: 1}[frame_ms]
    flags = classify_all(vad, lecture[: 6 * RATE], size=RATE * frame_ms // 1000)
    assert any(flags) and not all(flags)


@needs_silero
def test_silero_in_a_session_gives_segments(model: SileroVadModel, lecture: Pcm) -> None:
    """A session with Silero as its VAD turns the lecture's first 20 s into several finals."""
    session = Session(
        StreamOptions(), SessionSettings(segmenter=SegmenterConfig()), model.session_vad(), IDENTITY
    )
    data = lecture[: 20 * RATE].astype("<i2").tobytes()
    for i in range(0, len(data), 3200):
        session.receive_audio(data[i : i + 3200])
    session.receive_audio(b"")
    finals = [j for j in session.jobs_to_run() if j.kind is JobKind.FINAL]
    assert 2 <= len(finals) <= 10
    assert all(a.end_sample <= b.start_sample for a, b in zip(finals, finals[1:], strict=False))


@needs_silero
def test_settings_are_checked(model: SileroVadModel) -> None:
    """Thresholds outside (0, 1), an end threshold above the start one, and odd frames are refused."""
    with pytest.raises(ConfigError, match="threshold"):
        model.session_vad(threshold=1.0)
    with pytest.raises(ConfigError, match="neg_threshold"):
        model.session_vad(threshold=0.5, neg_threshold=0.6)
    with pytest.raises(ConfigError, match="frame_ms"):
        model.session_vad(frame_ms=0)
    with pytest.raises(ValueError, match="480"):
        model.session_vad().classify(np.zeros(160, dtype=np.int16))
    with pytest.raises(ConfigError, match="threads"):
        SileroVadModel.load(threads=0)


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the silero-vad package, loading says what to install."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(EngineError, match="pip install --no-deps silero-vad"):
        SileroVadModel.load()


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    """A model path that does not exist is an EngineError naming it."""
    with pytest.raises(EngineError, match="does not exist"):
        SileroVadModel.load(model_path=tmp_path / "nope.onnx")


# --------------------------------------------------------------------------------------------------
# Chunking, context and hysteresis, against a scripted model


class _Input:
    def __init__(self, name: str) -> None:
        self.name = name


class ScriptedSession:
    """Stands in for an ONNX Runtime session: returns scripted probabilities, records its inputs."""

    def __init__(self, probabilities: Sequence[float]) -> None:
        self.probabilities = list(probabilities)
        self.windows: list[npt.NDArray[np.float32]] = []
        self.states: list[npt.NDArray[np.float32]] = []

    def get_inputs(self) -> list[_Input]:
        return [_Input("input"), _Input("state"), _Input("sr")]

    def run(self, _outputs: Any, feeds: dict[str, Any]) -> list[Any]:
        assert feeds["sr"] == RATE
        self.windows.append(np.array(feeds["input"], copy=True))
        self.states.append(np.array(feeds["state"], copy=True))
        k = len(self.windows)
        probability = self.probabilities[k - 1] if k <= len(self.probabilities) else 0.0
        return [np.array([[probability]], dtype=np.float32), np.full((2, 1, 128), float(k), dtype=np.float32)]


def scripted(probabilities: Sequence[float], **kwargs: Any) -> tuple[SileroFrameVad, ScriptedSession]:
    session = ScriptedSession(probabilities)
    return SileroVadModel(session, Path("scripted.onnx"), threads=1).session_vad(**kwargs), session


def test_each_chunk_gets_the_previous_64_samples_and_the_state() -> None:
    """Chunks are 512 samples with the previous chunk's last 64 in front (zeros first); the state the
    model returned goes back in with the next chunk; a short last chunk is padded with zeros."""
    pcm = (np.arange(4 * FRAME) % 2000 - 1000).astype(np.int16)  # 3.75 chunks
    vad, session = scripted([])
    classify_all(vad, pcm)
    audio = pcm.astype(np.float32) / 32768
    padded = np.concatenate([audio, np.zeros(-len(audio) % CHUNK_SAMPLES, dtype=np.float32)])
    assert len(session.windows) == len(padded) // CHUNK_SAMPLES
    for k, window in enumerate(session.windows):
        assert window.shape == (1, CONTEXT_SAMPLES + CHUNK_SAMPLES) and window.dtype == np.float32
        before = (
            padded[k * CHUNK_SAMPLES - CONTEXT_SAMPLES : k * CHUNK_SAMPLES]
            if k
            else np.zeros(CONTEXT_SAMPLES)
        )
        np.testing.assert_array_equal(window[0, :CONTEXT_SAMPLES], before)
        np.testing.assert_array_equal(
            window[0, CONTEXT_SAMPLES:], padded[k * CHUNK_SAMPLES : (k + 1) * CHUNK_SAMPLES]
        )
        np.testing.assert_array_equal(session.states[k], np.full((2, 1, 128), float(k)))


def test_hysteresis_starts_at_threshold_and_ends_below_threshold_minus_015() -> None:
    """Speech starts at p >= 0.5, holds while p >= 0.35, and ends at the first chunk below 0.35."""
    probabilities = [0.1, 0.49, 0.5, 0.4, 0.36, 0.34, 0.45, 0.9, 0.2]
    expected_chunks = [False, False, True, True, True, False, False, True, False]
    vad, _ = scripted(probabilities)
    pcm = np.zeros(len(probabilities) * CHUNK_SAMPLES, dtype=np.int16)
    flags = classify_all(vad, pcm)
    # Each frame takes the state of the chunk holding its middle sample.
    expected = [expected_chunks[(i * FRAME + FRAME // 2) // CHUNK_SAMPLES] for i in range(len(flags))]
    assert flags == expected


def test_neg_threshold_can_be_set() -> None:
    """With neg_threshold equal to threshold there is no hysteresis: 0.45 ends speech at once."""
    vad, _ = scripted([0.9, 0.45, 0.9], threshold=0.5, neg_threshold=0.5)
    flags = classify_all(vad, np.zeros(3 * CHUNK_SAMPLES, dtype=np.int16))
    chunks = [True, False, True]
    assert flags == [chunks[(i * FRAME + FRAME // 2) // CHUNK_SAMPLES] for i in range(len(flags))]


# --------------------------------------------------------------------------------------------------
# NoiseFloor, NoiseGate, MinSpeechRun


class ScriptedVad:
    """A classifier that answers scripted flags, ``lag`` frames late."""

    frame_samples = FRAME

    def __init__(self, flags: Sequence[bool], lag: int = 0) -> None:
        self.flags = list(flags)
        self.max_lag_frames = lag
        self.received = 0
        self.answered = 0

    def classify(self, frame: Pcm) -> Sequence[bool]:
        self.received += 1
        ready = max(0, self.received - self.max_lag_frames)
        out = self.flags[self.answered : ready]
        self.answered = ready
        return out

    def flush(self) -> Sequence[bool]:
        out = self.flags[self.answered : self.received]
        self.answered = self.received
        return out


def level_frame(dbfs: float, seed: int = 0) -> Pcm:
    """One frame of white noise at ``dbfs`` (digital silence below -110)."""
    if dbfs < -110:
        return np.zeros(FRAME, dtype=np.int16)
    return noise(30, dbfs, seed=seed)


def test_noise_floor_is_the_quietest_frame_of_the_window() -> None:
    """The floor is the minimum level of the last window, forgets older frames, and is capped by the
    initial value until a whole window has been seen."""
    floor = NoiseFloor(frame_ms=30, window_ms=300, initial_dbfs=-70.0)
    assert floor.floor_dbfs == -70.0
    assert floor.push(-40.0) == -70.0  # a stream that opens loud is not taken for a loud room
    for _ in range(9):
        floor.push(-40.0)
    assert floor.floor_dbfs == -40.0  # a whole window seen: the initial value no longer counts
    floor.push(-60.0)
    assert floor.floor_dbfs == -60.0
    for _ in range(9):
        assert floor.push(-30.0) == -60.0
    assert floor.push(-30.0) == -30.0  # the -60 frame has left the 10-frame window


def test_noise_gate_drops_speech_close_to_the_floor() -> None:
    """In a -50 dBFS room, frames the inner VAD calls speech count only if 12 dB above the floor."""
    levels = [-50.0] * 100 + [-20.0] * 5 + [-45.0] * 5 + [-30.0] * 5 + [-50.0] * 5
    inner = ScriptedVad([True] * len(levels))
    gate = NoiseGate(inner, margin_db=12.0, window_ms=3000)
    flags = classify_all(gate, np.concatenate([level_frame(x, seed=i) for i, x in enumerate(levels)]))
    assert flags[100:105] == [True] * 5
    assert flags[105:110] == [False] * 5  # 5 dB above the room
    assert flags[110:115] == [True] * 5
    assert flags[115:] == [False] * 5


def test_noise_gate_keeps_order_and_lag_of_a_lagging_vad() -> None:
    """Gate verdicts wait for the inner VAD's answers: same order, same lag, flush answers the rest."""
    levels = [-120.0] * 10 + [-20.0] * 10 + [-120.0] * 10
    inner_flags = [i % 3 != 0 for i in range(len(levels))]
    gate = NoiseGate(ScriptedVad(inner_flags, lag=4), margin_db=6.0)
    assert gate.max_lag_frames == 4
    flags = classify_all(gate, np.concatenate([level_frame(x) for x in levels]))
    # On digital silence the floor is -120 dBFS, and digital silence itself is never above it.
    expected = [flag and -120.0 < level for flag, level in zip(inner_flags, levels, strict=True)]
    assert flags == expected


def test_noise_gate_passes_speech_over_digital_silence() -> None:
    """Between digital silences the floor is -120 dBFS: a faint -80 dBFS frame still passes."""
    levels = [-120.0] * 20 + [-80.0] * 3
    flags = classify_all(
        NoiseGate(ScriptedVad([True] * 23)), np.concatenate([level_frame(x) for x in levels])
    )
    assert flags[20:] == [True] * 3
    assert frame_energy_dbfs(level_frame(-120.0)) == -120.0


def test_noise_gate_refuses_a_negative_margin() -> None:
    """A negative margin is refused."""
    with pytest.raises(ValueError, match="margin_db"):
        NoiseGate(ScriptedVad([]), margin_db=-1.0)


def run_filter(pattern: str, **kwargs: int) -> str:
    vad = MinSpeechRun(ScriptedVad([c == "S" for c in pattern]), **kwargs)
    flags = classify_all(vad, np.zeros(len(pattern) * FRAME, dtype=np.int16))
    return "".join("S" if f else "." for f in flags)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        # blips after a pause are dropped; a run of 3 is kept whole
        (".......S......SS......SSS....", "......................SSS...."),
        ("SSSSSSSS......S......SS......", "SSSSSSSS....................."),
        # a blip after a short gap belongs to the speech around it
        ("SSSSSSSS...S.........", "SSSSSSSS...S........."),
        ("SSSSSSSS..SS.S.SS....", "SSSSSSSS..SS.S.SS...."),
        # a dropped blip is part of the pause: the next one is dropped too
        ("SSSS......S...S......", "SSSS................."),
        # a short run cut by the end of the stream is kept
        ("........SS", "........SS"),
    ],
)
def test_min_speech_run_drops_short_blips_after_pauses(pattern: str, expected: str) -> None:
    """Runs under 3 speech frames after 5 or more non-speech frames are dropped; nothing else is."""
    assert run_filter(pattern, min_frames=3, quiet_frames=5) == expected


def test_min_speech_run_keeps_runs_of_min_frames() -> None:
    """A run of exactly min_frames after a pause is kept, and min_frames=1 changes nothing."""
    assert run_filter("......SSS......", min_frames=3) == "......SSS......"
    assert run_filter("..S..S..", min_frames=1) == "..S..S.."
    assert run_filter("S.S.S.", min_frames=2, quiet_frames=0) == "......"


def test_min_speech_run_delays_nothing_but_a_pending_run() -> None:
    """Non-speech after speech is answered at once; only a run after a pause waits, up to
    min_frames - 1 frames."""
    vad = MinSpeechRun(
        ScriptedVad([True] * 10 + [False] * 3 + [True] * 2 + [False]), min_frames=4, quiet_frames=2
    )
    assert vad.max_lag_frames == 3
    frame = np.zeros(FRAME, dtype=np.int16)
    answers = [len(vad.classify(frame)) for _ in range(16)]
    assert answers == [0, 0, 0, 4] + [1] * 9 + [0, 0, 3]
