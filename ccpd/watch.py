"""What the providers say about each lane, watched: the unified headers of every answer, the
readings of quota polls and limit answers, and lanes marked unusable. Each reading is kept in
:class:`~ccpd.evidence.ProviderEvidence` (the pure part), shown on the
``ccp_provider_*{lane,window}`` gauges, saved (``keep``, the store) when it says something
new, and used to learn the plan's cap from ccpd's count of the lane (``plans``)."""
from __future__ import annotations

import math

from twisted.logger import Logger

from ccpd.evidence import QUOTA_WINDOW, ProviderEvidence, Reading
from ccpd.lanes import last_values
from ccpd.limits import FIVE_HOUR, SEVEN_DAY, WEEKLY, read_utilization
from ccpd.metrics import Metrics

log = Logger()

UNIFIED_STATUS = b"anthropic-ratelimit-unified-status"
_UNIFIED_PREFIX = b"anthropic-ratelimit-unified-"
_LEARN_EVERY_S = 60.0  # a lane's window is learned from at most this often


class ProviderWatch:
    def __init__(self, evidence: ProviderEvidence, plans, metrics: Metrics, clock, keep=None):
        """``plans``: ccpd's count per lane (a :class:`~ccpd.quotas.QuotaEngine`); ``keep``,
        when given, has ``save_reading(reading)``."""
        self.evidence = evidence
        self.plans = plans
        self.metrics = metrics
        self.clock = clock
        self.keep = keep
        self._saved: dict[tuple[str, str], Reading] = {}
        self._learned_at: dict[tuple[str, str], float] = {}

    def restore(self, rows) -> None:
        """Readings the store kept (:meth:`Reading.to_row`), back after a restart."""
        self.evidence.restore(rows)
        for reading in self.evidence.readings.values():
            self._gauges(reading)

    def observe_answer(self, lane: str, status: int, headers) -> None:
        """Every answer of every lane: keep the utilisation the provider reports (Twisted
        ``Headers``; answers without unified headers cost one lookup), and a success makes
        a lane marked unusable usable again."""
        if status < 400 and lane in self.evidence.unusable:
            self.mark_usable(lane, f"it answered {status}")
        if not headers.hasHeader(UNIFIED_STATUS):
            return
        utilization = read_utilization(last_values(headers, _UNIFIED_PREFIX))
        if utilization is not None:
            self.observe_readings(self.evidence.observe(lane, utilization, self.clock.seconds()))

    def used_up(self, lane: str, window: str, reset_at: float, now: float) -> None:
        """A limit answer said ``window`` of ``lane`` is used up until ``reset_at``."""
        self.observe_readings([self.evidence.put(
            Reading(lane, window, 1.0, reset_at, "rejected", now, "limit"))])

    def observe_readings(self, readings: list[Reading]) -> None:
        """New readings (from answers, limit answers or a quota poll): gauges, the store,
        and a learned-limit sample for the windows ccpd counts too."""
        for reading in readings:
            key = (reading.lane, reading.window)
            self._gauges(reading)
            if self.keep is not None and reading.news_since(self._saved.get(key)):
                self._saved[key] = reading
                self.keep.save_reading(reading)
            ours = QUOTA_WINDOW.get(reading.window)
            if ours and reading.observed_at - self._learned_at.get(key, -math.inf) \
                    >= _LEARN_EVERY_S and reading.lane in self.plans.models:
                self._learned_at[key] = reading.observed_at
                counted = self.plans.state(reading.lane, reading.observed_at)
                used = counted.rolling if ours == "rolling" else counted.weekly
                self.evidence.learn(reading.lane, reading.window, used.used_tokens,
                                    reading.utilization)

    def usage_fields(self, lane: str, now: float) -> dict:
        """The provider's figures of ``lane`` for a usage line (fresh readings only)."""
        fields = {}
        if self.evidence.readings:
            readings = self.evidence.fresh(lane, now)
            for windows, field in (((FIVE_HOUR,), "provider_utilization_5h"),
                                   ((SEVEN_DAY, WEEKLY), "provider_utilization_7d")):
                for window in windows:
                    if window in readings:
                        fields[field] = readings[window].utilization
        return fields

    def mark_unusable(self, lane: str, why: str, message: str | None) -> None:
        if self.evidence.mark_unusable(lane, why):
            self.metrics.lane_unusable.labels(lane).set(1)
            log.warn("lane {lane} cannot serve until it answers again or quotas are "
                     "reloaded: {why} ({message})", lane=lane, why=why, message=message)

    def mark_usable(self, lane: str, why: str) -> None:
        if self.evidence.mark_usable(lane):
            self.metrics.lane_unusable.labels(lane).set(0)
            log.info("lane {lane} is usable again: {why}", lane=lane, why=why)

    def _gauges(self, reading: Reading) -> None:
        if reading.utilization is not None:
            self.metrics.provider_utilization.labels(reading.lane, reading.window).set(
                reading.utilization)
        if reading.reset_at is not None:
            self.metrics.provider_reset.labels(reading.lane, reading.window).set(
                reading.reset_at)
