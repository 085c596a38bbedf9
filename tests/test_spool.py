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
    assert len(spool._files) == 1
    fd = spool._files[0].file.fileno()
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


def test_disk_use_is_bounded_when_the_reader_never_catches_up(tmp_path: Path) -> None:
    """A stream that always has messages waiting still gives disk space back: files rotate every
    file_bytes and each is closed once read through, so the disk holds at most the waiting bytes plus
    one file."""
    spool = Spool(4000, str(tmp_path), file_bytes=1000)
    order = 0
    popped = 0
    peak_disk = 0
    for _ in range(200):  # push two, pop one... then drain: never empty until the end
        for _ in range(2 if order < 300 else 0):
            if spool.push(BINARY, order.to_bytes(4, "big") + b"z" * 95):
                order += 1
        got = spool.pop()
        assert got is not None and got[1][:4] == popped.to_bytes(4, "big"), "order kept across files"
        popped += 1
        peak_disk = max(peak_disk, spool.disk_bytes)
        assert spool.disk_bytes <= spool.bytes_waiting + 1000 + 100
    assert popped == 200 and spool.pending and len(spool._files) >= 2
    assert peak_disk <= 4000 + 1100
    while spool.pop() is not None:
        popped += 1
    assert popped == order and spool.disk_bytes == 0 and len(spool._files) == 1
