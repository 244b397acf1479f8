"""The store's schema: numbered ``schema/NNN_*.sql`` files applied in order, in place.

``schema_version`` records what was applied; :func:`migrate` brings any older database (or an
empty file) to :data:`LATEST` in one transaction. Plain ``sqlite3``: the daemon runs it through
adbapi, the ``ccp db`` commands and tests on a bare connection.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

SCHEMA_DIR = Path(__file__).parent / "schema"
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


def migrations() -> list[tuple[int, str]]:
    """``(version, sql)`` of every schema file, in order."""
    found = []
    for path in sorted(SCHEMA_DIR.iterdir()):
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path.read_text(encoding="utf-8")))
    return found


LATEST = migrations()[-1][0]


def statements(sql: str) -> list[str]:
    """The statements of a schema file (no semicolons inside our SQL literals)."""
    text = "\n".join(line.split("--", 1)[0] for line in sql.splitlines())
    return [statement.strip() for statement in text.split(";") if statement.strip()]


def schema_version(cursor) -> int:
    cursor.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                   "version INT NOT NULL, applied_at REAL NOT NULL)")
    cursor.execute("SELECT max(version) FROM schema_version")
    return cursor.fetchone()[0] or 0


def migrate(cursor, upto: int = LATEST) -> tuple[int, int]:
    """Apply the missing schema versions up to ``upto``; ``(from, to)`` versions.

    All of it happens in one transaction: a failed migration leaves the old schema whole.
    The caller commits (adbapi does at the end of the interaction).
    """
    if not cursor.connection.in_transaction:
        cursor.execute("BEGIN")
    current = schema_version(cursor)
    for version, sql in migrations():
        if current < version <= upto:
            for statement in statements(sql):
                cursor.execute(statement)
            cursor.execute("INSERT INTO schema_version VALUES (?, ?)", (version, time.time()))
    return current, max(current, min(upto, LATEST))
