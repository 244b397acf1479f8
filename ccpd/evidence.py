"""What the providers themselves say about each lane: the latest utilisation per window (from
the unified headers of every answer, or a lane's own quota endpoint), lanes that cannot serve
until someone acts, and the limits those readings imply.

Pure logic: no reactor and no I/O; every call takes ``now``. A lane is one account or plan, so
readings are kept per lane, and per provider window (``five_hour``, ``seven_day``, ...).
"""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

from ccpd.limits import FIVE_HOUR, SEVEN_DAY, WEEKLY, ProviderUtilization

# ccpd's own quota window that each provider window is a reading of.
# (Anthropic reports seven_day; Z.AI's quota endpoint, its weekly window.)
QUOTA_WINDOW = {FIVE_HOUR: "rolling", SEVEN_DAY: "weekly", WEEKLY: "weekly"}
_STATES = ("ok", "warn", "block")
# Readings of the whole lane rather than one window: the unified status (with its reset and
# representative claim) and the overage status. Kept and shown, never judged as a window: an
# overage status "rejected" only means no extra usage beyond the plan. (A limit answer whose
# claim is the ``overage`` window is a window reading, and is judged.)
UNIFIED, OVERAGE_STATUS = "unified", "overage_status"
LANE_WIDE = (UNIFIED, OVERAGE_STATUS)
SAVE_EVERY_S = 60.0  # an unchanged window's reading is worth saving at most this often
# Utilisation below this says too little about the cap to learn it (1 % of 2M tokens = 20k).
_MIN_LEARNING_UTILIZATION = 0.02
_CAP_SAMPLES = 64


@dataclass(frozen=True)
class Reading:
    """One window of one lane, as the provider reported it (``window`` ``unified`` and
    ``overage_status``: the lane as a whole)."""

    lane: str
    window: str
    utilization: float | None
    reset_at: float | None
    status: str | None
    observed_at: float
    source: str = "headers"    # headers | poll | limit (a limit answer said it is used up)
    surpassed_threshold: float | None = None  # the warning threshold the window passed
    claim: str | None = None   # unified: the window that decides (representative claim)

    def age(self, now: float) -> float:
        return max(0.0, now - self.observed_at)

    def to_row(self) -> tuple:
        return (self.lane, self.window, self.utilization, self.reset_at, self.status,
                self.observed_at, self.source, self.surpassed_threshold, self.claim)

    def news_since(self, saved: Reading | None) -> bool:
        """Whether this says something ``saved`` (the last one kept) does not: a new status
        or reset, a figure that moved by a point or more, or a minute gone by."""
        return (saved is None or saved.status != self.status or saved.reset_at != self.reset_at
                or abs((saved.utilization or 0.0) - (self.utilization or 0.0)) >= 0.01
                or self.observed_at - saved.observed_at >= SAVE_EVERY_S)


@dataclass(frozen=True)
class LearnedLimit:
    """The cap a window's readings imply: tokens ccpd counted in it ÷ the provider's figure."""

    tokens: int
    samples: int
    confidence: float  # 0-1: more samples that agree, more confidence


