"""What happened to one client request, filled in as the proxy serves it, and turned into its
usage line (:meth:`Exchange.record`) once it is over."""
from __future__ import annotations

from dataclasses import dataclass, field

from ccpd.policy import Decision
from ccpd.usage import TokenUsage, UsageRecord
from ccpd.web.errors import ApiError


@dataclass
class Exchange:
    rid: str
    started: float
    op: str
    model: str = ""
    stream: bool = False
    lane: str = ""
    upstream: str = ""
    header_mode: str = ""      # how the lane's credentials were set: passthrough, env, bearer-env
    served_model: str = ""
    status: int = 0
    err_type: str | None = None
    usage: TokenUsage = field(default_factory=TokenUsage)
    first_byte_at: float | None = None
    first_token_at: float | None = None
    last_byte_at: float | None = None
    finished_at: float | None = None
    anomalies: list[dict] = field(default_factory=list)
    decision: Decision | None = None
    sent_model: str = ""       # the model the serving lane was asked for (after a rewrite)
    wasted_retry_ms: int = 0
    limit_class: str | None = None  # the class of a limit answer from the preferred lane
    policy_fields: dict = field(default_factory=dict)  # quota and decision fields of the line

    def anomaly(self, kind: str, detail: str, **extra) -> None:
        self.anomalies.append({"kind": kind, "detail": detail, **extra})

    def fail(self, error: ApiError) -> None:
        """ccpd answered ``error`` itself: the status and error type the client got, and the
        anomaly line the error names (none for a refusal of the client's request)."""
        self.status, self.err_type = error.status, error.error_type
        if error.anomaly:
            self.anomaly(error.anomaly, error.detail or error.message, status=error.status)

    @staticmethod
    def span(start: float | None, end: float | None) -> float:
        """Seconds from ``start`` to ``end``; 0 when either is unknown."""
        return 0.0 if start is None or end is None else max(0.0, end - start)

    def record(self, reroute_mode: str) -> UsageRecord:
        def ms(start: float | None, end: float | None) -> int:
            return round(self.span(start, end) * 1000)

        return UsageRecord(
            ts=self.started, rid=self.rid, model=self.model,
            served_model=self.served_model or self.sent_model or self.model, lane=self.lane,
            op=self.op,
            stream=self.stream, status=self.status,
            input_tokens=self.usage.input_tokens, output_tokens=self.usage.output_tokens,
            cache_creation_input_tokens=self.usage.cache_creation_input_tokens,
            cache_read_input_tokens=self.usage.cache_read_input_tokens,
            ttft_ms=ms(self.started, self.first_token_at or self.first_byte_at),
            stream_ms=ms(self.first_byte_at, self.last_byte_at),
            dirty_ms=ms(self.started, self.finished_at),
            err_type=self.err_type, upstream=self.upstream, reroute_mode=reroute_mode,
            wasted_retry_ms=self.wasted_retry_ms, header_mode=self.header_mode,
            upstream_model=self.sent_model, limit_class=self.limit_class,
            **self.policy_fields,
        )
