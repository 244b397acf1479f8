"""Polls a plan's own usage endpoint (Z.AI's ``/api/monitor/usage/quota/limit``) for the lanes
that set ``quota_url``, and feeds what it says into the provider evidence.

Z.AI answers ``{"code": 200, "data": {"limits": [{"type": "TOKENS_LIMIT", "unit": 3,
"number": 5, "percentage": 42, "nextResetTime": <epoch ms>}, ...]}}``: unit 3 with number 5 is
the 5-hour window, unit 6 the weekly one; ``percentage`` is 0-100. A failed, slow or odd
answer is logged and counted, never stops the poller and never reaches a client.
"""
from __future__ import annotations

import math

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from ccpd import jsonparse
from ccpd.evidence import ProviderEvidence, Reading
from ccpd.lanes import MissingCredential, describe_failure
from ccpd.limits import FIVE_HOUR, WEEKLY

log = Logger()

POLL_TIMEOUT_S = 10.0
_MAX_ANSWER_BYTES = 256 * 1024
# (type, unit, number) -> window; number None: any
_ZAI_WINDOWS = {("TOKENS_LIMIT", 3, 5): FIVE_HOUR, ("TOKENS_LIMIT", 6, None): WEEKLY}


class QuotaAnswerError(ValueError):
    """An answer of the quota endpoint that cannot be read."""


def _finite(value) -> float | None:
    """A JSON number that is a real, finite number (not a bool, NaN or Infinity)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _window(limit: dict) -> str | None:
    key = (limit.get("type"), limit.get("unit"), limit.get("number"))
    if not all(isinstance(part, (str, int, type(None))) for part in key):
        return None  # e.g. "unit": [3]: not one of Z.AI's windows
    return _ZAI_WINDOWS.get(key) or _ZAI_WINDOWS.get((key[0], key[1], None))


def parse_zai_quota(body: bytes, lane: str, now: float) -> list[Reading]:
    """The window readings in one answer of Z.AI's quota endpoint."""
    try:
        answer = jsonparse.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise QuotaAnswerError(f"not JSON: {e}") from None
    if isinstance(answer, dict) and (answer.get("success") is False
                                     or answer.get("code") not in (None, 200)):
        # Z.AI answers a wrong or expired key with HTTP 200 and {"code": 401, "msg": ...}
        raise QuotaAnswerError(f"code {answer.get('code')}: {str(answer.get('msg'))[:100]}")
    limits = answer.get("data", {}).get("limits") if isinstance(answer, dict) and isinstance(
        answer.get("data"), dict) else None
    if not isinstance(limits, list):
        raise QuotaAnswerError("no data.limits list in the answer")
    readings = []
    for limit in limits:
        if not isinstance(limit, dict):
            continue
        window, percentage = _window(limit), _finite(limit.get("percentage"))
        if window is None or percentage is None:
            continue
        reset_ms = _finite(limit.get("nextResetTime"))
        reset_at = reset_ms / 1000.0 if reset_ms is not None and reset_ms > 0 else None
        readings.append(Reading(lane, window, max(0.0, percentage / 100.0), reset_at, None, now,
                                "poll"))
    if not readings:
        raise QuotaAnswerError("no token window in data.limits")
    return readings


def _timed_out(result, timeout):
    raise QuotaAnswerError(f"no answer within {timeout:g}s")


class QuotaPoller(service.Service):
    """One timer per lane with a ``quota_url``; each tick reads the endpoint with the lane's
    credentials (``Authorization: Bearer <key>``) and stores the readings."""

    name = "quota-poller"

    def __init__(self, lanes, evidence: ProviderEvidence, metrics, clock, on_readings=None):
        self.lanes = [lane for lane in lanes if lane.config.quota_endpoint]
        self.evidence = evidence
        self.metrics = metrics
        self.clock = clock
        self.on_readings = on_readings  # called with the readings of each good poll
        self._loops: list[task.LoopingCall] = []
        self._polls: set[defer.Deferred] = set()

    def startService(self):
        super().startService()
        for lane in self.lanes:
            loop = task.LoopingCall(self._start_poll, lane)
            loop.clock = self.clock
            loop.start(lane.config.quota_poll, now=True)
            self._loops.append(loop)

    def _start_poll(self, lane) -> defer.Deferred:
        poll = defer.ensureDeferred(self.poll(lane))
        self._polls.add(poll)
        poll.addBoth(lambda result: (self._polls.discard(poll), result)[1])
        return poll

    def stopService(self):
        super().stopService()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        for poll in list(self._polls):  # a poll in flight stores nothing after the stop
            poll.cancel()

    @staticmethod
    async def _fetch(lane, url: str, headers: Headers) -> tuple[int, bytes]:
        response = await lane.client.get(url, headers=headers, allow_redirects=False)
        return response.code, await response.content()

    async def poll(self, lane) -> list[Reading]:
        """One poll of ``lane``; never raises (a LoopingCall stops for good after one)."""
        url = lane.config.quota_endpoint
        try:
            key = lane.credential()
            headers = Headers({b"authorization": [b"Bearer " + key.encode("latin-1")],
                               b"accept": [b"application/json"],
                               b"user-agent": [b"ccpd-quota-poll"]})
            fetching = defer.ensureDeferred(self._fetch(lane, url, headers))
            code, body = await fetching.addTimeout(POLL_TIMEOUT_S, self.clock,
                                                   onTimeoutCancel=_timed_out)
            if code != 200:
                raise QuotaAnswerError(f"HTTP {code}")
            if len(body) > _MAX_ANSWER_BYTES:
                raise QuotaAnswerError(f"answer of {len(body)} bytes")
            readings = parse_zai_quota(body, lane.name, self.clock.seconds())
        except defer.CancelledError:
            return []  # the service stopped
        except Exception as e:  # noqa: BLE001 - every failure is logged and counted alike
            reason = (str(e) if isinstance(e, (QuotaAnswerError, MissingCredential))
                      else describe_failure(e))
            self.metrics.quota_poll_errors.labels(lane.name).inc()
            log.warn("quota poll of lane {lane} failed: {reason}", lane=lane.name, reason=reason)
            return []
        try:
            for reading in readings:
                self.evidence.put(reading)
            if self.on_readings is not None:
                self.on_readings(readings)
        except Exception:  # noqa: BLE001 - polling goes on whatever the consumer did
            self.metrics.quota_poll_errors.labels(lane.name).inc()
            log.failure("the readings of lane {lane}'s quota poll could not be used",
                        lane=lane.name)
        return readings
