"""Token quotas over a rolling window and a weekly window, per model and per lane (a lane is
one plan or account: its limits cover every model it serves), and the speeds seen.

Pure logic: no reactor and no I/O; every call takes ``now`` (epoch seconds). Usage is kept in
fixed time buckets with running sums, so recording a request costs the same however long the
history is. Tokens drive warn and block; hours are reported as telemetry only.
"""
from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field

from ccpd import jsonparse

WEEK_SECONDS = 7 * 24 * 3600
_ROLLING_BUCKET_S = 60
_WEEKLY_BUCKET_S = 3600
_SPEED_SAMPLES = 256
_NEED_SAMPLES = 32


class QuotaError(ValueError):
    """A quotas file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class ModelQuota:
    rolling_window_hours: float = 5.0
    rolling_limit_tokens: int | None = None
    weekly_limit_tokens: int | None = None
    warn_pct: float = 0.8
    count_cache_read: bool = False
    rolling_limit_hours: float | None = None  # telemetry only
    weekly_limit_hours: float | None = None   # telemetry only

    def quota_tokens(self, input_tokens: int, output_tokens: int, cache_creation: int,
                     cache_read: int) -> int:
        return (input_tokens + cache_creation + output_tokens
                + (cache_read if self.count_cache_read else 0))

    def limit(self, window: str) -> int | None:
        return self.rolling_limit_tokens if window == "rolling" else self.weekly_limit_tokens

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


_DEFAULT_QUOTA = ModelQuota()


class Quotas(dict):
    """The quotas of a file: model name -> :class:`ModelQuota`, plus plan limits per lane in
    ``lanes`` (lane name -> :class:`ModelQuota`). Both apply; the tighter decides."""

    def __init__(self, models=(), lanes=None):
        super().__init__(models)
        self.lanes: dict[str, ModelQuota] = dict(lanes or {})


def _number(where: str, value, *, integer: bool = False, low: float = 0.0,
            high: float = math.inf, low_open: bool = True):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise QuotaError(f"{where}: must be a number, not {json.dumps(value)[:40]}")
    if integer and value != int(value):
        raise QuotaError(f"{where}: must be a whole number of tokens, not {value}")
    if value < low or (low_open and value == low) or value > high:
        bound = f"above {low:g}" if low_open else f"at least {low:g}"
        raise QuotaError(f"{where}: must be {bound}" + (f" and at most {high:g}"
                                                         if high != math.inf else "")
                         + f", not {value}")
    return int(value) if integer else float(value)


def parse_quotas(text: str, source: str) -> Quotas:
    """The quotas of a ``quotas.json`` text; :class:`QuotaError` names ``source`` and the key.

    ``{"models": {...}, "lanes": {...}}``: ``lanes`` (plan limits, same keys) is optional."""
    try:
        document = jsonparse.loads(text)
    except ValueError as e:
        raise QuotaError(f"{source}: not valid JSON: {e}") from None
    if not isinstance(document, dict) or not isinstance(document.get("models"), dict):
        raise QuotaError(f'{source}: must be an object with a "models" object')
    unknown = set(document) - {"models", "lanes"}
    if unknown:
        raise QuotaError(f"{source}: unknown key {sorted(unknown)[0]!r}")
    if not isinstance(document.get("lanes", {}), dict):
        raise QuotaError(f'{source}: lanes: must be an object of lane names')
    return Quotas(_entries(document["models"], f"{source}: models"),
                  _entries(document.get("lanes", {}), f"{source}: lanes"))


def _entries(entries: dict, where_prefix: str) -> dict[str, ModelQuota]:
    quotas = {}
    for model, entry in entries.items():
        where = f"{where_prefix}.{model}"
        if not isinstance(entry, dict):
            raise QuotaError(f"{where}: must be an object")
        known = ModelQuota.__dataclass_fields__
        for key in entry:
            if key not in known:
                raise QuotaError(f"{where}.{key}: unknown key")
        values = {}
        for key, value in entry.items():
            at = f"{where}.{key}"
            if key == "count_cache_read":
                if not isinstance(value, bool):
                    raise QuotaError(f"{at}: must be true or false")
                values[key] = value
            elif value is None and key not in ("rolling_window_hours", "warn_pct"):
                values[key] = None
            elif key == "warn_pct":
                values[key] = _number(at, value, high=1.0)
            elif key == "rolling_window_hours":
                values[key] = _number(at, value, high=WEEK_SECONDS / 3600)
            elif key.endswith("_tokens"):
                values[key] = _number(at, value, integer=True)
            else:
                values[key] = _number(at, value)
        quotas[model] = ModelQuota(**values)
    return quotas


def load_quotas(path: str) -> Quotas:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise QuotaError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise QuotaError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return parse_quotas(text, path)


class Window:
    """Token and second sums over the last ``length`` seconds, in ``bucket``-second buckets."""

    def __init__(self, length: float, bucket: float):
        self.length = length
        self.bucket = bucket
        self._buckets: deque[list] = deque()  # [start, tokens, seconds]
        self.tokens = 0
        self.seconds = 0.0

    def add(self, now: float, tokens: int, seconds: float) -> None:
        self.expire(now)
        start = now - now % self.bucket
        buckets = self._buckets
        position = len(buckets)
        while position and buckets[position - 1][0] > start:
            position -= 1  # an out-of-order (replayed) sample: rare, and near the end
        if position and buckets[position - 1][0] == start:
            bucket = buckets[position - 1]
            bucket[1] += tokens
            bucket[2] += seconds
        else:
            buckets.insert(position, [start, tokens, seconds])
        self.tokens += tokens
        self.seconds += seconds

    def expire(self, now: float) -> None:
        buckets = self._buckets
        while buckets and buckets[0][0] + self.bucket <= now - self.length:
            _, tokens, seconds = buckets.popleft()
            self.tokens -= tokens
            self.seconds -= seconds
        if not buckets:
            self.seconds = 0.0

    def reset_eta(self, now: float) -> float | None:
        """Seconds until the oldest usage in the window leaves it; None when it is empty."""
        self.expire(now)
        if not self._buckets:
            return None
        return max(0.0, self._buckets[0][0] + self.bucket + self.length - now)

    def seconds_until_below(self, tokens: int, now: float) -> float:
        """Seconds until the window holds fewer than ``tokens`` (0 when it already does)."""
        self.expire(now)
        left = self.tokens
        if left < tokens:
            return 0.0
        for start, bucket_tokens, _ in self._buckets:
            left -= bucket_tokens
            if left < tokens:
                return max(0.0, start + self.bucket + self.length - now)
        return self.length  # only when ``tokens`` <= 0: no amount of waiting makes room


@dataclass
class _Speed:
    output_tokens: int
    stream_s: float
    total_s: float
    ttft_s: float | None


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0-1) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class ModelUsage:
    """What ccpd has seen of one model since it started."""

    rolling: Window
    weekly: Window
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    speeds: deque = field(default_factory=lambda: deque(maxlen=_SPEED_SAMPLES))
    needs: deque = field(default_factory=lambda: deque(maxlen=_NEED_SAMPLES))

    def window(self, name: str) -> Window:
        return self.rolling if name == "rolling" else self.weekly


@dataclass(frozen=True)
class WindowState:
    name: str
    window_hours: float
    used_tokens: int
    limit_tokens: int | None
    used_hours: float
    limit_hours: float | None
    reset_eta_sec: float | None

    @property
    def headroom_tokens(self) -> int | None:
        return None if self.limit_tokens is None else max(0, self.limit_tokens - self.used_tokens)

    @property
    def headroom_pct(self) -> float | None:
        if self.limit_tokens is None:
            return None
        return round(100.0 * self.headroom_tokens / self.limit_tokens, 3)


@dataclass(frozen=True)
class QuotaState:
    """A model's quota standing at one moment."""

    model: str
    quota: ModelQuota | None
    rolling: WindowState
    weekly: WindowState
    warn_pct: float
    predicted_need: int

    @property
    def windows(self) -> tuple[WindowState, WindowState]:
        return self.rolling, self.weekly

    def window_state(self, window: WindowState) -> str:
        if window.limit_tokens is None:
            return "ok"
        if window.used_tokens >= window.limit_tokens:
            return "block"
        if window.used_tokens >= self.warn_pct * window.limit_tokens:
            return "warn"
        return "ok"

    @property
    def state(self) -> str:
        states = {self.window_state(w) for w in self.windows}
        return "block" if "block" in states else "warn" if "warn" in states else "ok"

    @property
    def blocked(self) -> bool:
        return self.state == "block"

    @property
    def headroom_tokens(self) -> int | None:
        rooms = [w.headroom_tokens for w in self.windows if w.headroom_tokens is not None]
        return min(rooms) if rooms else None

    @property
    def headroom_pct(self) -> float | None:
        pcts = [w.headroom_pct for w in self.windows if w.headroom_pct is not None]
        return min(pcts) if pcts else None


