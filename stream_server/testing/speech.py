"""Test speech shared by tests and load tests: synthetic (espeak-ng), recorded (fetched), and WER.

Everything generated or fetched lives in one cache directory, ``<repo>/.cache/test-audio`` by default
(git-ignored), or wherever the environment variable ``STREAM_SERVER_TEST_CACHE`` points.

* :func:`espeak_wav` — one sentence of synthetic English speech, 16 kHz mono 16-bit. At 100 words per
  minute faster-whisper tiny.en transcribes such sentences word for word (see ``/work/shared/MODELS.md``).
* :func:`speech_with_pauses` — several sentences joined by digital silence, with the sentence times
  written to a JSON sidecar (:func:`sentence_spans` reads them back) so tests can check segment times.
* :func:`recorded_speech` — REAL recorded English speech, fetched at run time from PyPI and never
  committed: a lecture and a news clip from the silero-vad sdist, and a telephone dialogue and fourteen
  AMI meeting clips from the pyannote.audio sdist (both MIT licensed). :func:`recorded_transcript` gives
  the dialogue's transcript with times, :func:`recorded_speaker_turns` the annotated speaker turns of
  the dialogue and the meeting clips. ``python -m stream_server.testing.speech fetch`` fetches it all
  ahead of time (for CI set-up).
* :func:`read_wav`, :func:`write_wav`, :func:`read_mono_float32` — stdlib ``wave`` plus numpy.
* :func:`word_error_rate` and :func:`normalize_text` — the WER the project reports.

Nothing in the server imports this module. It needs the ``espeak-ng`` and ``sox`` programs (Debian
packages of the same names) for synthetic speech and ``pip`` for the recorded speech.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "CACHE_ENV",
    "MEETING_CLIPS",
    "RECORDED_SPEECH",
    "RecordedSpeech",
    "SentenceSpan",
    "SpeakerTurn",
    "SpeechToolError",
    "TranscriptTurn",
    "cache_dir",
    "espeak_wav",
    "fetch_all",
    "normalize_text",
    "read_mono_float32",
    "read_wav",
    "recorded_speaker_turns",
    "recorded_speech",
    "recorded_text",
    "recorded_transcript",
    "sentence_spans",
    "speech_with_pauses",
    "word_error_rate",
    "write_wav",
]

CACHE_ENV = "STREAM_SERVER_TEST_CACHE"
"""Environment variable that overrides the cache directory."""

SAMPLE_RATE_HZ = 16000
"""Rate of every file this module makes."""

_SILENCE_THRESHOLD = 16
"""|int16 sample| at or below which espeak's own edge padding counts as silence when trimmed."""

_PIP_TIMEOUT_S = 300.0
"""Wall-clock limit for one ``pip download`` (the sdists are 29 and 14 MB)."""


class SpeechToolError(RuntimeError):
    """A tool (espeak-ng, sox, pip) is missing or failed, or a fetched file is not what was expected."""


# --------------------------------------------------------------------------------------------------
# Cache


def cache_dir() -> Path:
    """The directory that holds generated and fetched audio, created when missing.

    Returns:
        ``$STREAM_SERVER_TEST_CACHE`` when set, else ``<repo>/.cache/test-audio``.
    """
    override = os.environ.get(CACHE_ENV)
    path = Path(override) if override else Path(__file__).resolve().parents[2] / ".cache" / "test-audio"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _replace_atomically(tmp: Path, final: Path) -> Path:
    """Move ``tmp`` onto ``final`` in one step, so concurrent runs never see half a file."""
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    return final


