"""Tooling around the product, not needed to run it: the demo, the benchmarks, the soak, scratch
databases and an embedded PostgreSQL."""
