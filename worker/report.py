"""The readable run report: one line per (domain, list), errors under their line."""

from __future__ import annotations

from collections.abc import Sequence

from worker.reconcile import ListResult

COLUMNS = ("pulled", "inserted", "updated", "removed", "adopted", "pushed", "rejected")


def render_table(results: Sequence[ListResult]) -> str:
    if not results:
        return "nothing to reconcile\n"
    domain_width = max(len("domain"), *(len(r.domain) for r in results))
    header = f"{'domain':<{domain_width}}  {'list':<12}  {'status':<8}" + "".join(
        f"  {c:>8}" for c in COLUMNS)
    lines = [header, "-" * len(header)]
    for r in results:
        counts = r.counts()
        lines.append(f"{r.domain:<{domain_width}}  {r.list:<12}  {r.status:<8}"
                     + "".join(f"  {n:>8}" for n in counts))
        if r.error:
            lines.append(f"{'':<{domain_width}}  error: {r.error}")
    return "\n".join(lines) + "\n"
