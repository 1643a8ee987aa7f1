"""The tooling's SQL: its own named queries (sql/devtools.sql) beside the product's."""

from __future__ import annotations

import functools

from worker import sql


@functools.cache
def queries() -> dict[str, str]:
    """The product's named queries and the tooling's; a name means one query across both files."""
    product, own = sql.queries(), sql.named_queries("devtools.sql")
    if both := sorted(product.keys() & own.keys()):
        raise ValueError(f"queries {both} are defined in both sql/queries.sql and sql/devtools.sql")
    return {**product, **own}