class ProviderEvidence:
    """Per lane: the newest reading of each window, the lane's overall status, whether it can
    serve at all, and the implied caps learned from readings.

    A reading is fresh while younger than ``max_age``; a window the provider said is used up
    (``rejected``) stays so until its reset, however old the word. A lane blocks at
    ``rejected`` or at a utilisation of ``block_at``."""

    def __init__(self, max_age: float = 600.0, block_at: float = 0.98):
        self.max_age = max_age
        self.block_at = block_at
        self.readings: dict[tuple[str, str], Reading] = {}
        self.unusable: dict[str, str] = {}  # lane -> why (an account problem)
        self._caps: dict[tuple[str, str], deque] = {}

    # -- readings --------------------------------------------------------------------------------

    def observe(self, lane: str, reading: ProviderUtilization, now: float,
                source: str = "headers") -> list[Reading]:
        """Keep what one answer (or one poll) said; returns the readings kept."""
        kept = [self.put(Reading(lane, UNIFIED, None, reading.reset_at, reading.status, now,
                                 source, claim=reading.representative_claim))]
        if reading.overage_status:
            kept.append(self.put(Reading(lane, OVERAGE_STATUS, None, None,
                                         reading.overage_status, now, source)))
        for window, figures in reading.windows.items():
            kept.append(self.put(Reading(lane, window, figures.utilization, figures.reset_at,
                                         figures.status, now, source,
                                         figures.surpassed_threshold)))
        return kept

    def put(self, reading: Reading) -> Reading:
        self.readings[(reading.lane, reading.window)] = reading
        return reading

    def restore(self, rows) -> None:
        """Readings saved by :meth:`Reading.to_row` (the store keeps them across restarts)."""
        for row in rows:
            reading = Reading(*row)
            current = self.readings.get((reading.lane, reading.window))
            if current is None or current.observed_at < reading.observed_at:
                self.put(reading)

    def reading(self, lane: str, window: str, now: float,
                max_age: float | None = None) -> Reading | None:
        """The newest reading of ``window``; None when there is none, it is older than
        ``max_age``, or its window has reset since (the figure no longer describes it)."""
        reading = self.readings.get((lane, window))
        if reading is None:
            return None
        if reading.reset_at is not None and reading.reset_at <= now:
            return None
        if max_age is not None and reading.age(now) > max_age:
            return None
        return reading

    def lane_readings(self, lane: str, now: float) -> list[Reading]:
        return [reading for (name, window), reading in sorted(self.readings.items())
                if name == lane and self.reading(lane, window, now) is not None]

    def is_fresh(self, reading: Reading, now: float) -> bool:
        return reading.age(now) <= self.max_age or (reading.status == "rejected"
                                                    and reading.reset_at is not None)

    def fresh(self, lane: str, now: float) -> dict[str, Reading]:
        """The readings of ``lane`` that decisions may use, by provider window."""
        return {reading.window: reading for reading in self.lane_readings(lane, now)
                if reading.window not in LANE_WIDE and self.is_fresh(reading, now)}

    def blocks(self, reading: Reading) -> bool:
        return reading.status == "rejected" or (reading.utilization or 0.0) >= self.block_at

    def judge(self, lane: str, now: float, warn_at: float) -> tuple[str, str, set[str]]:
        """``(state, reason, ccpd windows covered)`` of ``lane`` from its fresh readings:
        ``block``, ``warn`` at ``warn_at`` of a window, else ``ok``."""
        state, reason, covered = "ok", "", set()
        for window, reading in sorted(self.fresh(lane, now).items()):
            if window in QUOTA_WINDOW:
                covered.add(QUOTA_WINDOW[window])
            here = ("block" if self.blocks(reading) else
                    "warn" if (reading.utilization or 0.0) >= warn_at else "ok")
            if _STATES.index(here) > _STATES.index(state):
                state = here
                reason = (f"provider reports {window} of lane {lane} " + (
                    "rejected" if reading.status == "rejected"
                    else f"at {reading.utilization:.0%}"))
        return state, reason, covered

    # -- lanes that cannot serve -----------------------------------------------------------------

    def mark_unusable(self, lane: str, reason: str) -> bool:
        """True when this is news (the lane was usable)."""
        news = lane not in self.unusable
        self.unusable[lane] = reason
        return news

    def mark_usable(self, lane: str) -> bool:
        return self.unusable.pop(lane, None) is not None

    # -- learned limits --------------------------------------------------------------------------

    def learn(self, lane: str, window: str, counted_tokens: int, utilization: float | None
              ) -> None:
        """One implied-cap sample: ccpd counted ``counted_tokens`` in the window while the
        provider reported ``utilization`` of it."""
        if utilization is None or utilization < _MIN_LEARNING_UTILIZATION or counted_tokens <= 0:
            return
        samples = self._caps.setdefault((lane, window), deque(maxlen=_CAP_SAMPLES))
        samples.append(counted_tokens / utilization)

    def learned_limit(self, lane: str, window: str) -> LearnedLimit | None:
        samples = list(self._caps.get((lane, window), ()))
        if not samples:
            return None
        median = statistics.median(samples)
        if len(samples) > 1:
            quartiles = statistics.quantiles(samples, n=4)
            spread = (quartiles[2] - quartiles[0]) / median if median else 1.0
        else:
            spread = 1.0
        confidence = min(1.0, len(samples) / 10) * max(0.0, 1.0 - min(1.0, spread))
        return LearnedLimit(round(median), len(samples), round(confidence, 3))
