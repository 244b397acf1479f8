#!/usr/bin/env bash
# Probe where a provider (GLM on Z.AI) really cuts a model off, compared with what ccpd counted.
# Sends small Messages requests through ccpd until the first limit answer and appends one row to
# results/GLM_LIMIT_PROBE.md, which ccpd's calibration sampler ingests. Run with --help.
set -euo pipefail

PROG=glm-limit-probe
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"

usage() {
    cat <<EOF
Usage: scripts/experiments/glm-limit-probe.sh [options]

Sends up to N small POST <url>/v1/messages requests through ccpd, one after another, until the
provider answers with its limit (HTTP 429, or an error body with error.code 1308/1310 or
error.type rate_limit_error). Before each request it reads <url>/v1/usage, so at the first limit
it knows what ccpd had counted before the limited request. Appends one row to the results file
(writing its heading and table header first when it has none) and prints a one-line summary.

The model's route in ccpd must have no secondary lane (e.g. "[routes] glm-4.6 = zai"): with one,
ccpd reroutes the limit answer and the probe never sees it. Each run uses up the model's plan
until its next reset.

Options:
  --repeat N       most requests to send (default 120)
  --tokens T       max_tokens of each request (default 50)
  --vendor V       provider; only "glm" is supported (default glm; model glm-4.6)
  --model M        model to probe (default: the vendor's, glm-4.6)
  --url URL        ccpd base URL (default \$CCP_URL, else http://127.0.0.1:8787)
  --results FILE   results file (default <repo>/results/GLM_LIMIT_PROBE.md)
  --api-key KEY    sent as x-api-key (default \$ANTHROPIC_API_KEY, else "probe")
  --reset-tz TZ    zone of the provider's "reset at <wall time>" (default +08:00, Z.AI's)
  --timeout S      seconds to wait for each answer (default 300)
  -h, --help       this text

Exit status: 0 when the run completed (limit found or not); 1 when a request failed with an
answer that is not a limit; 2 on a usage error or when ccpd cannot be reached.
EOF
}

die() {
    echo "$PROG: $*" >&2
    exit 2
}

repeat=120
tokens=50
vendor=glm
model=""
url="${CCP_URL:-http://127.0.0.1:8787}"
results="$REPO_ROOT/results/GLM_LIMIT_PROBE.md"
api_key="${ANTHROPIC_API_KEY:-probe}"
reset_tz="+08:00"
timeout=300

while (($#)); do
    opt="$1"
    case "$opt" in
        -h|--help) usage; exit 0 ;;
        --*=*) set -- "${opt%%=*}" "${opt#*=}" "${@:2}"; continue ;;
        --repeat|--tokens|--vendor|--model|--url|--results|--api-key|--reset-tz|--timeout)
            (($# >= 2)) || die "$opt needs a value (see --help)"
            value="$2"
            shift 2
            case "$opt" in
                --repeat) repeat="$value" ;;
                --tokens) tokens="$value" ;;
                --vendor) vendor="$value" ;;
                --model) model="$value" ;;
                --url) url="$value" ;;
                --results) results="$value" ;;
                --api-key) api_key="$value" ;;
                --reset-tz) reset_tz="$value" ;;
                --timeout) timeout="$value" ;;
            esac
            ;;
        *) die "unknown option '$opt' (see --help)" ;;
    esac
done

[[ "$repeat" =~ ^[1-9][0-9]*$ ]] || die "--repeat must be a positive whole number, not '$repeat'"
[[ "$tokens" =~ ^[1-9][0-9]*$ ]] || die "--tokens must be a positive whole number, not '$tokens'"
[[ "$timeout" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--timeout must be a number of seconds, not '$timeout'"
[[ "$reset_tz" =~ ^[+-][0-9]{2}:[0-9]{2}$ ]] || die "--reset-tz must look like +08:00, not '$reset_tz'"
case "$vendor" in
    glm) default_model=glm-4.6 ;;
    *) die "vendor '$vendor' is not supported: only 'glm' is (Z.AI's GLM plans)" ;;
