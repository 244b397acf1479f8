"""The periodic jobs, each a timer service of its own: the calibration sampler, the watcher of
the GLM probe results file, and the lanes' readiness probes. A failing tick is logged and the next
one still runs (a bare LoopingCall stops for good after one exception)."""
from __future__ import annotations

import os

from twisted.application.internet import TimerService
from twisted.logger import Logger

from ccpd.calibration import Calibration, read_probe_results

log = Logger()


class _Timer(TimerService):
    def __init__(self, interval_s: float, clock=None):
        super().__init__(interval_s, self._safe_tick)
        if clock is not None:
            self.clock = clock

    def _safe_tick(self) -> None:
        try:
            self.tick()
        except Exception:  # noqa: BLE001 - keep ticking whatever one tick did
            log.failure("{name} failed", name=self.name)

    def tick(self) -> None:
        raise NotImplementedError


class CalibrationSampler(_Timer):
    """Every ``interval_s``: gap samples for limits still pending, fresh headroom gauges, and
    a log line for an auto warn % in use at low confidence. Makes no external call."""

    name = "calibration-sampler"

    def __init__(self, governor, interval_s: float, clock=None):
        super().__init__(interval_s, clock)
        self.governor = governor

    def tick(self) -> None:
        governor = self.governor
        now = governor.clock.seconds()
        for model in sorted(governor.engine.quotas):
            for window in governor.engine.state(model, now).windows:
                governor.calibration.sample(model, window.name, now, window.reset_eta_sec)
            warn = governor.auto_warn(model)
            if warn.confidence < 0.5 and warn.min_samples_reached:
                log.info("calibration of {model}: warn_pct_auto {pct} at low confidence "
                         "{confidence}", model=model, pct=warn.warn_pct_auto,
                         confidence=warn.confidence)
        governor.update_gauges(now)


class LaneProber(_Timer):
    """Probes one lane every ``probe_interval`` (and at start), so ``ccp_lane_up`` and
    ``ccp_lane_probe_seconds`` always say how the lane is, and ``/readyz`` answers from the
    latest result. A probe's failure is its result ("down"), never the timer's end."""

    def __init__(self, lanes, lane, clock=None):
        super().__init__(lane.config.probe_interval, clock)
        self.name = f"lane-prober:{lane.name}"
        self.lanes = lanes
        self.lane = lane

    def tick(self) -> None:
        self.lanes.probe(self.lane, max_age=0)


class ProbeResultsWatcher(_Timer):
    """Reads the GLM probe results file (``[calibration] probe_results``) into the
    calibration whenever it is new or changed; a missing file is simply not there yet."""

    name = "probe-results-watcher"

    def __init__(self, path: str, calibration: Calibration, interval_s: float, clock=None):
        super().__init__(interval_s, clock)
        self.path = path
        self.calibration = calibration
        self._mtime: float | None = None

    def tick(self) -> int:
        """Rows used (0 when the file is missing or unchanged)."""
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError:
            return 0
        if mtime == self._mtime:
            return 0
        self._mtime = mtime
        used = self.calibration.set_probe_rows(read_probe_results(self.path))
        log.info("calibration: {rows} samples from {path}", rows=used, path=self.path)
        return used
