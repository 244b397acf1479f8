"""JSON from outside ccpd (clients, providers, files): every malformed text is a ValueError.

``json.loads`` raises RecursionError, not ValueError, for arrays or objects nested about a
thousand deep, so a plain ``except ValueError`` lets such a body through as a 500."""
from __future__ import annotations

import json


def loads(text: str | bytes):
    """``json.loads(text)``; nesting too deep to parse raises ValueError like any other flaw."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