esac
model="${model:-$default_model}"
[[ "$url" == *://* ]] || url="http://$url"
url="${url%/}"

exec python3 - "$REPO_ROOT" "$url" "$vendor" "$model" "$repeat" "$tokens" "$results" \
    "$api_key" "$reset_tz" "$timeout" <<'PY'
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

PROG = "glm-limit-probe"
(repo_root, url, vendor, model, repeat, tokens, results, api_key, reset_tz,
 timeout) = sys.argv[1:]
# ccpd's own (stdlib-only) readers of limit answers, so the probe reads them as ccpd does
sys.path.insert(0, repo_root)
from ccpd.config import utc_offset  # noqa: E402
from ccpd.limits import classify  # noqa: E402
repeat, tokens, timeout = int(repeat), int(tokens), float(timeout)

COLUMNS = ("timestamp", "vendor", "model", "repeat", "tokens", "first_429_index",
           "calc_headroom", "inferred_multiplier", "upstream_status", "gap_seconds",
           "hour_of_day")
HEADING = """# GLM limit probe

Rows appended by `scripts/experiments/glm-limit-probe.sh`: each run sends small Messages
requests through ccpd until the provider's first limit answer and records what ccpd had counted
before that request. ccpd's calibration sampler ingests this file when it changes (a numeric
`inferred_multiplier` is a limit-multiplier sample, a numeric `gap_seconds` a rolling-window gap
sample). The probed model's route must have no secondary lane, or ccpd reroutes the limit and
the probe never sees it. See `scripts/experiments/glm-limit-probe.sh --help`.
"""


def fail(message, code=2):
    print(f"{PROG}: {message}", file=sys.stderr)
    sys.exit(code)


RESET_TZ = utc_offset(reset_tz)


def call(method, path, body=None):
    """(status, headers, bytes) of one request; HTTP errors are answers too."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method, headers={
        "content-type": "application/json", "accept": "application/json",
        "x-api-key": api_key, "anthropic-version": "2023-06-01"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, {k.lower(): v for k, v in answer.headers.items()}, answer.read()
    except urllib.error.HTTPError as answer:
        return answer.code, {k.lower(): v for k, v in answer.headers.items()}, answer.read()


def usage_window():
    """ccpd's view of the model from GET /v1/usage: {"rolling": {...}, "weekly": {...}}."""
    try:
        status, _, body = call("GET", "/v1/usage")
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        fail(f"ccpd is not reachable at {url} ({reason}); start it (make run) or pass --url")
    try:
        view = json.loads(body)
    except ValueError:
        view = None
    if status != 200 or not isinstance(view, dict) or not isinstance(view.get("models"), dict):
        fail(f"{url}/v1/usage answered HTTP {status} without ccpd's usage view; "
             "is --url a ccpd base URL?")
    return view["models"].get(model) or {}


def error_of(body):
    try:
        answer = json.loads(body)
    except ValueError:
        return {}
    error = answer.get("error") if isinstance(answer, dict) else None
    return error if isinstance(error, dict) else {}


def number(value, digits):
    if value is None:
        return "-"
    text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def cells_of(line):
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def append_row(row):
    """Append ``row`` to the last probe table of the results file, writing the heading and the
    table header first when the file has none (or when text follows its last table)."""
    text = ""
    if os.path.exists(results):
        with open(results, encoding="utf-8") as f:
            text = f.read()
    lines = text.rstrip().splitlines()
    start = len(lines)
    while start > 0 and lines[start - 1].strip().startswith("|"):
        start -= 1
    header = [c.lower() for c in cells_of(lines[start])] if start < len(lines) else []
    if header and set(COLUMNS) <= set(header):
        columns, prefix = header, "\n".join(lines) + "\n"
    else:
        columns = list(COLUMNS)
        prefix = ("\n".join(lines) + "\n\n" if lines else HEADING + "\n")
        prefix += "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    line = "| " + " | ".join(str(row.get(c, "")).replace("|", "/") for c in columns) + " |\n"
    folder = os.path.dirname(os.path.abspath(results))
    os.makedirs(folder, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=folder, prefix=".glm-limit-probe.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(prefix + line)
        if os.path.exists(results):
            os.chmod(temp, os.stat(results).st_mode & 0o777)
        else:
            os.chmod(temp, 0o644)
        os.replace(temp, results)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    return line.strip()


request_body = {"model": model, "max_tokens": tokens,
                "messages": [{"role": "user", "content": "Reply with one word."}]}
first_limit = status = None
before = {}
kind = None
note = ""
for index in range(1, repeat + 1):
    before = usage_window()
    try:
        status, headers, body = call("POST", "/v1/messages", request_body)
    except (urllib.error.URLError, OSError) as e:
        fail(f"request {index} to {url}/v1/messages failed: {getattr(e, 'reason', e)}")
    if 200 <= status < 300:
        continue
    error = error_of(body)
    message = str(error.get("message") or "")
    now = time.time()
    answer = classify(status, headers, body, now, RESET_TZ)
    if answer.kind is None:
        fail(f"request {index} got HTTP {status} ({error.get('type') or error.get('code')}: "
             f"{message or body[:200]!r}), not a limit answer; no row written", code=1)
    if message.startswith("ccpd:"):
        note = (f"; ccpd blocked request {index} on its own quota before the provider limited "
                f"({message}) - raise the model's quota in quotas.json to probe the provider")
        kind = None
        break
    kind = answer.quota_window
    if kind is None:
        fail(f"request {index} got a {answer.label} answer (HTTP {status}, {answer.code}), "
             f"not a plan window's limit; no row written", code=1)
    first_limit = index
    reset = answer.reset_at
    window = before.get(kind) or {}
    limit = window.get("limit_tokens")
    used, headroom = window.get("used_tokens"), window.get("headroom_tokens")
    calc_eta = window.get("reset_eta_sec")
    multiplier = used / limit if limit and used is not None else None
    headroom_fraction = headroom / limit if limit and headroom is not None else None
    gap = None
    if reset is not None and reset > now and calc_eta is not None:
        gap = calc_eta - (reset - now)
    if kind == "weekly" and gap is not None:
        note = (f"; weekly limit: gap {gap:.1f} s not recorded (the file's gaps are read as "
                "rolling-window ones)")
        gap = None
    break

end = datetime.now(timezone.utc)
row = {"timestamp": end.strftime("%Y-%m-%dT%H:%M:%SZ"), "vendor": vendor, "model": model,
       "repeat": repeat, "tokens": tokens, "first_429_index": first_limit or "-",
       "calc_headroom": "-", "inferred_multiplier": "-",
       "upstream_status": status if status is not None else "-", "gap_seconds": "-",
       "hour_of_day": end.hour}
if first_limit:
    row.update(calc_headroom=number(headroom_fraction, 4),
               inferred_multiplier=number(multiplier, 4), gap_seconds=number(gap, 1))
append_row(row)
if first_limit:
    counted = (f"ccpd had counted {used}/{limit} {kind} tokens (multiplier "
               f"{row['inferred_multiplier']}, headroom {row['calc_headroom']})"
               if limit else f"{model} has no {kind} limit in ccpd's quotas")
    summary = (f"{model}: limit at request {first_limit}/{repeat} (HTTP {status}); {counted}; "
               f"gap {row['gap_seconds']} s")
elif note:
    summary = f"{model}: no provider limit seen (HTTP {status})"
else:
    summary = f"{model}: no limit within {repeat} requests (last HTTP {status})"
print(f"{PROG}: {summary}{note}; row appended to {results}")
PY
