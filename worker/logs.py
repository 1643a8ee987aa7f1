"""Structured logs: JSON lines off a terminal, readable lines on one; context bound per run."""

from __future__ import annotations

import datetime
import logging
import os
import sys
from typing import TextIO

import structlog

# Back to the start of the line, and erase it.
_CLEAR_LINE = "\r\x1b[K"


class StatusLine:
    """A line redrawn in place on a terminal (a progress bar). A log line written meanwhile goes
    above it: the status line is erased first and drawn again after, so the two never share a
    line. It is cut to the terminal's width at each draw: a line that wraps is erased only from
    its last row, and each redraw would leave a stale row behind."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._text = ""
        self._tail = ""
        self._erased = True

    def show(self, text: str, *, tail: str = "") -> None:
        """Draw `text` + `tail`; where it does not fit, `text` loses its start, `tail` stays whole."""
        global _status_line
        _status_line = self
        self._text, self._tail = text, tail
        self._draw()

    def _columns(self) -> int | None:
        try:
            columns = os.get_terminal_size(self._out.fileno()).columns
        except (OSError, ValueError, AttributeError):  # not a terminal, or closed
            return None
        return columns or None  # 0: a terminal that does not know its size

    def _fitted(self) -> str:
        line = self._text + self._tail
        columns = self._columns()
        # A column to spare: a line that fills the last one leaves some terminals' cursor on it,
        # waiting to wrap.
        room = columns - 1 if columns is not None else len(line)
        if len(line) <= room:
            return line
        if len(self._tail) + 1 >= room:
            return line[:room]
        return "…" + self._text[len(line) - room + 1:] + self._tail

    def _draw(self) -> None:
        self._out.write(_CLEAR_LINE + self._fitted())
        self._out.flush()
        self._erased = False

    def erase(self) -> None:
        if not self._erased:
            self._out.write(_CLEAR_LINE)
            self._out.flush()
            self._erased = True

    def redraw(self) -> None:
        if self._text or self._tail:
            self._draw()

    def end(self) -> None:
        """Leave the last state on its line; log lines go below it from now on."""
        global _status_line
        if (self._text or self._tail) and not self._erased:
            self._out.write("\n")
            self._out.flush()
        self._text, self._tail, self._erased = "", "", True
        if _status_line is self:
            _status_line = None


_status_line: StatusLine | None = None


class _CurrentStderr:
    """Writes to whatever sys.stderr is at the time, not the one seen at configuration, above the
    status line if one is shown."""

    def write(self, text: str) -> int:
        status = _status_line
        if status is not None:
            status.erase()
        written = sys.stderr.write(text)
        if status is not None and text.endswith("\n"):
            sys.stderr.flush()
            status.redraw()
        return written

    def flush(self) -> None:
        sys.stderr.flush()


# Libraries log through the standard library (APScheduler, aiohttp, asyncio): one handler renders
# their records as the worker's own lines, so that stderr stays one JSON object a line.
_LIBRARIES = logging.StreamHandler(_CurrentStderr())


def _iso_datetimes(logger: object, method: str, event: structlog.typing.EventDict
                   ) -> structlog.typing.EventDict:
    """A datetime in a line is ISO 8601 (JSON has no datetime; the renderer would write its repr)."""
    for key, value in event.items():
        if isinstance(value, datetime.date):
            event[key] = value.isoformat()
    return event


def configure_logging(*, level: str = "INFO", json: bool | None = None) -> None:
    """Set up structlog. `json=None` picks JSON unless stderr is a terminal.

    Loggers are not cached on first use: the module-level ones would keep the first
    configuration's level for good, so a second in-process `cli()` call with another --log-level
    would still filter with the first one's.
    """
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _iso_datetimes,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    _LIBRARIES.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name,
                           structlog.processors.TimeStamper(fmt="iso", utc=True)],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer]))
    _LIBRARIES.setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))
    root = logging.getLogger()
    if _LIBRARIES not in root.handlers:
        root.addHandler(_LIBRARIES)
    # The daemon logs the runs the scheduler skips and the errors of its jobs itself.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger
