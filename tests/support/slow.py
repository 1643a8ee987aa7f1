"""The split between fast tests and slow ones. A test that starts a process (the worker, a daemon,
the emulator, PostgreSQL, `unshare`, a linter) or takes seconds by design is marked `slow`, so that
`pytest -m "not slow"` runs the in-process ones alone. A test not so marked that starts a process
fails, naming the marker, so the fast run stays fast as tests are added."""

from __future__ import annotations

import contextlib
import functools
import multiprocessing.util
import sys
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import pytest

# Python's audit events for every way of starting a process (asyncio's subprocesses go through
# subprocess.Popen), and one of this module's own: multiprocessing's spawn and forkserver start
# methods start their processes through a call that raises no audit event.
PROCESS_EVENTS = frozenset({"subprocess.Popen", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                            "os.exec", "os.system", "multiprocessing.spawn"})


def _audited_spawn(spawn: Callable[..., int]) -> Callable[..., int]:
    @functools.wraps(spawn)
    def spawnv_passfds(path: bytes | str, args: Sequence[str], passfds: Sequence[int]) -> int:
        sys.audit("multiprocessing.spawn", path, args)
        return spawn(path, args, passfds)
    return spawnv_passfds


class ProcessGuard:
    """A plugin registered once per test run (an audit hook cannot be removed); see the module's
    docstring. Registered as a plugin, not as conftest hooks: those apply only to nodes under
    their directory, and a session's fixtures are set up for the session, which is not."""

    def __init__(self) -> None:
        self._test: str | None = None  # the node id of the unmarked test running now
        self._started: str | None = None  # what it started
        sys.addaudithook(self._audit)
        multiprocessing.util.spawnv_passfds = _audited_spawn(multiprocessing.util.spawnv_passfds)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, None, None]:
        with self._watching(item):
            return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        with self._watching(item):
            return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item,
                                nextitem: pytest.Item | None) -> Generator[None, None, None]:
        if nextitem is None or nextitem.getparent(pytest.Module) is not item.getparent(pytest.Module):
            # The last test of a module (or of the session) also ends that module's (or the
            # session's) fixtures, which the tests that set them up answer for.
            return (yield)
        with self._watching(item):
            return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef: pytest.FixtureDef[Any]) -> Generator[Any, Any, Any]:
        """A session's fixture may start a process: the tests' own PostgreSQL may be an embedded
        server."""
        if fixturedef.scope != "session":
            return (yield)
        test, self._test = self._test, None
        try:
            return (yield)
        finally:
            self._test = test

    @contextlib.contextmanager
    def _watching(self, item: pytest.Item) -> Iterator[None]:
        """Around an unmarked test's set-up, call or teardown: a process it starts fails it."""
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

    def _audit(self, event: str, args: tuple[Any, ...]) -> None:
        if self._test is None or event not in PROCESS_EVENTS:
            return
        what = f" {args[0]!r}" if args else ""  # os.fork has no arguments
        self._started = (f"{self._test} starts a process ({event}{what}): mark it "
                         "@pytest.mark.slow (or its module `pytestmark = pytest.mark.slow`)")
        raise RuntimeError(self._started)