def _temp_path_next_to(path: Path, suffix: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


# --------------------------------------------------------------------------------------------------
# WAV files


def read_wav(path: Path | str) -> tuple[npt.NDArray[np.int16], int, int]:
    """Read a 16-bit PCM WAV file.

    Args:
        path: the file.

    Returns:
        ``(samples, sample_rate_hz, channels)``: ``samples`` is 1-D int16, interleaved as stored (the
        layout the server's wire format uses; ``samples.reshape(-1, channels)`` splits channels).

    Raises:
        SpeechToolError: the file is not 16-bit PCM WAV.
    """
    try:
        with wave.open(str(path), "rb") as reader:
            sample_width_bytes = reader.getsampwidth()
            channels = reader.getnchannels()
            sample_rate_hz = reader.getframerate()
            frames = reader.readframes(reader.getnframes())
    except (wave.Error, EOFError) as exc:
        raise SpeechToolError(f"{path}: not a PCM WAV file ({exc})") from exc
    if sample_width_bytes != 2:
        raise SpeechToolError(f"{path}: {8 * sample_width_bytes}-bit samples; only 16-bit PCM is supported")
    samples = np.frombuffer(frames, dtype="<i2").astype(np.int16)
    return samples, sample_rate_hz, channels


def write_wav(
    path: Path | str,
    samples: npt.NDArray[np.int16] | npt.NDArray[np.float32] | npt.NDArray[np.float64],
    sample_rate_hz: int = SAMPLE_RATE_HZ,
    channels: int = 1,
) -> Path:
    """Write a 16-bit PCM WAV file.

    Args:
        path: where to write (parent directories are created).
        samples: int16 samples, or floats in [-1, 1] (clipped, then scaled by 32767); interleaved when
            ``channels > 1``.
        sample_rate_hz: the sample rate to record in the header.
        channels: interleaved channel count.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: the sample count is not a multiple of ``channels``.
    """
    array = np.asarray(samples)
    if array.size % channels:
        raise ValueError(f"{array.size} samples is not a multiple of {channels} channels")
    if array.dtype == np.int16:
        pcm = array.astype("<i2")
    else:
        pcm = np.round(np.clip(array.astype(np.float64), -1.0, 1.0) * 32767.0).astype("<i2")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(out), "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(2)
        writer.setframerate(sample_rate_hz)
        writer.writeframes(pcm.reshape(-1).tobytes())
    return out


def read_mono_float32(path: Path | str, *, sample_rate_hz: int = SAMPLE_RATE_HZ) -> npt.NDArray[np.float32]:
    """Read a mono 16-bit WAV as float32 in [-1, 1], the form engines take.

    Args:
        path: the file.
        sample_rate_hz: the rate the file must have.

    Returns:
        1-D float32 samples (int16 divided by 32768).

    Raises:
        SpeechToolError: the file is not mono 16-bit PCM at ``sample_rate_hz``.
    """
    samples, rate_hz, channels = read_wav(path)
    if channels != 1 or rate_hz != sample_rate_hz:
        raise SpeechToolError(f"{path}: {channels} channel(s) at {rate_hz} Hz; need mono {sample_rate_hz} Hz")
    return (samples.astype(np.float32) / 32768.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Synthetic speech


def _run_tool(argv: Sequence[str], *, input_text: str | None = None, timeout_s: float = 120.0) -> None:
    try:
        completed = subprocess.run(
            list(argv), input=input_text, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except FileNotFoundError as exc:
        raise SpeechToolError(
            f"{argv[0]} is not installed: install it (Debian/Ubuntu: apt-get install espeak-ng sox)"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise SpeechToolError(f"{argv[0]} did not finish within {timeout_s:.0f} s") from exc
    if completed.returncode != 0:
        raise SpeechToolError(f"{' '.join(argv)} failed ({completed.returncode}): {completed.stderr.strip()}")


def espeak_wav(text: str, path: Path | None = None, *, words_per_minute: int = 100) -> Path:
    """Synthesise English speech with espeak-ng, as 16 kHz mono 16-bit WAV.

    The recipe is ``espeak-ng -v en-us -s WPM -g 5`` then ``sox -r 16000 -c 1 -b 16``. At 100 words per
    minute faster-whisper tiny.en transcribes a plain sentence word for word; at espeak's default
    175 it does not.

    Args:
        text: what to say (passed on stdin, so it may start with ``-``).
        path: where to write. None: a file in :func:`cache_dir` named after the text and speed, reused
            when it already exists.
        words_per_minute: espeak's speed.

    Returns:
        The WAV file.

    Raises:
        SpeechToolError: espeak-ng or sox is missing or failed.
        ValueError: ``text`` is blank or the speed is outside espeak's 80..450.
    """
    if not text.strip():
        raise ValueError("text must not be blank")
    if not 80 <= words_per_minute <= 450:
        raise ValueError(f"words_per_minute must be 80..450, not {words_per_minute}")
    if path is None:
        key = hashlib.sha256(f"{words_per_minute}\n{text}".encode()).hexdigest()[:20]
        path = cache_dir() / "espeak" / f"{key}.wav"
        if path.exists():
            return path
    raw = _temp_path_next_to(path, ".raw.wav")
    converted = _temp_path_next_to(path, ".wav")
    try:
        _run_tool(
            ["espeak-ng", "-v", "en-us", "-s", str(words_per_minute), "-g", "5", "--stdin", "-w", str(raw)],
            input_text=text,
        )
        _run_tool(["sox", str(raw), "-r", str(SAMPLE_RATE_HZ), "-c", "1", "-b", "16", str(converted)])
        return _replace_atomically(converted, path)
    finally:
        raw.unlink(missing_ok=True)
        converted.unlink(missing_ok=True)


@dataclass(frozen=True)
class SentenceSpan:
    """Where one sentence's speech lies in a :func:`speech_with_pauses` file.

    Attributes:
        text: the sentence as given.
        start_s: first non-silent sample, seconds from the start of the file.
        end_s: just after the last non-silent sample, seconds from the start of the file.
    """

    text: str
    start_s: float
    end_s: float


def _trim_silence(samples: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > _SILENCE_THRESHOLD)
    if loud.size == 0:
        return samples[:0]
    return samples[int(loud[0]) : int(loud[-1]) + 1]


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def speech_with_pauses(
    sentences: Sequence[str], pause_s: float, path: Path | None = None, *, words_per_minute: int = 100
) -> Path:
    """Several espeak sentences with ``pause_s`` of digital silence before, between and after them.

    Each sentence's own leading and trailing near-silence is trimmed first, so the pauses are exactly
    ``pause_s`` long and :func:`sentence_spans` gives the speech extents to the sample. The spans are
    written next to the WAV as ``<name>.wav.json``.

    Args:
        sentences: one or more sentences, in order.
        pause_s: silence before the first, between each pair, and after the last sentence.
        path: where to write. None: a file in :func:`cache_dir`, reused when it already exists.
        words_per_minute: espeak's speed.

    Returns:
        The WAV file (16 kHz mono 16-bit).

    Raises:
        ValueError: no sentences, or a negative pause.
        SpeechToolError: espeak-ng or sox is missing or failed.
    """
    if not sentences:
        raise ValueError("sentences must not be empty")
    if pause_s < 0:
        raise ValueError(f"pause_s must be >= 0, not {pause_s}")
    if path is None:
        key_text = json.dumps([list(sentences), pause_s, words_per_minute])
        path = cache_dir() / "pauses" / f"{hashlib.sha256(key_text.encode()).hexdigest()[:20]}.wav"
        if path.exists() and _sidecar(path).exists():
            return path
    pause = np.zeros(round(pause_s * SAMPLE_RATE_HZ), dtype=np.int16)
    pieces: list[npt.NDArray[np.int16]] = [pause]
    spans: list[SentenceSpan] = []
    position = len(pause)
    for sentence in sentences:
        samples, _, _ = read_wav(espeak_wav(sentence, words_per_minute=words_per_minute))
        speech = _trim_silence(samples)
        spans.append(
            SentenceSpan(sentence, position / SAMPLE_RATE_HZ, (position + len(speech)) / SAMPLE_RATE_HZ)
        )
        pieces += [speech, pause]
        position += len(speech) + len(pause)
    tmp = _temp_path_next_to(path, ".wav")
    write_wav(tmp, np.concatenate(pieces))
    sidecar_tmp = _temp_path_next_to(path, ".json")
    sidecar_tmp.write_text(
        json.dumps(
            {
                "sample_rate_hz": SAMPLE_RATE_HZ,
                "pause_s": pause_s,
                "spans": [{"text": s.text, "start_s": s.start_s, "end_s": s.end_s} for s in spans],
            },
            indent=1,
        )
    )
    _replace_atomically(sidecar_tmp, _sidecar(path))
    return _replace_atomically(tmp, path)


def sentence_spans(path: Path) -> list[SentenceSpan]:
    """The sentence times of a file made by :func:`speech_with_pauses`.

    Args:
        path: the WAV file (its ``.wav.json`` sidecar is read).

    Returns:
        One span per sentence, in order.

    Raises:
        FileNotFoundError: the file has no sidecar.
    """
    data = json.loads(_sidecar(path).read_text())
    return [SentenceSpan(str(s["text"]), float(s["start_s"]), float(s["end_s"])) for s in data["spans"]]


# --------------------------------------------------------------------------------------------------
# Recorded speech


@dataclass(frozen=True)
class RecordedSpeech:
    """A real recording inside a PyPI sdist.

    Attributes:
        name: short name used by :func:`recorded_speech`.
        package: the sdist's project name on PyPI.
        version: the exact release.
        member: the file's path inside the sdist.
        sha256: the SHA-256 of the cached 16-bit WAV (after conversion, for a float source), recorded
            when it was first fetched.
        duration_s: its length.
        description: what it is.
        source_format: ``pcm16``: the member is a 16-bit PCM WAV, cached as it is; ``float32``: it is a
            32-bit float WAV (which the stdlib ``wave`` module cannot read), converted to 16-bit PCM
            when it is extracted (clipped to [-1, 1], scaled by 32767, rounded).
        transcript_member: the path inside the sdist of its transcript (NIST STM), if it has one.
        transcript_sha256: that transcript's SHA-256.
        turns_member: the path inside the sdist of its speaker turns (RTTM), if it has them.
        turns_sha256: that file's SHA-256.
        turns_uri: the recording's id in that file (an RTTM file may describe several recordings).
    """

    name: str
    package: str
    version: str
    member: str
    sha256: str
    duration_s: float
    description: str
    source_format: Literal["pcm16", "float32"] = "pcm16"
    transcript_member: str | None = None
    transcript_sha256: str | None = None
    turns_member: str | None = None
    turns_sha256: str | None = None
    turns_uri: str | None = None


@dataclass(frozen=True)
class SpeakerTurn:
    """A stretch of a recording in which one speaker talks, as annotated (RTTM ``SPEAKER`` lines).

    Turns of different speakers may overlap. Annotated boundaries are looser than the audio: use them to
    tell speech from other sounds, and the level (``stream_server.testing.truth``) for where it ends.

    Attributes:
        speaker: the annotation's speaker label.
        start_s: start, seconds from the start of the recording.
        end_s: end, seconds from the start of the recording.
    """

    speaker: str
    start_s: float
    end_s: float


@dataclass(frozen=True)
class TranscriptTurn:
    """One line of a recording's transcript.

    Attributes:
        speaker: who speaks (as the transcript names them).
        start_s: when the line starts, seconds from the start of the recording.
        end_s: when it ends.
        text: what is said, with the transcript's own casing and punctuation.
    """

    speaker: str
    start_s: float
    end_s: float
    text: str


_SDIST_SHA256: dict[tuple[str, str], str] = {
    ("silero-vad", "6.2.3"): "d7a23b09202be4953915cb9173089bb307eed0418a9bd4794d9ec5af07fa1996",
    ("pyannote.audio", "4.0.7"): "3a903dfb5ca711d134cc2522561c9158b186836f5d62e8a57c46c6648e8a8229",
}
"""SHA-256 of every sdist recordings are taken from: the download must be the one recorded here."""

_PYANNOTE = ("pyannote.audio", "4.0.7")
_PYANNOTE_ROOT = "pyannote_audio-4.0.7"

_MEETING_RTTM: dict[str, tuple[str, str]] = {
    # clip name prefix: (speaker-turn file in the sdist's tests/data, its SHA-256)
    "dev": ("debug.development.rttm", "9667a672072f7d0ad5b647cfaed987d8c52209a4e1ddc252fed06d0b955e7aeb"),
    "tst": ("debug.test.rttm", "eae147d74d3f08002a5028183538eb35e6a7c7a77fe7d87c51eec95852d33161"),
    "trn": ("debug.train.rttm", "972ee04414fc7644f26eabe1909d6a0f6a3fa57ab840719ec0112d26f3a957d5"),
}

_MEETING_SHA256: dict[str, tuple[str, str]] = {
    # name: (clip file in the sdist's tests/data, SHA-256 of the 16-bit conversion)
    "dev00": ("dev00.wav", "116479901d357b285b1e7837c3fdeff9dc888082f902ddf53ea673cacf534a94"),
    "dev01": ("dev01.wav", "1fe2792d35d4b2c86f7cf832f2b72f93acfa78018875b554f7f543f2abb0f66e"),
    "tst00": ("tst00.wav", "93bb31f4da3447a493505d9e17b8f9de9b528c6e35ffc73bb01ea5b64979a1bc"),
    "tst01": ("tst01.wav", "3386aba0f77192f7ec710ad8612bc1026f5d32436cca48c98b797aea9752178a"),
    "trn00": (
        "tr\u00f100.wav",
        "442f18572bbc9d95f715234664d6447aeabc8b7def3f45a8e28b2ab59120877e",
    ),  # sic: the sdist spells this one with an n-tilde
    "trn01": ("trn01.wav", "95955cf706ac01b1cd5680f11933427a2bf57359205c6e53ccd963957be2b7cb"),
    "trn02": ("trn02.wav", "3ebd83f53ef0a76f67dccf9485d31860e8a6c57f8a1af89af136441672a217d9"),
    "trn03": ("trn03.wav", "9683349ac016d2332c42b43dbac11a44fa01633f0bd85eeebba873cfa6f9da36"),
    "trn04": ("trn04.wav", "27525a26f370867d48dfa65a3bb23612ad596f9bb2fce6d692da8bf0640f017f"),
    "trn05": ("trn05.wav", "7f333103670b855418c335214004e7fb30bf7891dfcc39d1cc3940a1b17266d2"),
    "trn06": ("trn06.wav", "a69694449bee187671ed38ccb3e15928364594c2760e642862c2704dacffe783"),
    "trn07": ("trn07.wav", "b8db6a0670ceed4cdc10bc9e8afbd294cf4de46dd67fbd2f11739889f92f5b2c"),
    "trn08": ("trn08.wav", "339a922e899b3624ea70331a7ad6e05a0777d3cea6dd2391aa348f9b5b9b2fd8"),
    "trn09": ("trn09.wav", "4547ec90d4da0cd991d9ce15e68f4936c3f6d439431206178a4f16283c8aa860"),
}

MEETING_CLIPS: tuple[str, ...] = tuple(f"meeting-{clip}" for clip in _MEETING_SHA256)
"""The names of the AMI meeting clips in :data:`RECORDED_SPEECH`, 30 s each. They are separate
recordings (different meetings and microphone levels, cut mid-sentence), so they are kept apart rather
than joined: ground truth taken from levels (``stream_server.testing.truth``) needs each on its own."""

RECORDED_SPEECH: dict[str, RecordedSpeech] = {
    "lecture": RecordedSpeech(
        name="lecture",
        package="silero-vad",
        version="6.2.3",
        member="silero_vad-6.2.3/tests/data/test.wav",
        sha256="89f17d9c94c4b31eb320f424628bcbc920abaddbee6e2760fd868bfb1d9a2e47",
        duration_s=60.0,
        description="60 s of a man lecturing in English, 16 kHz mono (silero-vad tests, MIT)",
    ),
    "news": RecordedSpeech(
        name="news",
        package="silero-vad",
        version="6.2.3",
        member="silero_vad-6.2.3/examples/c++/aepyx.wav",
        sha256="a622cb1cdd8a52db84b0d4bb524fa9a93f9ed387de40530f87c3a57d7493fd49",
        duration_s=2706432 / SAMPLE_RATE_HZ,
        description="169 s English news clip, 16 kHz mono (silero-vad C++ example, MIT)",
    ),
    "dialogue": RecordedSpeech(
        name="dialogue",
        package=_PYANNOTE[0],
        version=_PYANNOTE[1],
        member=f"{_PYANNOTE_ROOT}/src/pyannote/audio/sample/sample.wav",
        sha256="c319b4abca767b124e41432d364fd7df006cb26bb79d09326c487d606a134e6e",
        duration_s=30.0,
        description="30 s telephone call between two American English speakers, 16 kHz mono, with a "
        "timed transcript (pyannote.audio sample, MIT)",
        transcript_member=f"{_PYANNOTE_ROOT}/src/pyannote/audio/sample/sample.stm",
        transcript_sha256="f861f3004927e1c4429199f9695bfd252def75d7d5e4bdf735d3d85fd4a667f7",
        turns_member=f"{_PYANNOTE_ROOT}/src/pyannote/audio/sample/sample.rttm",
        turns_sha256="d78fe62c69d8e6dcbb42c26adfce83faccb374c5a1e6d987fe37f85f1c173c87",
        turns_uri="sample",
    ),
    **{
        f"meeting-{clip}": RecordedSpeech(
            name=f"meeting-{clip}",
            package=_PYANNOTE[0],
            version=_PYANNOTE[1],
            member=f"{_PYANNOTE_ROOT}/tests/data/{file_name}",
            sha256=digest,
            duration_s=480001 / SAMPLE_RATE_HZ,
            description=f"30 s of an English AMI meeting ({clip}), several talkers, 16 kHz mono, "
            "converted from 32-bit float (pyannote.audio tests, MIT)",
            source_format="float32",
            turns_member=f"{_PYANNOTE_ROOT}/tests/data/{_MEETING_RTTM[clip[:3]][0]}",
            turns_sha256=_MEETING_RTTM[clip[:3]][1],
            turns_uri=clip,
        )
        for clip, (file_name, digest) in _MEETING_SHA256.items()
    },
}
"""Every recording :func:`recorded_speech` knows, by name."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _recorded_path(item: RecordedSpeech) -> Path:
    return cache_dir() / "recorded" / f"{item.package}-{item.version}-{item.name}.wav"


def _sidecars(item: RecordedSpeech) -> list[tuple[str, str | None, Path]]:
    """The annotation files kept next to a recording: (member, SHA-256, cached path)."""
    wav = _recorded_path(item)
    out: list[tuple[str, str | None, Path]] = []
    if item.transcript_member is not None:
        out.append((item.transcript_member, item.transcript_sha256, wav.with_suffix(".stm")))
    if item.turns_member is not None:
        out.append((item.turns_member, item.turns_sha256, wav.with_suffix(".rttm")))
    return out


def _is_cached(item: RecordedSpeech) -> bool:
    return _recorded_path(item).exists() and all(path.exists() for _, _, path in _sidecars(item))


def _download_sdist(package: str, version: str, into: Path) -> Path:
    argv = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        "--quiet",
        "-d",
        str(into),
        f"{package}=={version}",
    ]
    try:
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise SpeechToolError(
            f"pip download {package}=={version} took over {_PIP_TIMEOUT_S:.0f} s: is PyPI reachable? "
            f"(pip honours PIP_INDEX_URL and proxy settings)"
        ) from exc
    if completed.returncode != 0:
        tail = "\n".join(completed.stderr.strip().splitlines()[-5:])
        raise SpeechToolError(
            f"could not download the {package}=={version} sdist from PyPI, which holds the recorded test "
            f"speech. Check network access to PyPI (pip honours PIP_INDEX_URL and proxy settings), or run "
            f"`python -m stream_server.testing.speech fetch` where PyPI is reachable and copy {cache_dir()} "
            f"(or point {CACHE_ENV} at a copy). pip said:\n{tail}"
        )
    # sdist file names use the normalised project name (PEP 625), older ones the name as given.
    normalized = re.sub(r"[-_.]+", "_", package).lower()
    found = sorted(into.glob(f"{normalized}-{version}.tar.gz")) + sorted(
        into.glob(f"{package}-{version}.tar.gz")
    )
    if not found:
        raise SpeechToolError(f"pip download succeeded but left no sdist for {package}=={version} in {into}")
    return found[0]


def _float_wav_to_int16(data: bytes, member: str) -> npt.NDArray[np.int16]:
    """The samples of a mono 16 kHz 32-bit float WAV, as 16-bit PCM (clipped, scaled by 32767, rounded).

    Raises:
        SpeechToolError: the bytes are not such a WAV file.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise SpeechToolError(f"{member}: not a RIFF/WAVE file")
    fmt: bytes | None = None
    samples: bytes | None = None
    offset = 12
    while offset + 8 <= len(data):
        chunk_id = data[offset : offset + 4]
        size = int.from_bytes(data[offset + 4 : offset + 8], "little")
        body = data[offset + 8 : offset + 8 + size]
        if chunk_id == b"fmt ":
            fmt = body
        elif chunk_id == b"data":
            samples = body
        offset += 8 + size + (size & 1)  # chunks are padded to an even length
    if fmt is None or samples is None or len(fmt) < 16:
        raise SpeechToolError(f"{member}: WAV file without a fmt or data chunk")
    format_tag = int.from_bytes(fmt[0:2], "little")
    channels = int.from_bytes(fmt[2:4], "little")
    rate_hz = int.from_bytes(fmt[4:8], "little")
    bits = int.from_bytes(fmt[14:16], "little")
    if format_tag == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the subformat says what it is
        format_tag = int.from_bytes(fmt[24:26], "little")
    if (format_tag, bits, channels, rate_hz) != (3, 32, 1, SAMPLE_RATE_HZ):
        raise SpeechToolError(
            f"{member}: format {format_tag}, {bits}-bit, {channels} channel(s), {rate_hz} Hz; expected "
            f"32-bit float (format 3) mono {SAMPLE_RATE_HZ} Hz"
        )
    floats = np.frombuffer(samples[: len(samples) - len(samples) % 4], dtype="<f4").astype(np.float64)
    pcm: npt.NDArray[np.int16] = np.round(np.clip(floats, -1.0, 1.0) * 32767.0).astype(np.int16)
    return pcm


def _check_recording(path: Path, item: RecordedSpeech) -> None:
    actual = _sha256(path)
    if actual != item.sha256:
        raise SpeechToolError(f"{item.member} has SHA-256 {actual}, expected {item.sha256}")
    samples, rate_hz, channels = read_wav(path)
    if rate_hz != SAMPLE_RATE_HZ or channels != 1 or abs(len(samples) / rate_hz - item.duration_s) > 0.01:
        raise SpeechToolError(
            f"{item.member}: {channels} channel(s), {rate_hz} Hz, {len(samples) / rate_hz:.2f} s; expected "
            f"mono {SAMPLE_RATE_HZ} Hz, {item.duration_s:.2f} s"
        )


def _extract(archive: tarfile.TarFile, sdist: Path, member_name: str, target: Path) -> None:
    try:
        member = archive.getmember(member_name)
    except KeyError as exc:
        raise SpeechToolError(f"{sdist.name} has no {member_name}") from exc
    source = archive.extractfile(member)
    if source is None:
        raise SpeechToolError(f"{member_name} in {sdist.name} is not a regular file")
    with source, target.open("wb") as out:
        shutil.copyfileobj(source, out)


def _fetch(items: Sequence[RecordedSpeech]) -> None:
    """Download each needed sdist once and extract every listed recording from it into the cache."""
    by_sdist: dict[tuple[str, str], list[RecordedSpeech]] = {}
    for item in items:
        by_sdist.setdefault((item.package, item.version), []).append(item)
    for (package, version), wanted in by_sdist.items():
        with tempfile.TemporaryDirectory(prefix="speech-fetch-", dir=cache_dir()) as tmp_name:
            tmp = Path(tmp_name)
            sdist = _download_sdist(package, version, tmp)
            expected = _SDIST_SHA256.get((package, version))
            if expected is not None and _sha256(sdist) != expected:
                raise SpeechToolError(f"{sdist.name} does not have the recorded SHA-256 {expected}")
            with tarfile.open(sdist, "r:gz") as archive:
                for item in wanted:
                    _extract_recording(archive, sdist, item, tmp)


def _extract_recording(archive: tarfile.TarFile, sdist: Path, item: RecordedSpeech, tmp: Path) -> None:
    """Extract one recording (converted to 16-bit if need be) and its annotations, check them, and move
    them into the cache (annotations first, the WAV last)."""
    source = tmp / f"{item.name}.source"
    _extract(archive, sdist, item.member, source)
    extracted = tmp / f"{item.name}.wav"
    if item.source_format == "float32":
        write_wav(extracted, _float_wav_to_int16(source.read_bytes(), item.member))
    else:
        source.replace(extracted)
    _check_recording(extracted, item)
    for member, expected, cached in _sidecars(item):
        annotation = tmp / f"{item.name}{cached.suffix}"
        _extract(archive, sdist, member, annotation)
        actual = _sha256(annotation)
        if actual != expected:
            raise SpeechToolError(f"{member} has SHA-256 {actual}, expected {expected}")
        _replace_atomically(annotation, cached)
    _replace_atomically(extracted, _recorded_path(item))


def recorded_speech(name: str = "lecture") -> Path:
    """Real recorded English speech, fetched from PyPI on first use and cached.

    From the silero-vad 6.2.3 sdist (MIT): ``"lecture"``, 60 s of a lecture, and ``"news"``, 169 s of a
    news clip. From the pyannote.audio 4.0.7 sdist (MIT): ``"dialogue"``, a 30 s telephone call between
    two speakers (:func:`recorded_transcript` gives what they say), and the 30 s AMI meeting clips named
    in :data:`MEETING_CLIPS`. A first call downloads the sdist (29 or 14 MB) with ``pip download`` and
    keeps every recording it holds, so later calls, for any of its names, are file look-ups.

    Args:
        name: a key of :data:`RECORDED_SPEECH`.

    Returns:
        A 16 kHz mono 16-bit WAV file whose SHA-256 was checked.

    Raises:
        KeyError: unknown name.
        SpeechToolError: PyPI could not be reached, or the file is not the one recorded here.
    """
    if name not in RECORDED_SPEECH:
        raise KeyError(f"unknown recording {name!r}; known: {', '.join(sorted(RECORDED_SPEECH))}")
    item = RECORDED_SPEECH[name]
    if not _is_cached(item):
        siblings = [
            i for i in RECORDED_SPEECH.values() if (i.package, i.version) == (item.package, item.version)
        ]
        _fetch([i for i in siblings if not _is_cached(i)])
    return _recorded_path(item)


def recorded_transcript(name: str = "dialogue") -> list[TranscriptTurn]:
    """The timed transcript of a recording that has one (fetched with it).

    Args:
        name: a key of :data:`RECORDED_SPEECH` whose ``transcript_member`` is set (``"dialogue"``).

    Returns:
        Its lines in the order of the transcript (by start time).

    Raises:
        KeyError: unknown name, or the recording has no transcript.
        SpeechToolError: PyPI could not be reached, or a file is not the one recorded here.
    """
    recorded_speech(name)
    item = RECORDED_SPEECH[name]
    if item.transcript_member is None:
        with_one = sorted(n for n, i in RECORDED_SPEECH.items() if i.transcript_member is not None)
        raise KeyError(f"recording {name!r} has no transcript; these do: {', '.join(with_one)}")
    turns: list[TranscriptTurn] = []
    for line in _recorded_path(item).with_suffix(".stm").read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith(";;"):
            continue  # STM comment lines start with ";;"
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            raise SpeechToolError(f"{item.transcript_member}: not an STM line: {line!r}")
        text = fields[5] if len(fields) == 6 else ""
        turns.append(TranscriptTurn(fields[2], float(fields[3]), float(fields[4]), text.strip()))
    return turns


def recorded_speaker_turns(name: str) -> list[SpeakerTurn]:
    """The annotated speaker turns of a recording that has them (fetched with it).

    Args:
        name: a key of :data:`RECORDED_SPEECH` whose ``turns_member`` is set (``"dialogue"`` and the
            :data:`MEETING_CLIPS`).

    Returns:
        Its turns, by start time (they may overlap).

    Raises:
        KeyError: unknown name, or the recording has no speaker turns.
        SpeechToolError: PyPI could not be reached, or a file is not the one recorded here.
    """
    recorded_speech(name)
    item = RECORDED_SPEECH[name]
    if item.turns_member is None:
        with_turns = sorted(n for n, i in RECORDED_SPEECH.items() if i.turns_member is not None)
        raise KeyError(f"recording {name!r} has no speaker turns; these do: {', '.join(with_turns)}")
    turns: list[SpeakerTurn] = []
    for line in _recorded_path(item).with_suffix(".rttm").read_text(encoding="utf-8").splitlines():
        fields = line.split()
        # SPEAKER <uri> <channel> <onset> <duration> <NA> <NA> <speaker> <NA> <NA>
        if len(fields) < 8 or fields[0] != "SPEAKER" or fields[1] != item.turns_uri:
            continue
        start_s, duration_s = float(fields[3]), float(fields[4])
        turns.append(SpeakerTurn(fields[7], start_s, round(start_s + duration_s, 6)))
    return sorted(turns, key=lambda turn: (turn.start_s, turn.end_s))


def recorded_text(name: str = "dialogue") -> str:
    """What is said in a recording with a transcript, as one string (the reference for WER).

    Args:
        name: as for :func:`recorded_transcript`.

    Returns:
        The transcript's lines joined by spaces, in order.

    Raises:
        KeyError: unknown name, or the recording has no transcript.
        SpeechToolError: PyPI could not be reached, or a file is not the one recorded here.
    """
    return " ".join(turn.text for turn in recorded_transcript(name) if turn.text)


def fetch_all() -> list[Path]:
    """Fetch every recording in :data:`RECORDED_SPEECH` that is not cached yet.

    Returns:
        The cached files, in the order of :data:`RECORDED_SPEECH`.

    Raises:
        SpeechToolError: PyPI could not be reached, or a file is not the one recorded here.
    """
    missing = [item for item in RECORDED_SPEECH.values() if not _is_cached(item)]
    if missing:
        _fetch(missing)
    return [_recorded_path(item) for item in RECORDED_SPEECH.values()]


# --------------------------------------------------------------------------------------------------
# Word error rate

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**9, "billion"), (10**6, "million"), (1000, "thousand"), (100, "hundred"))


def _number_words(value: int) -> list[str]:
    """English words for a non-negative integer below 10**12, the way it is read aloud (no "and")."""
    if value < 20:
        return [_ONES[value]]
    if value < 100:
        tens, ones = divmod(value, 10)
        return [_TENS[tens]] + ([_ONES[ones]] if ones else [])
    for scale, word in _SCALES:
        if value >= scale:
            head, rest = divmod(value, scale)
            return _number_words(head) + [word] + (_number_words(rest) if rest else [])
    raise AssertionError("unreachable")  # pragma: no cover


def _spell_number(match: re.Match[str]) -> str:
    whole, _, fraction = match.group(0).replace(",", "").partition(".")
    if len(whole) > 12:
        return " " + " ".join(_ONES[int(d)] for d in whole) + " "
    words = _number_words(int(whole))
    if fraction:
        words += ["point"] + [_ONES[int(d)] for d in fraction]
    return " " + " ".join(words) + " "


_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")


def normalize_text(text: str) -> list[str]:
    """Split a transcript into normalised words for :func:`word_error_rate`.

    Rules, in order: Unicode NFKC; lower case; ``%`` becomes "percent" and ``&`` "and"; numbers written
    in digits become words the way they are read ("21" → "twenty one", "1,500" → "one thousand five
    hundred", "3.5" → "three point five"); hyphens and slashes split words ("twenty-one" → "twenty
    one"); apostrophes are dropped ("don't" → "dont"); any other character that is not a letter or digit
    is removed. Spelling variants ("okay"/"OK", "Mr."/"mister") are not unified.

    Args:
        text: any transcript.

    Returns:
        The words.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = text.replace("%", " percent ").replace("&", " and ")
    text = _NUMBER.sub(_spell_number, text)
    text = re.sub(r"[-‐‑‒–—/]", " ", text)
    text = re.sub(r"['’‘`]", "", text)
    text = re.sub(r"[^\w\s]|_", " ", text)
    return text.split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word error rate: (substitutions + deletions + insertions) / reference words, after normalising.

    Both texts go through :func:`normalize_text` first, so case, punctuation and digits-versus-words
    do not count as errors.

    Args:
        reference: the text taken as right.
        hypothesis: the text to score.

    Returns:
        0.0 for a perfect match; may exceed 1.0 when the hypothesis has many extra words. With an empty
        reference: 0.0 when the hypothesis is empty too, else 1.0.
    """
    ref = normalize_text(reference)
    hyp = normalize_text(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, start=1):
        current = [i] + [0] * len(hyp)
        for j, hyp_word in enumerate(hyp, start=1):
            current[j] = min(
                previous[j] + 1,  # deletion
                current[j - 1] + 1,  # insertion
                previous[j - 1] + (ref_word != hyp_word),  # substitution or match
            )
        previous = current
    return previous[-1] / len(ref)


# --------------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stream_server.testing.speech fetch``: fetch all recorded speech into the cache.

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.

    Returns:
        The exit status: 0 on success, 1 when fetching failed.
    """
    parser = argparse.ArgumentParser(prog="python -m stream_server.testing.speech", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch", help="download every recording into the cache (for CI set-up)")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        try:
            paths = fetch_all()
        except SpeechToolError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for path in paths:
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
