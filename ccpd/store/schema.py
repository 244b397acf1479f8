"""The store's schema: numbered ``schema/NNN_*.sql`` files applied in order, in place; the same
versions for PostgreSQL in ``schema/postgresql/`` (its column types differ).

``schema_version`` records what was applied; :func:`migrate` brings any older database (or an
empty one) to :data:`LATEST` in one transaction. Plain DB-API: the daemon runs it through
adbapi, the ``ccp db`` commands and tests on a bare connection.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

SCHEMA_DIR = Path(__file__).parent / "schema"
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
SQLITE, POSTGRESQL = "sqlite", "postgresql"
# held by the transaction that migrates a PostgreSQL store: daemons starting together wait
MIGRATION_LOCK = 0x63637064_0001


def migrations(dialect: str = SQLITE) -> list[tuple[int, str]]:
    """``(version, sql)`` of every schema file of ``dialect``, in order."""
    found = []
    folder = SCHEMA_DIR / POSTGRESQL if dialect == POSTGRESQL else SCHEMA_DIR
    for path in sorted(folder.iterdir()):
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
                   "version INT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)")
    cursor.execute("SELECT max(version) FROM schema_version")
    return cursor.fetchone()[0] or 0


def migrate(cursor, upto: int = LATEST, dialect: str = SQLITE) -> tuple[int, int]:
    """Apply the missing schema versions up to ``upto``; ``(from, to)`` versions.

    All of it happens in one transaction: a failed migration leaves the old schema whole.
    The caller commits (adbapi does at the end of the interaction). On PostgreSQL the
    transaction first takes :data:`MIGRATION_LOCK`, so daemons that start at once migrate one
    after the other (the later ones find nothing left to do).
    """
    if dialect == POSTGRESQL:
        cursor.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
    elif not cursor.connection.in_transaction:
        cursor.execute("BEGIN")
    current = schema_version(cursor)
    for version, sql in migrations(dialect):
        if current < version <= upto:
            for statement in statements(sql):
                cursor.execute(statement)
            cursor.execute("INSERT INTO schema_version VALUES (?, ?)", (version, time.time()))
    return current, max(current, min(upto, LATEST))
