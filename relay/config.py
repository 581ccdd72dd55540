"""Configuration: TOML file + environment + flags, resolved once.

Precedence (lowest first): built-in defaults, the TOML file (``--config PATH``,
else ``$RELAY_CONFIG``), ``$RELAY_SPOOL_URL`` for ``spool.url``, then flags
given to a program.  The result is one frozen :class:`Config`; components get
the part they need and never read the environment themselves.

Durations are integer seconds or strings with a unit (``"30s"``, ``"5m"``,
``"4h"``, ``"5d"``); sizes are integer bytes or strings like ``"25MB"``.
An unknown key or a bad value raises :class:`relay.errors.ConfigError`
naming the key.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from relay.errors import ConfigError

TLS_MODES = ("none", "opportunistic", "required")

_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_UNITS = {
    "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
    "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
}


def _bad_duration(key: str, value: object) -> ConfigError:
    return ConfigError(f"{key} must be a duration like 30, \"30s\", \"5m\", \"4h\", \"5d\" or \"1ms\", not {value!r}.")


def parse_duration(value: object, key: str) -> float:
    """Seconds from ``30``, ``"30s"``, ``"5m"``, ``"4h"``, ``"5d"``, ``"1.5h"`` or ``"1ms"``."""
    if isinstance(value, bool):
        raise _bad_duration(key, value)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|[smhdw]?)\s*", value.lower())
        if not m:
            raise _bad_duration(key, value)
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]
    else:
        raise _bad_duration(key, value)
    if seconds < 0:
        raise ConfigError(f"{key} must not be negative.")
    return seconds


def parse_size(value: object, key: str) -> int:
    """Bytes from ``1000``, ``"25MB"``, ``"512KiB"``..."""
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a size like 1048576 or \"25MB\", not {value!r}.")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", value.lower())
        if not m or m.group(2) not in _SIZE_UNITS and m.group(2) != "":
            raise ConfigError(f"{key} must be a size like 1048576 or \"25MB\", not {value!r}.")
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2) or "b"])
    else:
        raise ConfigError(f"{key} must be a size like 1048576 or \"25MB\", not {value!r}.")
    if size < 0:
        raise ConfigError(f"{key} must not be negative.")
    return size


def parse_hostport(value: str, key: str, default_port: int | None = None) -> tuple[str, int]:
    """``"HOST:PORT"``, ``"[::1]:PORT"`` or (with a default port) ``"HOST"``."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a \"HOST:PORT\" string, not {value!r}.")
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\[\]\s]+)(?::(\d+))?", value.strip())
    if not m:
        raise ConfigError(f"{key} must be a \"HOST:PORT\" string, not {value!r}.")
    host = m.group(1) or m.group(3)
    port_text = m.group(2) or m.group(4)
    if port_text is None:
        if default_port is None:
            raise ConfigError(f"{key} must name a port, as in \"127.0.0.1:2525\", not {value!r}.")
        return host, default_port
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{key} has port {port}, which is outside 0-65535.")
    return host, port


def parse_listen(value: str, key: str) -> tuple[str, int]:
    """A listening ``"HOST:PORT"`` (``submission.listen``, ``metrics.listen``):
    the host must be an IP address or ``localhost``, returned as
    ``127.0.0.1``.  Raises ConfigError."""
    host, port = parse_hostport(value, key)
    if host.lower() == "localhost":
        return "127.0.0.1", port
    try:
        ipaddress.ip_address(host.split("%", 1)[0])     # an IPv6 scope (fe80::1%eth0) allowed
    except ValueError:
        raise ConfigError(f"{key} must name an IP address or localhost, not {host!r}.") from None
    return host, port


def default_spool_path() -> Path:
    """The embedded SQLite spool shared by ``relayctl`` and ``relayd``.

    ``$XDG_STATE_HOME/relay/spool.db``, by default ``~/.local/state/relay/spool.db``.
    """
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "relay" / "spool.db"


def default_spool_url() -> str:
    return f"sqlite:///{default_spool_path()}"


def redact_url(url: str) -> str:
    """The spool URL without its password (SPEC: status shows the URL without
    it): the one after the user name, read as SQLAlchemy reads it (everything
    up to ``@``, ``/`` included), and a libpq ``password`` query parameter."""
    url = re.sub(r"^([a-z0-9+.-]+://[^:/@]*):[^@]*@", r"\1:***@", url, flags=re.I)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", url, flags=re.I)


