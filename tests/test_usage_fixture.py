"""The captured /v1/usage fixture stays in step with the daemon and renders in `ccp status`."""
from __future__ import annotations

import json
from pathlib import Path

from twisted.internet import task

from ccpd.cli import format_status
from ccpd.config import config_from_string
from ccpd.governor import Governor
from ccpd.metrics import Metrics
from ccpd.quotas import ModelQuota
from ccpd.web.views import usage_view

FIXTURE = Path(__file__).parent.parent / "fixtures" / "usage" / "ccc_usage_with_speeds.json"


def keys(value, prefix="") -> set[str]:
    if not isinstance(value, dict):
        return set()
    found = set()
    for key, inner in value.items():
        found.add(prefix + key)
        if key != "quota":
            found |= keys(inner, prefix + key + ".")
    return found


def test_fixture_has_every_field_of_the_model_view(tmp_path):
    quotas = tmp_path / "quotas.json"
    quotas.write_text('{"models": {}}')
    config = config_from_string(f"[lane:a]\nbase_url = http://127.0.0.1:9\n[routing]\n"
                                f"default_lane = a\n[quotas]\nfile = {quotas}\n",
                                "t.ini", environ={})
    governor = Governor(config, {"glm-4.6": ModelQuota(rolling_limit_tokens=10)}, Metrics(),
                        task.Clock())
    live = usage_view(governor, 0.0)
    captured = json.loads(FIXTURE.read_text())
    assert set(captured) == set(live)
    assert keys(captured["models"]["glm-4.6"]) == keys(live["models"]["glm-4.6"])


def test_fixture_renders_as_a_status_table():
    text = format_status(json.loads(FIXTURE.read_text()), speeds=True, debug=True)
    [row] = [line for line in text.splitlines() if line.startswith("glm-4.6 ")]
    assert "1.7k/2k" in row and "WARN" in row
    assert "ACTIVE" in text  # the cooldown after the 1308 answer
