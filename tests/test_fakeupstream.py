"""The fake upstream the proxy tests and benchmarks rely on answers as documented."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest_twisted
import treq

from ccpd.usage import StreamAccountant, TokenUsage

BODY = json.dumps({"model": "m1", "max_tokens": 8,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()


async def call(fake, path="/v1/messages", body=BODY, **headers):
    response = await treq.post(fake.url() + path, data=body, headers={
        "content-type": "application/json", **headers})
    return response, await response.content()


@pytest_twisted.ensureDeferred
async def test_json_and_stream_answers_report_the_asked_usage(fake_upstream):
    response, body = await call(fake_upstream, **{"x-fake-input-tokens": "3",
                                                  "x-fake-events": "4"})
    answer = json.loads(body)
    assert response.code == 200 and answer["model"] == "m1"
    assert answer["usage"]["input_tokens"] == 3 and answer["usage"]["output_tokens"] == 4

    stream_body = json.dumps({**json.loads(BODY), "stream": True}).encode()
    response, body = await call(fake_upstream, body=stream_body, **{"x-fake-cache-read": "9"})
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream"]
    accountant = StreamAccountant()
    accountant.feed(body)
    assert accountant.usage == TokenUsage(12, 5, 0, 9)
    assert fake_upstream.requests[-1].body == stream_body


@pytest_twisted.ensureDeferred
async def test_limit_answers(fake_upstream):
    response, body = await call(fake_upstream, **{"x-fake-status": "429"})
    assert response.code == 429 and response.headers.getRawHeaders("retry-after") == ["30"]
    assert response.headers.getRawHeaders("anthropic-ratelimit-tokens-reset")
    assert json.loads(body)["error"]["type"] == "rate_limit_error"
    for scenario, code in (("zai-1308", "1308"), ("zai-1310", "1310")):
        response, body = await call(fake_upstream, **{"x-fake-scenario": scenario})
        error = json.loads(body)["error"]
        assert response.code == 429 and error["code"] == code
        assert "Your limit will reset at " in error["message"]


@pytest_twisted.ensureDeferred
async def test_usage_headers_count_tokens_models_and_unknown_paths(fake_upstream):
    response, body = await call(fake_upstream, **{"x-fake-scenario": "usage-headers",
                                                  "x-fake-events": "2"})
    assert "usage" not in json.loads(body)
    assert response.headers.getRawHeaders("x-usage-output-tokens") == ["2"]
    _, body = await call(fake_upstream, "/api/anthropic/v1/messages/count_tokens")
    assert json.loads(body) == {"input_tokens": 12}
    models = await treq.get(fake_upstream.url() + "/v1/models")
    assert json.loads(await models.content())["data"][0]["id"] == "fake-model"
    response, _ = await call(fake_upstream, "/v2/else")
    assert response.code == 404


def test_runs_as_a_program_and_reports_its_port(tmp_path):
    port_file = tmp_path / "port"
    child = subprocess.Popen([sys.executable, "-m", "ccpd.testing.fakeupstream", "--port", "0",
                              "--port-file", str(port_file), "--no-record"])
    try:
        for _ in range(200):
            if port_file.exists() and port_file.read_text():
                break
            time.sleep(0.05)
        port = int(port_file.read_text())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as answer:
            assert json.loads(answer.read())["data"][0]["id"] == "fake-model"
    finally:
        child.terminate()
        child.wait(timeout=10)
