"""scripts/experiments/glm-limit-probe.sh against a Z.AI-like fake that runs out, through an
in-process ccpd: the rows it appends to the results file, its exit codes and messages, and
ccpd's calibration ingesting those rows.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest_twisted
import treq
from twisted.internet.threads import deferToThread

from ccpd.calibration import PROBE_COLUMNS, parse_probe_results
from tests.support import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "experiments", "glm-limit-probe.sh")
TEMPLATE = os.path.join(ROOT, "results", "GLM_LIMIT_PROBE.md")
FIVE_HOURS = 5 * 3600


def run_probe(*args: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("CCP_URL", "ANTHROPIC_API_KEY")}
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=60,
                          env=environ)


async def usage_of(ccpd, model: str) -> dict:
    return json.loads(await (await treq.get(ccpd.url + "/v1/usage")).content())["models"][model]


def test_the_committed_results_file_is_an_empty_probe_table():
    with open(TEMPLATE, encoding="utf-8") as f:
        text = f.read()
    assert parse_probe_results(text) == []
    header = "| " + " | ".join(PROBE_COLUMNS) + " |"
    assert text.count(header) == 1
    assert text.rstrip().splitlines()[-2:] == [header, "|" + "---|" * len(PROBE_COLUMNS)]


@pytest_twisted.ensureDeferred
async def test_probe_records_the_first_limit_and_ccpd_ingests_the_rows(tmp_path, start_ccpd,
                                                                        make_fake):
    (tmp_path / "quotas.json").write_text(json.dumps(
        {"models": {"glm-solo": {"rolling_limit_tokens": 1000}}}))
    results = tmp_path / "probe.md"
    anthropic, zai = make_fake(), make_fake(limit_tokens=50)  # 3 answers of 17 tokens, then 1308
    ccpd = await start_ccpd(anthropic.url(), zai_url=zai.url(),
                            extra=f"[calibration]\nprobe_results = {results}\n")
    args = ("--url", ccpd.url, "--model", "glm-solo", "--repeat", "10", "--tokens", "5",
            "--results", str(results))

    first = await deferToThread(run_probe, *args)
    assert first.returncode == 0, first.stderr
    assert "glm-solo: limit at request 4/10 (HTTP 429)" in first.stdout
    assert "51/1000" in first.stdout and str(results) in first.stdout
    [row] = parse_probe_results(results.read_text())
    assert (row["vendor"], row["model"], row["repeat"], row["tokens"]) == \
        ("glm", "glm-solo", 10.0, 5.0)
    assert (row["first_429_index"], row["upstream_status"]) == (4.0, 429.0)
    assert row["inferred_multiplier"] == 0.051  # 51 tokens counted of 1000 before request 4
    assert row["calc_headroom"] == 0.949
    # ccpd's window frees the tokens ~5 h after they were used; the fake resets in 30 min
    assert FIVE_HOURS - 1800 - 120 <= row["gap_seconds"] <= FIVE_HOURS - 1800 + 600
    assert 0 <= row["hour_of_day"] <= 23 and row["timestamp"].endswith("Z")
    assert [json.loads(r.body)["max_tokens"] for r in zai.requests] == [5] * 4
    assert [json.loads(r.body)["model"] for r in zai.requests] == ["glm-solo"] * 4

    second = await deferToThread(run_probe, *args)
    assert second.returncode == 0, second.stderr
    text = results.read_text()
    rows = parse_probe_results(text)
    assert len(rows) == 2 and rows[0] == row
    assert rows[1]["first_429_index"] == 1.0 and rows[1]["inferred_multiplier"] == 0.051
    assert text.count("| timestamp | vendor | model |") == 1
    assert text.startswith("# GLM limit probe")

    # the watcher's tick reads the changed file: one multiplier and one gap sample per row
    before = await usage_of(ccpd, "glm-solo")
    ccpd.service.getServiceNamed("probe-results-watcher").tick()
    after = await usage_of(ccpd, "glm-solo")
    assert after["calibration"]["multiplier_samples"] == \
        before["calibration"]["multiplier_samples"] + 2
    assert after["gap_samples"] >= before["gap_samples"] + 2
    assert after["min_samples_reached"] is True
    assert after["calibration"]["limit_multiplier"] == 0.051
    assert after["warn_pct_auto"] < after["warn_pct"]


@pytest_twisted.ensureDeferred
async def test_no_limit_within_repeat_appends_a_row_without_samples(tmp_path, start_ccpd,
                                                                     make_fake):
    anthropic, zai = make_fake(), make_fake()
    ccpd = await start_ccpd(anthropic.url(), zai_url=zai.url())
    results = tmp_path / "probe.md"
    done = await deferToThread(run_probe, "--url", ccpd.url, "--model", "glm-solo",
                               "--repeat", "3", "--results", str(results))
    assert done.returncode == 0, done.stderr
    assert "no limit within 3 requests" in done.stdout
    [row] = parse_probe_results(results.read_text())
    assert (row["first_429_index"], row["inferred_multiplier"], row["gap_seconds"],
            row["upstream_status"]) == (None, None, None, 200.0)
    assert len(zai.requests) == 3


def test_an_unsupported_vendor_is_refused(tmp_path):
    results = tmp_path / "probe.md"
    done = run_probe("--vendor", "other", "--results", str(results))
    assert done.returncode != 0
    assert "vendor 'other' is not supported" in done.stderr and "glm" in done.stderr
    assert not results.exists()


def test_an_unreachable_ccpd_is_reported(tmp_path):
    results = tmp_path / "probe.md"
    url = f"http://127.0.0.1:{free_port()}"
    done = run_probe("--url", url, "--results", str(results))
    assert done.returncode != 0
    assert f"ccpd is not reachable at {url}" in done.stderr
    assert not results.exists()


def test_help_tells_the_route_needs_no_secondary_lane():
    done = run_probe("--help")
    assert done.returncode == 0
    assert "--repeat N" in done.stdout and "no secondary lane" in done.stdout.replace("\n", " ")
