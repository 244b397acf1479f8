"""The dashboard (``GET /`` and ``/dashboard``): what ccpd serves, and the page in a real browser.

In memory (``memory_ccpd``): the page and its two files, their types and security headers,
404s in Anthropic's shape, HEAD, the guard in front of them, and that the page can run under its
own Content-Security-Policy (no inline script or style, nothing from elsewhere, no HTML parsed
from data). On loopback: real proxied traffic of two models (one of them rerouted after a Z.AI
1308), then headless Chromium renders ``/dashboard`` from ccpd's JSON endpoints; the rendered
DOM must show that traffic, the page must log nothing to the console (no exception, no CSP
violation) and show no problem, and a screenshot goes to ``results/dashboard.png``. Also in
Chromium: an idle ccpd (no traffic, quota or store rows), a lane down (``/readyz`` 503), and a
control page proving the console check sees what it looks for.

Chromium is driven from the command line (``--dump-dom``, ``--screenshot``, with a virtual time
budget that covers two refreshes of the page); its console reaches us through
``--enable-logging=stderr``. Each run is bounded (:data:`BROWSER_TIMEOUT_S`) and killed with its
whole session after. The browser tests skip only when no Chromium binary is found (Debian
package ``chromium``; or set ``CCPD_TEST_CHROMIUM``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Site

from ccpd.web import dashboard
from tests.support import MESSAGE, post

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "results" / "dashboard.png"
TOKEN = "ccpd-client-token-0123456789abcdef"
TYPES = {"dashboard.html": "text/html; charset=utf-8",
         "dashboard.js": "text/javascript; charset=utf-8",
         "dashboard.css": "text/css; charset=utf-8"}


def assert_served(answer, content_type: str) -> None:
    assert answer.code == 200, answer.body[:300]
    assert answer.header("content-type") == content_type
    assert answer.header("content-security-policy") == dashboard.CSP.decode()
    assert answer.header("cache-control") == "no-cache"
    assert answer.header("x-content-type-options") == "nosniff"


# -- in memory: what ccpd serves -----------------------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/dashboard"])
def test_the_page_is_served_at_root_and_dashboard(memory_ccpd, path):
    ccpd = memory_ccpd()
    answer = ccpd.get(path)
    assert_served(answer, "text/html; charset=utf-8")
    assert answer.body == dashboard.asset_bytes("dashboard.html")
    assert b"<title>ccpd dashboard</title>" in answer.body


@pytest.mark.parametrize("name", sorted(TYPES))
def test_the_assets_are_served_with_their_types(memory_ccpd, name):
    ccpd = memory_ccpd()
    answer = ccpd.get(f"/static/{name}")
    assert_served(answer, TYPES[name])
    assert answer.body == (ROOT / "ccpd" / "web" / "static" / name).read_bytes()


@pytest.mark.parametrize("path", ["/static/nope.js", "/static/dashboard.py", "/static/DASHBOARD.JS",
                                  "/static/vendor/uPlot.min.js", "/static/", "/static/..%2fapp.py",
                                  "/dashboard/", "/dashboard.html"])
def test_anything_else_is_an_anthropic_shaped_404(memory_ccpd, path):
    ccpd = memory_ccpd()
    answer = ccpd.get(path)
    assert answer.error() == (404, "not_found_error")
    assert answer.header("content-type") == "application/json"


@pytest.mark.parametrize("path, content_type", [("/", TYPES["dashboard.html"]),
                                                ("/dashboard", TYPES["dashboard.html"]),
                                                ("/static/dashboard.js", TYPES["dashboard.js"]),
                                                ("/static/dashboard.css", TYPES["dashboard.css"])])
def test_head_has_the_headers_and_no_body(memory_ccpd, path, content_type):
    ccpd = memory_ccpd()
    answer = ccpd.request("HEAD", path)
    assert_served(answer, content_type)
    assert answer.body == b""


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_other_methods_get_405(memory_ccpd, method):
    ccpd = memory_ccpd()
    answer = ccpd.request(method, "/dashboard", b"{}", {"content-type": "application/json"})
    assert answer.error() == (405, "invalid_request_error")
    assert ccpd.upstream.requests == []


def test_the_page_and_its_fetches_pass_the_guard_as_same_origin_only(memory_ccpd):
    ccpd = memory_ccpd()
    own = ccpd.url  # http://127.0.0.1:8787, the Host the client sends
    for path in ("/dashboard", "/static/dashboard.js", "/v1/usage", "/v1/usage/samples?since=0",
                 "/v1/usage/rollups?granularity=hour&since=0"):
        # a browser's same-origin fetch may carry its own Origin (and Sec-Fetch-Site)
        answer = ccpd.get(path, {"origin": own, "sec-fetch-site": "same-origin"})
        assert answer.code == 200, (path, answer.body[:200])
        assert ccpd.get(path).code == 200
        assert ccpd.get(path, {"origin": "https://attacker.example"}).error() == \
            (403, "permission_error")
        # DNS rebinding: the attacker's name as Host gets nothing, not even the page
        assert ccpd.get(path, {"host": "attacker.example:8787"}).error() == \
            (421, "permission_error")


def test_with_client_tokens_the_page_needs_one_too(memory_ccpd):
    ccpd = memory_ccpd(server_extra=f"client_tokens = {TOKEN}")
    assert ccpd.get("/dashboard").error() == (401, "authentication_error")
    assert ccpd.get("/static/dashboard.js").error() == (401, "authentication_error")
    assert ccpd.get("/dashboard", {"x-api-key": TOKEN}).code == 200


def test_the_json_the_page_asks_for_answers_on_an_empty_ccpd(memory_ccpd):
    """The very URLs dashboard.js builds (``since`` with three decimals, the largest limit),
    with no traffic, no quota and no store rows."""
    ccpd = memory_ccpd()
    now = ccpd.clock.seconds()
    usage = ccpd.get("/v1/usage").json()
    assert set(usage["models"]) == {"glm-4.6", "glm-solo"} and set(usage["lanes"]) == \
        {"anthropic", "zai"}
    samples = ccpd.get(f"/v1/usage/samples?since={now - 86400:.3f}&limit=10000")
    assert samples.code == 200 and samples.json()["models"] == {}
    rollups = ccpd.get(f"/v1/usage/rollups?granularity=hour&since={int(now) - 23 * 3600}")
    assert rollups.code == 200 and rollups.json()["models"] == {}
    js = dashboard.asset_bytes("dashboard.js").decode()
    assert "limit=${SAMPLE_PAGE}" in js and "SAMPLE_PAGE = 10000;" in js
    assert "/v1/usage/rollups?granularity=hour&since=" in js


# -- the page runs under its own CSP -------------------------------------------------------------

class _PageScan(HTMLParser):
    def __init__(self):
        super().__init__()
        self.scripts: list[dict] = []
        self.links: list[dict] = []
        self.inline: list[str] = []  # inline script or style, event handlers, style attributes
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        for name, _value in attrs:
            if name.startswith("on") or name == "style":
                self.inline.append(f"<{tag} {name}=…>")
        if tag == "script":
            self.scripts.append(attributes)
            self._in_script = True
        elif tag == "style":
            self.inline.append("<style>")
        elif tag == "link":
            self.links.append(attributes)

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline.append(f"<script>{data.strip()[:40]}")


def test_the_page_needs_nothing_its_csp_forbids(memory_ccpd):
    ccpd = memory_ccpd()
    scan = _PageScan()
    scan.feed(ccpd.get("/dashboard").body.decode())
    assert scan.inline == []
    loads = [s["src"] for s in scan.scripts] + [
        link["href"] for link in scan.links if link.get("rel") == "stylesheet"]
    assert sorted(loads) == ["/static/dashboard.css", "/static/dashboard.js"]
    for link in scan.links:  # the icon too: a data: URL (img-src allows it), no /favicon.ico
        assert link["href"].startswith(("/static/", "data:")), link
    for path in loads:
        assert ccpd.get(path).code == 200
    directives = dict(d.strip().split(" ", 1) for d in dashboard.CSP.decode().split(";"))
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert directives["connect-src"] == "'self'" and directives["default-src"] == "'self'"
    assert "unsafe" not in dashboard.CSP.decode()


def test_the_script_never_parses_data_as_html_or_code():
    """Model names and reasons come from clients and providers: text nodes only."""
    js = dashboard.asset_bytes("dashboard.js").decode()
    for forbidden in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                      "new Function", ".style.", "setAttribute(\"style\"", "import("):
        assert forbidden not in js, forbidden
    # nothing from elsewhere: the one absolute URL is the SVG namespace
    assert re.findall(r"https?://[^\s\"'`]+", js) == ["http://www.w3.org/2000/svg"]
    css = dashboard.asset_bytes("dashboard.css").decode()
    assert "url(" not in css and "@import" not in css


def test_the_files_are_package_data():
    setup_cfg = (ROOT / "setup.cfg").read_text()
    assert re.search(r"^ccpd\.web = static/\*$", setup_cfg, re.M), \
        "ccpd/web/static/* must ship with the package ([options.package_data] in setup.cfg)"
    for name in dashboard.ASSETS:
        assert (ROOT / "ccpd" / "web" / "static" / name).is_file()


# -- a real browser ------------------------------------------------------------------------------

BROWSER_TIMEOUT_S = 60.0
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """``CCPD_TEST_CHROMIUM``, else the first of the usual names on PATH, else None."""
    chosen = os.environ.get("CCPD_TEST_CHROMIUM")
    if chosen:
        if not os.access(chosen, os.X_OK):
            pytest.fail(f"CCPD_TEST_CHROMIUM={chosen!r} is not an executable file")
        return chosen
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def run_chromium(binary: str, home: Path, url: str, *extra: str) -> tuple[bytes, str]:
    """Run headless Chromium on ``url`` (with ``extra`` options) in its own session, bounded by
    :data:`BROWSER_TIMEOUT_S`; ``(stdout, stderr)``. Whatever it leaves running is killed."""
    assert url.startswith("http://127.0.0.1:"), url
    command = [binary, "--headless=new", "--no-sandbox",  # as root (CI): no sandbox possible
               "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
               "--no-default-browser-check", "--no-proxy-server",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
               f"--user-data-dir={home / 'profile'}", "--enable-logging=stderr", "--v=0",
               # the page refreshes every 5 s: 12 s of virtual time see at least two rounds
               "--virtual-time-budget=12000", *extra, url]
    environ = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"),
               "XDG_CACHE_HOME": str(home / "cache")}
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=environ, start_new_session=True)
    try:
        out, err = child.communicate(timeout=BROWSER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_group(child.pid)
        child.communicate()
        raise AssertionError(f"chromium did not finish within {BROWSER_TIMEOUT_S:g}s") from None
    finally:
        _kill_group(child.pid)  # helpers (zygote, crashpad) it may have left in its session
    assert child.returncode == 0, (child.returncode, err.decode("utf-8", "replace")[-3000:])
    return out, err.decode("utf-8", "replace")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def console_lines(stderr: str) -> list[str]:
    """What the page wrote to the console — exceptions (``Uncaught …``), CSP violations,
    ``console.*`` calls. The dashboard writes nothing there when all is well."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


