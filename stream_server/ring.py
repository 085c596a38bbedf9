"""A fixed-capacity ring of 16-bit PCM addressed by absolute sample index.

The session writes every sample it receives and reads segments back by their absolute positions.
The array is allocated once: a session holds the same memory after eight hours as after one second.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Int16Array = npt.NDArray[np.int16]


class SampleRing:
    """Keeps the most recent ``capacity_samples`` samples.

    Args:
        capacity_samples: how many of the newest samples stay readable.
    """

    def __init__(self, capacity_samples: int) -> None:
        if capacity_samples <= 0:
            raise ValueError("capacity_samples must be positive")
        self.capacity_samples = capacity_samples
        self._data = np.zeros(capacity_samples, dtype=np.int16)
        self.end_index = 0
        """Absolute index one past the newest sample (= samples written so far)."""

    @property
    def start_index(self) -> int:
        """Absolute index of the oldest sample still held."""
        return max(0, self.end_index - self.capacity_samples)

    def write(self, samples: Int16Array) -> None:
        """Append samples, overwriting the oldest ones beyond capacity."""
        n = len(samples)
        if n == 0:
            return
        if n >= self.capacity_samples:
            samples = samples[-self.capacity_samples :]
            self.end_index += n - self.capacity_samples
            n = self.capacity_samples
        pos = self.end_index % self.capacity_samples
        first = min(n, self.capacity_samples - pos)
        self._data[pos : pos + first] = samples[:first]
        if first < n:
            self._data[: n - first] = samples[first:]
        self.end_index += n

    def read(self, start: int, end: int) -> Int16Array:
        """Copy out samples ``[start, end)``.

        Raises:
            IndexError: when part of the range was overwritten or not yet written.
        """
        if not self.start_index <= start <= end <= self.end_index:
            raise IndexError(
                f"samples [{start}, {end}) not held; ring holds [{self.start_index}, {self.end_index})"
            )
        n = end - start
        out = np.empty(n, dtype=np.int16)
        if n == 0:
            return out
        pos = start % self.capacity_samples
        first = min(n, self.capacity_samples - pos)
        out[:first] = self._data[pos : pos + first]
        if first < n:
            out[first:] = self._data[: n - first]
        return out