class QuotaEngine:
    """Per-model usage windows and the quotas they are held against."""

    def __init__(self, quotas: dict[str, ModelQuota]):
        self.quotas = dict(quotas)
        self.models: dict[str, ModelUsage] = {}

    def set_quotas(self, quotas: dict[str, ModelQuota]) -> None:
        """Apply new quotas; usage already seen is kept (a changed rolling window length
        applies to what the window still holds)."""
        self.quotas = dict(quotas)
        for model, usage in self.models.items():
            usage.rolling.length = self._quota(model).rolling_window_hours * 3600

    def _quota(self, model: str) -> ModelQuota:
        return self.quotas.get(model, _DEFAULT_QUOTA)

    def _usage(self, model: str) -> ModelUsage:
        usage = self.models.get(model)
        if usage is None:
            usage = self.models[model] = ModelUsage(
                rolling=Window(self._quota(model).rolling_window_hours * 3600, _ROLLING_BUCKET_S),
                weekly=Window(WEEK_SECONDS, _WEEKLY_BUCKET_S))
        return usage

    def record(self, model: str, now: float, *, input_tokens: int = 0, output_tokens: int = 0,
               cache_creation_input_tokens: int = 0, cache_read_input_tokens: int = 0,
               seconds: float = 0.0, stream_seconds: float = 0.0,
               ttft_seconds: float | None = None) -> None:
        usage = self._usage(model)
        tokens = self._quota(model).quota_tokens(input_tokens, output_tokens,
                                                 cache_creation_input_tokens,
                                                 cache_read_input_tokens)
        usage.rolling.add(now, tokens, seconds)
        usage.weekly.add(now, tokens, seconds)
        usage.requests += 1
        usage.input_tokens += input_tokens
        usage.output_tokens += output_tokens
        usage.cache_creation_input_tokens += cache_creation_input_tokens
        usage.cache_read_input_tokens += cache_read_input_tokens
        usage.needs.append(tokens)
        if seconds > 0:
            usage.speeds.append(_Speed(output_tokens, stream_seconds, seconds, ttft_seconds))

    def state(self, model: str, now: float, warn_pct: float | None = None) -> QuotaState:
        """``model``'s standing; ``warn_pct`` overrides the configured one (auto calibration)."""
        quota = self.quotas.get(model)
        effective = quota or _DEFAULT_QUOTA
        usage = self.models.get(model)

        def window(name: str, hours: float, limit_hours: float | None) -> WindowState:
            w = usage.window(name) if usage else None
            if w is not None:
                w.expire(now)
            return WindowState(
                name=name, window_hours=hours, used_tokens=w.tokens if w else 0,
                limit_tokens=effective.limit(name), used_hours=round(w.seconds / 3600, 6)
                if w else 0.0, limit_hours=limit_hours,
                reset_eta_sec=w.reset_eta(now) if w else None)

        needs = usage.needs if usage else ()
        return QuotaState(
            model=model, quota=quota,
            rolling=window("rolling", effective.rolling_window_hours,
                           effective.rolling_limit_hours),
            weekly=window("weekly", WEEK_SECONDS / 3600, effective.weekly_limit_hours),
            warn_pct=effective.warn_pct if warn_pct is None else warn_pct,
            predicted_need=round(sum(needs) / len(needs)) if needs else 0)

    def seconds_until_room(self, model: str, tokens: int, now: float) -> float:
        """Seconds until every limited window of ``model`` has room for ``tokens`` more."""
        usage = self.models.get(model)
        quota = self.quotas.get(model)
        if usage is None or quota is None:
            return 0.0
        waits = [usage.window(name).seconds_until_below(limit - tokens + 1, now)
                 for name in ("rolling", "weekly")
                 if (limit := quota.limit(name)) is not None]
        return max(waits, default=0.0)

    def speeds(self, model: str) -> dict:
        usage = self.models.get(model)
        samples = list(usage.speeds) if usage else []
        out = sum(s.output_tokens for s in samples)
        stream_s = sum(s.stream_s for s in samples)
        total_s = sum(s.total_s for s in samples)
        ttfts = [s.ttft_s * 1000 for s in samples if s.ttft_s is not None]
        return {
            "samples": len(samples),
            "out_tps_stream": round(out / stream_s, 2) if stream_s > 0 else None,
            "out_tps_total": round(out / total_s, 2) if total_s > 0 else None,
            "ttft_ms_p50": None if not ttfts else round(percentile(ttfts, 0.5), 1),
        }
