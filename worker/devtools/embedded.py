"""An embedded PostgreSQL (PyPI `pgserver`, binaries in a wheel) for the demo and for tests on
machines without a server. It runs as root too, which the system's own PostgreSQL refuses."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from worker.errors import ConfigError


def _with_system_tools_on_path() -> None:
    """As root, pgserver creates an unprivileged user for the server with `useradd`, which lives in
    sbin directories that a cron job's or a container's minimal PATH leaves out."""
    path = os.environ.get("PATH", "").split(os.pathsep)
    missing = [d for d in ("/usr/local/sbin", "/usr/sbin", "/sbin") if d not in path and Path(d).is_dir()]
    if missing:
        os.environ["PATH"] = os.pathsep.join([*path, *missing])


@contextlib.contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[str]:
    """Start a private server in `data_dir`, yield its `postgresql://` URL, stop it after."""
    with warnings.catch_warnings():
        # pgserver asks platformdirs for a runtime directory, which warns where XDG_RUNTIME_DIR
        # is unset (containers, CI); the directory is not used for anything here.
        warnings.simplefilter("ignore", UserWarning)
        try:
            import pgserver  # imported late: it is only needed where no server is given
        except ImportError:
            raise ConfigError(
                "embedded PostgreSQL",
                "not installed; install mailgun-sync[embedded] or give a database URL") from None

        if os.geteuid() == 0:
            _with_system_tools_on_path()
        server = pgserver.get_server(data_dir, cleanup_mode="stop")  # type: ignore[attr-defined]
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()
