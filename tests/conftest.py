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
