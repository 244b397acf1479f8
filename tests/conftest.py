"""Fixtures only; the helpers they use live in :mod:`tests.support`."""
from __future__ import annotations

import pytest
import pytest_twisted

from ccpd.testing.fakeupstream import FakeUpstream
# ccpd_ini and RunningCcpd are imported from here by modules written before tests/support.py
from tests.support import (RunningCcpd, build_memory_ccpd, ccpd_ini,  # noqa: F401
                           start_loopback_ccpd)


@pytest.fixture
def make_fake():
    """Start loopback fake upstreams (``make_fake(limit_tokens=0)``); stopped after the test."""
    from twisted.internet import reactor
    ports = []

    def make(**options) -> FakeUpstream:
        fake = FakeUpstream(reactor, **options)
        ports.append(fake.listen(0))
        return fake

    yield make
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def fake_upstream(make_fake):
    return make_fake()


@pytest.fixture
def start_ccpd(tmp_path):
    """Start ccpd in this process on loopback against the given upstream
    (``await start(url, **options)``, see :func:`tests.support.start_loopback_ccpd`); stopped
    after the test."""
    running = []

    async def start(upstream_url: str, **options) -> RunningCcpd:
        ccpd = await start_loopback_ccpd(tmp_path, upstream_url, **options)
        running.append(ccpd)
        return ccpd

    yield start
    for ccpd in running:
        pytest_twisted.blockon(ccpd.service.stopService())


@pytest.fixture
def memory_ccpd(tmp_path):
    """Start ccpd in memory on a Clock (``memory_ccpd(**options)``, see
    :func:`tests.support.build_memory_ccpd`); stopped after the test."""
    running = []

    def start(**options):
        ccpd = build_memory_ccpd(tmp_path, **options)
        running.append(ccpd)
        return ccpd

    yield start
    for ccpd in running:
        ccpd.stop()


# -- PostgreSQL (tests/pg.py) ---------------------------------------------------------------------

@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL server for the session (:class:`tests.pg.PostgresServer`), stopped
    and removed at its end; every test using it is skipped, with the reason, where PostgreSQL
    cannot be had (:func:`tests.pg.skip_reason`)."""
    from tests import pg
    reason = pg.skip_reason()
    if reason is not None:
        pytest.skip(f"PostgreSQL: {reason}")
    with pg.PostgresServer() as server:
        yield server


@pytest.fixture
def postgres(postgres_server):
    """A fresh database of its own on the session's server (a :class:`tests.pg.Database`:
    ``postgres.dsn``; ``postgres.server`` to ``restart()``, ``stop()``, ``kill()``, ``start()``
    it or make more with ``fresh_database()``). Afterwards the server runs again, whatever the
    test did to it, and the database is dropped."""
    database = postgres_server.fresh_database()
    yield database
    postgres_server.start()
    database.drop()
