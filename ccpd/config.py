"""ccpd configuration: etc/ccp.ini plus ``CCP_*`` overrides, validated into frozen dataclasses.

Every section and key is declared in one table; anything else, and any bad value, is a
:class:`ConfigError` naming the file, the section and the key (or the environment variable).
"""
from __future__ import annotations

import configparser
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field, replace
from datetime import timedelta, timezone
from typing import Callable, Mapping
from urllib.parse import unquote, urlsplit

REROUTE_MODES = ("preemptive", "run2cap", "hybrid")


class ConfigError(Exception):
    """A configuration problem, worded for the operator who has to fix it."""


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "tcp:8787:interface=127.0.0.1"
    admin_token: str = ""
    max_body_bytes: int = 32 * 1024 * 1024
    allowed_hosts: tuple[str, ...] = ()     # Host names accepted besides loopback ones
    allowed_origins: tuple[str, ...] = ()   # browser origins accepted besides ccpd's own
    client_tokens: tuple[str, ...] = field(default=(), repr=False)
    client_tokens_file: str = ""
    backlog: int = 511
    header_timeout_s: float = 30.0
    max_in_flight: int = 512

    @property
    def listen_is_loopback(self) -> bool:
        return endpoint_is_loopback(self.listen)


@dataclass(frozen=True)
class LaneAuth:
    """How a lane authenticates: ``passthrough``, or a key from an environment variable."""

    kind: str = "passthrough"  # passthrough | env | bearer-env
    env_var: str | None = None


@dataclass(frozen=True)
class LaneConfig:
    name: str
    base_url: str
    auth: LaneAuth = LaneAuth()
    probe_path: str = "/v1/models"
    probe_interval: float = 30.0  # seconds between readiness probes of this lane
    connect_timeout_s: float = 10.0
    idle_timeout_s: float = 300.0
    reset_tz: str = "+00:00"
    max_connections: int = 128
    quota_url: str = ""          # the plan's own usage endpoint, polled when set (Z.AI)
    quota_poll: float = 300.0    # seconds between polls; never under MIN_QUOTA_POLL_S

    @property
    def quota_endpoint(self) -> str | None:
        """``quota_url`` as an absolute URL (a path is on the lane's host), or None."""
        if not self.quota_url:
            return None
        if self.quota_url.startswith("/"):
            parts = urlsplit(self.base_url)
            return f"{parts.scheme}://{parts.netloc}{self.quota_url}"
        return self.quota_url

    @property
    def reset_tzinfo(self) -> timezone:
        """``reset_tz`` as a tzinfo (the zone of wall-clock reset times in limit messages)."""
        return utc_offset(self.reset_tz)


@dataclass(frozen=True)
class Route:
    """Where a model goes: its preferred lane and, optionally, a secondary lane and model."""

    model: str
    lane: str
    secondary_lane: str | None = None
    secondary_model: str | None = None  # None: keep the requested model


@dataclass(frozen=True)
class RoutingConfig:
    default_lane: str = "anthropic"
    reroute_mode: str = "hybrid"
    cooldown_sec: float = 300.0
    provider_max_age: float = 600.0   # a provider reading older than this is not used
    block_at: float = 0.98            # provider utilisation at which a lane counts as blocked


@dataclass(frozen=True)
class LogsConfig:
    dir: str = "logs"
    max_bytes: int = 10 * 1024 * 1024
    backups: int = 5
    json_log: bool = False


@dataclass(frozen=True)
class StoreConfig:
    persist: bool = True
    path: str = "logs/ccp.sqlite3"
    rollup_interval: float = 300.0
    retention_days: int = 30
    url: str | None = None       # team mode: a PostgreSQL URL instead of the SQLite path
    instance: str = field(default_factory=socket.gethostname)  # this daemon, in shared samples

    @property
    def team(self) -> bool:
        """Whether the store is shared (PostgreSQL): quotas are then the team's."""
        return self.url is not None


@dataclass(frozen=True)
class CalibrationConfig:
    sample_minutes: float = 60.0
    probe_results: str = "results/GLM_LIMIT_PROBE.md"


