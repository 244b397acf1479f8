"""Configuration: the shipped file, every error naming file/section/key, CCP_* overrides."""
import os
import subprocess
import sys

import pytest

from ccpd.config import ConfigError, Route, config_from_string, load_config, parse_duration

MINIMAL = """
[lane:anthropic]
base_url = https://api.anthropic.com
"""


def parse(text, environ=None):
    return config_from_string(text, source="test.ini", environ=environ or {}, check_files=False)


def error_of(text, environ=None) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(text, environ)
    return str(caught.value)


def test_shipped_config_loads_with_documented_defaults():
    config = load_config("etc/ccp.ini", environ={})
    assert config.server.listen == "tcp:8787:interface=127.0.0.1"
    assert config.server.max_body_bytes == 33554432
    assert config.server.admin_token == ""
    assert set(config.lanes) == {"anthropic", "zai"}
    zai = config.lanes["zai"]
    assert (zai.auth.kind, zai.auth.env_var, zai.reset_tz) == ("env", "ZAI_API_KEY", "+08:00")
    assert config.lanes["anthropic"].auth.kind == "passthrough"
    assert config.lanes["anthropic"].idle_timeout_s == 300
    assert config.routing.reroute_mode == "hybrid" and config.routing.cooldown_sec == 300
    assert config.routes["glm-4.6"] == Route("glm-4.6", "zai", "anthropic", "claude-sonnet-4-5")
    assert config.logs.dir == "logs" and config.logs.backups == 5
    assert config.store.persist is True and config.store.rollup_interval == 300
    assert config.store.path == "logs/ccp.sqlite3" and config.store.retention_days == 30
    assert config.calibration.sample_minutes == 60


def test_minimal_config_takes_defaults():
    config = parse(MINIMAL)
    assert config.routing.default_lane == "anthropic"
    assert config.quotas_file == "etc/quotas.json"
    assert config.lanes["anthropic"].probe_path == "/v1/models"


@pytest.mark.parametrize("text, expected", [
    ("30s", 30), ("5m", 300), ("1h", 3600), ("2d", 172800), ("45", 45), ("1.5h", 5400),
])
def test_durations(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["", "5 minutes", "-3s", "1w", "m"])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_unknown_key_names_file_section_and_key():
    message = error_of(MINIMAL + "\n[server]\nlisten = tcp:1\nlisen = oops\n")
    assert message.startswith("test.ini: [server] lisen: unknown key")


def test_unknown_section_is_named():
    assert error_of(MINIMAL + "\n[serverr]\n").startswith("test.ini: [serverr]: unknown section")


def test_unknown_lane_key_is_named():
    assert error_of(MINIMAL + "timeout = 3\n").startswith("test.ini: [lane:anthropic] timeout:")


@pytest.mark.parametrize("section, key, value, words", [
    ("server", "max_body_bytes", "lots", "not a whole number"),
    ("logs", "backups", "-1", "below the minimum"),
    ("store", "persist", "perhaps", "not a boolean"),
    ("store", "rollup_interval", "soon", "not a duration"),
    ("routing", "reroute_mode", "yolo", "preemptive, run2cap, hybrid"),
    ("routing", "cooldown_sec", "5 min", "not a duration"),
])
def test_bad_values_name_their_key(section, key, value, words):
    message = error_of(MINIMAL + f"\n[{section}]\n{key} = {value}\n")
    assert message.startswith(f"test.ini: [{section}] {key}: ")
    assert words in message


@pytest.mark.parametrize("key, value", [
    ("base_url", "api.anthropic.com"), ("auth", "env:"), ("auth", "token:ABC"),
    ("probe_path", "v1/models"), ("connect_timeout_s", "0"), ("reset_tz", "+8"),
])
def test_bad_lane_values(key, value):
    text = f"[lane:anthropic]\nbase_url = https://x.test\n{key} = {value}\n"
    if key == "base_url":
        text = f"[lane:anthropic]\nbase_url = {value}\n"
    assert error_of(text).startswith(f"test.ini: [lane:anthropic] {key}: ")


