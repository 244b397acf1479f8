"""The roller: every ``rollup_interval`` it recomputes the hour rollups of the hours that may
have changed and the day rollups they fall in, trims what is past retention and refreshes the
store gauges. A failing tick is counted and logged; the next one still runs. On a shared store
one daemon's roller does it for the team (:func:`~ccpd.store.queries.roll_for_team`); the
others' ticks find it done and skip.
"""
from __future__ import annotations

import time

from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.logger import Logger

from ccpd.store.queries import HOUR, roll, roll_for_team, trim

log = Logger()


class Roller(TimerService):
    name = "roller"

    def __init__(self, store, metrics, interval_s: float, retention_days: float, clock=None,
                 team: bool = False):
        super().__init__(interval_s, self.tick)
        self.interval_s = interval_s
        self.team = team
        self.store = store
        self.metrics = metrics
        self.retention_days = retention_days
        self.since: float | None = None  # the earliest sample time the next tick re-rolls
        if clock is not None:
            self.clock = clock

    def mark(self, ts: float) -> None:
        """Samples from ``ts`` on changed (a late or recovered sample): re-roll from there."""
        self.since = ts if self.since is None else min(self.since, ts)

    @defer.inlineCallbacks
    def tick(self):
        now = self.clock.seconds()
        # Re-roll the last hour at every tick: samples are stamped when a request started and
        # written when it finished, so a long request lands in an hour already rolled.
        marked, self.since = self.since, None
        since = min(marked if marked is not None else now, now - HOUR)
        started = time.perf_counter()
        try:
            if self.team:
                yield self.store.run(roll_for_team, since, now, self.retention_days,
                                     self.interval_s, marked is not None and marked < now - HOUR)
            else:
                yield self.store.run(roll, since, now)
                yield self.store.run(trim, now, self.retention_days)
            size = yield defer.maybeDeferred(self.store.size_bytes)
            self.metrics.store_size.set(size)
        except Exception as e:  # noqa: BLE001 - a TimerService stops for good on an error
            self.metrics.store_write_errors.inc()
            self.mark(since)
            log.error("rollup tick failed, retrying at the next tick: {error}", error=str(e))
            return
        finally:
            self.metrics.rollup_duration.observe(time.perf_counter() - started)
