"""The store as one service: the SQLite store, the sample writer and the roller, and what
happens at start — recovery of samples that reached ``usage.jsonl`` but not the store (a crash,
``kill -9``), reroute cooldowns and the quota windows restored — before the first rollup.
"""
from __future__ import annotations

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from ccpd.config import StoreConfig
from ccpd.store import queries
from ccpd.store.roller import Roller
from ccpd.store.sqlite import MEMORY, SQLiteStore
from ccpd.store.writer import SampleWriter
from ccpd.usagelog import read_records

log = Logger()

_RECOVER_BATCH = 2000


def recover_from_log(cursor, usage_log: str, since: float) -> tuple[int, float | None]:
    """Insert the samples of ``usage_log`` (and its rotated files) newer than ``since`` that
    the store lacks; ``(inserted, oldest inserted ts)``. Idempotent on ``(ts, rid)``."""
    inserted, oldest, batch = 0, None, []

    def flush():
        nonlocal inserted
        inserted += queries.insert_samples(cursor, batch)
        batch.clear()

    for record in read_records(usage_log):
        ts = record.get("ts")
        if not isinstance(ts, (int, float)) or ts < since or not record.get("rid"):
            continue
        batch.append(queries.sample_row(record))
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
        self.store = SQLiteStore(config.path if config.persist else MEMORY, clock)
        self.store.setServiceParent(self)
        self.writer = SampleWriter(self.store, metrics, clock)
        self.writer.setServiceParent(self)
        self.roller = Roller(self.store, metrics, config.rollup_interval, config.retention_days,
                             clock=clock)
        self.ready: defer.Deferred | None = None
        self.started_at: float | None = None

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

    async def _recover(self) -> None:
        since = self.started_at - queries.SAMPLE_TTL_S
        inserted, oldest = await self.store.run(recover_from_log, self.usage_log, since)
        if inserted:
            log.info("store: recovered {count} samples from {path} that were not stored",
                     count=inserted, path=self.usage_log)
            self.roller.mark(oldest)
        cooldowns = await self.store.run(queries.load_cooldowns, self.started_at)
        rows = await self.store.run(queries.recent_usage, since)
        readings = await self.store.run(queries.load_readings)
        for restore in self._restorers:
            restore(cooldowns, [r for r in rows if r[1] < self.started_at], readings)
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
        yield self.writer.stopService()
        if self.roller.running:
            yield self.roller.stopService()
        if self.ready is not None:
            yield self.ready
        self.store.stopService()
