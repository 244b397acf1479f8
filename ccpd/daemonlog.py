"""Optional JSON copy of the daemon log (``[logs] json_log = true``): one JSON object per
twisted.logger event in ``<logs dir>/ccpd.log.json``, rotated like the usage log.
"""
from __future__ import annotations

import os

from twisted.application import service
from twisted.logger import globalLogPublisher, jsonFileLogObserver
from twisted.python.logfile import LogFile

from ccpd.config import LogsConfig

JSON_LOG = "ccpd.log.json"


class JsonLogService(service.Service):
    name = "json-log"

    def __init__(self, logs: LogsConfig):
        self.logs = logs
        self._file = self._observer = None

    def startService(self):
        super().startService()
        os.makedirs(self.logs.dir, exist_ok=True)
        self._file = LogFile(JSON_LOG, self.logs.dir, rotateLength=self.logs.max_bytes,
                             maxRotatedFiles=self.logs.backups or None)
        self._observer = jsonFileLogObserver(self._file)
        globalLogPublisher.addObserver(self._observer)

    def stopService(self):
        super().stopService()
        if self._observer is not None:
            globalLogPublisher.removeObserver(self._observer)
            self._file.close()
            self._file = self._observer = None