@dataclass(frozen=True, slots=True)
class Route:
    """One ``routes`` entry: a smarthost that replaces MX lookup.

    ``tls`` is ``"none"``, ``"opportunistic"``, ``"required"`` or ``None``
    (use ``delivery.tls``).  ``host`` is an IP literal (used as is; IPv6 may
    be bracketed) or a name resolved with A + AAAA through the resolver.
    """

    host: str
    port: int
    tls: str | None = None
    username: str | None = None
    password: str | None = None

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("a route needs a host")
        if not 0 < self.port < 65536:
            raise ValueError(f"route port {self.port} is out of range")
        if self.tls is not None and self.tls not in TLS_MODES:
            raise ValueError(f"route tls {self.tls!r} is not none, opportunistic or required")

    def __repr__(self) -> str:  # never show the password in logs
        pw = None if self.password is None else "***"
        return (f"Route(host={self.host!r}, port={self.port}, tls={self.tls!r}, "
                f"username={self.username!r}, password={pw!r})")


#: ``submission.max_message_size`` when not set.
DEFAULT_MAX_MESSAGE_SIZE = 25_000_000


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting relay uses, typed and validated (SPEC "Configuration")."""

    hostname: str
    node: str
    spool_url: str
    spool_busy_timeout: float = 5.0
    #: ``spool.min_free_space``: None = one and a half times the largest message (see min_free_space).
    spool_min_free_space: int | None = None
    nameservers: tuple[str, ...] = ()
    delivery_port: int = 25
    concurrency: int = 100
    per_domain_concurrency: int = 10
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    lease: float = 600.0
    tls: str = "opportunistic"
    poll_interval: float = 1.0
    batch_size: int = 500
    retry_initial: float = 300.0
    retry_maximum: float = 14400.0
    max_lifetime: float = 432000.0
    routes: Mapping[str, Route] = field(default_factory=lambda: MappingProxyType({}))
    submission_listen: str = ""
    submission_users: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    submission_tls_cert: str = ""   # PEM certificate (chain) file; "" = no STARTTLS
    submission_tls_key: str = ""    # PEM private key file; set together with the certificate
    commit_delay: float = 0.001     # group commit: wait this long for sessions mid-transaction
    metrics_listen: str = ""
    cpu_affinity: tuple[int, ...] = ()   # () = wherever the kernel schedules it
    source: str | None = None       # the file it came from, for messages

    @property
    def min_free_space(self) -> int:
        """Bytes new mail must leave free on a SQLite spool's file system:
        ``spool.min_free_space``, by default one and a half times
        ``submission.max_message_size`` (Postfix's rule), 0 = no floor."""
        if self.spool_min_free_space is not None:
            return self.spool_min_free_space
        return int(1.5 * (self.max_message_size or DEFAULT_MAX_MESSAGE_SIZE))

    def with_overrides(self, **changes: Any) -> "Config":
        """A copy with some fields replaced (flags given on a command line)."""
        return replace(self, **changes)


# key -> (section, name, parser).  Parsers take (value, "section.name").
def _int_at_least(minimum: int):
    def parse(value: object, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{key} must be a whole number of at least {minimum}, not {value!r}.")
        return value
    return parse


def _port(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 65535:
        raise ConfigError(f"{key} must be a TCP port number from 1 to 65535, not {value!r}.")
    return value


def _string(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, not {value!r}.")
    return value


def _nonempty_string(value: object, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} must be a non-empty string, not {value!r}.")
    return value.strip()


def _tls(value: object, key: str) -> str:
    if value not in TLS_MODES:
        raise ConfigError(f"{key} must be one of \"none\", \"opportunistic\" or \"required\", not {value!r}.")
    return value  # type: ignore[return-value]


def _spool_url(value: object, key: str) -> str:
    if not isinstance(value, str) or not re.match(r"^(sqlite|postgresql)(\+\w+)?://", value):
        raise ConfigError(
            f"{key} must be a SQLAlchemy URL such as \"sqlite:///PATH\" or "
            f"\"postgresql+psycopg://USER@HOST/DB\", not {value!r}.")
    return value


def _listen(value: object, key: str) -> str:
    value = _string(value, key)
    if value:
        parse_hostport(value, key)
    return value


def _listen_ip(value: object, key: str) -> str:
    value = _string(value, key)
    if value:
        parse_listen(value, key)
    return value


def _nameservers(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key} must be a list of \"HOST\" or \"HOST:PORT\" strings, not {value!r}.")
    for v in value:
        parse_nameserver(v)
    return tuple(value)


def parse_nameserver(spec: str) -> tuple[str, int]:
    """Parse one ``dns.nameservers`` entry: ``HOST``, ``HOST:PORT``,
    ``[V6]``, ``[V6]:PORT`` or a bare IPv6 address; the host must be an IP
    address (twisted.names needs one).  Raises ConfigError."""
    s = spec.strip()
    port = 53
    if s.startswith("["):
        end = s.find("]")
        host, rest = s[1:end], s[end + 1:]
        if end < 0 or (rest and not rest.startswith(":")):
            raise ConfigError(f"dns.nameservers entry {spec!r} is not HOST, HOST:PORT or [IPv6]:PORT.")
        port_text = rest[1:] if rest else None
    elif s.count(":") == 1:
        host, port_text = s.split(":")
    else:
        host, port_text = s, None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"dns.nameservers entry {spec!r} has a bad port.")
        port = int(port_text)
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        raise ConfigError(
            f"dns.nameservers entry {spec!r} must be an IP address (optionally with :PORT)."
        ) from None
    return address, port


def _cpu_list(value: object, key: str) -> tuple[int, ...]:
    if (not isinstance(value, list)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise ConfigError(f"{key} must be a list of CPU numbers such as [1] or [2, 3], not {value!r}.")
    if len(set(value)) != len(value):
        raise ConfigError(f"{key} names a CPU twice: {value!r}.")
    return tuple(value)


def _users(value: object, key: str) -> Mapping[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"{key} must be a table of user name = \"password\" strings.")
    for name, password in value.items():
        if not password.strip():    # AUTH would let in anyone who guesses the name
            where = f"{key}.{name}" if re.fullmatch(r"[A-Za-z0-9_-]+", name) else f"{key}.{json.dumps(name)}"
            raise ConfigError(f"{where} has an empty password; give every submission user a password.")
    return MappingProxyType(dict(value))


_ROUTE_KEYS = {"host", "port", "tls", "username", "password"}


def _routes(value: object, key: str) -> Mapping[str, Route]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a table of domain = {{ host = ..., port = ... }}.")
    routes: dict[str, Route] = {}
    for domain, spec in value.items():
        where = f"{key}.{domain}" if re.fullmatch(r"[\w.-]+", domain) else f'{key}."{domain}"'
        if not isinstance(spec, dict):
            raise ConfigError(f"{where} must be a table like {{ host = \"smtp.example.com\", port = 587 }}.")
        unknown = set(spec) - _ROUTE_KEYS
        if unknown:
            raise ConfigError(f"{where} has an unknown key {sorted(unknown)[0]!r}; "
                              f"known keys are host, port, tls, username and password.")
        if "host" not in spec:
            raise ConfigError(f"{where} needs a host.")
        username = spec.get("username")
        password = spec.get("password")
        if (username is None) != (password is None):
            raise ConfigError(f"{where} needs both username and password, or neither.")
        routes[domain.lower().rstrip(".") if domain != "*" else "*"] = Route(
            host=_nonempty_string(spec["host"], f"{where}.host"),
            port=_port(spec.get("port", 25), f"{where}.port"),
            tls=_tls(spec["tls"], f"{where}.tls") if "tls" in spec else None,
            username=_string(username, f"{where}.username") if username is not None else None,
            password=_string(password, f"{where}.password") if password is not None else None,
        )
    return MappingProxyType(routes)


#: Longest ``submission.commit_delay`` (PostgreSQL's ``commit_delay`` stops there too).
MAX_COMMIT_DELAY = 0.1


def _commit_delay(value: object, key: str) -> float:
    seconds = parse_duration(value, key)
    if seconds > MAX_COMMIT_DELAY:
        raise ConfigError(f"{key} must be at most \"100ms\" (a wait before commits under load; "
                          f"milliseconds are written \"1ms\", \"m\" means minutes), not {value!r}.")
    return seconds


_KEYS: dict[str, tuple[str, Any]] = {
    "relay.hostname": ("hostname", _nonempty_string),
    "relay.node": ("node", _nonempty_string),
    "relay.cpu_affinity": ("cpu_affinity", _cpu_list),
    "spool.url": ("spool_url", _spool_url),
    "spool.busy_timeout": ("spool_busy_timeout", parse_duration),
    "spool.min_free_space": ("spool_min_free_space", parse_size),
    "dns.nameservers": ("nameservers", _nameservers),
    "delivery.port": ("delivery_port", _port),
    "delivery.concurrency": ("concurrency", _int_at_least(1)),
    "delivery.per_domain_concurrency": ("per_domain_concurrency", _int_at_least(1)),
    "delivery.connect_timeout": ("connect_timeout", parse_duration),
    "delivery.command_timeout": ("command_timeout", parse_duration),
    "delivery.lease": ("lease", parse_duration),
    "delivery.tls": ("tls", _tls),
    "delivery.poll_interval": ("poll_interval", parse_duration),
    "delivery.batch_size": ("batch_size", _int_at_least(1)),
    "retry.initial": ("retry_initial", parse_duration),
    "retry.maximum": ("retry_maximum", parse_duration),
    "retry.max_lifetime": ("max_lifetime", parse_duration),
    "submission.listen": ("submission_listen", _listen),
    "submission.users": ("submission_users", _users),
    "submission.max_message_size": ("max_message_size", parse_size),
    "submission.tls_cert": ("submission_tls_cert", _string),
    "submission.tls_key": ("submission_tls_key", _string),
    "submission.commit_delay": ("commit_delay", _commit_delay),
    "metrics.listen": ("metrics_listen", _listen_ip),
}
_SECTIONS = {k.split(".")[0] for k in _KEYS} | {"routes"}


def _flatten(data: Mapping[str, Any]) -> dict[str, Any]:
    """``{"delivery": {"port": 25}}`` -> ``{"delivery.port": 25}``; routes kept whole."""
    flat: dict[str, Any] = {}
    for section, body in data.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{section} is not a configuration section; known sections are "
                              f"{', '.join(sorted(_SECTIONS))}.")
        if section == "routes":
            flat["routes"] = body
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{section} must be a table ([{section}]), not {body!r}.")
        for name, value in body.items():
            key = f"{section}.{name}"
            if key not in _KEYS:
                raise ConfigError(f"{key} is not a known configuration key.")
            flat[key] = value
    return flat


def machine_fqdn() -> str:
    """The machine's FQDN, the default ``relay.hostname``."""
    name = socket.getfqdn()
    return name if name and name != "localhost" else (socket.gethostname() or "localhost")


def load_config(path: str | os.PathLike[str] | None = None,
                environ: Mapping[str, str] | None = None) -> Config:
    """Resolve the configuration once: defaults, TOML file, then environment.

    ``path`` is ``--config``; without it ``$RELAY_CONFIG`` is read; without
    that the built-in defaults are used.  ``$RELAY_SPOOL_URL`` overrides
    ``spool.url`` from any source.
    """
    env = os.environ if environ is None else environ
    source = os.fspath(path) if path is not None else (env.get("RELAY_CONFIG") or None)
    data: dict[str, Any] = {}
    if source:
        try:
            with open(source, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"The configuration file {source} does not exist.") from None
        except IsADirectoryError:
            raise ConfigError(f"The configuration file {source} is a directory.") from None
        except PermissionError:
            raise ConfigError(f"The configuration file {source} cannot be read (permission denied).") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"The configuration file {source} is not valid TOML: {e}.") from None
    flat = _flatten(data)
    if env.get("RELAY_SPOOL_URL"):
        flat["spool.url"] = env["RELAY_SPOOL_URL"]

    values: dict[str, Any] = {}
    for key, raw in flat.items():
        if key == "routes":
            values["routes"] = _routes(raw, "routes")
            continue
        attr, parse = _KEYS[key]
        values[attr] = parse(raw, key)

    hostname = values.pop("hostname", None) or machine_fqdn()
    node = values.pop("node", None) or hostname
    spool_url = values.pop("spool_url", None) or default_spool_url()
    config = Config(hostname=hostname, node=node, spool_url=spool_url, source=source, **values)
    if config.retry_maximum < config.retry_initial:
        raise ConfigError("retry.maximum must not be shorter than retry.initial.")
    if config.lease < 10:
        raise ConfigError("delivery.lease must be at least 10 seconds.")
    check_tls_pair(config)
    return config


SUBMISSION_TLS_PAIR = "submission.tls_cert and submission.tls_key must be set together, or neither."


def check_tls_pair(config: Config) -> None:
    """``submission.tls_cert`` and ``submission.tls_key``: both or neither (ConfigError).

    (The files themselves are read by ``relay.submission`` when the listener
    is built: relayctl never needs them.)"""
    if bool(config.submission_tls_cert) != bool(config.submission_tls_key):
        raise ConfigError(SUBMISSION_TLS_PAIR)
