"""The readable run report: one line per (domain, list), errors under their line."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from worker.reconcile import ListResult
from worker.records import ListRef
from worker.runs import RUN_COUNTS
from worker.store import MIRRORED_LISTS, MirrorStore


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
    report = []
    for domain in sorted(domains):
        for kind in MIRRORED_LISTS:
            run = runs.get((domain, kind.value))
            pending, rejected = await store.count_states(ListRef(domain, kind))
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
