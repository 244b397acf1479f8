"""The store as one service: the store (SQLite, or PostgreSQL in team mode), the sample writer
and the roller, and what happens at start — recovery of samples that reached ``usage.jsonl``
but not the store (a crash, ``kill -9``), reroute cooldowns and the quota windows restored —
before the first rollup. A shared store that cannot be reached at start is tried again (every
``START_RETRY_S`` at most) until it answers; the daemon serves meanwhile.
"""
from __future__ import annotations

from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import Logger

from ccpd.config import StoreConfig, database_error
from ccpd.store import queries
from ccpd.store.roller import Roller
from ccpd.store.schema import LATEST, POSTGRESQL, migrate
from ccpd.store.sqlite import MEMORY, SQLiteStore
from ccpd.store.writer import SampleWriter
from ccpd.usagelog import read_records

log = Logger()

_RECOVER_BATCH = 2000
START_RETRY_FIRST_S, START_RETRY_S = 1.0, 30.0


def recover_from_log(cursor, usage_log: str, since: float,
                     instance: str = "") -> tuple[int, float | None]:
    """Insert the samples of ``usage_log`` (and its rotated files) newer than ``since`` that
    the store lacks, as written by ``instance``; ``(inserted, oldest inserted ts)``.
    Idempotent on ``(ts, rid)``."""
    inserted, oldest, batch = 0, None, []

    def flush():
        nonlocal inserted
        inserted += queries.insert_samples(cursor, batch)
        batch.clear()

    for record in read_records(usage_log):
        ts = record.get("ts")
        if not isinstance(ts, (int, float)) or ts < since or not record.get("rid"):
            continue
        batch.append(queries.sample_row(record, instance))
        if len(batch) >= _RECOVER_BATCH:
            flush()
    flush()
    if inserted:
        cursor.execute("SELECT min(ts) FROM usage_sample WHERE ts >= ?", (since,))
        oldest = cursor.fetchone()[0]
    return inserted, oldest


class StoreService(service.MultiService):
    """``ready`` fires once the store is migrated and recovered."""

    name = "store-service"

    def __init__(self, config: StoreConfig, usage_log: str, metrics, clock):
        super().__init__()
        self.config = config
        self.usage_log = usage_log
        self.clock = clock
        self._restorers = []
        if config.team:
            from ccpd.store.postgres import PostgresStore  # psycopg only when asked for
            self.store = PostgresStore(config.url, config.instance, clock)
        else:
            self.store = SQLiteStore(config.path if config.persist else MEMORY, clock)
        self.store.setServiceParent(self)
        self.writer = SampleWriter(self.store, metrics, clock, config.instance, team=config.team)
        self.writer.setServiceParent(self)
        self.roller = Roller(self.store, metrics, config.rollup_interval, config.retention_days,
                             clock=clock, team=config.team)
        self.ready: defer.Deferred | None = None
        self.started_at: float | None = None
        self.team_position: int | None = None  # shared store: the seq the windows hold up to
        self._pause: defer.Deferred | None = None  # shared store: waiting to try the start again

    def startService(self):
        self.started_at = self.clock.seconds()
        service.Service.startService(self)
        self.store.startService()
        self.writer.startService()
        self.ready = defer.ensureDeferred(self._start_up())

    async def _start_up(self) -> None:
        """Recover, then start the roller; a failed recovery is logged, and the roller, the
        cooldown saving and the request path go on without it."""
        try:
            if self.config.team:
                await self._join_team()
            else:
                await self.store.ready
                if self.config.persist and self.running:
                    await self._recover()
        except Exception:  # noqa: BLE001 - the daemon serves on; usage.jsonl has every line
            log.failure("store start-up recovery failed; samples still go to usage.jsonl and "
                        "will be recovered at the next start")
        finally:
            # the roller starts only now, so its first tick sees the recovered samples
            if self.running:
                self.roller.setServiceParent(self)

    async def _join_team(self) -> None:
        """A shared store: migrated, recovered and restored, tried again until the database
        answers (the daemon serves on its own view meanwhile; a stop ends the waiting)."""
        delay = START_RETRY_FIRST_S
        while self.running:
            try:
                await self.store.ready
                await self._recover()
                return
            except Exception as e:  # noqa: BLE001 - told, and tried again
                log.error("store {location}: start-up failed ({error}); serving on this "
                          "daemon's own view, trying again in {delay:g}s",
                          location=self.store.location, error=database_error(self.config.url, e),
                          delay=delay)
            self._pause = deferLater(self.clock, delay)
            try:
                await self._pause
            except defer.CancelledError:
                return
            delay = min(START_RETRY_S, delay * 2)
            self.store.ready = self.store.run(migrate, LATEST, POSTGRESQL)

    async def _recover(self) -> None:
        since = self.started_at - queries.SAMPLE_TTL_S
        inserted, oldest = await self.store.run(recover_from_log, self.usage_log, since,
                                                self.config.instance)
        if inserted:
            log.info("store: recovered {count} samples from {path} that were not stored",
                     count=inserted, path=self.usage_log)
            self.roller.mark(oldest)
        cooldowns = await self.store.run(queries.load_cooldowns, self.started_at)
        if self.config.team:  # the team's samples, up to a position the ledger goes on from
            position = await self.store.run(queries.team_position)
            rows = await self.store.run(queries.recent_usage, since, position)
            self.team_position = position
        else:
            rows = await self.store.run(queries.recent_usage, since)
        readings = await self.store.run(queries.load_readings)
        # what this daemon served since it started is in its windows already
        instance = self.config.instance
        rows = [r for r in rows if r[1] < self.started_at or r[8] != instance]
        for restore in self._restorers:
            restore(cooldowns, rows, readings)
        newest = await self.store.run(queries.newest_rollup)
        self.roller.mark(newest if newest is not None else
                         await self.store.run(queries.oldest_sample) or self.started_at)

    def on_recovered(self, restore) -> None:
        """Call ``restore(cooldowns, usage_rows, readings)`` with the stored state once the
        store is recovered at start-up (see :meth:`ccpd.governor.Governor.restore`)."""
        self._restorers.append(restore)

    def save_cooldown(self, model: str, until: float) -> None:
        self._save(queries.save_cooldown, f"the cooldown of {model}", model, until)

    def save_reading(self, reading) -> None:
        self._save(queries.save_reading, f"the {reading.window} reading of lane "
                                         f"{reading.lane}", reading.to_row())

    def _save(self, query, what: str, *args) -> None:
        if not self.config.persist:
            return
        d = self.store.run(query, *args)
        d.addErrback(lambda f: log.error("could not save {what}: {error}", what=what,
                                         error=f.getErrorMessage()))

    @defer.inlineCallbacks
    def stopService(self):
        """The writer drains into the store, a rollup tick and the start-up recovery in
        progress finish, then the store closes (closing joins its thread: nothing may be
        running in it then, or the reactor would wait)."""
        service.Service.stopService(self)
        if self._pause is not None:
            self._pause.cancel()  # no-op once it has fired
        yield self.writer.stopService()
        if self.roller.running:
            yield self.roller.stopService()
        if self.ready is not None:
            yield self.ready
        self.store.stopService()
