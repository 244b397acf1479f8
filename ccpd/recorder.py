"""Where every finished exchange goes: one line in usage.jsonl, its anomalies in anomaly.jsonl,
and the Prometheus counters. The line is on its way to disk (handed to the OS) before the
client's response is finished, so a finished request is never lost.

When the disk refuses a line (full, read-only), the proxy serves on: the line waits in the
writer's spool, the store still gets it, and a timer retries every ``SPOOL_RETRY_SECONDS``
(so does every new line), counted in ``ccp_log_write_errors_total{log}`` and shown by
``/readyz``.
"""
from __future__ import annotations

import os

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

from ccpd.config import LogsConfig
from ccpd.metrics import Metrics
from ccpd.usagelog import RotatingJSONLWriter

log = Logger()

USAGE_LOG = "usage.jsonl"
ANOMALY_LOG = "anomaly.jsonl"
SPOOL_RETRY_SECONDS = 5.0


class Recorder(service.Service):
    """Accounts finished exchanges; owns the usage and anomaly logs."""

    name = "recorder"

    def __init__(self, logs: LogsConfig, metrics: Metrics, reroute_mode: str, clock):
        self.logs = logs
        self.metrics = metrics
        self.reroute_mode = reroute_mode
        self.clock = clock
        self.usage_log: RotatingJSONLWriter | None = None
        self.anomaly_log: RotatingJSONLWriter | None = None
        self.sinks: list = []  # more consumers of each usage line (the store's writer)
        self._children: dict[tuple, object] = {}
        self._dropped_seen: dict[str, int] = {}
        self._degraded: set[str] = set()  # logs whose lines wait in memory
        self._retry: task.LoopingCall | None = None

    def startService(self):
        super().startService()
        self.usage_log = RotatingJSONLWriter(
            os.path.join(self.logs.dir, USAGE_LOG), self.logs.max_bytes, self.logs.backups)
        self.anomaly_log = RotatingJSONLWriter(
            os.path.join(self.logs.dir, ANOMALY_LOG), self.logs.max_bytes, self.logs.backups)
        self._retry = task.LoopingCall(self.flush_logs)
        self._retry.clock = self.clock
        self._retry.start(SPOOL_RETRY_SECONDS, now=False)

    def stopService(self):
        super().stopService()
        if self._retry is not None and self._retry.running:
            self._retry.stop()
        self.flush_logs()
        for name, writer in self._writers():
            if writer.spooled:
                log.error("{log} log: {count} lines could not be written to {path} before the "
                          "stop ({error}); they are in the store", log=name,
                          count=writer.spooled, path=writer.path, error=writer.last_error)
            writer.close()

    def _writers(self):
        return [(name, writer) for name, writer in (("usage", self.usage_log),
                                                    ("anomaly", self.anomaly_log))
                if writer is not None]

    def record(self, exchange) -> None:
        record = exchange.record(self.reroute_mode)
        line = record.to_dict()
        self._write("usage", self.usage_log, line)
        for sink in self.sinks:
            sink(line)
        for anomaly in exchange.anomalies:
            self.anomaly({"ts": record.ts, "rid": record.rid, "model": record.model,
                          "lane": record.lane, **anomaly})
        self._count(record)

    def anomaly(self, line: dict) -> None:
        self._write("anomaly", self.anomaly_log, line)

    def _write(self, name: str, writer: RotatingJSONLWriter | None, line: dict) -> None:
        try:
            written = writer.write(line)
        except (ValueError, TypeError, AttributeError) as e:  # closed, or not encodable
            log.error("could not write to the {log} log: {error}", log=name, error=str(e))
            return
        if not written:  # a full disk must not take the proxy down: the line waits
            self.metrics.log_write_errors.labels(name).inc()
        if not written or name in self._degraded:
            self._track(name, writer)

    def flush_logs(self) -> None:
        """Write what waits in the spools (the retry timer's job; never raises)."""
        for name, writer in self._writers():
            if name in self._degraded:
                try:
                    writer.flush()
                except Exception:  # noqa: BLE001 - a LoopingCall stops for good after one
                    log.failure("retrying the {log} log failed", log=name)
                self._track(name, writer)

    def _track(self, name: str, writer: RotatingJSONLWriter) -> None:
        """Log and show it when a log starts or stops keeping lines in memory."""
        if writer.spooled and name not in self._degraded:
            self._degraded.add(name)
            log.error("cannot write to {path}: {error}; keeping its lines in memory and "
                      "retrying every {interval:g}s", path=writer.path, error=writer.last_error,
                      interval=SPOOL_RETRY_SECONDS)
        elif not writer.spooled and name in self._degraded:
            self._degraded.discard(name)
            log.info("{path} accepts lines again; the waiting lines are written, in order",
                     path=writer.path)
        self.metrics.log_spooled.labels(name).set(writer.spooled)
        dropped = writer.dropped - self._dropped_seen.get(name, 0)
        if dropped:
            self._dropped_seen[name] = writer.dropped
            self.metrics.log_dropped.labels(name).inc(dropped)

    def log_health(self) -> dict:
        """Per log: whether lines are written, and what waits or was given up."""
        return {name: {"ok": not writer.spooled, "spooled": writer.spooled,
                       "dropped": writer.dropped, "error": writer.last_error}
                for name, writer in self._writers()}

    def _count(self, record) -> None:
        lane, model = record.lane, record.model
        self._child("requests", lane, model, str(record.status)).inc()
        for kind, value in (("input", record.input_tokens), ("output", record.output_tokens),
                            ("cache_creation", record.cache_creation_input_tokens),
                            ("cache_read", record.cache_read_input_tokens)):
            if value > 0:
                self._child("tokens", lane, model, kind).inc(value)
        self._child("request_duration", lane, model).observe(record.dirty_ms / 1000.0)
        if record.status < 400 and record.ttft_ms:
            self._child("ttft", lane, model).observe(record.ttft_ms / 1000.0)

    def _child(self, metric: str, *labels: str):
        """A labelled metric, looked up once: ``labels()`` is a measurable cost per request."""
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = getattr(self.metrics, metric).labels(*labels)
        return child