@dataclass(frozen=True)
class Config:
    source: str
    server: ServerConfig
    lanes: Mapping[str, LaneConfig]
    routing: RoutingConfig
    routes: Mapping[str, Route]
    quotas_file: str
    logs: LogsConfig
    store: StoreConfig
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def route_for(self, model: str | None) -> Route:
        """The route of ``model``: its ``[routes]`` entry (exact name) or the default lane."""
        route = self.routes.get(model) if model is not None else None
        return route or Route(model=model or "", lane=self.routing.default_lane)


# -- value parsers: each takes the raw string and returns a value or raises ValueError ----------

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds from ``30s``, ``5m``, ``1h``, ``2d`` or a plain number of seconds."""
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise ValueError(f"{text!r} is not a duration (use 30s, 5m, 1h, 2d or seconds)")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _int(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise ValueError(f"{value} is below the minimum of {minimum}")
        return value

    return parse


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise ValueError(f"{text!r} must be a positive number")
    return value


def _positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return value


_BOOLEANS = {"1": True, "yes": True, "true": True, "on": True,
             "0": False, "no": False, "false": False, "off": False}


def _bool(text: str) -> bool:
    try:
        return _BOOLEANS[text.strip().lower()]
    except KeyError:
        raise ValueError(f"{text!r} is not a boolean (use true/false, yes/no, 1/0)") from None


def _text(text: str) -> str:
    return text


def _non_empty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def check_database_url(text: str) -> str:
    """A PostgreSQL URL; the messages never quote it (it may hold a password)."""
    parts = urlsplit(text.strip())
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("must be a postgresql://user[:password]@host[:port]/database URL")
    return text.strip()


def database_location(url: str) -> str:
    """``url`` without its password, for logs and answers: ``postgresql://user@host:port/db``."""
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"


def database_error(url: str, error: BaseException) -> str:
    """One line about a database ``error`` for a log or a message: its first line (libpq adds
    hints on more), with any copy of ``url``'s password masked."""
    text = (str(error).strip() or type(error).__name__).splitlines()[0]
    password = urlsplit(url).password
    if password:
        text = text.replace(password, "***").replace(unquote(password), "***")
    return text


def _instance(text: str) -> str:
    name = text.strip()
    if not name or not name.isprintable() or len(name) > 200:
        raise ValueError("must be a printable name of 1 to 200 characters")
    return name


def _base_url(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r} is not an http(s) URL")
    if parts.query or parts.fragment:
        raise ValueError(f"{text!r} must not carry a query or fragment")
    return text.strip().rstrip("/")


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _auth(text: str) -> LaneAuth:
    text = text.strip()
    if text == "passthrough":
        return LaneAuth()
    kind, _, var = text.partition(":")
    if kind in ("env", "bearer-env") and _ENV_NAME.match(var):
        return LaneAuth(kind=kind, env_var=var)
    raise ValueError(f"{text!r} is not passthrough, env:VAR or bearer-env:VAR")


def _path(text: str) -> str:
    text = text.strip()
    if not text.startswith("/"):
        raise ValueError(f"{text!r} must start with /")
    return text


_TZ = re.compile(r"^([+-])(\d{2}):(\d{2})$")


def utc_offset(text: str) -> timezone:
    """A validated ``+08:00``-style offset as a tzinfo."""
    sign = -1 if text.startswith("-") else 1
    hours, minutes = _tz_offset(text).lstrip("+-").split(":")
    return timezone(sign * timedelta(hours=int(hours), minutes=int(minutes)))


def _tz_offset(text: str) -> str:
    match = _TZ.match(text.strip())
    if not match or int(match.group(2)) > 14 or int(match.group(3)) > 59:
        raise ValueError(f"{text!r} is not a UTC offset like +08:00")
    return text.strip()


def _names(text: str) -> tuple[str, ...]:
    """A comma- or space-separated list."""
    return tuple(part for part in re.split(r"[\s,]+", text.strip()) if part)


def _hosts(text: str) -> tuple[str, ...]:
    hosts = tuple(host.lower() for host in _names(text))
    for host in hosts:
        if "/" in host or "@" in host:
            raise ValueError(f"{host!r} is not a host name (write name or name:port, no scheme)")
    return hosts


