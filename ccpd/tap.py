"""twistd entry point: ``twistd -n ccpd --config etc/ccp.ini`` builds the ccpd service tree.

``makeService`` only wires; every service owns and releases its own resources.
"""
from __future__ import annotations

import gc
import os
from typing import Mapping

from twisted.application import service, strports
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from ccpd.config import Config, ConfigError, load_config
from ccpd.daemonlog import JsonLogService
from ccpd.governor import Governor
from ccpd.lanes import Lanes
from ccpd.metrics import Metrics
from ccpd.quotapoll import QuotaPoller
from ccpd.quotas import QuotaError, Quotas, load_quotas
from ccpd.recorder import USAGE_LOG, Recorder
from ccpd.store.service import StoreService
from ccpd.team import TeamLedger
from ccpd.timers import CalibrationSampler, LaneProber, ProbeResultsWatcher
from ccpd.web.app import CcpdApp
from ccpd.web.site import CcpdSite

log = Logger()

STOP_GRACE_S = 10.0  # systemd's default stop timeout is 90 s


class Options(usage.Options):
    optParameters = [["config", "c", "etc/ccp.ini", "Path to the ccpd INI file."]]

    def postOptions(self):
        try:
            self.loaded = load_config(self["config"])
            self.quotas = load_quotas(self.loaded.quotas_file)
        except (ConfigError, QuotaError) as e:
            raise usage.UsageError(str(e)) from None


class CcpdService(service.MultiService):
    """The whole daemon; ``app`` is kept for tests and in-process tools."""

    def __init__(self, config: Config, app: CcpdApp):
        super().__init__()
        self.config = config
        self.app = app

    def startService(self):
        log.info("ccpd starting: listen {listen}, lanes {lanes}, default lane {default}",
                 listen=self.config.server.listen, lanes=", ".join(self.config.lanes),
                 default=self.config.routing.default_lane)
        super().startService()

    @defer.inlineCallbacks
    def stopService(self):
        """Stop listening, let the requests in flight finish (for at most ``STOP_GRACE_S``,
        then cut them off, which still writes their usage lines), then stop the rest in
        reverse order: the store drains its queue before the logs close."""
        service.Service.stopService(self)
        yield self.web.stopService()
        yield self.app.proxy.drain(STOP_GRACE_S)
        for child in reversed(list(self)):
            if child is not self.web and child.running:
                yield child.stopService()


def with_backlog(listen: str, backlog: int) -> str:
    """The endpoint string with its listen backlog (Twisted's default of 50 makes a burst of
    connections wait for SYN retransmits, whole seconds)."""
    if listen.partition(":")[0].lower() in ("tcp", "tcp6", "ssl", "unix"):
        return f"{listen}:backlog={backlog}"
    return listen


def build_service(config: Config, reactor, environ: Mapping[str, str] = os.environ,
                  quotas: Quotas | None = None) -> CcpdService:
    """The service tree; ``quotas`` defaults to the quotas file of ``config``.

    Services start in the order added and stop in reverse (see
    :meth:`CcpdService.stopService`).
    """
    metrics = Metrics()
    lanes = Lanes(config.lanes, reactor, environ, metrics)
    recorder = Recorder(config.logs, metrics, config.routing.reroute_mode, reactor)
    store = StoreService(config.store, os.path.join(config.logs.dir, USAGE_LOG), metrics,
                         reactor)
    governor = Governor(config, load_quotas(config.quotas_file) if quotas is None else quotas,
                        metrics, reactor, keep=store)
    store.on_recovered(governor.restore)
    if config.store.team:
        governor.team = TeamLedger(store, governor, metrics, reactor)
    recorder.sinks.append(store.writer.add)
    app = CcpdApp(config, lanes, recorder, metrics, governor, store, reactor)
    top = CcpdService(config, app)
    if config.logs.json_log:
        JsonLogService(config.logs).setServiceParent(top)
    sample_s = config.calibration.sample_minutes * 60
    for child in (lanes, recorder,
                  CalibrationSampler(governor, sample_s, clock=reactor),
                  ProbeResultsWatcher(config.calibration.probe_results, governor.calibration,
                                      sample_s, clock=reactor),
                  QuotaPoller(lanes, governor.evidence, metrics, reactor,
                              on_readings=governor.watch.observe_readings),
                  *(LaneProber(lanes, lane, clock=reactor) for lane in lanes),
                  store, *([governor.team] if governor.team else [])):
        child.setServiceParent(top)
    server = config.server
    site = CcpdSite(app.resource(), server.max_body_bytes, server.header_timeout_s,
                    metrics.refused, reactor=reactor)
    top.web = strports.service(with_backlog(server.listen, server.backlog), site,
                               reactor=reactor)
    top.web.setServiceParent(top)
    return top


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    config = getattr(options, "loaded", None) or load_config(options["config"])
    reactor.callWhenRunning(_tune_garbage_collector)
    return build_service(config, reactor, quotas=getattr(options, "quotas", None))


# A young collection once this many more container objects are alive than at the last one
# (CPython's default: 700). Requests in flight together hold a few hundred each, so at 700 the
# collector ran every ~10 requests to find almost nothing (requests free what they make);
# cyclic garbage, should any pile up, is still collected once it reaches this count.
GC_YOUNG_THRESHOLD = 5000


def _tune_garbage_collector() -> None:
    """Tune the garbage collector for a long-running proxy, once the reactor runs. What
    start-up built lives as long as the daemon: frozen out of the collector's sight, a full
    collection no longer walks it; and young collections run only past
    :data:`GC_YOUNG_THRESHOLD`. Under the 32-connection benchmark the collector's time per
    request went from about 45 us to 18 us (freeze) and then to under 0.1 us (threshold):
    docs/BENCHMARKS.md. Done for the twistd daemon only: tests build many services in one
    process."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
