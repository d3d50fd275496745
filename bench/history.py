"""Scenario 5 — history length: the cost of one more event for a profile with a short or a
very long history.

One profile per history length, each with that many events in the last 29 days (sessions of
up to 100 events, 5 s apart, more than the session timeout between sessions), traits of a
gold trader, and the generated segment mix installed (every kind once at 10 segments). Then
each profile gets the same new session, event by event, as single-row INSERTs (the API's
path), taking turns so that every length is measured under the same conditions. What must
hold: the time per event stays flat as the history grows.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from rich.console import Console

from bench import segments
from bench.common import (
    FunctionStats,
    Machine,
    Report,
    Scale,
    Stopwatch,
    connect,
    fmt_ms,
    grouped_self_ms,
    insert_statement,
    median,
    set_clock,
    track_functions,
    vacuum_analyze,
)
from bench.population import RAW_COLUMNS, add_profiles, trusted_copy
from segflow.feed import EVENT_COLUMNS, FX_USD_PER_UNIT, TraderFeed, load_fx_rates

# The measured session starts here; the history lies in the 29 days before it.
START = dt.datetime(2026, 12, 10, 12, 0, tzinfo=dt.UTC)
SPAN = dt.timedelta(days=29)
SESSION = 100
STEP = dt.timedelta(seconds=5)
_ASSETS = (("EURUSD", "fx"), ("BTCUSD", "crypto"), ("XAUUSD", "metal"), ("TSLA", "stock"),
           ("US500", "index"))


@dataclass(frozen=True)
class HistoryScale:
    lengths: tuple[int, ...]  # events in the windows, one profile each
    events: int  # new events measured per profile
    segment_count: int
    # Then day partitions back this many days (retention keeps everything by default, and
    # windows may reach back 400 days) and this many more events per profile.
    partition_days: int
    more_events: int


SCALES: dict[Scale, HistoryScale] = {
    "small": HistoryScale((10, 300), 8, 10, 45, 3),
    "medium": HistoryScale((10, 1_000, 100_000), 150, 10, 400, 30),
    "full": HistoryScale((10, 1_000, 100_000), 300, 100, 400, 100),
}


def _event(rnd: random.Random, position: int) -> tuple[str, dict[str, Any], float | None]:
    """A trader's ``position``-th event of a session: (type, properties, amount in USD)."""
    if position == 0:
        return "login", {"method": "password", "platform": "web"}, None
    asset, klass = rnd.choice(_ASSETS)
    r = rnd.random()
    if r < 0.30:
        return "asset_view", {"asset": asset, "asset_class": klass, "platform": "web"}, None
    if r < 0.45:
        page = rnd.choice(("home", "markets", "deposit", "asset"))
        return "page_view", {"page": page, "path": f"/{page}"}, None
    if r < 0.65:
        amount = round(rnd.uniform(100, 5000), 2)
        return "trade", {"asset": asset, "asset_class": klass, "side": "buy",
                         "amount": amount, "leverage": 10, "platform": "web"}, amount
    if r < 0.77:
        u = round(rnd.uniform(0.3, 1.05), 4)
        return "margin_update", {"utilization": u, "exposure_usd": round(u * 20000, 2),
                                 "equity_usd": 2000.0}, None
    if r < 0.83:
        return "deposit", {"method": "card", "first_deposit": False}, float(
            rnd.choice((250, 500, 1000, 5000)))
    if r < 0.86:
        return "deposit_attempt", {"status": "failed", "method": "card"}, 500.0
    if r < 0.88:
        return "withdrawal", {"method": "card", "status": "requested"}, 300.0
    return "email_open", {"campaign": "weekly_markets"}, None


