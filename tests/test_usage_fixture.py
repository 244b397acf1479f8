"""The captured /v1/usage fixture stays in step with the daemon and renders in `ccp status`."""
from __future__ import annotations

import json
from pathlib import Path

from twisted.internet import task
from twisted.web.http_headers import Headers

from ccpd.cli import format_status
from ccpd.config import config_from_string
from ccpd.governor import Governor
from ccpd.metrics import Metrics
from ccpd.quotas import ModelQuota
from ccpd.testing.fakeupstream import unified_headers
from ccpd.usage import TokenUsage
from ccpd.web.views import usage_view

FIXTURE = Path(__file__).parent.parent / "fixtures" / "usage" / "ccc_usage_with_speeds.json"
# the maps whose keys are provider window names (five_hour, seven_day, ...), not fields: their
# entries are compared as one shape, "*"
MODEL_BY_WINDOW = {"provider"}
LANE_BY_WINDOW = {"provider.windows", "learned_limits"}


def keys(value, by_window=frozenset(), prefix="") -> set[str]:
    """The field paths of ``value`` (``quota`` and ``plan``, null or not, are not entered)."""
    if not isinstance(value, dict):
        return set()
    found = set()
    for key, inner in value.items():
        path = prefix + key
        found.add(path)
        if path in by_window and isinstance(inner, dict):
            for entry in inner.values():
                found |= {path + ".*"} | keys(entry, by_window, path + ".*.")
        elif key not in ("quota", "plan"):
            found |= keys(inner, by_window, path + ".")
    return found


def live_view(tmp_path) -> dict:
    """The view of a governor that counted one request on lane ``a`` and had one answer with
    unified utilisation headers from it (as the capture's Anthropic fake sends them), so that
    provider readings and learned limits are filled in."""
    quotas = tmp_path / "quotas.json"
    quotas.write_text('{"models": {}}')
    config = config_from_string(f"[lane:a]\nbase_url = http://127.0.0.1:9\n[routing]\n"
                                f"default_lane = a\n[quotas]\nfile = {quotas}\n",
                                "t.ini", environ={})
    clock = task.Clock()
    clock.advance(1_800_000_000)
    governor = Governor(config, {"glm-4.6": ModelQuota(rolling_limit_tokens=10)}, Metrics(),
                        clock)
    governor.account("glm-4.6", "a", TokenUsage(input_tokens=150, output_tokens=40),
                     seconds=1.0, stream_seconds=0.5, ttft_seconds=0.05)
    headers = unified_headers({"5h": 0.42, "7d": 0.1}, clock.seconds())
    governor.watch.observe_answer("a", 200, Headers({k: [v] for k, v in headers.items()}))
    return usage_view(governor, clock.seconds())


def test_fixture_has_every_field_of_the_model_view(tmp_path):
    """The top-level keys, a model entry and a lane entry (``anthropic``, whose provider
    sent unified headers) have the fields of a live ``usage_view``."""
    live = live_view(tmp_path)
    captured = json.loads(FIXTURE.read_text())
    assert set(captured) == set(live)
    assert live["models"]["glm-4.6"]["provider"] and live["lanes"]["a"]["learned_limits"]
    assert (keys(captured["models"]["glm-4.6"], MODEL_BY_WINDOW)
            == keys(live["models"]["glm-4.6"], MODEL_BY_WINDOW))
    assert (keys(captured["lanes"]["anthropic"], LANE_BY_WINDOW)
            == keys(live["lanes"]["a"], LANE_BY_WINDOW))


def test_fixture_renders_as_a_status_table():
    text = format_status(json.loads(FIXTURE.read_text()), speeds=True, debug=True)
    [row] = [line for line in text.splitlines() if line.startswith("glm-4.6 ")]
    # counted 1,710 of 2,000 is only a warning, but Z.AI's 1308 answer left a rejected
    # five_hour reading on lane zai, the worst evidence: BLOCK, the provider's 5h at 100%
    assert "1.7k/2k" in row and "BLOCK" in row and "WARN " not in row and "100%" in row
    [row] = [line for line in text.splitlines() if line.startswith("claude-sonnet-4-5 ")]
    assert "OK" in row and "42%" in row and "10%" in row  # the anthropic fake's unified figures
    assert "zai: five_hour REJECTED, resets in 29m" in text
    assert "anthropic: five_hour 42%" in text
    # the cooldown after the 1308 answer lasts until the reported reset, not cooldown_sec
    assert "cooldown:        ACTIVE, 179" in text and "(in 29m" in text
