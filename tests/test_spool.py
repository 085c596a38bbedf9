"""The spool: a fast client's messages kept in order on disk, bounded, and gone when done."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stream_server import spool as spool_module
from stream_server.spool import BINARY, TEXT, Spool


def test_messages_come_back_in_order_with_their_kind(tmp_path: Path) -> None:
    """Audio and control messages pushed in turn pop in the same order, byte for byte."""
    spool = Spool(1 << 20, str(tmp_path))
    sent = [(BINARY, os.urandom(3200)), (TEXT, b'{"type": "Finalize"}'), (BINARY, b""), (BINARY, b"\x01" * 7)]
    for kind, payload in sent:
        assert spool.push(kind, payload)
    assert spool.messages == 4 and spool.bytes_waiting == sum(5 + len(p) for _, p in sent)
    got = [spool.pop() for _ in range(4)]
    assert got == sent
    assert spool.pop() is None and not spool.pending


def test_the_file_is_unlinked_and_truncated_when_caught_up(tmp_path: Path) -> None:
    """Nothing is visible in the directory, and the file shrinks to nothing once read back."""
    spool = Spool(1 << 20, str(tmp_path))
    spool.push(BINARY, b"x" * 10000)
    assert list(tmp_path.iterdir()) == []
    assert spool._file is not None
    fd = spool._file.fileno()
    assert os.fstat(fd).st_size == 10005
    spool.pop()
    assert os.fstat(fd).st_size == 0 and spool.bytes_waiting == 0
    spool.push(BINARY, b"y" * 10)
    assert spool.pop() == (BINARY, b"y" * 10)
    spool.close()


def test_a_full_spool_refuses_without_writing(tmp_path: Path) -> None:
    """Past max_bytes push answers False and keeps nothing; room comes back as it drains."""
    spool = Spool(100, str(tmp_path))
    assert spool.push(BINARY, b"a" * 60)
    assert not spool.push(BINARY, b"b" * 60)
    assert spool.messages == 1 and spool.peak_bytes == 65
    assert spool.pop() == (BINARY, b"a" * 60)
    assert spool.push(BINARY, b"b" * 60)


def test_a_disk_error_is_a_refusal_not_an_exception(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the write fails (disk full), push answers False so the caller falls back to not reading."""

    def full_disk(fd: int, data: bytes, offset: int) -> int:
        raise OSError(28, "No space left on device")

    spool = Spool(1 << 20, str(tmp_path))
    monkeypatch.setattr(spool_module.os, "pwrite", full_disk)
    assert not spool.push(BINARY, b"a")
    assert spool.failed and not spool.has_room(1) and not spool.pending


def test_zero_bytes_means_no_spool(tmp_path: Path) -> None:
    """max_spool_mb 0 turns spooling off: every push is refused."""
    assert not Spool(0, str(tmp_path)).push(BINARY, b"a")
