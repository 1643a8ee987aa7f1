"""Crontab schedules, read as cron (Vixie cron / cronie) reads them, and turned into APScheduler
triggers that fire at exactly the same minutes.

Every field is expanded to the explicit set of values it names, so APScheduler's own field syntax
(weekdays from Monday, `x/y`, `last`) never applies. Cron fires on a day when day-of-month OR
weekday matches if both are restricted, and when both match otherwise; a field counts as
unrestricted when it starts with `*` (so `*/2` in one of them makes the two combine with AND, as in
cron). APScheduler ANDs its fields, so the OR is two triggers combined.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, datetime

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger

# The macros cron knows, but @reboot (a daemon has no boot to follow).
MACROS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}
_MONTHS = {name.lower(): number for number, name in enumerate(calendar.month_abbr) if name}
_WEEKDAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
# The words cron's messages use of their own (field names, macros, month and weekday names).
VOCABULARY = frozenset({"minute", "hour", "day", "of", "month", "weekday", *MACROS, "@reboot",
                        *_MONTHS, *_WEEKDAYS})
_APS_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # cron's 0-6 by name


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: dict[str, int] | None = None


_FIELDS = (
    _Field("minute", 0, 59), _Field("hour", 0, 23), _Field("day of month", 1, 31),
    _Field("month", 1, 12, _MONTHS), _Field("weekday", 0, 7, _WEEKDAYS),  # 0 and 7: Sunday
)


@dataclass(frozen=True)
class CronSchedule:
    """The minutes a crontab line fires at, field by field (weekdays 0-6 from Sunday)."""

    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    days_restricted: bool
    weekdays_restricted: bool

    def trigger(self, *, jitter: float | None = None) -> BaseTrigger:
        def cron(days: frozenset[int] | None, weekdays: frozenset[int] | None) -> CronTrigger:
            return CronTrigger(
                minute=_listed(self.minutes, range(60)), hour=_listed(self.hours, range(24)),
                day=_listed(days, range(1, 32)), month=_listed(self.months, range(1, 13)),
                day_of_week="*" if weekdays is None or len(weekdays) == 7
                else ",".join(_APS_WEEKDAYS[d] for d in sorted(weekdays)),
                jitter=jitter, timezone=UTC)

        if self.days_restricted and self.weekdays_restricted:
            return OrTrigger([cron(self.days, None), cron(None, self.weekdays)], jitter=jitter)
        return cron(self.days, self.weekdays)


def _listed(values: frozenset[int] | None, every: range) -> str:
    if values is None or values == frozenset(every):
        return "*"
    return ",".join(str(v) for v in sorted(values))


def _number(text: str, spec: _Field) -> int:
    if spec.names is not None and text.lower() in spec.names:
        return spec.names[text.lower()]
    if not (text.isascii() and text.isdigit()):  # cron reads ASCII digits only
        known = f" or a name ({', '.join(spec.names)})" if spec.names else ""
        raise ValueError(f"{spec.name} {text!r} is not a number{known}")
    value = int(text)
    if not spec.low <= value <= spec.high:
        raise ValueError(f"{spec.name} {value} is outside {spec.low}-{spec.high}")
    return value


def _expand(text: str, spec: _Field) -> frozenset[int]:
    """One field: a comma list of `*`, `N`, `N-M`, each but `N` with an optional `/step`."""
    values: set[int] = set()
    for element in text.split(","):
        body, slash, step_text = element.partition("/")
        if not body:
            raise ValueError(f"{spec.name} {text!r} has an empty element")
        step = 1
        if slash:
            if not (step_text.isascii() and step_text.isdigit()) or int(step_text) == 0:
                raise ValueError(f"{spec.name} {element!r}: the step must be a whole number above 0")
            step = int(step_text)
        if body == "*":
            low, high = spec.low, spec.high
        elif "-" in body:
            first, _, last = body.partition("-")
            low, high = _number(first, spec), _number(last, spec)
            if low > high:
                raise ValueError(f"{spec.name} range {body!r} runs backwards (cron does not wrap around)")
        else:
            if slash:  # some crons read N/S as N-max/S, others refuse it: say which is meant
                raise ValueError(f"{spec.name} {element!r}: write a range with a step "
                                 f"({body}-{spec.high}/{step}) or a list")
            low = high = _number(body, spec)
        values.update(range(low, high + 1, step))
    return frozenset(values)


def parse_cron(text: str) -> CronSchedule:
    """A crontab schedule (five fields, or a macro such as @hourly); ValueError says what is wrong."""
    line = MACROS.get(text.strip().lower(), text)
    if line.strip().lower() == "@reboot" or line.strip().startswith("@"):
        raise ValueError(f"{text.strip()!r} is not a schedule; known: {', '.join(MACROS)}")
    fields = line.split()
    if len(fields) != 5:
        raise ValueError(f"{text!r} needs 5 fields: minute hour day month weekday")
    minutes, hours, days, months, weekdays = (
        _expand(field, spec) for field, spec in zip(fields, _FIELDS, strict=True))
    schedule = CronSchedule(
        minutes, hours, days, months, frozenset(d % 7 for d in weekdays),
        days_restricted=not fields[2].startswith("*"), weekdays_restricted=not fields[4].startswith("*"))
    if schedule.trigger().get_next_fire_time(None, datetime(2000, 1, 1, tzinfo=UTC)) is None:
        raise ValueError(f"{text!r} names no date that exists, so it never fires")
    return schedule
