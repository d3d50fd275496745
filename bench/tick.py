"""Scenario 4 — time-driven changes: ``segflow.tick()`` with a backlog of changes due.

Four time-driven segments after the desk's examples (inactivity, a 7-day activity window, a
fresh deposit with ``max_age``, "deposited before but not this week"), each changing 7 days
after a profile's last login and deposit. A fixed number of profiles had theirs just over 7
days before the tick instant, so exactly ``due`` changes are due; every other profile is
scheduled later. The book grows step by step (more profiles, same backlog) and the same tick
is timed at each step inside a rolled-back transaction, so every repeat sees the same
backlog. What must hold: the tick's time follows what is due, not the number of profiles.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from typing import Any

import psycopg
from rich.console import Console

from bench import segments
from bench.common import (
    Databases,
    Machine,
    Report,
    Scale,
    Stopwatch,
    connect,
    fmt_ms,
    function_stats,
    grouped_self_ms,
    median,
    set_clock,
    stats_delta,
    track_functions,
    vacuum_analyze,
)
from bench.population import RAW_COLUMNS, add_profiles, trusted_copy

SEGMENTS: list[segments.Doc] = [
    {"name": "inactive_7d", "rule": {"last": "login", "age": {"gte": "7d"}},
     "context": {"tier": {"trait": "tier"}}},
    {"name": "active_week", "rule": {"events": "login", "within": "7d"}},
    {"name": "recent_depositor", "rule": {"last": "deposit", "field": "amount_usd", "gt": 0,
                                          "max_age": "7d"}},
    {"name": "lapsed_depositor", "rule": {"all": [{"events": "deposit"},
                                                  {"not": {"events": "deposit",
                                                           "within": "7d"}}]}},
]
CHANGES_PER_PROFILE = len(SEGMENTS)
WEEK = dt.timedelta(days=7)
# The tick instant; the book is built (and backfilled) one hour before it.
TICK_AT = dt.datetime(2026, 12, 10, 12, 0, tzinfo=dt.UTC)
BUILT_AT = TICK_AT - dt.timedelta(hours=1)
WARMUP = 2


@dataclass(frozen=True)
class TickScale:
    steps: tuple[int, ...]  # profiles in the book at each measurement, ascending
    due: int  # changes due at the measured tick
    repeats: int


SCALES: dict[Scale, TickScale] = {
    "small": TickScale((300, 600), 400, 1),
    "medium": TickScale((10_000, 30_000, 100_000), 10_000, 5),
    "full": TickScale((100_000, 300_000, 1_000_000), 10_000, 5),
}


def _add(conn: psycopg.Connection[Any], first: int, last: int, due_profiles: int,
         rnd: random.Random) -> None:
    """Profiles ``first..last`` with a login and a deposit each; the first ``due_profiles``
    of the whole book became due within the hour before the tick, the others later."""
    profiles = []
    identities = []
    rows: list[tuple[Any, ...]] = []
    for pid in range(first, last + 1):
        if pid <= due_profiles:
            # The deposit 30 s after the login must be due too.
            at = TICK_AT - WEEK - dt.timedelta(seconds=rnd.uniform(31, 3599))
        else:
            at = TICK_AT - WEEK + dt.timedelta(seconds=rnd.uniform(60, 7 * 86400 - 7200))
        crm_id = f"T-{pid:08d}"
        profiles.append((pid, {"tier": rnd.choice(("bronze", "silver", "gold"))},
                         at - dt.timedelta(days=30)))
        identities.append(("crm_id", crm_id, pid, at - dt.timedelta(days=30)))
        ids = {"crm_id": crm_id}
        rows.append(("login", at, ids, None, None, {"platform": "web"}, "app",
                     f"l{pid}", pid, None, True))
        rows.append(("deposit", at + dt.timedelta(seconds=30), ids, 500, "USD",
                     {"method": "card"}, "payments", f"d{pid}", pid, 500, True))
    assert len(rows[0]) == len(RAW_COLUMNS)
    add_profiles(conn, profiles, identities)
    trusted_copy(conn, rows)


def _backfill(conn: psycopg.Connection[Any], after: int) -> None:
    """Evaluates profiles above ``after`` for every segment, as apply's backfill does."""
    ids = [r[0] for r in conn.execute(
        "SELECT segment_id FROM segflow.segment_defs WHERE active ORDER BY topo_order")]
    for segment_id in ids:
        last: int | None = after
        while last is not None:
            row = conn.execute("SELECT segflow.evaluate_batch(%s, %s, 5000, %s, 'backfill')",
                               (segment_id, last, BUILT_AT)).fetchone()
            last = row[0] if row else None


