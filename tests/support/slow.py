"""The split between fast tests and slow ones. A test that starts a process (the worker, a daemon,
the emulator, PostgreSQL, `unshare`, a linter) or takes seconds by design is marked `slow`, so that
`pytest -m "not slow"` runs the in-process ones alone. A test not so marked that starts a process
fails, naming the marker, so the fast run stays fast as tests are added."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import pytest

# Python's audit events for every way of starting a process (asyncio's subprocesses go through
# subprocess.Popen).
PROCESS_EVENTS = frozenset({"subprocess.Popen", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                            "os.exec", "os.system"})


class ProcessGuard:
    """Installed once per test run (an audit hook cannot be removed); see the module's docstring."""

    def __init__(self) -> None:
        self._test: str | None = None  # the node id of the unmarked test running now
        self._started: str | None = None  # what it started
        sys.addaudithook(self._audit)

    @contextlib.contextmanager
    def watching(self, item: pytest.Item) -> Iterator[None]:
        """Around an unmarked test's set-up or call: a process it starts fails it."""
        if item.get_closest_marker("slow") is not None:
            yield
            return
        self._test, self._started = item.nodeid, None
        try:
            yield
        finally:
            self._test = None
        if self._started is not None:  # raised in the test, but caught there
            pytest.fail(self._started, pytrace=False)

    @contextlib.contextmanager
    def allowing(self) -> Iterator[None]:
        """Around a session's fixture: the tests' own PostgreSQL may be an embedded server."""
        test, self._test = self._test, None
        try:
            yield
        finally:
            self._test = test

    def _audit(self, event: str, args: tuple[Any, ...]) -> None:
        if self._test is None or event not in PROCESS_EVENTS:
            return
        self._started = (f"{self._test} starts a process ({event} {args[0]!r}): mark it "
                         "@pytest.mark.slow (or its module `pytestmark = pytest.mark.slow`)")
        raise RuntimeError(self._started)


PROCESS_GUARD = pytest.StashKey[ProcessGuard]()
