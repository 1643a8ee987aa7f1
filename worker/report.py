"""The readable run report: one line per (domain, list), errors under their line."""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from typing import Any

from worker.logs import get_logger
from worker.reconcile import ListResult
from worker.runs import RUN_COUNTS
from worker.store import MIRRORED_LISTS, MirrorStore

log = get_logger(__name__)


def render_table(results: Sequence[ListResult]) -> str:
    if not results:
        return "nothing to reconcile\n"
    domain_width = max(len("domain"), *(len(r.domain) for r in results))
    header = f"{'domain':<{domain_width}}  {'list':<12}  {'status':<8}" + "".join(
        f"  {c:>8}" for c in RUN_COUNTS)
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.domain:<{domain_width}}  {r.list:<12}  {r.status:<8}"
                     + "".join(f"  {n:>8}" for n in r.counts()))
        if r.error:
            lines.append(f"{'':<{domain_width}}  error: {r.error}")
    return "\n".join(lines) + "\n"


async def list_status(store: MirrorStore, configured_domains: Iterable[str] = (), *,
                      every_domain: bool = True) -> list[dict[str, Any]]:
    """Per (domain, list): the last recorded run, and the rows waiting for or refused by Mailgun,
    for every configured domain, and with `every_domain` every domain with a recorded run."""
    runs = {(r["domain"], r["list"]): r for r in await store.latest_runs()}
    domains = set(configured_domains) | ({d for d, _ in runs} if every_domain else set())
    # One query per list for every domain: one per (domain, list) takes seconds at thousands.
    states = {kind: await store.count_states_by_domain(kind) for kind in MIRRORED_LISTS}
    report = []
    for domain in sorted(domains):
        for kind in MIRRORED_LISTS:
            run = runs.get((domain, kind.value))
            pending, rejected = states[kind].get(domain, (0, 0))
            report.append({
                "domain": domain, "list": kind.value,
                "last_run_at": run["finished_at"].isoformat() if run else None,
                "status": run["status"] if run else None,
                **{c: (run[c] if run else 0) for c in RUN_COUNTS},
                "pending_rows": pending, "rejected_rows": rejected,
                "error": run["error"] if run else None,
            })
    return report


def render_status(report: Sequence[dict[str, Any]]) -> str:
    """The last run's time, status and counts (as `run` prints them), then the rows pending and
    rejected now."""
    if not report:
        return "no runs recorded yet\n"
    width = max(len("domain"), *(len(row["domain"]) for row in report))
    counts = "".join(f"  {c:>8}" for c in RUN_COUNTS)
    lead = f"{'domain':<{width}}  {'list':<12}  {'last run (UTC)':<19}  {'status':<8}"
    groups = (f"{'':<{len(lead)}}  {'counts of the last run':<{len(counts) - 2}}"
              f"  {'rows now':>18}")
    header = f"{lead}{counts}  {'pending':>8}  {'rejected':>8}"
    lines = [groups.rstrip(), header, "-" * len(header)]
    for row in report:
        when = row["last_run_at"][:19].replace("T", " ") if row["last_run_at"] else "never"
        lines.append(f"{row['domain']:<{width}}  {row['list']:<12}  {when:<19}  {row['status'] or '-':<8}"
                     + "".join(f"  {row[c]:>8}" for c in RUN_COUNTS)
                     + f"  {row['pending_rows']:>8}  {row['rejected_rows']:>8}")
        if row["error"]:
            lines.append(f"{'':<{width}}  last error: {row['error']}")
    return "\n".join(lines) + "\n"


# Past this many lists, `status` prints a summary, and the lists that want looking at, instead of
# a line per list (`status --lists` prints them all; `--json` always has them all).
TABLE_MOST_LISTS = 100
_NOT_OK_SHOWN = 20


