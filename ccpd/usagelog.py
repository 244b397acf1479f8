"""JSON-lines log files that rotate by size and stay whole under concurrent writers.

Each line goes to the OS in one ``write(2)`` on an ``O_APPEND`` descriptor, so lines from
several writers never interleave. Rotation renames ``f`` → ``f.1`` → … → ``f.<backups>``; it is
done under an ``flock`` on ``f.lock`` (and a thread lock inside one process), and a writer that
finds its file was rotated by someone else reopens before it writes. No line is lost or written
twice, and every rotated file in ``1..backups`` exists once the first rotation is done.

A line is in the file whole or not at all: when a write fails part-way (a full disk), the part
that got in is cut off again. Lines that could not be written wait, in order, in a bounded
in-memory spool and go to the file before any newer line once the disk accepts them again.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import threading
from collections import deque
from collections.abc import Iterator

from ccpd.store.files import jsonl_lines

SPOOL_MAX_BYTES = 16 * 1024 * 1024  # about 20,000 usage lines


def _finite(value):
    """``value`` with NaN and infinities replaced by None, for strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# Made once: json.dumps with arguments builds a new encoder for every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def encode_line(record: dict) -> bytes:
    try:
        text = _ENCODER.encode(record)
    except ValueError:
        text = _ENCODER.encode(_finite(record))
    return text.encode("utf-8") + b"\n"


class RotatingJSONLWriter:
    """Appends JSON objects to ``path``, rotating at ``max_bytes`` (0: never)."""

    def __init__(self, path: str, max_bytes: int, backups: int,
                 spool_max_bytes: int = SPOOL_MAX_BYTES):
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.spool_max_bytes = spool_max_bytes
        self.dropped = 0               # spooled lines given up because the spool was full
        self.last_error: str | None = None  # why the spool is not empty
        self._spool: deque[bytes] = deque()
        self._spool_bytes = 0
        self._torn_at: int | None = None  # where a failed write could not be cut off
        self._lock = threading.Lock()
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self._lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        self._fd = -1
        self._ino = None
        self._open()

    @property
    def spooled(self) -> int:
        """Lines waiting for the disk."""
        return len(self._spool)

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._ino = os.fstat(fd).st_ino
        self._torn_at = None

    def write(self, record: dict) -> bool:
        return self.write_line(encode_line(record))

    def write_line(self, line: bytes) -> bool:
        """Append ``line``; True when it is in the file, False when it waits in the spool
        (the disk refused it, or older lines are still waiting)."""
        with self._lock:
            if self._fd < 0:
                raise ValueError(f"{self.path} is closed")
            self._spool.append(line)
            self._spool_bytes += len(line)
            while self._spool_bytes > self.spool_max_bytes and len(self._spool) > 1:
                self._spool_bytes -= len(self._spool.popleft())
                self.dropped += 1
            return self._flush_spool()

    def flush(self) -> bool:
        """Try the waiting lines again; True when none is left."""
        with self._lock:
            return self._fd < 0 or self._flush_spool()

    def _flush_spool(self) -> bool:
        while self._spool:
            try:
                self._append(self._spool[0])
            except OSError as e:
                self.last_error = e.strerror or str(e)
                return False
            self._spool_bytes -= len(self._spool.popleft())
        self.last_error = None
        return True

    def _append(self, line: bytes) -> None:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            self._follow_rotation()
            if self._torn_at is not None:
                os.ftruncate(self._fd, self._torn_at)
                self._torn_at = None
            size = os.fstat(self._fd).st_size
            if self.max_bytes and size and size + len(line) > self.max_bytes:
                self._rotate()
                size = 0
            view = memoryview(line)
            try:
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError:
                if len(view) < len(line):  # part of the line got in: cut it off again
                    try:
                        os.ftruncate(self._fd, size)
                    except OSError:
                        self._torn_at = size  # cut before the next line instead
                raise
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _follow_rotation(self) -> None:
        """Reopen when another writer rotated (or someone removed) the file."""
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            current = None
        if current != self._ino:
            self._open()

    def _rotate(self) -> None:
        if self.backups <= 0:
            os.unlink(self.path)
        else:
            for n in range(self.backups - 1, 0, -1):
                older = f"{self.path}.{n}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{n + 1}")
            os.replace(self.path, f"{self.path}.1")
        self._open()

    def close(self) -> None:
        with self._lock:
            for fd in (self._fd, self._lock_fd):
                if fd >= 0:
                    os.close(fd)
            self._fd = self._lock_fd = -1


def rotated_paths(path: str) -> list[str]:
    """``path`` and its rotated files that exist, oldest first."""
    older = []
    n = 1
    while os.path.exists(f"{path}.{n}"):
        older.append(f"{path}.{n}")
        n += 1
    older.reverse()
    return older + ([path] if os.path.exists(path) else [])


def read_records(path: str) -> Iterator[dict]:
    """Every JSON object in ``path`` and its rotated files, oldest first (lines that are not
    one, and a torn last line after a crash, are skipped: :mod:`ccpd.store.files`)."""
    for name in rotated_paths(path):
        with open(name, "rb") as f:
            for line in jsonl_lines(f):
                if isinstance(line.record, dict):
                    yield line.record