def test_lane_without_base_url():
    assert error_of("[lane:anthropic]\nauth = passthrough\n") == \
        "test.ini: [lane:anthropic] base_url: missing (required)"


def test_default_lane_must_exist():
    message = error_of(MINIMAL + "[routing]\ndefault_lane = zai\n")
    assert message.startswith("test.ini: [routing] default_lane: no lane named 'zai'")


def test_routes_need_known_lanes():
    assert "no lane named 'zai'" in error_of(MINIMAL + "[routes]\nglm-4.6 = zai\n")
    assert "no lane named 'other'" in error_of(
        MINIMAL + "[routes]\nclaude-x = anthropic, other/m\n")


def test_routes_keep_model_case_and_optional_secondary_model():
    config = parse(MINIMAL + "[lane:zai]\nbase_url = https://z.test/api\n"
                   "[routes]\nGLM-4.6 = zai, anthropic\nglm-4.5 = zai\n")
    assert config.routes["GLM-4.6"] == Route("GLM-4.6", "zai", "anthropic", None)
    assert config.routes["glm-4.5"] == Route("glm-4.5", "zai")
    assert config.route_for("GLM-4.6").lane == "zai"
    assert config.route_for("glm-4.6").lane == "anthropic"  # exact names only
    assert config.route_for(None).lane == "anthropic"


def test_inline_comments_and_continuation_comments():
    config = parse("[lane:anthropic]\nbase_url = https://a.test   ; the lane\n"
                   "auth = bearer-env:KEY   # comment\n"
                   "                         ; continuation comment\n")
    assert config.lanes["anthropic"].base_url == "https://a.test"
    assert config.lanes["anthropic"].auth.kind == "bearer-env"


def test_environment_overrides_keys():
    config = parse(MINIMAL, environ={
        "CCP_LISTEN": "tcp:9999:interface=127.0.0.1", "CCP_REROUTE_MODE": "run2cap",
        "CCP_QUOTA_COOLDOWN_SEC": "0", "CCP_PERSIST": "0", "CCP_DB_PATH": "/tmp/x.sqlite3",
        "CCP_ROLLUP_INTERVAL": "1m", "CCP_ROLLUP_RETENTION_DAYS": "7",
        "CCP_CAL_SAMPLE_MINUTES": "15"})
    assert config.server.listen == "tcp:9999:interface=127.0.0.1"
    assert config.routing.reroute_mode == "run2cap" and config.routing.cooldown_sec == 0
    assert config.store.persist is False and config.store.path == "/tmp/x.sqlite3"
    assert config.store.rollup_interval == 60 and config.store.retention_days == 7
    assert config.calibration.sample_minutes == 15


def test_bad_environment_override_names_the_variable():
    message = error_of(MINIMAL, environ={"CCP_PERSIST": "maybe"})
    assert message.startswith("environment variable CCP_PERSIST (overrides test.ini [store] persist)")


def test_missing_quotas_file_is_an_error(tmp_path):
    text = MINIMAL + f"[quotas]\nfile = {tmp_path}/nope.json\n"
    with pytest.raises(ConfigError, match=r"\[quotas\] file: .*nope.json does not exist"):
        config_from_string(text, source="t.ini", environ={})


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.ini: cannot read config file"):
        load_config(str(tmp_path / "nope.ini"))


def test_syntax_error_names_the_file():
    assert error_of("[lane:anthropic\nbase_url = x\n").startswith("test.ini")
    assert "base_url" in error_of(MINIMAL + "base_url = twice\n")


def test_twistd_exits_non_zero_naming_the_bad_key(tmp_path):
    bad = tmp_path / "bad.ini"
    bad.write_text(MINIMAL + "[server]\nlisen = tcp:1\n")
    done = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "ccpd",
         "--config", str(bad)],
        capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"{bad}: [server] lisen: unknown key" in done.stdout + done.stderr
