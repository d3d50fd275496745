"""Scenario 6 — backfill and preview: a new segment over the whole book, against the SQL a
DBA would write by hand for the same membership.

A book of the feed's clients and their history (bulk-loaded), then for each of a few
definitions of different kinds: the hand-written query (a plain ``SELECT`` of the member ids,
and the same into a table), ``segflow preview`` of the definition (members computed, nothing
installed) and ``segflow apply`` of it (compiled, installed and backfilled: memberships,
transitions, schedule), each at the same clock instant. The hand query, preview and apply
must find the same members; the ratios are preview and apply time over the hand query's.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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
    median,
    set_clock,
    stats_delta,
    track_functions,
    vacuum_analyze,
)
from bench.population import load_book
from segflow.feed import TraderFeed
from segflow.install import preview

TARGET = 1.5


@dataclass(frozen=True)
class Definition:
    doc: segments.Doc
    # The same membership by hand, at %(at)s.
    hand: str


DEFINITIONS: tuple[Definition, ...] = (
    Definition(
        {"name": "vip_depositors", "description": "gold or platinum, ≥ $1,000 deposited in 30 days",
         "rule": {"all": [{"trait": "tier", "in": ["gold", "platinum"]},
                          {"events": "deposit", "within": "30d",
                           "sum": {"field": "amount_usd", "gte": 1000}}]}},
        # Traits compared as jsonb, and the profile looked up per aggregated row: with
        # `traits ->> 'tier'` and a join, the planner expects one matching profile and
        # rescans the whole aggregate once per gold trader (27× slower at 5k traders).
        """
        SELECT d.profile_id
        FROM (SELECT e.profile_id, sum(e.amount_usd) AS total
              FROM segflow.events_stored e
              WHERE e.event_type = 'deposit'
                AND e.occurred_at > %(at)s - interval '30 days' AND e.occurred_at <= %(at)s
              GROUP BY e.profile_id) d
        WHERE d.total >= 1000
          AND EXISTS (SELECT FROM segflow.profiles p
                      WHERE p.profile_id = d.profile_id AND p.merged_into IS NULL
                        AND p.traits -> 'tier' IN ('"gold"', '"platinum"'))
        """),
    Definition(
        {"name": "dormant_7d", "description": "no login for 7 days",
         "rule": {"last": "login", "age": {"gte": "7d"}}},
        """
        SELECT e.profile_id
        FROM segflow.events_stored e
        JOIN segflow.profiles p ON p.profile_id = e.profile_id AND p.merged_into IS NULL
        WHERE e.event_type = 'login' AND e.occurred_at <= %(at)s
        GROUP BY e.profile_id
        HAVING %(at)s - max(e.occurred_at) >= interval '7 days'
        """),
    Definition(
        {"name": "active_traders", "description": "3 trades this week, no withdrawal in 3 days",
         "rule": {"all": [{"events": "trade", "within": "7d", "count": {"gte": 3}},
                          {"not": {"events": "withdrawal", "within": "3d"}}]}},
        """
        SELECT e.profile_id
        FROM segflow.events_stored e
        JOIN segflow.profiles p ON p.profile_id = e.profile_id AND p.merged_into IS NULL
        WHERE e.event_type IN ('trade', 'withdrawal')
          AND e.occurred_at > %(at)s - interval '7 days' AND e.occurred_at <= %(at)s
        GROUP BY e.profile_id
        HAVING count(*) FILTER (WHERE e.event_type = 'trade') >= 3
           AND count(*) FILTER (WHERE e.event_type = 'withdrawal'
                                  AND e.occurred_at > %(at)s - interval '3 days') = 0
        """),
)


@dataclass(frozen=True)
class BackfillScale:
    traders: int
    repeats: int  # hand query and preview: median of this many (after one untimed run)


SCALES: dict[Scale, BackfillScale] = {
    "small": BackfillScale(300, 1),
    "medium": BackfillScale(20_000, 3),
    "full": BackfillScale(1_000_000, 3),
}


def _timed(repeats: int, action: Callable[[], Any]) -> tuple[float, Any]:
    """Median seconds of ``repeats`` runs after an untimed one, and the last result."""
    result = action()
    times = []
    for _ in range(repeats):
        watch = Stopwatch()
        with watch.running():
            result = action()
        times.append(watch.seconds)
    return median(times), result


@dataclass
class Measured:
    name: str
    hand_s: float
    hand_table_s: float
    preview_s: float
    apply_s: float
    eval_ms: float  # of apply: compiled evaluation (the segment's functions)
    build_ms: float  # of apply: building its rollups from the stored events
    write_ms: float  # of apply: diff and writes (_apply self time)
    members: int
    same_preview: bool
    same_apply: bool
    transitions: int


def _measure(dbs: Databases, url: str, at: dt.datetime, definition: Definition,
             repeats: int) -> Measured:
    name = str(definition.doc["name"])
    with connect(url) as conn:
        set_clock(conn, at)
        hand_s, rows = _timed(repeats, lambda: conn.execute(
            definition.hand, {"at": at}).fetchall())
        hand = {int(r[0]) for r in rows}

        def into_table() -> None:
            with conn.transaction(force_rollback=True):
                conn.execute(f"CREATE TEMP TABLE bench_members AS {definition.hand}", {"at": at})

        hand_table_s, _ = _timed(repeats, into_table)
    with tempfile.TemporaryDirectory(prefix="segflow-bench-") as folder:
        path = Path(folder) / f"{name}.json"
        path.write_text(json.dumps(definition.doc))
        with connect(url, row_factory=psycopg.rows.dict_row) as conn:
            set_clock(conn, at)
            preview_s, result = _timed(repeats, lambda: preview(conn, path, sample=10 ** 9))
        previewed = {int(r["profile_id"]) for r in result.sample}
    # apply writes: once, in a copy, its data read once by the hand query first (as above).
    clone = dbs.clone(url, "apply")
    with connect(clone) as conn:
        set_clock(conn, at)
        conn.execute(definition.hand, {"at": at}).fetchall()
        tracked = track_functions(conn)
        before = function_stats(conn) if tracked else {}
        watch = Stopwatch()
        # apply reads rows by column name
        conn.row_factory = psycopg.rows.dict_row
        with watch.running():
            plan = segments.install(conn, [definition.doc])
        conn.row_factory = psycopg.rows.tuple_row
        delta = stats_delta(function_stats(conn), before) if tracked else {}
        applied = {int(r[0]) for r in conn.execute(
            "SELECT m.profile_id FROM segflow.segment_members m "
            "JOIN segflow.segment_defs d USING (segment_id) WHERE d.name = %s", (name,))}
    dbs.drop(clone)
    build_ms = delta.get("segflow_compiled.rollups_build", (0, 0.0, 0.0))[1]
    eval_ms = sum(v[1] for k, v in delta.items()
                  if k.startswith("segflow_compiled.s") and k.endswith(("_book", "_eval")))
    write_ms = delta.get("segflow._apply", (0, 0.0, 0.0))[2]
    return Measured(name, hand_s, hand_table_s, preview_s, watch.seconds, eval_ms, build_ms,
                    write_ms,
                    len(hand), previewed == hand, applied == hand, plan.transitions)


def run(url: str, scale: Scale, console: Console) -> Report:
    cfg = SCALES[scale]
    report = Report("backfill", scale, "Backfill and preview vs a hand-written query")
    dbs = Databases(url)
    results: list[Measured] = []
    try:
        with connect(url) as conn:
            report.machine = Machine.probe(conn)
            console.print(f"loading {cfg.traders:,} traders' history", highlight=False)
            feed = TraderFeed(seed=11, profiles=cfg.traders, rate=max(20.0, cfg.traders / 50))
            load_book(conn, feed)
            vacuum_analyze(conn)
            counts = conn.execute("SELECT (SELECT count(*) FROM segflow.profiles), "
                                  "(SELECT count(*) FROM segflow.events_stored)").fetchone()
            assert counts is not None
        at = feed.start
        for definition in DEFINITIONS:
            measured = _measure(dbs, url, at, definition, cfg.repeats)
            results.append(measured)
            console.print(f"{measured.name}: hand {measured.hand_s * 1000:.0f} ms, preview "
                          f"{measured.preview_s * 1000:.0f} ms, apply "
                          f"{measured.apply_s * 1000:.0f} ms", highlight=False)
    finally:
        dbs.cleanup()

    report.setup += [
        f"book: {counts[0]:,} profiles, {counts[1]:,} stored events (9 days of history)",
        f"every definition at the same clock instant ({at:%Y-%m-%d %H:%M} UTC); hand query "
        f"(SELECT of the member ids, and CREATE TEMP TABLE … AS it) and preview: median of "
        f"{cfg.repeats} runs after an untimed one; apply (compile, install, backfill: "
        "memberships, transitions, schedule, one transaction): once, in a copy of the book "
        "whose data the hand query has just read",
        "preview and apply are the library calls behind `segflow preview` / `segflow apply`; "
        "both evaluate the whole book in one grouped pass (the compiled book form)",
    ]
    table = report.table(
        "Time (ms) and ratio to the hand-written query",
        ["segment", "members", "hand SELECT", "hand into table", "preview", "preview ×",
         "apply", "apply ×", "target", "same members"])
    for m in results:
        table.rows.append([
            m.name, f"{m.members:,}", fmt_ms(m.hand_s * 1000), fmt_ms(m.hand_table_s * 1000),
            fmt_ms(m.preview_s * 1000), f"{m.preview_s / m.hand_s:.1f}×",
            fmt_ms(m.apply_s * 1000), f"{m.apply_s / m.hand_table_s:.1f}×",
            f"≤ {TARGET:g}×",
            "yes" if m.same_preview and m.same_apply else
            f"preview {'yes' if m.same_preview else 'NO'}, apply "
            f"{'yes' if m.same_apply else 'NO'}"])
        report.figures[f"{m.name}_preview_ratio"] = m.preview_s / m.hand_s
        report.figures[f"{m.name}_apply_ratio"] = m.apply_s / m.hand_table_s
        report.figures[f"{m.name}_members"] = m.members
        report.figures[f"{m.name}_same"] = float(m.same_preview and m.same_apply)
    where = report.table(
        "Where apply's time goes (ms, function time; track_functions = all)",
        ["segment", "apply", "compiled evaluation", "rollup build",
         "diff + writes (_apply self)", "rest (compile, install, transaction)",
         "transitions written"])
    for m in results:
        where.rows.append([m.name, fmt_ms(m.apply_s * 1000), fmt_ms(m.eval_ms),
                           fmt_ms(m.build_ms), fmt_ms(m.write_ms),
                           fmt_ms(max(0.0, m.apply_s * 1000 - m.eval_ms - m.build_ms
                                      - m.write_ms)),
                           f"{m.transitions:,}"])
    report.notes.append("preview × is over the hand SELECT; apply × over the hand query "
                        "written into a table (apply stores its result too)")
    return report
