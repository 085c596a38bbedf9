"""Client audio to 16 kHz mono float32: decoding, partial samples, streaming resampling. No I/O.

Audio arrives as a byte stream cut into WebSocket frames of any size (README, "Protocol: audio"):
a frame may end in the middle of a sample, and the next frame completes it. :class:`AudioDecoder`
keeps the dangling bytes (at most one PCM frame minus one byte) and a streaming resampler's state;
nothing here grows with the length of the stream.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import soxr

from .engines.base import SAMPLE_RATE_HZ
from .protocol import Encoding

FloatArray = npt.NDArray[np.float32]


def _mulaw_table() -> FloatArray:
    """ITU-T G.711 mu-law byte -> linear, scaled to [-1, 1]."""
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    linear = np.where(sign != 0, -magnitude, magnitude)
    return (linear / 32768.0).astype(np.float32)


def _alaw_table() -> FloatArray:
    """ITU-T G.711 A-law byte -> linear, scaled to [-1, 1]."""
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = np.where(
        exponent == 0,
        (mantissa << 4) + 8,
        ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0),
    )
    linear = np.where(sign != 0, magnitude, -magnitude)
    return (linear / 32768.0).astype(np.float32)


MULAW_TO_FLOAT = _mulaw_table()
ALAW_TO_FLOAT = _alaw_table()


class AudioDecoder:
    """Turns a client's byte stream into 16 kHz float32 samples: mono, or one column per channel.

    Args:
        encoding: ``linear16``, ``mulaw`` or ``alaw``.
        sample_rate_hz: the client's rate; anything but 16000 is resampled (soxr, high quality).
        channels: interleaved channels; without ``demultiplex`` more than one is averaged to mono.
        demultiplex: keep the channels apart: :meth:`decode` and :meth:`flush` return an array of shape
            ``(samples, channels)`` (each channel resampled on its own) instead of a mono one.
    """

    def __init__(
        self, encoding: Encoding, sample_rate_hz: int, channels: int = 1, *, demultiplex: bool = False
    ) -> None:
        self.encoding = encoding
        self.sample_rate_hz = sample_rate_hz
        self.channels = channels
        self.demultiplex = demultiplex
        self._out_channels = channels if demultiplex else 1
        self.bytes_per_sample = 2 if encoding == "linear16" else 1
        self.bytes_per_frame = self.bytes_per_sample * channels
        self._pending = b""
        self._resampler: soxr.ResampleStream | None = None
        if sample_rate_hz != SAMPLE_RATE_HZ:
            self._resampler = soxr.ResampleStream(
                sample_rate_hz, SAMPLE_RATE_HZ, self._out_channels, dtype="float32", quality="HQ"
            )
        self.input_frames = 0
        """PCM frames (one sample per channel) received so far, at the client's rate."""

    @property
    def input_duration_s(self) -> float:
        return self.input_frames / self.sample_rate_hz

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete sample waiting for the next frame."""
        return len(self._pending)

    def decode(self, data: bytes) -> FloatArray:
        """Decode one frame's bytes.

        Args:
            data: any number of bytes; an incomplete trailing sample is kept for the next call.

        Returns:
            Float32 samples at 16 kHz (possibly none: the resampler holds a few ms back): mono, or of
            shape ``(samples, channels)`` when demultiplexing.
        """
        if self._pending:
            data = self._pending + data
        usable = len(data) - len(data) % self.bytes_per_frame
        self._pending = data[usable:]
        if usable == 0:
            return self._empty()
        raw = data[:usable] if usable != len(data) else data
        if self.encoding == "linear16":
            samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) * (1.0 / 32768.0)
        elif self.encoding == "mulaw":
            samples = MULAW_TO_FLOAT[np.frombuffer(raw, dtype=np.uint8)]
        else:
            samples = ALAW_TO_FLOAT[np.frombuffer(raw, dtype=np.uint8)]
        if self.demultiplex:
            samples = samples.reshape(-1, self.channels)
        elif self.channels > 1:
            samples = samples.reshape(-1, self.channels).mean(axis=1, dtype=np.float32)
        self.input_frames += len(samples)
        if self._resampler is not None:
            return np.asarray(self._resampler.resample_chunk(samples), dtype=np.float32)
        return samples

    def flush(self) -> FloatArray:
        """End of stream: return what the resampler still holds (the dangling partial sample is dropped;
        ``pending_bytes`` says how many bytes that was so the caller can report it)."""
        if self._resampler is None:
            return self._empty()
        tail = np.asarray(self._resampler.resample_chunk(self._empty(), last=True), dtype=np.float32)
        self._resampler = None
        return tail

    def _empty(self) -> FloatArray:
        if self.demultiplex:
            return np.zeros((0, self.channels), dtype=np.float32)
        return np.zeros(0, dtype=np.float32)


def float_to_int16(samples: FloatArray) -> npt.NDArray[np.int16]:
    """Clip to [-1, 1) and convert to 16-bit PCM."""
    return np.clip(np.round(samples * 32768.0), -32768, 32767).astype(np.int16)
