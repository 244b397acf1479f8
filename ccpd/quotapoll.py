"""Polls a plan's own usage endpoint (Z.AI's ``/api/monitor/usage/quota/limit``) for the lanes
that set ``quota_url``, and feeds what it says into the provider evidence.

Z.AI answers ``{"code": 200, "data": {"limits": [{"type": "TOKENS_LIMIT", "unit": 3,
"number": 5, "percentage": 42, "nextResetTime": <epoch ms>}, ...]}}``: unit 3 with number 5 is
the 5-hour window, unit 6 the weekly one; ``percentage`` is 0-100. A failed, slow or odd
answer is logged and counted, never stops the poller and never reaches a client.
"""
from __future__ import annotations


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


def parse_zai_quota(body: bytes, lane: str, now: float) -> list[Reading]:
    """The window readings in one answer of Z.AI's quota endpoint."""
    try:
        answer = jsonparse.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise QuotaAnswerError(f"not JSON: {e}") from None
    limits = answer.get("data", {}).get("limits") if isinstance(answer, dict) and isinstance(
        answer.get("data"), dict) else None
    if not isinstance(limits, list):
        raise QuotaAnswerError("no data.limits list in the answer")
    readings = []
    for limit in limits:
        if not isinstance(limit, dict):
            continue
        window = (_ZAI_WINDOWS.get((limit.get("type"), limit.get("unit"), limit.get("number")))
                  or _ZAI_WINDOWS.get((limit.get("type"), limit.get("unit"), None)))
        percentage, reset_ms = limit.get("percentage"), limit.get("nextResetTime")
        if window is None or isinstance(percentage, bool) or not isinstance(
                percentage, (int, float)):
            continue
        reset_at = reset_ms / 1000.0 if isinstance(reset_ms, (int, float)) and not isinstance(
            reset_ms, bool) and reset_ms > 0 else None
        readings.append(Reading(lane, window, max(0.0, percentage / 100.0), reset_at, None, now,
                                "poll"))
    if not readings:
        raise QuotaAnswerError("no token window in data.limits")
    return readings


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

    def startService(self):
        super().startService()
        for lane in self.lanes:
            loop = task.LoopingCall(lambda lane=lane: defer.ensureDeferred(self.poll(lane)))
            loop.clock = self.clock
            loop.start(lane.config.quota_poll, now=True)
            self._loops.append(loop)

    def stopService(self):
        super().stopService()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []

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
            code, body = await fetching.addTimeout(POLL_TIMEOUT_S, self.clock)
            if code != 200:
                raise QuotaAnswerError(f"HTTP {code}")
            if len(body) > _MAX_ANSWER_BYTES:
                raise QuotaAnswerError(f"answer of {len(body)} bytes")
            readings = parse_zai_quota(body, lane.name, self.clock.seconds())
        except Exception as e:  # noqa: BLE001 - every failure is logged and counted alike
            if isinstance(e, defer.TimeoutError):
                reason = f"no answer within {POLL_TIMEOUT_S:g}s"
            elif isinstance(e, (QuotaAnswerError, MissingCredential)):
                reason = str(e)
            else:
                reason = describe_failure(e)
            self.metrics.quota_poll_errors.labels(lane.name).inc()
            log.warn("quota poll of lane {lane} failed: {reason}", lane=lane.name, reason=reason)
            return []
        for reading in readings:
            self.evidence.put(reading)
        if self.on_readings is not None:
            self.on_readings(readings)
        return readings