def _origins(text: str) -> tuple[str, ...]:
    origins = tuple(origin.lower().rstrip("/") for origin in _names(text))
    for origin in origins:
        parts = urlsplit(origin)
        if origin != "null" and (parts.scheme not in ("http", "https") or not parts.hostname
                                 or parts.path or parts.query):
            raise ValueError(f"{origin!r} is not an origin like https://host[:port] (or null)")
    return origins


MIN_CLIENT_TOKEN_LENGTH = 16


def _tokens(text: str) -> tuple[str, ...]:
    # The values are secrets: no message here may quote them.
    tokens = _names(text)
    for number, token in enumerate(tokens, 1):
        if len(token) < MIN_CLIENT_TOKEN_LENGTH:
            raise ValueError(f"token {number} is shorter than {MIN_CLIENT_TOKEN_LENGTH} "
                             f"characters (value not shown)")
    return tokens


def read_client_tokens(path: str) -> tuple[str, ...]:
    """The tokens in ``path``: one per line, ``#`` comments and blank lines ignored."""
    with open(path, encoding="utf-8") as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    return _tokens(" ".join(line for line in lines if line))


def endpoint_is_loopback(description: str) -> bool:
    """Whether a Twisted server endpoint string listens on loopback (or a unix socket) only.

    ``tcp:PORT`` without ``interface`` listens on every address; kinds this does not know
    (``systemd:``, ...) count as reachable from the network.
    """
    parts = re.split(r"(?<!\\):", description.strip())
    kind = parts[0].lower()
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl") or len(parts) < 2:
        return False
    options = dict(part.split("=", 1) for part in parts[2:] if "=" in part)
    interface = options.get("interface", "").replace("\\:", ":").strip("[]")
    if interface.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def _listen(text: str) -> str:
    text = _non_empty(text)
    if "backlog=" in text and text.partition(":")[0].lower() in ("tcp", "tcp6", "ssl", "unix"):
        raise ValueError("set the listen backlog with [server] backlog, not in the endpoint")
    return text


MIN_QUOTA_POLL_S = 60.0


def _quota_url(text: str) -> str:
    text = text.strip()
    if text and not text.startswith("/"):
        _base_url(text)  # an absolute URL must be http(s)
    return text


def _quota_poll(text: str) -> float:
    value = parse_duration(text)
    if value < MIN_QUOTA_POLL_S:
        raise ValueError(f"{text!r} is more often than once a minute (use 1m or more)")
    return value


def _fraction(text: str) -> float:
    value = _positive_number(text)
    if value > 1:
        raise ValueError(f"{text!r} must be a fraction from 0 to 1")
    return value


def _reroute_mode(text: str) -> str:
    text = text.strip().lower()
    if text not in REROUTE_MODES:
        raise ValueError(f"{text!r} is not one of {', '.join(REROUTE_MODES)}")
    return text


