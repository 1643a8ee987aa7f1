"""Which domains to sync, where, which lists and how often: `MAILGUN_DOMAINS` (every list, the
default region and schedule), a TOML file named by `SYNC_CONFIG` for anything more, and the
account's own domain list (`[discover]`).

A domain's suppressions live in its region only, so each domain carries its API origin.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from worker.cron import parse_cron
from worker.errors import ConfigError, MailgunError, SyncError
from worker.logs import get_logger
from worker.mailgun import MailgunClient
from worker.records import SYNCED_LISTS, SuppressionList
from worker.settings import REGIONS, Settings, is_domain_name, validate_api_base

log = get_logger(__name__)

SETTING = "SYNC_CONFIG"


@dataclass(frozen=True)
class DomainPlan:
    """One sending domain: its API origin, the lists to sync, and its own schedule if it has one
    (else the daemon's `SYNC_INTERVAL` / `SYNC_CRON`)."""

    name: str
    api_base: str
    lists: tuple[SuppressionList, ...] = SYNCED_LISTS
    interval: float | None = None
    cron: str | None = None
    discovered: bool = False  # found by listing the account's domains, not named


@dataclass(frozen=True)
class Discovery:
    """Sync every enabled domain the account has in these regions, except the excluded ones."""

    api_bases: tuple[str, ...]
    lists: tuple[SuppressionList, ...] = SYNCED_LISTS
    interval: float | None = None
    cron: str | None = None
    exclude: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Planned:
    """The domains to sync, and why some may be missing: a region whose domains could not be
    listed (its last known domains, the other regions' and the ones named explicitly are synced
    all the same). `discovered` names every region asked, `stale` those whose listing failed."""

    domains: list[DomainPlan]
    failures: list[str]
    discovered: tuple[str, ...] = ()
    stale: tuple[str, ...] = ()


class DiscoveryMemory(Protocol):
    """Where each region's last complete listing is kept (the mirror's database)."""

    async def record_discovery(self, api_base: str, domains: Sequence[str] | None,
                               error: str | None = None) -> None: ...

    async def discovery_state(self) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class SyncConfig:
    domains: tuple[DomainPlan, ...] = ()
    discover: Discovery | None = None


def _fail(where: str, problem: str) -> ConfigError:
    return ConfigError(SETTING, f"{where}: {problem}")


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise _fail(where, f"unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))})")


def _origin(value: object, label: str, where: str) -> str:
    try:
        return validate_api_base(str(value))
    except ConfigError as exc:
        raise _fail(where, f"{label} {exc.problem}") from None


def _api_base(table: Mapping[str, Any], default: str, where: str) -> str:
    if "region" in table and "api_base" in table:
        raise _fail(where, "give `region` or `api_base`, not both")
    if "api_base" in table:
        return _origin(table["api_base"], "api_base", where)
    if "region" in table:
        region = table["region"]
        if not isinstance(region, str) or region.lower() not in REGIONS:
            raise _fail(where, f"region {region!r} is not one of {', '.join(map(repr, REGIONS))}")
        return REGIONS[region.lower()]
    return default


def _lists(table: Mapping[str, Any], default: tuple[SuppressionList, ...],
           where: str) -> tuple[SuppressionList, ...]:
    if "lists" not in table:
        return default
    names = table["lists"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise _fail(where, "lists must be a non-empty list of list names")
    try:
        chosen = {SuppressionList.parse(name) for name in names}
    except ValueError:
        raise _fail(where, f"lists {names!r}: each is one of {', '.join(k.value for k in SYNCED_LISTS)}") \
            from None
    return tuple(k for k in SYNCED_LISTS if k in chosen)


Schedule = tuple[float | None, str | None]  # (interval, cron); neither: the daemon's own


def _schedule(table: Mapping[str, Any], where: str, inherited: Schedule = (None, None)) -> Schedule:
    """The table's own `interval` or `cron`, else the one it inherits."""
    interval, cron = table.get("interval"), table.get("cron")
    if interval is None and cron is None:
        return inherited
    if interval is not None and cron is not None:
        raise _fail(where, "give `interval` or `cron`, not both")
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int | float)
                                 or not 1 <= interval <= 7 * 86400):
        raise _fail(where, f"interval {interval!r} is not a number of seconds from 1 to 604800")
    if cron is not None:
        if not isinstance(cron, str):
            raise _fail(where, f"cron {cron!r} is not a crontab schedule text")
        try:
            parse_cron(cron)
        except ValueError as exc:
            raise _fail(where, f"cron: {exc}") from None
    return (float(interval) if interval is not None else None), cron


