"""The store's files as the tools outside the daemon read and write them — ``ccp db``,
``ccp-agg`` — and the daemon's start-up recovery too, so that a torn line, a read-only open and
an atomic write mean the same everywhere.

- **JSONL, one torn-line rule** (:func:`jsonl_lines`): every non-blank line is parsed; a line
  that is not JSON has ``record`` None and is the caller's to skip and count. The one exception
  is the last line when it has no newline — what a crash mid-write leaves (``torn``): used when
  it parses whole (only the newline is missing), else skipped silently, never counted
  (:attr:`JsonlLine.ignored`).
- **Read-only SQLite** (:func:`connect_readonly`): a ``file:…?mode=ro`` URI, so that reading a
  store never creates one where there was none, nor changes it.
- **Atomic writes** (:func:`atomic_file`): written beside the target under a temporary name,
  flushed to disk (``fsync``) and moved over the target only when whole; removed on error.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator
from urllib.parse import quote

from ccpd import jsonparse


@dataclass(frozen=True)
class JsonlLine:
    number: int      # 1-based line number
    offset: int      # bytes read up to the end of this line
    record: object   # the parsed value; None when the line is not JSON
    torn: bool       # the last line, without its newline

    @property
    def ignored(self) -> bool:
        """A torn last line that does not parse: skipped silently, never counted."""
        return self.torn and self.record is None


def jsonl_lines(stream: BinaryIO) -> Iterator[JsonlLine]:
    """The non-blank lines of a JSONL byte stream, parsed (see the module docstring)."""
    offset = 0
    for number, raw in enumerate(stream, 1):
        offset += len(raw)
        if not raw.strip():
            continue
        try:
            record = jsonparse.loads(raw)
        except ValueError:
            record = None
        yield JsonlLine(number, offset, record, not raw.endswith(b"\n"))


def connect_readonly(path: str | os.PathLike, timeout: float = 5.0) -> sqlite3.Connection:
    """A read-only connection to the SQLite file at ``path`` (sqlite3.Error when it cannot be
    opened: missing, unreadable)."""
    uri = "file:" + quote(os.path.abspath(path)) + "?mode=ro"
    return sqlite3.connect(uri, uri=True, timeout=timeout)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", **open_args):
    """A file object whose content replaces ``path`` once the block ends without error."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, mode, **open_args) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