# section -> key -> (parser, environment variable or None). "lane:*" applies to every lane.
_KEYS: dict[str, dict[str, tuple[Callable[[str], object], str | None]]] = {
    "server": {
        "listen": (_listen, "CCP_LISTEN"),
        "admin_token": (_text, None),
        "max_body_bytes": (_int(1), None),
        "allowed_hosts": (_hosts, None),
        "allowed_origins": (_origins, None),
        "client_tokens": (_tokens, "CCP_CLIENT_TOKENS"),
        "client_tokens_file": (_non_empty, None),
        "backlog": (_int(1), None),
        "header_timeout_s": (_positive_duration, None),
        "max_in_flight": (_int(1), None),
    },
    "lane:*": {
        "base_url": (_base_url, None),
        "auth": (_auth, None),
        "probe_path": (_path, None),
        "probe_interval": (_positive_duration, None),
        "connect_timeout_s": (_positive_number, None),
        "idle_timeout_s": (_positive_number, None),
        "reset_tz": (_tz_offset, None),
        "max_connections": (_int(1), None),
        "quota_url": (_quota_url, None),
        "quota_poll": (_quota_poll, None),
    },
    "routing": {
        "default_lane": (_non_empty, None),
        "reroute_mode": (_reroute_mode, "CCP_REROUTE_MODE"),
        "cooldown_sec": (parse_duration, "CCP_QUOTA_COOLDOWN_SEC"),
        "provider_max_age": (_positive_duration, None),
        "block_at": (_fraction, None),
    },
    "quotas": {"file": (_non_empty, None)},
    "logs": {
        "dir": (_non_empty, None),
        "max_bytes": (_int(1024), None),
        "backups": (_int(0), None),
        "json_log": (_bool, None),
    },
    "store": {
        "persist": (_bool, "CCP_PERSIST"),
        "path": (_non_empty, "CCP_DB_PATH"),
        "rollup_interval": (_positive_duration, "CCP_ROLLUP_INTERVAL"),
        "retention_days": (_int(1), "CCP_ROLLUP_RETENTION_DAYS"),
        "url": (check_database_url, "CCP_DB_URL"),
        "instance": (_instance, "CCP_INSTANCE"),
    },
    "calibration": {
        "sample_minutes": (_positive_number, "CCP_CAL_SAMPLE_MINUTES"),
        "probe_results": (_non_empty, None),
    },
}
_REQUIRED = {"lane:*": ("base_url",)}
DEFAULT_QUOTAS_FILE = "etc/quotas.json"


class _Reader:
    """Pulls typed values out of the parsed INI, naming the source of every error."""

    def __init__(self, source: str, parser: configparser.ConfigParser, environ: Mapping[str, str]):
        self.source = source
        self.parser = parser
        self.environ = environ

    def fail(self, section: str, key: str | None, problem: str) -> ConfigError:
        where = f"[{section}]" if key is None else f"[{section}] {key}"
        return ConfigError(f"{self.source}: {where}: {problem}")

    def section(self, section: str, table: str | None = None) -> dict[str, object]:
        """The parsed values present in ``section`` (environment overrides applied)."""
        keys = _KEYS[table or section]
        values: dict[str, object] = {}
        raw = dict(self.parser[section]) if self.parser.has_section(section) else {}
        for key in raw:
            if key not in keys:
                raise self.fail(section, key, f"unknown key (allowed: {', '.join(keys)})")
        for key, (parse, env_var) in keys.items():
            if env_var and env_var in self.environ:
                text, origin = self.environ[env_var], f"environment variable {env_var}"
            elif key in raw:
                text, origin = raw[key], None
            else:
                if key in _REQUIRED.get(table or section, ()):
                    raise self.fail(section, key, "missing (required)")
                continue
            try:
                values[key] = parse(text)
            except ValueError as e:
                if origin:
                    raise ConfigError(
                        f"{origin} (overrides {self.source} [{section}] {key}): {e}") from None
                raise self.fail(section, key, str(e)) from None
        return values


def _routes(reader: _Reader, lanes: Mapping[str, LaneConfig]) -> dict[str, Route]:
    routes: dict[str, Route] = {}
    if not reader.parser.has_section("routes"):
        return routes
    for model, spec in reader.parser["routes"].items():
        preferred, _, secondary = (part.strip() for part in spec.partition(","))
        if not preferred:
            raise reader.fail("routes", model, "needs a lane: model = lane [, lane/model]")
        if preferred not in lanes:
            raise reader.fail("routes", model, f"no lane named {preferred!r}")
        secondary_lane = secondary_model = None
        if secondary:
            secondary_lane, _, secondary_model = (p.strip() for p in secondary.partition("/"))
            if secondary_lane not in lanes:
                raise reader.fail("routes", model, f"no lane named {secondary_lane!r}")
            secondary_model = secondary_model or None
        routes[model] = Route(model, preferred, secondary_lane, secondary_model)
    return routes


def _store(reader: _Reader) -> StoreConfig:
    store = StoreConfig(**reader.section("store"))
    if store.team and not store.persist:
        raise reader.fail("store", "persist", "must stay true with a url: the shared store is "
                                              "the team's quota ledger")
    return store


