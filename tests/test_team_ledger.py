"""The team ledger's timing logic with a Clock and a store whose reads the test answers: one
read serves every request that waits for it, a read that fails or hangs turns decisions to the
daemon's own view at once, and the database is tried again every second until it answers.
What is read and how it is counted is tested on a real PostgreSQL in tests/test_team.py."""
from __future__ import annotations

from types import SimpleNamespace

from twisted.internet import defer, task

from ccpd.metrics import Metrics
from ccpd.team import RETRY_S, SYNC_TIMEOUT_S, TeamLedger


class ScriptedStore:
    """``run()`` gives a Deferred the test fires, in order."""

    location = "postgresql://ccpd@db:5432/ccpd"

    def __init__(self):
        self.reads: list[defer.Deferred] = []

    def run(self, function, *args):
        d = defer.Deferred()
        self.reads.append(d)
        return d


class Recorded:
    """The governor's side: what the ledger counted into it."""

    def __init__(self):
        self.rows = []
        self.policy = SimpleNamespace(cooldowns={})
        self.watch = SimpleNamespace(restore=lambda rows: None)

    def record_samples(self, rows):
        self.rows.extend(rows)

    def update_gauges(self, now):
        pass


def make_ledger():
    clock, store, governor = task.Clock(), ScriptedStore(), Recorded()
    stores = SimpleNamespace(store=store, team_position=7,
                             config=SimpleNamespace(instance="alice", url=store.location),
                             on_recovered=lambda restore: None)
    ledger = TeamLedger(stores, governor, Metrics(), clock)
    ledger.startService()
    ledger._restored({}, [], [])  # the start-up restore is done: position 7
    return ledger, store, governor, clock


def news(position, *rows):
    return (position, list(rows), {}, [])


ROW = ("glm-4.6", 1.0, 100, 5, 0, 0, 0.5, "zai", "bob")


def test_one_read_serves_every_request_that_waited_for_it():
    ledger, store, governor, clock = make_ledger()
    store.reads[0].callback(news(7))           # the first read after the restore
    assert ledger.up and ledger.view()["ledger"] == "shared"
    first = ledger.sync()
    assert len(store.reads) == 2 and not first.called  # a decision waits for its read
    waiting = [ledger.sync() for _ in range(5)]         # they came while it ran
    assert len(store.reads) == 2
    store.reads[1].callback(news(8, ROW))
    assert first.called and not any(d.called for d in waiting)
    assert len(store.reads) == 3                         # one more read, for all five
    store.reads[2].callback(news(8))
    assert all(d.called for d in waiting)
    assert governor.rows == [ROW] and ledger.position == 8 and ledger.samples_read == 1
    assert ledger.reads == 3


def test_a_failed_read_turns_to_the_own_view_and_the_database_is_tried_every_second():
    ledger, store, governor, clock = make_ledger()
    store.reads[0].callback(news(7))
    waiting = ledger.sync()
    store.reads[1].errback(RuntimeError("connection refused\nIs the server running?"))
    assert waiting.called and waiting.result is None   # the decision goes on, on its own view
    view = ledger.view()
    assert (view["ledger"], view["error"]) == ("local", "connection refused")
    assert ledger.up_gauge._value.get() == 0
    assert ledger.sync().called and len(store.reads) == 2  # no waiting, no read meanwhile
    clock.advance(RETRY_S)
    assert len(store.reads) == 3                           # the retry
    store.reads[2].errback(RuntimeError("connection refused"))
    clock.advance(RETRY_S)
    store.reads[3].callback(news(9, ROW, ROW))             # back: caught up
    assert ledger.up and ledger.view()["error"] is None and governor.rows == [ROW, ROW]
    assert ledger.up_gauge._value.get() == 1


def test_a_read_that_hangs_gives_up_after_the_timeout():
    ledger, store, governor, clock = make_ledger()
    store.reads[0].callback(news(7))
    waiting = ledger.sync()
    clock.advance(SYNC_TIMEOUT_S - 0.01)
    assert not waiting.called
    clock.advance(0.01)
    assert waiting.called and not ledger.up
    assert ledger.view()["error"] == f"no answer within {SYNC_TIMEOUT_S:g}s"


def test_stopping_leaves_no_timer_behind():
    ledger, store, governor, clock = make_ledger()
    store.reads[0].errback(RuntimeError("down"))
    assert len(clock.getDelayedCalls()) == 1  # the retry
    ledger.stopService()
    assert clock.getDelayedCalls() == []
    # a read still running when the daemon stops ends without scheduling another
    ledger, store, governor, clock = make_ledger()
    store.reads[0].callback(news(7))
    ledger.sync()
    ledger.stopService()
    store.reads[1].errback(RuntimeError("server closed the connection"))
    assert clock.getDelayedCalls() == []
