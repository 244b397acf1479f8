"""Samples to the store, off the request path: queued, written in batches, retried on error.

A sample leaves the queue only once its batch is committed. A failing write is counted
(``ccp_store_write_errors_total``), logged and retried with a growing delay; the proxy never
waits and never sees the error. On a shared store (team mode) samples are written at once,
not gathered for ``FLUSH_DELAY_S``: they are the team's quota ledger, and a write that fails
is tried again within ``TEAM_RETRY_MAX_S``. What a crash loses from the queue is recovered at
the next start from ``usage.jsonl`` (see :mod:`ccpd.store.service`).
"""
from __future__ import annotations

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from ccpd.store.queries import insert_samples, sample_row

log = Logger()

FLUSH_DELAY_S = 0.2
BATCH_ROWS = 500
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0
TEAM_RETRY_MAX_S = 2.0


class SampleWriter(service.Service):
    name = "sample-writer"

    def __init__(self, store, metrics, clock, instance: str = "", team: bool = False):
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.instance = instance
        self.flush_delay = 0.0 if team else FLUSH_DELAY_S
        self.retry_max = TEAM_RETRY_MAX_S if team else RETRY_MAX_S
        self.queue: list[tuple] = []
        self._timer = None
        self._writing: defer.Deferred | None = None
        self._retry_s = RETRY_FIRST_S
        self._idle: list[defer.Deferred] = []

    def add(self, record: dict) -> None:
        """Queue the sample of one ``usage.jsonl`` record."""
        self.queue.append(sample_row(record, self.instance))
        if len(self.queue) >= BATCH_ROWS:
            self._schedule(0)
        else:
            self._schedule(self.flush_delay)

    def _schedule(self, delay: float) -> None:
        if self._writing is not None:
            return  # the write in progress schedules the next one
        if self._timer is not None and self._timer.active():
            if delay > 0:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._flush)

    def _flush(self) -> None:
        self._timer = None
        if not self.queue or self._writing is not None:
            return
        batch = self.queue[:BATCH_ROWS]
        self._writing = self.store.run(insert_samples, batch)
        self._writing.addCallbacks(self._written, self._failed, callbackArgs=(len(batch),))

    def _written(self, _inserted: int, count: int) -> None:
        self._writing = None
        del self.queue[:count]
        self.metrics.store_writes.inc(count)
        self._retry_s = RETRY_FIRST_S
        if self.queue:
            self._schedule(0)
        else:
            self._notify_idle()

    def _failed(self, failure) -> None:
        self._writing = None
        self.metrics.store_write_errors.inc()
        log.error("store write of {count} samples failed, retrying in {delay:g}s: {error}",
                  count=min(len(self.queue), BATCH_ROWS), delay=self._retry_s,
                  error=failure.getErrorMessage())
        if not self.running:
            self._notify_idle()  # stopping: what is left is in usage.jsonl for the next start
            return
        self._timer = self.clock.callLater(self._retry_s, self._flush)
        self._retry_s = min(self.retry_max, self._retry_s * 2)

    def _notify_idle(self) -> None:
        waiters, self._idle = self._idle, []
        for waiter in waiters:
            waiter.callback(None)

    def drained(self) -> defer.Deferred:
        """Fires once the queue is written (or a write failed while stopping)."""
        if not self.queue and self._writing is None:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._idle.append(waiter)
        if self._writing is None:
            self._schedule(0)
        return waiter

    def stopService(self):
        super().stopService()
        return self.drained()
