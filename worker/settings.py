"""Settings from the environment, overridden by command-line flags; validated once, at start.

Each setting has one name everywhere: the environment variable, the flag and the README table.
Secrets (the API key, the database URL with its password, the webhook signing key) are kept out of
every repr and every error, and each can be read from a file instead (`<NAME>_FILE`, as Docker and
Kubernetes mount secrets).
"""

from __future__ import annotations

import ipaddress
import math
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from worker.errors import ConfigError

US_API_BASE = "https://api.mailgun.net"
EU_API_BASE = "https://api.eu.mailgun.net"

T = TypeVar("T")

# Every environment variable the worker reads; deployment files are checked against this list.
ENVIRONMENT = (
    "MAILGUN_API_KEY", "MAILGUN_API_BASE", "MAILGUN_DOMAINS", "DATABASE_URL", "MAILGUN_MAX_ATTEMPTS",
    "MAILGUN_BACKOFF_MAX", "MAILGUN_TIMEOUT", "SYNC_MAX_DELETE_FRACTION", "SYNC_INTERVAL", "SYNC_CRON",
    "SYNC_JITTER", "HTTP_PORT", "SYNC_FAILURES_BEFORE_UNREADY", "SHUTDOWN_GRACE", "SYNC_PULL_RANGES",
    "SYNC_CONFIG", "MAILGUN_WEBHOOK_SIGNING_KEY", "WEBHOOK_MAX_AGE", "SYNC_RETENTION_DAYS",
    "MAILGUN_API_KEY_FILE", "DATABASE_URL_FILE", "MAILGUN_WEBHOOK_SIGNING_KEY_FILE",
    "WEBHOOK_PORT", "WEBHOOK_POOL_SIZE", "DATABASE_TIMEOUT",
)

# The settings that hold a secret; each is also read from the file its `<NAME>_FILE` names.
SECRETS = ("MAILGUN_API_KEY", "DATABASE_URL", "MAILGUN_WEBHOOK_SIGNING_KEY")
# A secret's file is read up to this size: a path naming the wrong file (a log, /dev/zero) fails
# instead of filling memory.
SECRET_FILE_MAX_BYTES = 64 * 1024


# Mailgun's regions and their API origins; a domain's suppressions live in its region only.
REGIONS = {"us": US_API_BASE, "eu": EU_API_BASE}


def region_of(api_base: str) -> str:
    """`US`, `EU`, or the origin itself (an emulator, a proxy)."""
    for name, origin in REGIONS.items():
        if api_base.rstrip("/") == origin:
            return name.upper()
    return api_base


def domain_names(text: str) -> tuple[str, ...]:
    """The names of a comma-separated list such as MAILGUN_DOMAINS."""
    return tuple(d.strip() for d in text.split(",") if d.strip())


