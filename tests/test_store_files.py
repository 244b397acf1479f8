"""The store's file helpers shared by ``ccp db``, ``ccp-agg`` and the start-up recovery."""
from __future__ import annotations

import io
import sqlite3

import pytest

from ccpd.store.files import atomic_file, connect_readonly, jsonl_lines


def test_one_torn_line_rule():
    data = (b'{"a": 1}\n'
            b'\n'                 # blank: not a line that carries anything
            b'not json\n'         # damage inside the file: the caller skips and counts it
            b'{"b": 2}\n'
            b'{"c": 3}')          # torn, and whole but for its newline: used
    lines = list(jsonl_lines(io.BytesIO(data)))
    assert [(l.number, l.record, l.torn, l.ignored) for l in lines] == [
        (1, {"a": 1}, False, False), (3, None, False, False), (4, {"b": 2}, False, False),
        (5, {"c": 3}, True, False)]
    assert lines[-1].offset == len(data)
    torn = list(jsonl_lines(io.BytesIO(b'{"a": 1}\n{"b": 2, "mod')))[-1]
    assert (torn.record, torn.torn, torn.ignored) == (None, True, True)  # a crash mid-write
    deep = list(jsonl_lines(io.BytesIO(b"[" * 100_000 + b"\n")))
    assert deep[0].record is None  # too deep to parse is not JSON, not a crash


def test_atomic_file_replaces_only_when_whole(tmp_path):
    target = tmp_path / "rollup_hour.json"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as f:
            f.write(b"half of the new")
            raise RuntimeError("disk trouble")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]
    with atomic_file(target, "w", encoding="utf-8") as f:
        f.write("new")
    assert target.read_text() == "new" and list(tmp_path.iterdir()) == [target]


def test_a_read_only_connection_never_creates_or_changes_a_store(tmp_path):
    missing = tmp_path / "none.sqlite3"
    with pytest.raises(sqlite3.OperationalError):
        connect_readonly(missing)
    assert not missing.exists()
    path = tmp_path / "ccp.sqlite3"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE t (x)")
    connection = connect_readonly(path)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            connection.execute("INSERT INTO t VALUES (1)")
    finally:
        connection.close()
