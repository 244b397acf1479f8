"""JSON-lines log files that rotate by size and stay whole under concurrent writers.

Each line goes to the OS in one ``write(2)`` on an ``O_APPEND`` descriptor, so lines from
several writers never interleave. Rotation renames ``f`` → ``f.1`` → … → ``f.<backups>``; it is
done under an ``flock`` on ``f.lock`` (and a thread lock inside one process), and a writer that
finds its file was rotated by someone else reopens before it writes. No line is lost or written
twice, and every rotated file in ``1..backups`` exists once the first rotation is done.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import threading
from collections.abc import Iterator


def _finite(value):
    """``value`` with NaN and infinities replaced by None, for strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def encode_line(record: dict) -> bytes:
    try:
        text = json.dumps(record, separators=(",", ":"), allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(record), separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8") + b"\n"


class RotatingJSONLWriter:
    """Appends JSON objects to ``path``, rotating at ``max_bytes`` (0: never)."""

    def __init__(self, path: str, max_bytes: int, backups: int):
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self._lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        self._fd = -1
        self._ino = None
        self._open()

    def _open(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._ino = os.fstat(self._fd).st_ino

    def write(self, record: dict) -> None:
        self.write_line(encode_line(record))

    def write_line(self, line: bytes) -> None:
        with self._lock:
            if self._fd < 0:
                raise ValueError(f"{self.path} is closed")
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                self._follow_rotation()
                if self.max_bytes:
                    size = os.fstat(self._fd).st_size
                    if size and size + len(line) > self.max_bytes:
                        self._rotate()
                view = memoryview(line)
                while view:
                    view = view[os.write(self._fd, view):]
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
    """Every JSON object in ``path`` and its rotated files, oldest first.

    A line that does not parse (a torn last line after a crash) is skipped.
    """
    for name in rotated_paths(path):
        with open(name, "rb") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    yield record
