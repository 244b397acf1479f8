"""Where every finished exchange goes: one line in usage.jsonl, its anomalies in anomaly.jsonl,
and the Prometheus counters. The line is on its way to disk (handed to the OS) before the
client's response is finished, so a finished request is never lost.
"""
from __future__ import annotations

import os

from twisted.application import service
from twisted.logger import Logger

from ccpd.config import LogsConfig
from ccpd.metrics import Metrics
from ccpd.usagelog import RotatingJSONLWriter

log = Logger()

USAGE_LOG = "usage.jsonl"
ANOMALY_LOG = "anomaly.jsonl"


class Recorder(service.Service):
    """Accounts finished exchanges; owns the usage and anomaly logs."""

    name = "recorder"

    def __init__(self, logs: LogsConfig, metrics: Metrics, reroute_mode: str):
        self.logs = logs
        self.metrics = metrics
        self.reroute_mode = reroute_mode
        self.usage_log: RotatingJSONLWriter | None = None
        self.anomaly_log: RotatingJSONLWriter | None = None
        self.sinks: list = []  # more consumers of each usage line (the store's writer)
        self._children: dict[tuple, object] = {}

    def startService(self):
        super().startService()
        self.usage_log = RotatingJSONLWriter(
            os.path.join(self.logs.dir, USAGE_LOG), self.logs.max_bytes, self.logs.backups)
        self.anomaly_log = RotatingJSONLWriter(
            os.path.join(self.logs.dir, ANOMALY_LOG), self.logs.max_bytes, self.logs.backups)

    def stopService(self):
        super().stopService()
        for writer in (self.usage_log, self.anomaly_log):
            if writer is not None:
                writer.close()

    def record(self, exchange) -> None:
        record = exchange.record(self.reroute_mode)
        line = record.to_dict()
        self._write(self.usage_log, line)
        for sink in self.sinks:
            sink(line)
        for anomaly in exchange.anomalies:
            self.anomaly({"ts": record.ts, "rid": record.rid, "model": record.model,
                          "lane": record.lane, **anomaly})
        self._count(record)

    def anomaly(self, line: dict) -> None:
        self._write(self.anomaly_log, line)

    def _write(self, writer: RotatingJSONLWriter | None, line: dict) -> None:
        try:
            writer.write(line)
        except (OSError, ValueError, TypeError) as e:
            # A full disk must not take the proxy down: log it and serve on.
            log.error("could not write to {path}: {error}",
                      path=getattr(writer, "path", "?"), error=str(e))

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
