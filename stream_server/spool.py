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
  ``CloseStream``) is kept exactly;
- **bounded** by ``max_bytes`` per stream: when the messages waiting would exceed it (or the disk refuses
  a write) :meth:`Spool.push` says so and the transport stops reading that stream until the spool
  drains: TCP back-pressure again, as a last resort only;
- **bounded on disk** as well: writes go to a new file every ``max_bytes / 4`` (at least 1 MiB), and a
  file is closed, its space given back, as soon as it has been read through; so a stream that never
  catches up (an eight-hour upload) holds at most ``max_bytes`` waiting plus one partly read file:
  ``1.25 × max_bytes`` on disk.
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
from collections import deque
from typing import IO

logger = logging.getLogger(__name__)

BINARY = 1
TEXT = 2
OVERSIZED = 3
"""A message the socket refused to read (over ``max_frame_bytes``): its place in the stream's order."""
_HEADER = struct.Struct(">BI")


class _File:
    """One unlinked file of the spool: where the next record is written and where the next is read."""

    __slots__ = ("file", "read_at", "write_at")

    def __init__(self, directory: str | None) -> None:
        self.file: IO[bytes] = tempfile.TemporaryFile(dir=directory)
        self.read_at = 0
        self.write_at = 0


class Spool:
    """An ordered, disk-backed queue of WebSocket messages for one stream.

    Args:
        max_bytes: the most bytes (records included) waiting at once; 0 refuses everything.
        directory: where the unlinked files are created (None: the system's temporary directory).
        file_bytes: start a new file once the current one holds this much (default ``max_bytes / 4``, at
            least 1 MiB).
    """

    def __init__(self, max_bytes: int, directory: str | None = None, *, file_bytes: int = 0) -> None:
        self.max_bytes = max_bytes
        self.directory = directory or None
        self.file_bytes = file_bytes or max(1 << 20, max_bytes // 4)
        self._files: deque[_File] = deque()  # oldest (being read) first, newest (being written) last
        self._waiting = 0
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
        return self._waiting

    @property
    def disk_bytes(self) -> int:
        """Bytes the spool's files take on disk now (read and unread)."""
        return sum(f.write_at for f in self._files)

    def has_room(self, size: int) -> bool:
        """A message of ``size`` bytes would fit."""
        return not self.failed and self._waiting + _HEADER.size + size <= self.max_bytes

    def push(self, kind: int, payload: bytes) -> bool:
        """Append a message.

        Returns:
            False when it does not fit or the write failed (then nothing was written; the caller must
            keep the message and stop reading the socket).
        """
        if not self.has_room(len(payload)):
            return False
        record = _HEADER.pack(kind, len(payload)) + payload
        try:
            if not self._files or self._files[-1].write_at >= self.file_bytes:
                self._files.append(_File(self.directory))
            target = self._files[-1]
            written = os.pwrite(target.file.fileno(), record, target.write_at)
            if written != len(record):
                raise OSError(f"short write: {written} of {len(record)} bytes")
        except OSError as exc:
            logger.warning("spool write failed (%s); falling back to TCP back-pressure for this stream", exc)
            self.failed = True
            self._drop_read_files()
            return False
        target.write_at += len(record)
        self._waiting += len(record)
        self.messages += 1
        self.peak_bytes = max(self.peak_bytes, self._waiting)
        return True

    def pop(self) -> tuple[int, bytes] | None:
        """The oldest message, or None when empty."""
        if not self.messages:
            return None
        source = self._files[0]
        fd = source.file.fileno()
        kind, size = _HEADER.unpack(os.pread(fd, _HEADER.size, source.read_at))
        payload = os.pread(fd, size, source.read_at + _HEADER.size)
        if len(payload) != size:
            raise OSError(f"spool file truncated: {len(payload)} of {size} bytes")
        source.read_at += _HEADER.size + size
        self._waiting -= _HEADER.size + size
        self.messages -= 1
        self._drop_read_files()
        if not self.messages:
            self.failed = False
        return kind, payload

    def close(self) -> None:
        """Drop everything and the files."""
        for f in self._files:
            f.file.close()
        self._files.clear()
        self._waiting = self.messages = 0

    def _drop_read_files(self) -> None:
        """Close files read through (their space goes back at once); the newest is truncated instead."""
        while self._files and self._files[0].read_at >= self._files[0].write_at:
            done = self._files[0]
            if len(self._files) == 1:  # the one being written: keep it, empty
                if done.write_at:
                    os.ftruncate(done.file.fileno(), 0)
                    done.read_at = done.write_at = 0
                return
            self._files.popleft().file.close()
