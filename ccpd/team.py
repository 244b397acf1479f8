"""Team mode's quota ledger: the decisions of every daemon sharing one PostgreSQL store are
made on the team's usage, not on the daemon's own.

The ledger is the store's ``usage_sample`` table. Every daemon writes each finished request's
sample at once (:class:`~ccpd.store.writer.SampleWriter` in team mode), numbered by ``seq`` in
commit order (:data:`ccpd.store.queries.LEDGER_LOCK`). Before each Messages decision the proxy
awaits :meth:`TeamLedger.sync`: one transaction reads what the other daemons recorded since
this one last looked (:func:`ccpd.store.queries.team_news`) — their samples, the cooldowns
running and the provider readings seen — and counts it into this daemon's governor; then the
decision is taken locally, as in single mode. So a decision sees every sample committed before
its read: the only overshoot past a limit is the requests already in flight when it was reached
(their tokens are known only when their answers end), at most one per client sending back to
back. Requests that arrive while a read is running wait for the next one, which serves them
all (one read per reactor turn at most under load).

When the database cannot be reached (an error, or no answer within ``SYNC_TIMEOUT_S``), the
daemon decides on its own view at once — flagged in ``/readyz``, ``/v1/usage`` and
``ccp_team_ledger_up`` — and tries the database again every ``RETRY_S`` in the background;
the first read that succeeds catches up on everything the others wrote meanwhile, and the
writer sends what this daemon served meanwhile (its samples waited in its queue and in
``usage.jsonl``).
"""
from __future__ import annotations

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from ccpd.config import database_error
from ccpd.store import queries

log = Logger()

SYNC_TIMEOUT_S = 2.0
RETRY_S = 1.0


class TeamLedger(service.Service):
    name = "team-ledger"

    def __init__(self, store_service, governor, metrics, clock):
        self.stores = store_service
        self.governor = governor
        self.instance = store_service.config.instance
        self.clock = clock
        self.position: int | None = None  # the last seq counted; None until the start-up restore
        self.readings_seen = 0.0          # the newest provider reading's observed_at read
        self.up = False                   # True while decisions see the team's usage
        self.error: str | None = "starting: the team's usage is not read yet"
        self.local_since: float | None = clock.seconds()
        self.samples_read = 0
        self.reads = 0                    # reads of the ledger (one serves every waiting request)
        self._reading = False             # a read is running
        self._waiting: list[defer.Deferred] = []
        self._retry = None
        self.up_gauge = metrics.team_gauge()
        store_service.on_recovered(self._restored)

    def _restored(self, _cooldowns, _rows, readings) -> None:
        """The start-up restore counted the team's samples up to the store's position."""
        self.position = self.stores.team_position
        self.readings_seen = max((row[5] for row in readings), default=0.0)
        self._kick()

    def sync(self) -> defer.Deferred:
        """Fires (never fails) once the team's usage as of now is in the governor, or at
        once when the database is away (the decision is then this daemon's own)."""
        if not self.up:
            self._kick()
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._waiting.append(waiter)
        if not self._reading:
            self._read()
        return waiter

    def _kick(self) -> None:
        """Try the database now, unless a read or a retry is already on its way."""
        if not self._reading and self.position is not None and \
                (self._retry is None or not self._retry.active()):
            self._read()

    def _read(self) -> None:
        self.reads += 1
        self._reading = True
        waiters, self._waiting = self._waiting, []
        d = self.stores.store.run(queries.team_news, self.position, self.instance,
                                  self.clock.seconds(), self.readings_seen)
        d.addTimeout(SYNC_TIMEOUT_S, self.clock)
        d.addCallback(self._apply)
        d.addErrback(self._failed)  # also what _apply could not count: told, own view
        d.addBoth(self._done, waiters)

    def _apply(self, news) -> None:
        position, rows, cooldowns, readings = news
        governor = self.governor
        if rows:
            governor.record_samples(rows)
            self.samples_read += len(rows)
            governor.update_gauges(self.clock.seconds())
        for model, until in cooldowns.items():
            if until > governor.policy.cooldowns.get(model, 0.0):
                governor.policy.cooldowns[model] = until
        if readings:
            governor.watch.restore(readings)
            self.readings_seen = max(self.readings_seen, *(row[5] for row in readings))
        self.position = position
        if not self.up:
            log.info("team ledger: reading the team's usage from the store again "
                     "({count} samples of other daemons caught up)", count=len(rows))
            self.up, self.error, self.local_since = True, None, None
            self.up_gauge.set(1)

    def _failed(self, failure) -> None:
        error = database_error(self.stores.config.url, failure.value)
        if failure.check(defer.TimeoutError, defer.CancelledError):
            error = f"no answer within {SYNC_TIMEOUT_S:g}s"
        if self.up or self.error != error:
            log.error("team ledger: cannot read the team's usage ({error}); deciding on this "
                      "daemon's own view, trying again every {retry:g}s", error=error,
                      retry=RETRY_S)
        if self.up:
            self.local_since = self.clock.seconds()
        self.up, self.error = False, error
        self.up_gauge.set(0)
        if self.running:
            self._retry = self.clock.callLater(RETRY_S, self._kick)

    def _done(self, _result, waiters) -> None:
        self._reading = False
        for waiter in waiters:
            waiter.callback(None)
        if self._waiting:
            if self.up:
                self._read()
            else:
                waiting, self._waiting = self._waiting, []
                for waiter in waiting:
                    waiter.callback(None)

    def view(self) -> dict:
        """What ``/readyz`` and ``/v1/usage`` show of team mode."""
        return {"instance": self.instance, "store": self.stores.store.location,
                "ledger": "shared" if self.up else "local", "error": self.error,
                "local_since": self.local_since, "position": self.position,
                "samples_read": self.samples_read, "reads": self.reads}

    def stopService(self):
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
