"""What the ``ccp`` commands share: exit codes, the one-line error, tolerant access to JSON
fields, the daemon's URL and printing. :mod:`ccpd.cli` (status, statusline), :mod:`ccpd.cli.db`
(``ccp db``) and :mod:`ccpd.cli.statusline` import it; none of them imports another for these."""
from __future__ import annotations

import os

DEFAULT_URL = "http://127.0.0.1:8787"
URL_ENV = "CCP_URL"
DASH = "-"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # also: the daemon could not be asked, or answered something unusable


class CliError(Exception):
    """A failure to report as one line on stderr (no traceback) with an exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.message = message
        self.code = code


def _num(value) -> float | None:
    """``value`` when it is a real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if value != value or value in (float("inf"), float("-inf")):  # NaN / infinities
        return None
    return value


def _obj(value) -> dict:
    """``value`` when it is a JSON object, else an empty one (so lookups give None)."""
    return value if isinstance(value, dict) else {}


def _text(value) -> str | None:
    """``value`` as text (numbers as ``%g``), None when it is absent or empty."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, "g")
    return str(value)


def resolve_url(arg: str | None, environ=None) -> str:
    """``--url``, else ``$CCP_URL``, else the default; no trailing slash, ``http://`` assumed."""
    environ = os.environ if environ is None else environ
    url = (arg or environ.get(URL_ENV) or DEFAULT_URL).strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def _emit(text: str, stream) -> None:
    """Print ``text``; on a terminal that cannot encode ``→`` fall back to ASCII."""
    try:
        stream.write(text + "\n")
    except UnicodeEncodeError:
        stream.write(text.replace("→", "->").encode("ascii", "replace").decode("ascii") + "\n")
    stream.flush()
