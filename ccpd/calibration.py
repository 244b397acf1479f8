"""Calibrating quota warnings from what providers really do.

Two kinds of evidence, per model:

- reset gaps, per window: ``calc_reset_eta_sec - observed_reset_eta_sec``, where the calculated
  ETA is when ccpd's window would next free usage and the observed one is when the provider said
  its limit lifts (``retry-after``, ``anthropic-ratelimit-*-reset``, Z.AI's "reset at"); one
  sample per limit answer, refreshed by the sampler until that reset passes;
- limit multipliers: the fraction of the configured limit ccpd had counted when the provider
  cut it off (1.0: the provider's limit is the configured one), from live limit answers and from
  ``results/GLM_LIMIT_PROBE.md``.

From them, ``warn_pct_auto``: the configured ``warn_pct`` scaled by the median multiplier and
lowered by a negative median gap (a provider that holds usage longer than ccpd thinks). With
fewer than ``min_samples`` samples it is the configured ``warn_pct``. Pure logic, no I/O except
:func:`read_probe_results`.
"""
from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass

from ccpd.quotas import percentile

WINDOWS = ("rolling", "weekly")
MIN_SAMPLES = 5
RING_SIZE = 128
SAME_EVENT_S = 60.0
_FULL_CONFIDENCE_SAMPLES = 20
_WARN_FLOOR, _WARN_CEILING = 0.05, 0.99

PROBE_COLUMNS = ("timestamp", "vendor", "model", "repeat", "tokens", "first_429_index",
                 "calc_headroom", "inferred_multiplier", "upstream_status", "gap_seconds",
                 "hour_of_day")


@dataclass(frozen=True)
class AutoWarn:
    warn_pct_auto: float
    confidence: float
    min_samples_reached: bool
    limit_multiplier: float


@dataclass
class _PendingReset:
    """A provider-reported reset still ahead: one limit event, one gap sample, refreshed by
    the sampler until the reset passes."""

    reset_at: float
    gap: float | None


