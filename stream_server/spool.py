"""What a fast client sends ahead of the model, kept in order on disk (README, "Back-pressure").

A client that streams faster than the model transcribes (an uploader pushing a recording) used to be
slowed by not reading its socket. That bounded memory but killed standard clients: their keepalive ping
sat unread behind megabytes of queued audio, and websockets closed the stream after 20 s (1011
"keepalive ping timeout"). Now the transport reads every stream all the time, so pings are answered
at once, and whatever its session cannot take yet (``max_pending_finals`` finals already wait for the
model) goes here instead:

- one **unlinked temporary file** per stream (``tempfile.TemporaryFile``): never in memory beyond the
  kernel's page cache, never visible by name, gone when the stream ends or the process dies;
- records ``kind (1 byte) | length (4 bytes, big-endian) | payload``, written and read with
  ``pwrite``/``pread`` at two offsets, so the order of audio and control messages (``Finalize``,
  ``CloseStream``) is kept exactly; the file is truncated each time the reader catches up;
- **bounded** by ``max_bytes`` per stream: when full (or the disk refuses a write) :meth:`Spool.push`
  says so and the transport stops reading that stream until the spool drains: TCP back-pressure again,
  as a last resort only.
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
from typing import IO

logger = logging.getLogger(__name__)

BINARY = 1
TEXT = 2
_HEADER = struct.Struct(">BI")


class Spool:
    """An ordered, disk-backed queue of WebSocket messages for one stream.

    Args:
        max_bytes: the most bytes (records included) it holds; 0 refuses everything.
        directory: where the unlinked file is created (None: the system's temporary directory).
    """

    def __init__(self, max_bytes: int, directory: str | None = None) -> None:
        self.max_bytes = max_bytes
        self.directory = directory or None
        self._file: IO[bytes] | None = None
        self._write_at = 0
        self._read_at = 0
        self.messages = 0
        self.peak_bytes = 0
        self.failed = False

    @property
    def pending(self) -> bool:
        """Messages are waiting."""
        return self.messages > 0

    @property
    def bytes_waiting(self) -> int:
        """Bytes on disk not yet read back."""
        return self._write_at - self._read_at

    def has_room(self, size: int) -> bool:
        """A message of ``size`` bytes would fit."""
        return not self.failed and self.bytes_waiting + _HEADER.size + size <= self.max_bytes

    def push(self, kind: int, payload: bytes) -> bool:
        """Append a message.

        Returns:
            False when it does not fit or the write failed (then nothing was written; the caller must
            keep the message and stop reading the socket).
        """
        if not self.has_room(len(payload)):
            return False
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(dir=self.directory)
            record = _HEADER.pack(kind, len(payload)) + payload
            written = os.pwrite(self._file.fileno(), record, self._write_at)
            if written != len(record):
                raise OSError(f"short write: {written} of {len(record)} bytes")
        except OSError as exc:
            logger.warning("spool write failed (%s); falling back to TCP back-pressure for this stream", exc)
            self.failed = True
            return False
        self._write_at += len(record)
        self.messages += 1
        self.peak_bytes = max(self.peak_bytes, self.bytes_waiting)
        return True

    def pop(self) -> tuple[int, bytes] | None:
        """The oldest message, or None when empty."""
        if not self.messages or self._file is None:
            return None
        fd = self._file.fileno()
        kind, size = _HEADER.unpack(os.pread(fd, _HEADER.size, self._read_at))
        payload = os.pread(fd, size, self._read_at + _HEADER.size)
        if len(payload) != size:
            raise OSError(f"spool file truncated: {len(payload)} of {size} bytes")
        self._read_at += _HEADER.size + size
        self.messages -= 1
        if not self.messages:  # caught up: give the disk space back
            self._read_at = self._write_at = 0
            os.ftruncate(fd, 0)
            self.failed = False
        return kind, payload

    def close(self) -> None:
        """Drop everything and the file."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._read_at = self._write_at = self.messages = 0