def _timed_tick(conn: psycopg.Connection[Any], at: dt.datetime) -> tuple[float, int]:
    watch = Stopwatch()
    with conn.transaction(force_rollback=True), watch.running():
        row = conn.execute("SELECT segflow.tick(%s)", (at,)).fetchone()
    return watch.seconds, int(row[0]) if row else 0


def run(url: str, scale: Scale, console: Console) -> Report:
    cfg = SCALES[scale]
    report = Report("tick", scale, "Time-driven changes: segflow.tick()")
    due_profiles = cfg.due // CHANGES_PER_PROFILE
    rnd = random.Random(4)
    report.setup += [
        f"segments: {', '.join(str(d['name']) for d in SEGMENTS)} (each changes 7 days after "
        "a profile's last login/deposit)",
        f"backlog: {due_profiles:,} profiles × {CHANGES_PER_PROFILE} segments = "
        f"{cfg.due:,} changes due at the tick; every other profile is scheduled later",
        "each step adds profiles that are not due, then times the same tick in a copy of "
        f"the book ({cfg.repeats}× in a rolled-back transaction, in one session after "
        f"{WARMUP} untimed ones; median)",
    ]
    table = report.table(
        "segflow.tick() as the book grows",
        ["profiles", "schedule rows", "stored events", "changes", "tick ms",
         "µs per change", "idle tick ms"])
    stats_table: dict[int, dict[str, float]] = {}
    dbs = Databases(url)
    try:
        with connect(url) as conn:
            report.machine = Machine.probe(conn)
            with _dict_conn(url) as setup:
                segments.install(setup, SEGMENTS)
        previous = 0
        for step in cfg.steps:
            console.print(f"book of {step:,} profiles", highlight=False)
            with connect(url) as conn:
                _add(conn, previous + 1, step, due_profiles, rnd)
                _backfill(conn, previous)
                vacuum_analyze(conn)
                set_clock(conn, TICK_AT)
                # Partitions ahead of the tick instant, once: not part of what is measured.
                conn.execute("SELECT segflow.maintain_partitions()")
            previous = step
            # Timed in a copy: the rolled-back ticks leave dead rows and grown indexes
            # behind, which the next, larger step must not inherit.
            clone = dbs.clone(url, "tick")
            with connect(clone) as conn:
                tracked = track_functions(conn)
                set_clock(conn, TICK_AT)
                # Untimed: the first calls plan every query afresh (see the ingest scenario).
                for _ in range(WARMUP):
                    _timed_tick(conn, TICK_AT)
                idle = median([_timed_tick(conn, BUILT_AT)[0] for _ in range(cfg.repeats)])
                before = function_stats(conn) if tracked else {}
                runs = [_timed_tick(conn, TICK_AT) for _ in range(cfg.repeats)]
                if tracked:
                    delta = stats_delta(function_stats(conn), before)
                    stats_table[step] = {k: v / cfg.repeats
                                         for k, v in grouped_self_ms(delta).items()}
                counts = conn.execute(
                    "SELECT (SELECT count(*) FROM segflow.schedule), "
                    "(SELECT count(*) FROM segflow.events_stored)").fetchone()
            dbs.drop(clone)
            assert counts is not None
            seconds = median([r[0] for r in runs])
            changes = runs[0][1]
            table.rows.append([f"{step:,}", f"{counts[0]:,}", f"{counts[1]:,}", f"{changes:,}",
                               fmt_ms(seconds * 1000),
                               f"{seconds * 1e6 / max(changes, 1):.0f}", fmt_ms(idle * 1000)])
            report.figures[f"tick_ms_{step}"] = seconds * 1000
            report.figures[f"idle_ms_{step}"] = idle * 1000
            report.figures[f"changes_{step}"] = changes
            console.print(f"  tick {seconds * 1000:.0f} ms for {changes:,} changes, "
                          f"idle {idle * 1000:.1f} ms", highlight=False)
    finally:
        dbs.cleanup()
    if stats_table:
        steps = list(stats_table)
        groups = sorted({g for s in steps for g in stats_table[s]})
        where = report.table("Where a tick's time goes (ms, function self time)",
                             ["part", *[f"{s:,} profiles" for s in steps]])
        for group in groups:
            where.rows.append([group, *[fmt_ms(stats_table[s].get(group, 0.0)) for s in steps]])
    first, last = cfg.steps[0], cfg.steps[-1]
    growth = report.figures[f"tick_ms_{last}"] / report.figures[f"tick_ms_{first}"]
    report.figures["growth"] = growth
    report.notes.append(
        f"{last // first}× the profiles: the tick takes {growth:.2f}× as long (same backlog)")
    return report


def _dict_conn(url: str) -> psycopg.Connection[Any]:
    """apply() reads rows by column name; the clock is the time the book was built."""
    conn = connect(url, row_factory=psycopg.rows.dict_row)
    set_clock(conn, BUILT_AT)
    return conn