def _domain_name(name: object, where: str) -> str:
    if name is None:
        raise _fail(where, 'has no name; give the domain\'s, as in name = "mg.example.com"')
    if not isinstance(name, str) or not is_domain_name(name):
        raise _fail(where, f"name {name!r} is not a domain name")
    return name


_SHARED = {"region", "api_base", "lists", "interval", "cron"}


def parse_sync_config(text: str, *, source: str, default_api_base: str) -> SyncConfig:
    """Read the TOML text of a sync configuration; every problem names where it is."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _fail(source, f"not valid TOML: {exc}") from None
    _check_keys(data, _SHARED | {"domains", "discover"}, source)
    base = _api_base(data, default_api_base, source)
    lists = _lists(data, SYNCED_LISTS, source)
    schedule = _schedule(data, source)
    entries = data.get("domains", [])
    if not isinstance(entries, list):
        raise _fail(source, "`domains` must be an array of tables: [[domains]]")
    plans: dict[str, DomainPlan] = {}
    for number, entry in enumerate(entries, 1):
        where = f"{source} [[domains]] #{number}"
        if not isinstance(entry, dict):
            raise _fail(where, "must be a table")
        _check_keys(entry, _SHARED | {"name"}, where)
        name = _domain_name(entry.get("name"), where)
        where = f"{where} ({name})"
        if name in plans:
            raise _fail(where, "the domain is listed twice")
        plans[name] = DomainPlan(name, _api_base(entry, base, where), _lists(entry, lists, where),
                                 *_schedule(entry, where, schedule))
    discover = data.get("discover")
    discovery: Discovery | None = None
    if discover is not None:
        where = f"{source} [discover]"
        if not isinstance(discover, dict):
            raise _fail(where, "must be a table")
        _check_keys(discover, {"regions", "lists", "interval", "cron", "exclude"}, where)
        regions = discover.get("regions", [])
        if not isinstance(regions, list) or not regions:
            raise _fail(where, f"regions must name at least one of {', '.join(map(repr, REGIONS))} "
                               "(or an origin such as an emulator's)")
        bases = tuple(dict.fromkeys(_region_base(r, where) for r in regions))
        exclude = discover.get("exclude", [])
        if not isinstance(exclude, list) or not all(isinstance(n, str) for n in exclude):
            raise _fail(where, "exclude must be a list of domain names")
        discovery = Discovery(bases, _lists(discover, lists, where), *_schedule(discover, where, schedule),
                              exclude=frozenset(exclude))
    if not plans and discovery is None:
        raise _fail(source, "names no domain: add [[domains]] entries or a [discover] table")
    return SyncConfig(tuple(plans.values()), discovery)


def _region_base(region: object, where: str) -> str:
    if isinstance(region, str) and region.lower() in REGIONS:
        return REGIONS[region.lower()]
    if isinstance(region, str) and "://" in region:
        return _origin(region, f"region {region!r}:", where)
    raise _fail(where, f"region {region!r} is not one of {', '.join(map(repr, REGIONS))} or an origin")


def read_sync_config(path: str, *, default_api_base: str) -> SyncConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(SETTING, f"cannot read {path}: {exc}") from None
    return parse_sync_config(text, source=path, default_api_base=default_api_base)


async def plan_domains(settings: Settings, client_for: Callable[[str], MailgunClient], *,
                       only: Sequence[str] = (),
                       lists: Iterable[SuppressionList] | None = None,
                       memory: DiscoveryMemory | None = None) -> Planned:
    """Every domain to sync, in order: the configuration file's, then `MAILGUN_DOMAINS`', then the
    discovered ones (a domain named explicitly keeps its own settings). `only` (from --domain)
    narrows to those names, a discovered one keeping its region; `lists` (from --list) narrows
    every domain's lists. With a `memory`, each complete listing is kept, and a region whose
    listing fails contributes the domains of its last complete one."""
    config = read_sync_config(settings.config_file, default_api_base=settings.api_base) \
        if settings.config_file else SyncConfig()
    plans = {plan.name: plan for plan in config.domains}
    if not only:  # with --domain, settings.domains are those flags' names
        for name in settings.domains:
            plans.setdefault(name, DomainPlan(name, settings.api_base))
    failures: list[str] = []
    discovered: tuple[str, ...] = ()
    stale: list[str] = []
    if config.discover is not None and (not only or any(name not in plans for name in only)):
        discovered = config.discover.api_bases
        found, failures, stale = await discover(config.discover, client_for, known=set(plans),
                                                memory=memory)
        for plan in found:
            plans[plan.name] = plan
    if only:
        plans = {name: plans.get(name) or DomainPlan(name, settings.api_base) for name in only}
    chosen = tuple(dict.fromkeys(lists)) if lists is not None else None
    result = []
    for plan in plans.values():
        if chosen is not None:  # in the order given
            plan = replace(plan, lists=tuple(k for k in chosen if k in plan.lists))
        if plan.lists:
            result.append(plan)
    if not result and failures:
        raise SyncError("no domain to sync: " + "; ".join(failures))
    if not result:
        raise ConfigError("MAILGUN_DOMAINS", "no domain to sync: set MAILGUN_DOMAINS, pass --domain, "
                                             "or name domains in SYNC_CONFIG")
    return Planned(result, failures, discovered, tuple(stale))


async def discover(discovery: Discovery, client_for: Callable[[str], MailgunClient], *,
                   known: set[str], memory: DiscoveryMemory | None = None,
                   ) -> tuple[list[DomainPlan], list[str], list[str]]:
    """The account's enabled domains in each region, but for the excluded and the `known` ones;
    why some regions could not be listed; and those regions. Only a complete listing counts: a
    region whose listing fails keeps the domains of its last complete one (from `memory`)."""
    found: list[DomainPlan] = []
    failures: list[str] = []
    stale: list[str] = []
    excluded = {name.lower() for name in discovery.exclude}
    seen = {name.lower() for name in known}
    remembered = {row["api_base"]: row for row in await memory.discovery_state()} if memory else {}
    for api_base in discovery.api_bases:
        try:
            names = [d.name for d in await client_for(api_base).account_domains() if not d.disabled]
        except MailgunError as exc:
            last = remembered.get(api_base)
            names = list(last["domains"]) if last else []
            kept = (f"; keeping the {len(names)} domains listed at {last['listed_at']:%Y-%m-%d %H:%M:%S} UTC"
                    if last and last["listed_at"] else "; no earlier listing to keep")
            failures.append(f"discovery at {api_base} failed: {exc}{kept}")
            stale.append(api_base)
            log.error("discovery_failed", api_base=api_base, error=str(exc), kept_domains=names)
            if memory is not None:
                await memory.record_discovery(api_base, None, str(exc))
        else:
            if memory is not None:
                await memory.record_discovery(api_base, names)
        for name in names:
            if name.lower() in excluded or name.lower() in seen:
                continue
            seen.add(name.lower())
            found.append(DomainPlan(name, api_base, discovery.lists, discovery.interval,
                                    discovery.cron, discovered=True))
    log.info("domains_discovered", domains=[plan.name for plan in found], stale_regions=stale)
    return found, failures, stale