def _server(reader: _Reader, lanes: Mapping[str, LaneConfig], check_files: bool) -> ServerConfig:
    server = ServerConfig(**reader.section("server"))
    if server.client_tokens_file and check_files:
        try:
            tokens = read_client_tokens(server.client_tokens_file)
        except OSError as e:
            raise reader.fail("server", "client_tokens_file",
                              f"cannot read {server.client_tokens_file}: {e.strerror}") from None
        except ValueError as e:
            raise reader.fail("server", "client_tokens_file",
                              f"{server.client_tokens_file}: {e}") from None
        server = replace(server, client_tokens=server.client_tokens + tokens)
    injecting = sorted(name for name, lane in lanes.items() if lane.auth.kind != "passthrough")
    if injecting and not server.listen_is_loopback and not (
            server.client_tokens or server.client_tokens_file):
        raise reader.fail(
            "server", "listen",
            f"{server.listen} can be reached from the network and lane(s) "
            f"{', '.join(injecting)} send your own API key upstream, so anyone who can connect "
            f"could spend it: set [server] client_tokens (or client_tokens_file, or "
            f"CCP_CLIENT_TOKENS) to tokens clients must send, or listen on 127.0.0.1")
    return server


def _make_parser() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(
        interpolation=None,
        delimiters=("=",),
        comment_prefixes=("#", ";"),
        inline_comment_prefixes=("#", ";"),
        empty_lines_in_values=False,
        default_section="\0no-defaults",  # a [DEFAULT] section would leak keys into every other
    )
    parser.optionxform = str  # model names in [routes] are case-sensitive
    return parser


def config_from_string(text: str, source: str = "<string>",
                       environ: Mapping[str, str] | None = None,
                       check_files: bool = True) -> Config:
    """Parse and validate INI ``text``; ``source`` names it in errors."""
    parser = _make_parser()
    try:
        parser.read_string(text, source=source)
    except configparser.ParsingError as e:
        # configparser quotes the offending line; it may hold a secret, so name its number only.
        numbers = [number for number, _line in getattr(e, "errors", ())] or [e.lineno]
        lines = ", ".join(map(str, numbers))
        kind = ("a key before any [section]" if isinstance(e, configparser.MissingSectionHeaderError)
                else "not a [section] header nor 'key = value'")
        raise ConfigError(f"{source}: line {lines}: {kind} (line not shown)") from None
    except configparser.Error as e:
        raise ConfigError(f"{source}: {e.message.strip()}") from None
    reader = _Reader(source, parser, os.environ if environ is None else environ)

    for section in parser.sections():
        if section not in _KEYS and not (section.startswith("lane:") and section[5:].strip()) \
                and section != "routes":
            allowed = ", ".join(sorted(set(_KEYS) - {"lane:*"}) + ["lane:NAME", "routes"])
            raise reader.fail(section, None, f"unknown section (allowed: {allowed})")

    lanes: dict[str, LaneConfig] = {}
    for section in parser.sections():
        if section.startswith("lane:"):
            name = section[5:].strip()
            lanes[name] = LaneConfig(name=name, **reader.section(section, "lane:*"))
            if lanes[name].quota_url and lanes[name].auth.kind == "passthrough":
                raise reader.fail(section, "quota_url", "polling the plan's quota needs the "
                                  "lane's own key (auth = env:VAR or bearer-env:VAR)")

    routing = RoutingConfig(**reader.section("routing"))
    if routing.default_lane not in lanes:
        raise reader.fail("routing", "default_lane", f"no lane named {routing.default_lane!r}"
                          f" (lanes: {', '.join(lanes) or 'none'})")

    quotas_file = str(reader.section("quotas").get("file", DEFAULT_QUOTAS_FILE))
    if check_files and not os.path.isfile(quotas_file):
        raise reader.fail("quotas", "file", f"{quotas_file} does not exist")

    return Config(
        source=source,
        server=_server(reader, lanes, check_files),
        lanes=lanes,
        routing=routing,
        routes=_routes(reader, lanes),
        quotas_file=quotas_file,
        logs=LogsConfig(**reader.section("logs")),
        store=_store(reader),
        calibration=CalibrationConfig(**reader.section("calibration")),
    )


def load_config(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the INI file at ``path``."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return config_from_string(text, source=path, environ=environ)