def is_domain_name(name: str) -> bool:
    return "." in name and "/" not in name and " " not in name


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def validate_api_base(value: str, setting: str = "MAILGUN_API_BASE") -> str:
    """An https origin, or plain http to a loopback host (an emulator); no path, no credentials."""
    try:
        parts = urlsplit(value.strip())
    except ValueError:  # an unclosed [IPv6] bracket
        parts = urlsplit("")
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(setting, f"{value!r} is not an http(s) URL such as {US_API_BASE}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError(setting, "must be a bare origin, without credentials, query or fragment")
    if parts.path.rstrip("/") not in ("", "/v3"):
        raise ConfigError(
            setting, f"must be an origin such as {US_API_BASE}; the client adds /v3/<domain>/<list>")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ConfigError(setting, "plain http is allowed for loopback hosts only; use https")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(setting, f"{value!r} has an invalid port") from None
    netloc = parts.hostname if port is None else f"{parts.hostname}:{port}"
    if ":" in parts.hostname:
        netloc = f"[{parts.hostname}]" + (f":{port}" if port is not None else "")
    return f"{parts.scheme}://{netloc}"


def _parse(env: Mapping[str, str], name: str, convert: Callable[[str], T], default: T,
           check: Callable[[T], bool], expected: str) -> T:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = convert(raw.strip())
    except ValueError:
        raise ConfigError(name, f"{raw!r} is not {expected}") from None
    if not check(value):
        raise ConfigError(name, f"{raw!r} is not {expected}")
    return value


def retention_days(env: Mapping[str, str]) -> int:
    """SYNC_RETENTION_DAYS: how long the change log and run records are kept; 0 keeps them forever.
    Read on its own too: `prune` needs the database, not Mailgun."""
    return _parse(env, "SYNC_RETENTION_DAYS", int, 30, lambda v: 0 <= v <= 36500,
                  "a whole number of days from 0 (keep forever) to 36500")


# ---- secrets from files ---------------------------------------------------------------------------


def _shown(path: str) -> str:
    """A path as an error line may show it: as given, or quoted if it would break the line."""
    return path if path.isprintable() else repr(path)


def read_secret_file(setting: str, path: str) -> str:
    """The secret in the file `setting` names, less one trailing newline (as `echo` writes one).
    Errors name the setting and the path, never what the file holds."""
    if not Path(path).is_absolute():
        # Not shown: a relative "path" is as likely the secret itself, given to the wrong variable.
        raise ConfigError(setting, "is not an absolute path (not shown, in case it is the secret "
                                   "itself); give the full path of the file, such as /run/secrets/...")
    try:
        with Path(path).open("rb") as file:
            data = file.read(SECRET_FILE_MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(setting, f"cannot read {_shown(path)}: {exc.strerror or type(exc).__name__}") \
            from None
    if len(data) > SECRET_FILE_MAX_BYTES:
        raise ConfigError(setting, f"{_shown(path)} is larger than {SECRET_FILE_MAX_BYTES // 1024} KiB; "
                                   "it is not the file of a secret")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ConfigError(setting, f"{_shown(path)} is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r") if text.endswith("\n") else text
    if not text.strip():
        raise ConfigError(setting, f"{_shown(path)} is empty")
    return text


def secret(env: Mapping[str, str], name: str, flag: str | None = None) -> str:
    """A secret setting: the flag's value if given, else the variable's, else the contents of the
    file `<name>_FILE` names; "" when none is set. Setting both the variable and its file is an
    error: which one wins would be a guess."""
    if flag is not None:
        return _text(name, flag)
    value = env.get(name, "")
    path = env.get(f"{name}_FILE", "").strip()
    if value.strip() and path:
        raise ConfigError(name, f"both {name} and {name}_FILE are set; set only one of them")
    return read_secret_file(f"{name}_FILE", path) if path else _text(name, value)


def _text(name: str, value: str) -> str:
    # Bytes that are not UTF-8 reach Python as lone surrogates, which fail only where the secret is
    # first encoded: as a request's header, or in every webhook's signature check.
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ConfigError(name, "is not UTF-8 text (not shown); check how the secret was written") \
            from None
    return value


# ---- the database URL -----------------------------------------------------------------------------

DATABASE_URL_FORM = "postgresql://user:password@host:port/database"
# How to write any password in a URL. Said whenever a URL cannot be parsed, since the usual cause
# is a password character that ends the part it is in (a / or # ends the host, an @ begins it).
PERCENT_ENCODE = ("percent-encode the user name and password (/ as %2F, # as %23, ? as %3F, @ as %40, "
                  ": as %3A, % as %25, a space as %20), in DATABASE_URL or in the file DATABASE_URL_FILE "
                  "names")
# RFC 3986: what a user name, a password (with ":"), a host, a database name and a query may hold
# unencoded. Anything else is percent-encoded (%XX), so the URL has one reading, the driver's too.
_UNRESERVED = string.ascii_letters + string.digits + "-._~"
_SUB_DELIMS = "!$&'()*+,;="
_USER = frozenset(_UNRESERVED + _SUB_DELIMS)
_PASSWORD = _USER | {":"}
_HOST = _USER - {","}  # a comma separates the hosts of a list (host1:5432,host2:5432)
_DATABASE = _USER | {":"}
_QUERY = _USER | set(":/?")
_PERCENT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")


def _only(text: str, allowed: frozenset[str] | set[str]) -> bool:
    """`text` holds only `allowed` characters and well-formed %XX escapes."""
    return all(c in allowed for c in _PERCENT_ESCAPE.sub("", text))


def _valid_host(entry: str) -> bool:
    """host, host:port, [IPv6] or [IPv6]:port; an empty host is the driver's default (a socket)."""
    if entry.startswith("["):
        address, bracket, port = entry[1:].partition("]")
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            return False
        if not bracket or (port and not port.startswith(":")):
            return False
        port = port[1:]
    else:
        host, _, port = entry.partition(":")
        if not _only(host, _HOST):
            return False
    return not port or (port.isdigit() and port.isascii() and 1 <= int(port) <= 65535)


def check_database_url(value: str, setting: str = "DATABASE_URL", where: str = "") -> str:
    """The URL with surrounding blanks removed, if it has a single reading; else a ConfigError that
    shows nothing of it (a misplaced password character makes any part of it a piece of the
    password). `where` names the URL's origin, such as the file it was read from."""
    url = value.strip()

    def refuse(reason: str) -> ConfigError:
        return ConfigError(setting, f"{where}cannot be parsed as {DATABASE_URL_FORM} ({reason}); "
                                    f"{PERCENT_ENCODE}")

    if not url.isascii() or not url.isprintable() or " " in url:
        raise refuse("it holds a space, a control character or a non-ASCII character")
    scheme, separator, rest = url.partition("://")
    if not separator or scheme.lower() not in ("postgresql", "postgres"):
        raise ConfigError(setting, f"{where}is not a postgresql:// URL ({DATABASE_URL_FORM})")
    end = min([rest.index(c) for c in "/?#" if c in rest], default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if authority.count("@") > 1 or "@" in tail:
        raise refuse("an @ that does not end the user name and password: is there a /, ?, # or @ "
                     "in the password?")
    userinfo, _, hosts = authority.rpartition("@")
    user, _, password = userinfo.partition(":")
    if not _only(user, _USER) or not _only(password, _PASSWORD):
        raise refuse("the user name or password holds a character that must be percent-encoded, "
                     "or a % that starts no %XX")
    entries = hosts.split(",")
    if (len(entries) > 1 and not all(entries)) or not all(_valid_host(entry) for entry in entries):
        raise refuse("the host is not a name or address with a port from 1 to 65535")
    if "#" in tail:
        raise refuse("it holds a #")
    path, _, query = tail.partition("?")
    if path.count("/") > 1 or not _only(path.removeprefix("/"), _DATABASE):
        raise refuse("the database name holds a / or a character that must be percent-encoded")
    if query:
        try:
            fields = parse_qs(query, strict_parsing=True)  # as the driver reads it
        except ValueError:
            raise refuse("the query is not name=value pairs joined by &") from None
        if {"password", "sslpassword"} & set(fields):
            # An & or = in it would cut it into a setting the server names back in its refusal.
            raise refuse("a password in the query; give it after the user name (user:password@host)")
        if not _only(query, _QUERY):
            raise refuse("the query holds a character that must be percent-encoded")
    return url


def read_database_url(env: Mapping[str, str], flag: str | None = None) -> str | None:
    """DATABASE_URL (or the flag, or DATABASE_URL_FILE's file), checked before anything connects;
    None when not set."""
    from_file = flag is None and bool(env.get("DATABASE_URL_FILE", "").strip())
    url = secret(env, "DATABASE_URL", flag)
    if not url.strip():
        return None
    if from_file:
        path = env["DATABASE_URL_FILE"].strip()
        return check_database_url(url, "DATABASE_URL_FILE", f"the URL in {_shown(path)} ")
    return check_database_url(url)


DATABASE_URL_MISSING = ("is not set; give a postgresql:// URL for the mirror, or DATABASE_URL_FILE "
                        "naming a file that holds one")


def require_database_url(env: Mapping[str, str], flag: str | None = None) -> str:
    url = read_database_url(env, flag)
    if url is None:
        raise ConfigError("DATABASE_URL", DATABASE_URL_MISSING)
    return url


@dataclass(frozen=True, kw_only=True)
class Settings:
    api_key: str = field(repr=False)
    api_base: str = US_API_BASE
    domains: tuple[str, ...] = ()
    # A TOML file of domains with their regions, lists and schedules (worker/domains.py).
    config_file: str | None = None
    database_url: str | None = field(default=None, repr=False)
    max_attempts: int = 6
    backoff_max: float = 60.0
    max_delete_fraction: float = 0.10
    http_timeout: float = 30.0
    # How long a run waits for one answer of PostgreSQL before it gives its connection up.
    database_timeout: float = 900.0
    pull_ranges: int = 16
    # The daemon's
    sync_interval: float = 900.0
    sync_cron: str | None = None
    sync_jitter: float = 30.0
    http_port: int = 8080
    # Deprecated, no effect: read so that configurations setting it keep working (the daemon
    # warns). Readiness no longer depends on failing lists.
    failures_before_unready: int | None = None
    shutdown_grace: float = 25.0
    # Webhooks: served only with a signing key. Mailgun retries a delivery for 8 hours with its
    # original timestamp, so the window is a day by default.
    webhook_signing_key: str | None = field(default=None, repr=False)
    webhook_max_age: float = 86400.0
    # Served on a port of their own when set, apart from /metrics and the probes.
    webhook_port: int | None = None
    # PostgreSQL connections of the daemon's webhooks and /readyz, a pool no run can take from.
    webhook_pool_size: int = 3
    # Change log and run records older than this are pruned (worker/retention.py); 0: never.
    retention_days: int = 30

    def __post_init__(self) -> None:
        if self.webhook_port and self.webhook_port == self.http_port:
            raise ConfigError("WEBHOOK_PORT", f"is HTTP_PORT ({self.http_port}): give another port, "
                              "or leave it unset to serve webhooks on HTTP_PORT")

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> Settings:
        """Read every setting; `overrides` (from flags) win where not None."""
        flags = {k: str(v) for k, v in overrides.items() if v is not None}
        merged = {**env, **flags}
        api_key = secret(env, "MAILGUN_API_KEY", flags.get("MAILGUN_API_KEY")).strip()
        if not api_key:
            raise ConfigError("MAILGUN_API_KEY", "is not set; give the domain's private API key, or "
                                                 "MAILGUN_API_KEY_FILE naming a file that holds it")
        domains = domain_names(merged.get("MAILGUN_DOMAINS", ""))
        for domain in domains:
            if not is_domain_name(domain):
                raise ConfigError("MAILGUN_DOMAINS", f"{domain!r} is not a domain name")
        return cls(
            api_key=api_key,
            api_base=validate_api_base(merged.get("MAILGUN_API_BASE") or US_API_BASE),
            domains=domains,
            config_file=(merged.get("SYNC_CONFIG") or "").strip() or None,
            database_url=read_database_url(env, flags.get("DATABASE_URL")),
            max_attempts=_parse(merged, "MAILGUN_MAX_ATTEMPTS", int, 6,
                                lambda v: 1 <= v <= 100, "a whole number from 1 to 100"),
            # 0 would retry (and wait for the request budget) without ever sleeping.
            backoff_max=_parse(merged, "MAILGUN_BACKOFF_MAX", float, 60.0,
                               lambda v: math.isfinite(v) and 0 < v <= 3600,
                               "a number of seconds above 0, at most 3600"),
            max_delete_fraction=_parse(merged, "SYNC_MAX_DELETE_FRACTION", float, 0.10,
                                       lambda v: 0 <= v <= 1, "a fraction from 0 to 1"),
            http_timeout=_parse(merged, "MAILGUN_TIMEOUT", float, 30.0,
                                lambda v: math.isfinite(v) and 0 < v <= 600,
                                "a number of seconds above 0, at most 600"),
            database_timeout=_parse(merged, "DATABASE_TIMEOUT", float, 900.0,
                                    lambda v: math.isfinite(v) and 1 <= v <= 86400,
                                    "a number of seconds from 1 to 86400"),
            pull_ranges=_parse(merged, "SYNC_PULL_RANGES", int, 16, lambda v: 1 <= v <= 64,
                               "a whole number from 1 to 64"),
            sync_interval=_parse(merged, "SYNC_INTERVAL", float, 900.0,
                                 lambda v: math.isfinite(v) and 1 <= v <= 7 * 86400,
                                 "a number of seconds from 1 to 604800"),
            sync_cron=(merged.get("SYNC_CRON") or "").strip() or None,
            sync_jitter=_parse(merged, "SYNC_JITTER", float, 30.0,
                               lambda v: math.isfinite(v) and 0 <= v <= 3600,
                               "a number of seconds from 0 to 3600"),
            http_port=_parse(merged, "HTTP_PORT", int, 8080, lambda v: 0 <= v <= 65535,
                             "a port number"),
            failures_before_unready=_parse(merged, "SYNC_FAILURES_BEFORE_UNREADY", int, None,
                                           lambda v: v is not None and v >= 1,
                                           "a whole number of at least 1"),
            shutdown_grace=_parse(merged, "SHUTDOWN_GRACE", float, 25.0,
                                  lambda v: math.isfinite(v) and 0 <= v <= 3600,
                                  "a number of seconds from 0 to 3600"),
            webhook_signing_key=secret(env, "MAILGUN_WEBHOOK_SIGNING_KEY",
                                       flags.get("MAILGUN_WEBHOOK_SIGNING_KEY")).strip() or None,
            webhook_max_age=_parse(merged, "WEBHOOK_MAX_AGE", float, 86400.0,
                                   lambda v: math.isfinite(v) and 60 <= v <= 30 * 86400,
                                   "a number of seconds from 60 to 2592000"),
            retention_days=retention_days(merged),
            webhook_port=_parse(merged, "WEBHOOK_PORT", int, None,
                                lambda v: v is not None and 0 <= v <= 65535, "a port number"),
            webhook_pool_size=_parse(merged, "WEBHOOK_POOL_SIZE", int, 3, lambda v: 2 <= v <= 50,
                                     "a whole number from 2 to 50"),
        )