class Calibration:
    """Ring buffers of reset gaps (per model and window) and limit multipliers (per model).

    Live evidence (limit answers) goes to the rings; the probe results file is kept apart and
    replaced whole each time the file changes, so re-reading it never counts a row twice.
    """

    def __init__(self, min_samples: int = MIN_SAMPLES, ring_size: int = RING_SIZE):
        self.min_samples = min_samples
        self.ring_size = ring_size
        self._gaps: dict[tuple[str, str], deque] = {}
        self._multipliers: dict[str, deque] = {}
        self._probe_gaps: dict[tuple[str, str], list[float]] = {}
        self._probe_multipliers: dict[str, list[float]] = {}
        self.pending: dict[tuple[str, str], _PendingReset] = {}
        self._last_event: dict[tuple[str, str], float] = {}

    def _ring(self, table: dict, key) -> deque:
        ring = table.get(key)
        if ring is None:
            ring = table[key] = deque(maxlen=self.ring_size)
        return ring

    def add_gap(self, model: str, window: str, gap_seconds: float) -> None:
        self._ring(self._gaps, (model, window)).append(float(gap_seconds))

    def add_multiplier(self, model: str, multiplier: float) -> None:
        if multiplier > 0:
            self._ring(self._multipliers, model).append(float(multiplier))

    def observe_limit(self, model: str, window: str, now: float, calc_eta: float | None,
                      observed_reset: float | None, used_fraction: float | None) -> bool:
        """A provider limit answer: a pending gap sample (when the provider said when its
        limit lifts) and a multiplier sample (when the window has a configured limit).

        Answers naming the same reset (within ``SAME_EVENT_S``), or with no reset within
        ``SAME_EVENT_S`` of the last one, are one event: run2cap meets the same cap on every
        request, and that is one piece of evidence, not thirty. True for a new event."""
        key = (model, window)
        pending = self.pending.get(key)
        last = self._last_event.get(key)
        if observed_reset is not None and observed_reset > now:
            if pending is not None and abs(pending.reset_at - observed_reset) <= SAME_EVENT_S:
                self.sample(model, window, now, calc_eta)
                return False
            self._settle(model, window)
            self.pending[key] = _PendingReset(
                observed_reset, None if calc_eta is None else calc_eta - (observed_reset - now))
        elif last is not None and now - last <= SAME_EVENT_S:
            return False
        self._last_event[key] = now
        if used_fraction is not None:
            self.add_multiplier(model, used_fraction)
        return True

    def sample(self, model: str, window: str, now: float, calc_eta: float | None) -> bool:
        """The sampler's tick: while a reported reset is still ahead, refresh its gap from the
        window's current ETA; once it passed, keep its last gap for good. True when refreshed."""
        pending = self.pending.get((model, window))
        if pending is None:
            return False
        if pending.reset_at <= now:
            self._settle(model, window)
            return False
        if calc_eta is None:
            return False
        pending.gap = calc_eta - (pending.reset_at - now)
        return True

    def _settle(self, model: str, window: str) -> None:
        pending = self.pending.pop((model, window), None)
        if pending is not None and pending.gap is not None:
            self.add_gap(model, window, pending.gap)

    def _all_gaps(self, model: str, window: str) -> list[float]:
        pending = self.pending.get((model, window))
        return (self._probe_gaps.get((model, window), [])
                + list(self._gaps.get((model, window), ()))
                + ([pending.gap] if pending is not None and pending.gap is not None else []))

    def _all_multipliers(self, model: str) -> list[float]:
        return self._probe_multipliers.get(model, []) + list(self._multipliers.get(model, ()))

    def gap_stats(self, model: str, window: str) -> dict:
        gaps = self._all_gaps(model, window)
        p50, p95 = percentile(gaps, 0.5), percentile(gaps, 0.95)
        return {"gap_seconds_p50": None if p50 is None else round(p50, 1),
                "gap_seconds_p95": None if p95 is None else round(p95, 1),
                "gap_samples": len(gaps)}

    def multiplier_samples(self, model: str) -> int:
        return len(self._all_multipliers(model))

    def auto_warn(self, model: str, warn_pct: float, window_seconds: float) -> AutoWarn:
        gaps = self._all_gaps(model, "rolling")
        multipliers = self._all_multipliers(model)
        samples = len(gaps) + len(multipliers)
        confidence = round(min(1.0, samples / _FULL_CONFIDENCE_SAMPLES), 3)
        if samples < self.min_samples:
            return AutoWarn(warn_pct, confidence, False, 1.0)
        multiplier = percentile(multipliers, 0.5) if multipliers else 1.0
        gap = percentile(gaps, 0.5) if gaps else 0.0
        auto = warn_pct * multiplier + min(0.0, gap) / window_seconds
        auto = min(_WARN_CEILING, max(_WARN_FLOOR, auto))
        return AutoWarn(round(auto, 4), confidence, True, round(multiplier, 4))

    def set_probe_rows(self, rows: list[dict], default_model: str = "glm-4.6") -> int:
        """Replace the samples of the probe results file with these parsed rows; returns how
        many rows gave a sample."""
        gaps: dict[tuple[str, str], list[float]] = {}
        multipliers: dict[str, list[float]] = {}
        used = 0
        for row in rows:
            model = row.get("model") or default_model
            multiplier, gap = row.get("inferred_multiplier"), row.get("gap_seconds")
            if isinstance(multiplier, float) and multiplier > 0:
                multipliers.setdefault(model, []).append(multiplier)
            if isinstance(gap, float):
                gaps.setdefault((model, "rolling"), []).append(gap)
            used += isinstance(multiplier, float) or isinstance(gap, float)
        self._probe_gaps, self._probe_multipliers = gaps, multipliers
        return used


def parse_probe_results(text: str) -> list[dict]:
    """The rows of the Markdown table(s) in a ``GLM_LIMIT_PROBE.md`` file.

    Columns are found by their header names (any order, unknown ones ignored); numeric cells
    become floats, ``-`` or empty cells None. Lines outside tables are ignored.
    """
    rows, header = [], None
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            header = None
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if header is None:
            header = [cell.lower() for cell in cells]
            continue
        if all(set(cell) <= set("-: ") for cell in cells):
            continue  # the separator row
        row = {}
        for name, cell in zip(header, cells):
            if name not in PROBE_COLUMNS:
                continue
            if name in ("timestamp", "vendor", "model"):
                row[name] = cell or None
                continue
            try:
                row[name] = float(cell)
            except ValueError:
                row[name] = None
        rows.append(row)
    return rows


def read_probe_results(path: str) -> list[dict]:
    """Rows of the probe results file; an absent file has none (it is optional)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return parse_probe_results(f.read())