def _history_times(length: int) -> Iterator[tuple[dt.datetime, int]]:
    """(occurred_at, position in its session) of ``length`` events in the 29 days before
    START, in sessions of up to SESSION events evenly spread."""
    sessions = max(1, -(-length // SESSION))
    spacing = (SPAN - dt.timedelta(hours=1)) / sessions
    for n in range(length):
        session, position = divmod(n, SESSION)
        yield START - SPAN + session * spacing + position * STEP, position


@dataclass
class Phase:
    times: list[float] = field(default_factory=list)
    stats: FunctionStats = field(default_factory=dict)


@dataclass
class Profile:
    length: int
    profile_id: int
    crm_id: str
    phases: list[Phase] = field(default_factory=lambda: [Phase(), Phase()])


def _load(conn: psycopg.Connection[Any], lengths: tuple[int, ...], rnd: random.Random
          ) -> list[Profile]:
    profiles = [Profile(n, pid, f"H-{pid:04d}") for pid, n in enumerate(lengths, start=1)]
    created = START - SPAN - dt.timedelta(days=1)
    traits = {"tier": "gold", "country": "GB", "account_currency": "USD",
              "consent": {"email": True, "sms": False}}
    add_profiles(conn, [(p.profile_id, traits, created) for p in profiles],
                 [("crm_id", p.crm_id, p.profile_id, created) for p in profiles])
    rows: list[tuple[Any, ...]] = []
    for p in profiles:
        for i, (at, position) in enumerate(_history_times(p.length)):
            event_type, props, amount = _event(rnd, position)
            rows.append((event_type, at, {"crm_id": p.crm_id}, amount,
                         "USD" if amount is not None else None, props, "bench",
                         f"h{p.profile_id}-{i}", p.profile_id, amount, True))
    assert len(rows[0]) == len(RAW_COLUMNS)
    trusted_copy(conn, rows)
    return profiles


def _session(conn: psycopg.Connection[Any], profiles: list[Profile], phase: int,
             session: list[tuple[str, dict[str, Any], float | None]], first: int,
             warmup: int, tracked: bool) -> None:
    """Events ``first…`` of the session for every profile in turn, one INSERT + COMMIT each;
    times and function statistics after the first ``warmup`` go to ``phase``."""
    watch = Stopwatch()
    for k, (event_type, props, amount) in enumerate(session, start=first):
        at = START + k * STEP
        set_clock(conn, at)
        for p in profiles:
            statement = insert_statement(
                "segflow.events", EVENT_COLUMNS,
                [(event_type, at, {"crm_id": p.crm_id}, amount,
                  "USD" if amount is not None else None, props, "bench",
                  f"m{p.profile_id}-{k}")])
            if tracked:
                # The transaction's function counters start from zero only once the
                # earlier ones are flushed (they are kept per backend until then).
                conn.execute("SELECT pg_stat_force_next_flush()")
            conn.execute("BEGIN")
            watch.seconds = 0.0
            with watch.running():
                conn.execute(statement)
            counted = k - first >= warmup
            target = p.phases[phase]
            if tracked and counted:
                for name, (calls, total, self_ms) in _xact_stats(conn).items():
                    c0, t0, s0 = target.stats.get(name, (0, 0.0, 0.0))
                    target.stats[name] = (c0 + calls, t0 + total, s0 + self_ms)
            with watch.running():
                conn.execute("COMMIT")
            if counted:
                target.times.append(watch.seconds)


def _xact_stats(conn: psycopg.Connection[Any]) -> FunctionStats:
    rows = conn.execute(
        "SELECT schemaname || '.' || funcname, calls, total_time, self_time "
        "FROM pg_stat_xact_user_functions "
        "WHERE schemaname IN ('segflow', 'segflow_compiled')").fetchall()
    return {r[0]: (int(r[1]), float(r[2]), float(r[3])) for r in rows}


def run(url: str, scale: Scale, console: Console) -> Report:
    cfg = SCALES[scale]
    report = Report("history", scale, "History length: cost per event")
    rnd = random.Random(5)
    with connect(url) as conn:
        report.machine = Machine.probe(conn)
        load_fx_rates(conn, TraderFeed(start=START))
        console.print(f"loading histories of {', '.join(f'{n:,}' for n in cfg.lengths)} events",
                      highlight=False)
        profiles = _load(conn, cfg.lengths, rnd)
        with connect(url, row_factory=psycopg.rows.dict_row) as setup:
            set_clock(setup, START)
            segments.install(setup, segments.generate(cfg.segment_count))
        names = {f"segflow_compiled.s{r[0]}_eval": str(r[1]) for r in conn.execute(
            "SELECT segment_id, name FROM segflow.segment_defs")}
        conn.execute("SELECT segflow.ensure_partitions(%s, %s)",
                     (START, START + dt.timedelta(days=1)))
        vacuum_analyze(conn)
        tracked = track_functions(conn)
        # Every profile gets the same session: same types, same instants.
        session = [_event(rnd, position) for position in range(cfg.events + cfg.more_events)]
        # The first events of a session plan every compiled query: not counted.
        warmup = max(1, cfg.events // 10)
        _session(conn, profiles, 0, session[:cfg.events], 0, warmup, tracked)
        # The same book after a longer life: its day partitions, empty but for the last 29
        # days (the same events, only more partitions).
        conn.execute("SELECT segflow.ensure_partitions(%s, %s)",
                     (START - dt.timedelta(days=cfg.partition_days), START))
        partitions = conn.execute(
            "SELECT count(*) FROM pg_inherits "
            "WHERE inhparent = 'segflow.events_stored'::regclass").fetchone()
        _session(conn, profiles, 1, session[cfg.events:], cfg.events, 1, tracked)
        stored = {r[0]: r[1] for r in conn.execute(
            "SELECT profile_id, count(*) FROM segflow.events_stored GROUP BY 1")}

    report.setup += [
        f"segments: the first {cfg.segment_count} generated definitions "
        f"({', '.join(sorted({segments.kind_of(n) for n in names.values()}))})",
        f"history: one gold trader per length, events in the 29 days before the session, "
        f"sessions of up to {SESSION} events {STEP.seconds} s apart; then "
        f"{cfg.events} new events each, one single-row INSERT + COMMIT per event, "
        f"profiles taking turns; the first {warmup} (plans being cached) not counted",
        f"then day partitions back {cfg.partition_days} days are created (empty: what a "
        "book that old keeps without retention) and the session goes on for "
        f"{cfg.more_events} more events each (the first not counted)",
        f"USD rates as the feed's ({', '.join(FX_USD_PER_UNIT)}); all amounts in USD",
    ]
    table = report.table(
        "Time per event (INSERT + COMMIT)",
        ["events in history", "stored after", "median ms", "mean ms", "p90 ms",
         "median vs shortest", "mean vs shortest"])
    base = median(profiles[0].phases[0].times)
    base_mean = _mean(profiles[0].phases[0].times)
    for p in profiles:
        times = p.phases[0].times
        ordered = sorted(times)
        med = median(times)
        table.rows.append([f"{p.length:,}", f"{stored.get(p.profile_id, 0):,}",
                           fmt_ms(med * 1000), fmt_ms(_mean(times) * 1000),
                           fmt_ms(ordered[int(0.9 * (len(ordered) - 1))] * 1000),
                           f"{med / base:.2f}×", f"{_mean(times) / base_mean:.2f}×"])
        report.figures[f"median_ms_{p.length}"] = med * 1000
        report.figures[f"mean_ms_{p.length}"] = _mean(times) * 1000
    n_partitions = int(partitions[0]) if partitions else 0
    wide = report.table(
        f"The same session once {n_partitions} day partitions exist",
        ["events in history", "median ms", "mean ms", "mean vs 29 days of partitions"])
    for p in profiles:
        times = p.phases[1].times
        wide.rows.append([f"{p.length:,}", fmt_ms(median(times) * 1000),
                          fmt_ms(_mean(times) * 1000),
                          f"{_mean(times) / _mean(p.phases[0].times):.1f}×"])
        report.figures[f"wide_mean_ms_{p.length}"] = _mean(times) * 1000
    if tracked:
        grouped = {p.length: grouped_self_ms(p.phases[0].stats) for p in profiles}
        groups = sorted({g for by in grouped.values() for g in by})
        where = report.table("Where the time goes (ms per event, function self time)",
                             ["part", *[f"{p.length:,}" for p in profiles]])
        for group in groups:
            where.rows.append([group, *[
                fmt_ms(grouped[p.length].get(group, 0.0) / len(p.phases[0].times))
                for p in profiles]])
        kinds = report.table(
            "Compiled evaluation per segment (ms per event, total time incl. sessions; "
            f"last columns: with {n_partitions} day partitions)",
            ["segment", *[f"{p.length:,}" for p in profiles],
             *[f"{p.length:,}, {n_partitions} p." for p in profiles]])
        for function, name in sorted(names.items(), key=lambda kv: kv[1]):
            cells = [fmt_ms(p.phases[phase].stats.get(function, (0, 0.0, 0.0))[1]
                            / len(p.phases[phase].times))
                     for phase in (0, 1) for p in profiles]
            kinds.rows.append([name, *cells])
    return report


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
