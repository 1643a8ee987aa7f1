"""Crontab schedules mean what cron means. Each row gives, by hand, the values cron reads from each
field form; the expected fire times are found by brute force, minute by minute, from cron's own
rules (day-of-month OR weekday when both are restricted, AND when either starts with `*`), and
compared with those of the trigger the daemon schedules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from worker.cron import parse_cron
from worker.domains import parse_sync_config
from worker.errors import ConfigError

ALL = None  # the whole range of the field
STARTS = (datetime(2024, 1, 1, tzinfo=UTC), datetime(2025, 3, 30, 12, 34, 56, tzinfo=UTC))
FIRES = 40

# (line, minutes, hours, days of month, months, weekdays from Sunday = 0)
TABLE = [
    ("* * * * *", ALL, ALL, ALL, ALL, ALL),
    ("*/15 2 * * 1-5", {0, 15, 30, 45}, {2}, ALL, ALL, {1, 2, 3, 4, 5}),
    ("0 3 * * 0-6", {0}, {3}, ALL, ALL, {0, 1, 2, 3, 4, 5, 6}),
    ("0 3 * * 0-2", {0}, {3}, ALL, ALL, {0, 1, 2}),
    ("0 3 * * */2", {0}, {3}, ALL, ALL, {0, 2, 4, 6}),
    ("0 3 * * 1-5/2", {0}, {3}, ALL, ALL, {1, 3, 5}),
    ("0 3 * * 7", {0}, {3}, ALL, ALL, {0}),
    ("0 3 * * 5-7", {0}, {3}, ALL, ALL, {5, 6, 0}),
    ("0 3 * * 0,7", {0}, {3}, ALL, ALL, {0}),
    ("0 3 * * sun,SAT", {0}, {3}, ALL, ALL, {0, 6}),
    ("0 3 * * mon-fri", {0}, {3}, ALL, ALL, {1, 2, 3, 4, 5}),
    ("0 3 1 * 1", {0}, {3}, {1}, ALL, {1}),                      # the 1st OR a Monday
    ("0 3 1,15 * 5", {0}, {3}, {1, 15}, ALL, {5}),
    ("0 3 */2 * 1", {0}, {3}, set(range(1, 32, 2)), ALL, {1}),  # `*`-led: odd days AND Mondays
    ("0 3 13 * */7", {0}, {3}, {13}, ALL, {0}),                  # a Sunday the 13th
    ("30 */6 * jan,Jul *", {30}, {0, 6, 12, 18}, ALL, {1, 7}, ALL),
    ("5-10/3 0-23/12 * * *", {5, 8}, {0, 12}, ALL, ALL, ALL),
    ("0 12 31 * *", {0}, {12}, {31}, ALL, ALL),
    ("0 0 29 2 *", {0}, {0}, {29}, {2}, ALL),
    ("59 23 28-31 2 *", {59}, {23}, {28, 29, 30, 31}, {2}, ALL),
    ("0 9 1-7 * 1", {0}, {9}, set(range(1, 8)), ALL, {1}),      # cron: days 1-7 OR any Monday
    ("@hourly", {0}, ALL, ALL, ALL, ALL),
    ("@daily", {0}, {0}, ALL, ALL, ALL),
    ("@weekly", {0}, {0}, ALL, ALL, {0}),
    ("@monthly", {0}, {0}, {1}, ALL, ALL),
    ("@yearly", {0}, {0}, {1}, {1}, ALL),
]

MACRO = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@weekly": "0 0 * * 0",
         "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *"}


def cron_fires(line, minutes, hours, days, months, weekdays, start: datetime, count: int) -> list[datetime]:
    """The next `count` minutes after `start` that cron runs `line` at: every minute is tried, a
    day that cannot match skipped whole."""
    fields = MACRO.get(line, line).split()
    days_star, weekdays_star = fields[2].startswith("*"), fields[4].startswith("*")

    def day_matches(day: datetime) -> bool:
        if months is not ALL and day.month not in months:
            return False
        dom = days is ALL or day.day in days
        dow = weekdays is ALL or (day.isoweekday() % 7) in weekdays
        return (dom and dow) if (days_star or weekdays_star) else (dom or dow)

    found: list[datetime] = []
    minute = start.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while len(found) < count:
        if not day_matches(minute):
            minute = (minute + timedelta(days=1)).replace(hour=0, minute=0)
            continue
        if (hours is ALL or minute.hour in hours) and (minutes is ALL or minute.minute in minutes):
            found.append(minute)
        minute += timedelta(minutes=1)
    return found


def trigger_fires(line: str, start: datetime, count: int) -> list[datetime]:
    trigger = parse_cron(line).trigger()
    fires: list[datetime] = []
    previous, now = None, start + timedelta(seconds=1)
    while len(fires) < count:
        fire = trigger.get_next_fire_time(previous, now)
        assert fire is not None
        fires.append(fire)
        previous, now = fire, fire + timedelta(seconds=1)
    return fires


@pytest.mark.parametrize("row", TABLE, ids=[row[0] for row in TABLE])
@pytest.mark.parametrize("start", STARTS, ids=["2024-01-01", "2025-03-30"])
def test_a_crontab_line_fires_at_exactly_the_minutes_cron_would(row, start):
    assert trigger_fires(row[0], start, FIRES) == cron_fires(*row, start, FIRES)


def test_the_first_and_mondays_means_both_not_mondays_that_are_the_first():
    fires = trigger_fires("0 3 1 * 1", datetime(2024, 1, 1, tzinfo=UTC), 6)
    # 2024-01-01 is a Monday; the 1st of February a Thursday.
    assert [(f.month, f.day) for f in fires] == [(1, 1), (1, 8), (1, 15), (1, 22), (1, 29), (2, 1)]


REFUSED = [
    ("* * *", "needs 5 fields"),
    ("* * * * * *", "needs 5 fields"),
    ("61 * * * *", "minute 61 is outside 0-59"),
    ("0 24 * * *", "hour 24 is outside 0-23"),
    ("0 0 0 * *", "day of month 0 is outside 1-31"),
    ("0 0 * 13 *", "month 13 is outside 1-12"),
    ("0 3 * * 8", "weekday 8 is outside 0-7"),
    ("0 3 * * funday", "weekday 'funday' is not a number or a name"),
    ("0 3 * * 5-1", "runs backwards"),
    ("0 3 * * 1/2", "write a range with a step (1-7/2)"),
    ("*/0 * * * *", "the step must be a whole number above 0"),
    ("0,,5 * * * *", "empty element"),
    ("0 3 L * *", "day of month 'L' is not a number"),
    ("0 3 * * 1#2", "is not a number"),
    ("0 0 30 2 *", "never fires"),
    ("@reboot", "is not a schedule"),
    ("\u0660 \u0663 * * *", "minute '\u0660' is not a number"),  # Arabic-Indic: isdigit() says yes
    ("0 3 * * \u0661", "weekday '\u0661' is not a number"),
    ("*/\u0662 * * * *", "the step must be a whole number above 0"),
    ("\u00b2 * * * *", "minute '\u00b2' is not a number"),
]


@pytest.mark.parametrize(("line", "reason"), REFUSED, ids=[r[0] for r in REFUSED])
def test_a_line_cron_would_read_otherwise_or_not_at_all_is_refused_with_the_reason(line, reason):
    with pytest.raises(ValueError) as caught:
        parse_cron(line)
    assert reason in str(caught.value)


def test_a_bad_cron_in_the_configuration_file_names_the_file_the_entry_and_the_key():
    text = '[[domains]]\nname = "mg.example.com"\ncron = "0 3 * * 9"\n'
    with pytest.raises(ConfigError) as caught:
        parse_sync_config(text, source="/etc/sync.toml", default_api_base="https://api.mailgun.net")
    assert caught.value.setting == "SYNC_CONFIG"
    assert caught.value.problem == ("/etc/sync.toml [[domains]] #1 (mg.example.com): "
                                    "cron: weekday 9 is outside 0-7")