class _Texts(HTMLParser):
    """The text of every element with an id, and the attributes of every element."""

    VOID = {"meta", "link", "br", "img", "input", "hr", "source", "wbr", "area", "base", "col"}

    def __init__(self):
        super().__init__()
        self.texts: dict[str, str] = {}
        self.elements: list[tuple[str, dict]] = []
        self._open: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.elements.append((tag, attributes))
        if tag in self.VOID:
            return
        self._open.append((tag, attributes.get("id")))
        if attributes.get("id"):
            self.texts.setdefault(attributes["id"], "")

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i][0] == tag:
                del self._open[i:]
                return

    def handle_data(self, data):
        for _tag, element_id in self._open:
            if element_id:
                self.texts[element_id] += data

    def with_attribute(self, name: str, value: str | None = None) -> list[dict]:
        return [a for _tag, a in self.elements if name in a and (value is None or a[name] == value)]


async def _json(url: str) -> dict:
    response = await treq.get(url, timeout=5)
    assert response.code == 200, url
    return json.loads(await response.content())


async def _until_stored(url: str, requests: int, timeout: float = 15.0) -> None:
    """Until the store holds ``requests`` samples and has rolled them up (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = await _json(url + "/v1/usage/samples?since=0&limit=10000")
        rollups = await _json(url + "/v1/usage/rollups?granularity=hour&since=0")
        stored = sum(len(rows) for rows in samples["models"].values())
        if stored >= requests and len(rollups["models"]) >= 2:
            return
        assert time.monotonic() < deadline, (stored, requests, rollups)
        await task.deferLater(reactor, 0.1, lambda: None)


@pytest.fixture
def chromium(tmp_path):
    """``await chromium(url, *options)``: the page at ``url`` rendered by headless Chromium
    (:class:`_Texts` of its DOM), having checked that it wrote nothing to the console;
    the test skips when there is no Chromium."""
    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium binary (chromium, chromium-browser, google-chrome on PATH, or "
                    "CCPD_TEST_CHROMIUM): install Debian's 'chromium' package")
    home = Path(tempfile.mkdtemp(prefix="ccpd-chromium-", dir=tmp_path))

    async def render(url: str, *options: str) -> _Texts:
        dom, stderr = await deferToThread(run_chromium, binary, home, url, "--dump-dom",
                                          *options)
        assert console_lines(stderr) == []
        page = _Texts()
        page.feed(dom.decode("utf-8", "replace"))
        [html] = [a for tag, a in page.elements if tag == "html"]
        assert int(html.get("data-refreshes", "0")) >= 2, "the page did not refresh itself"
        assert page.texts["problems"].strip() == "", page.texts["problems"]
        return page

    async def screenshot(url: str, path: Path) -> bytes:
        _out, stderr = await deferToThread(run_chromium, binary, home, url,
                                           f"--screenshot={path}", "--window-size=1400,2000")
        assert console_lines(stderr) == []
        png = path.read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
        return png

    async def run(url: str, *options: str) -> tuple[bytes, str]:
        return await deferToThread(run_chromium, binary, home, url, *options)

    render.screenshot = screenshot
    render.run = run
    render.home = home
    return render


class _BadPage(Resource):
    """A page under the dashboard's CSP that breaks it twice and throws: what the console
    check must see."""

    isLeaf = True

    def render_GET(self, request):
        if request.path == b"/bad.js":
            request.setHeader(b"content-type", b"text/javascript")
            return b"window.setTimeout(function () { null.boom(); }, 10);"
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", dashboard.CSP)
        return (b'<!DOCTYPE html><html><head><link rel="icon" href="data:,">'
                b'<script src="/bad.js"></script></head><body><p style="color: red">x</p>'
                b'<script>document.title = "inline";</script></body></html>')


@pytest_twisted.ensureDeferred
async def test_the_console_check_sees_exceptions_and_csp_violations(chromium):
    """The check the dashboard passes is not vacuous: with this Chromium, an uncaught
    exception and CSP violations do reach the lines :func:`console_lines` reads."""
    port = reactor.listenTCP(0, Site(_BadPage()), interface="127.0.0.1")
    try:
        _dom, stderr = await chromium.run(f"http://127.0.0.1:{port.getHost().port}/",
                                          "--dump-dom")
    finally:
        await port.stopListening()
    lines = "\n".join(console_lines(stderr))
    assert "Uncaught TypeError" in lines, stderr[-3000:]
    assert "Executing inline script violates" in lines and \
        "Applying inline style violates" in lines, stderr[-3000:]


@pytest_twisted.ensureDeferred
async def test_an_idle_dashboard_in_headless_chromium(chromium, fake_upstream, start_ccpd):
    """No traffic, no quota, no store rows: every part says so, nothing fails."""
    ccpd = await start_ccpd(fake_upstream.url())
    page = await chromium(ccpd.url + "/")
    models = {a["data-model"]: a["data-state"] for a in page.with_attribute("data-model")}
    assert models == {"glm-4.6": "ok", "glm-solo": "ok"}  # the routes' models
    assert "0 tokens, no limit" in page.texts["models"]
    assert {a["data-lane"] for a in page.with_attribute("data-lane")} == {"anthropic", "zai"}
    assert "no provider readings and nothing counted yet" in page.texts["lanes"]
    assert "no tokens in the last 24 h" in page.texts["tokens-chart"]
    assert "no successful Messages requests" in page.texts["ttft-chart"]
    assert "no rollups in the last 24 h" in page.texts["rollups"]
    assert "no requests in the last 24 h" in page.texts["requests"]


@pytest_twisted.ensureDeferred
async def test_the_dashboard_in_headless_chromium(tmp_path, chromium, make_fake, start_ccpd):
    (tmp_path / "quotas.json").write_text(json.dumps({"models": {
        "glm-4.6": {"rolling_limit_tokens": 5000, "weekly_limit_tokens": 50000, "warn_pct": 0.8}}}))
    anthropic = make_fake()
    zai = make_fake(limit_tokens=900)  # Z.AI's plan runs out: 1308 from the fourth request on
    ccpd = await start_ccpd(anthropic.url(), zai_url=zai.url(),
                            store_extra="rollup_interval = 1s")
    url = ccpd.url + "/v1/messages"
    sent = 0
    for _ in range(3):
        response = await post(url, MESSAGE, headers={
            "x-fake-unified": "5h=0.42,7d=0.10,status=allowed", "x-fake-input-tokens": "150",
            "x-fake-events": "40"})
        assert response.code == 200
        await response.content()
        sent += 1
    for _ in range(4):  # the fourth is answered 1308 by zai and rerouted to anthropic
        response = await post(url, {**MESSAGE, "model": "glm-4.6", "stream": True},
                              headers={"x-fake-input-tokens": "300"})
        assert response.code == 200
        await response.content()
        sent += 1
    response = await post(url, MESSAGE, headers={"x-fake-status": "400",
                                                 "x-fake-error-type": "invalid_request_error"})
    assert response.code == 400
    await response.content()
    sent += 1
    await _until_stored(ccpd.url, sent)

    started = time.monotonic()
    page = await chromium(ccpd.url + "/dashboard")
    summary = page.texts["summary"]
    assert "ready" in summary and "not ready" not in summary and "hybrid" in summary

    models = {a["data-model"]: a for a in page.with_attribute("data-model")}
    assert {"claude-sonnet-4-5", "glm-4.6", "glm-solo"} <= set(models)
    assert models["claude-sonnet-4-5"]["data-state"] == "ok"
    # Z.AI said five_hour is used up: blocked, cooling down until its reset, rerouted
    assert models["glm-4.6"]["data-state"] == "block"
    assert "provider reports five_hour of lane zai rejected" in page.texts["models"]
    assert "cooling down" in page.texts["models"] and "rerouted_limit" in page.texts["models"]
    assert "/ 5k" in page.texts["models"] and "/ 50k" in page.texts["models"]  # glm-4.6's limits
    assert {a["data-lane"] for a in page.with_attribute("data-lane")} == {"anthropic", "zai"}
    assert "provider five_hour" in page.texts["lanes"] and "rejected" in page.texts["lanes"]
    assert "42%" in page.texts["lanes"]  # anthropic's unified 5h utilisation

    legend = page.texts["tokens-legend"]
    assert "claude-sonnet-4-5" in legend and "glm-4.6" in legend and "glm-solo" not in legend
    # a bar per model in the last 5 minutes (each bar's title names its model and tokens)
    assert "claude-sonnet-4-5: " in page.texts["tokens-chart"]
    assert "glm-4.6: " in page.texts["tokens-chart"]
    assert "no tokens" not in page.texts["tokens-chart"]
    assert "no successful" not in page.texts["ttft-chart"]
    assert "claude-sonnet-4-5" in page.texts["rollups"] and "glm-4.6" in page.texts["rollups"]

    requests = page.texts["requests"]
    assert requests.count("glm-4.6") >= 3 and requests.count("claude-sonnet-4-5") >= 4
    assert "rerouted_limit" in requests and "invalid_request_error" in requests
    assert len(page.with_attribute("class", "error")) == 1  # the 400, shown as an error row

    shot = await chromium.screenshot(ccpd.url + "/dashboard", chromium.home / "dashboard.png")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    SCREENSHOT.write_bytes(shot)
    assert time.monotonic() - started < 2 * BROWSER_TIMEOUT_S


@pytest_twisted.ensureDeferred
async def test_a_lane_down_in_headless_chromium(chromium, fake_upstream, start_ccpd):
    """``/readyz`` answers 503 (zai has no key): the page reads that body too."""
    ccpd = await start_ccpd(fake_upstream.url(), environ={})
    page = await chromium(ccpd.url + "/dashboard")
    assert "not ready" in page.texts["summary"] and "lanes down: zai" in page.texts["summary"]
    assert "ZAI_TEST_KEY" in page.texts["lanes"]
