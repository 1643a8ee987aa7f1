"""Settings from the environment, overridden by command-line flags; validated once, at start.

Each setting has one name everywhere: the environment variable, the flag and the README table.
Secrets (the API key, the database URL with its password) are kept out of every repr.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

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
)


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
    parts = urlsplit(value.strip())
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
    # Change log and run records older than this are pruned (worker/retention.py); 0: never.
    retention_days: int = 30

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> Settings:
        """Read every setting; `overrides` (from flags) win where not None."""
        merged = {**env, **{k: str(v) for k, v in overrides.items() if v is not None}}
        api_key = merged.get("MAILGUN_API_KEY", "").strip()
        if not api_key:
            raise ConfigError("MAILGUN_API_KEY", "is not set; give the domain's private API key")
        domains = domain_names(merged.get("MAILGUN_DOMAINS", ""))
        for domain in domains:
            if not is_domain_name(domain):
                raise ConfigError("MAILGUN_DOMAINS", f"{domain!r} is not a domain name")
        return cls(
            api_key=api_key,
            api_base=validate_api_base(merged.get("MAILGUN_API_BASE") or US_API_BASE),
            domains=domains,
            config_file=(merged.get("SYNC_CONFIG") or "").strip() or None,
            database_url=merged.get("DATABASE_URL") or None,
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
                                "a number of seconds from 0 to 600"),
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
            webhook_signing_key=(merged.get("MAILGUN_WEBHOOK_SIGNING_KEY") or "").strip() or None,
            webhook_max_age=_parse(merged, "WEBHOOK_MAX_AGE", float, 86400.0,
                                   lambda v: math.isfinite(v) and 60 <= v <= 30 * 86400,
                                   "a number of seconds from 60 to 2592000"),
            retention_days=retention_days(merged),
        )