def render_summary(report: Sequence[dict[str, Any]]) -> str:
    """Many lists at a glance: how their last runs ended, the rows waiting, the oldest last run,
    and the lists whose last run did not end ok (or that never ran)."""
    domains = {row["domain"] for row in report}
    ended = collections.Counter(row["status"] or "never run" for row in report)
    pending = [row for row in report if row["pending_rows"]]
    rejected = [row for row in report if row["rejected_rows"]]
    ran = [row for row in report if row["last_run_at"]]
    lines = [f"{len(report):,} lists of {len(domains):,} domains (a line for each: status --lists)",
             "last runs: " + ", ".join(f"{n:,} {status}" for status, n in ended.most_common()),
             f"pending rows: {sum(r['pending_rows'] for r in pending):,} in {len(pending):,} lists; "
             f"rejected rows: {sum(r['rejected_rows'] for r in rejected):,} in {len(rejected):,} lists"]
    if ran:
        oldest = min(ran, key=lambda row: row["last_run_at"])
        lines.append(f"oldest last run: {oldest['last_run_at'][:19].replace('T', ' ')} "
                     f"({oldest['domain']} {oldest['list']})")
    # Failing first: a list that never ran is often only a list just added.
    wanting = [row for row in report if row["status"] not in ("ok", "skipped", None)] \
        + [row for row in report if row["status"] is None]
    if wanting:
        lines.append(f"lists whose last run did not end ok ({len(wanting):,}"
                     + (f", the first {_NOT_OK_SHOWN}" if len(wanting) > _NOT_OK_SHOWN else "") + "):")
        for row in wanting[:_NOT_OK_SHOWN]:
            when = row["last_run_at"][:19].replace("T", " ") if row["last_run_at"] else "never run"
            error = f"  {row['error']}" if row["error"] else ""
            lines.append(f"  {row['domain']} {row['list']}  {row['status'] or '-'}  {when}{error}")
    return "".join(f"{line}\n" for line in lines)


def render_unsynced(pending: Sequence[dict[str, Any]]) -> str:
    """The pending rows of domains not synced: nothing will push them."""
    if not pending:
        return ""
    width = max(len("domain"), *(len(row["domain"]) for row in pending))
    lines = ["pending rows of domains not synced (nothing pushes them: correct their domain, or "
             "sync the domain):"]
    lines += [f"  {row['domain']:<{width}}  {row['list']:<12}  {row['pending_rows']:>8}" for row in pending]
    return "".join(f"{line}\n" for line in lines)


async def discovery_status(store: MirrorStore) -> list[dict[str, Any]]:
    """Per region whose domains are discovered: the last complete listing, and whether the last
    attempt failed (its domains are then the last complete listing's)."""
    return [{
        "api_base": row["api_base"], "domains": list(row["domains"]),
        "listed_at": row["listed_at"].isoformat() if row["listed_at"] else None,
        "checked_at": row["checked_at"].isoformat(), "stale": row["error"] is not None,
        "error": row["error"],
    } for row in await store.discovery_state()]


def render_discovery(regions: Sequence[dict[str, Any]]) -> str:
    lines = []
    for region in regions:
        listed = region["listed_at"][:19].replace("T", " ") if region["listed_at"] else "never"
        line = f"discovery {region['api_base']}: {len(region['domains'])} domains, listed {listed}"
        if region["stale"]:
            checked = region["checked_at"][:19].replace("T", " ")
            line += (f"; STALE: the listing at {checked} failed, the last complete one is kept: "
                     f"{region['error']}")
        lines.append(line)
    return "".join(f"{line}\n" for line in lines)


async def warn_of_unsynced_rows(store: MirrorStore, synced: Sequence[str]) -> None:
    """One warning per domain that is not synced but has pending rows (a misspelt domain in an
    INSERT, a domain no longer configured): nothing will ever push them."""
    by_domain: dict[str, dict[str, int]] = {}
    for row in await store.pending_elsewhere(synced):
        by_domain.setdefault(row["domain"], {})[row["list"]] = row["pending_rows"]
    for domain, lists in by_domain.items():
        log.warning("pending_rows_of_unsynced_domain", domain=domain, rows=sum(lists.values()),
                    lists=lists, detail="no configured domain has this name: nothing pushes these "
                                        "rows; correct their domain, or sync the domain")
