"""Scenario 1 — ingest against the physical limit.

The same events are written, in the same statements, into databases cloned from one
template:

* **raw**: the engine switched off — rows with ``stored = true`` and their ``profile_id``
  and ``amount_usd`` under ``segflow.trusted_ingest``, into the same partitioned
  ``segflow.events``. The statement trigger still fires and returns after one pass over the
  transition table; this is the baseline the ratios use.
* **plain table**: the same rows into a plain copy of ``segflow.events_stored`` (same
  partitions and indexes, no trigger): the physical limit, for reference.
* **engine, N segments**: the events as a service sends them (identifiers, no profile), with
  0 and the configured numbers of generated realtime segments installed and backfilled.

The measured events are the feed's stream from traders already in the book (their
identifiers resolve on the fast path). The stream as it comes, with newcomers, anonymous
visitors and merges, is measured separately with no segments: it takes the identity slow
path, which is reported on its own line.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from rich.console import Console

from bench import segments
from bench.common import (
    Databases,
    FunctionStats,
    Machine,
    Report,
    Scale,
    Stopwatch,
    connect,
    copy_payload,
    fmt_ms,
    fmt_rate,
    function_stats,
    grouped_self_ms,
    insert_statement,
    load_average,
    median,
    run_copy,
    set_clock,
    stats_delta,
    track_functions,
    vacuum_analyze,
)
from bench.population import RAW_COLUMNS, Book, engine_row, load_book
from segflow.feed import EVENT_COLUMNS, TraderFeed

METHODS = ("COPY", "INSERT")
TARGETS = {10: 0.50, 100: 0.25}


@dataclass(frozen=True)
class IngestScale:
    traders: int
    events: int  # measured events from known traders
    segment_counts: tuple[int, ...]
    copy_chunk: int  # rows per COPY statement
    insert_chunk: int  # rows per multi-row INSERT statement
    raw_repeats: int  # the raw baseline is short: take the median of this many runs
    identity_events: int  # events of the unfiltered stream (identity slow path); 0: skip
    # Untimed statements first, in the same session: PL/pgSQL plans its queries afresh for
    # five calls and then keeps a generic plan, as a long-lived session would.
    warmup_statements: int = 6
    warmup_chunk: int = 50


SCALES: dict[Scale, IngestScale] = {
    "small": IngestScale(200, 300, (10,), 100, 50, 1, 100, warmup_statements=1),
    "medium": IngestScale(5_000, 2_000, (10, 100, 500), 1_000, 200, 3, 1_000),
    "full": IngestScale(1_000_000, 100_000, (10, 100, 500), 10_000, 1_000, 3, 10_000),
}


@dataclass
class Batch:
    """One statement's worth of events, encoded before the clock starts."""

    clock: dt.datetime
    copy: bytes
    insert: str


def _batches(rows: Sequence[Sequence[Any]], times: Sequence[dt.datetime], table: str,
             columns: Sequence[str], size: int) -> list[Batch]:
    return [Batch(max(times[i:i + size]), copy_payload(rows[i:i + size]),
                  insert_statement(table, columns, rows[i:i + size]))
            for i in range(0, len(rows), size)]


@dataclass
class Run:
    seconds: float
    stats: FunctionStats


def _measure(url: str, method: str, warmup: Sequence[Batch], batches: Sequence[Batch],
             table: str, columns: Sequence[str], trusted: bool = False) -> Run:
    with connect(url) as conn:
        tracked = track_functions(conn)
        if trusted:
            conn.execute("SET segflow.trusted_ingest = on")
        for batch in warmup:
            set_clock(conn, batch.clock)
            run_copy(conn, table, columns, batch.copy)
        before = function_stats(conn) if tracked else {}
        watch = Stopwatch()
        for batch in batches:
            set_clock(conn, batch.clock)
            with watch.running():
                if method == "COPY":
                    run_copy(conn, table, columns, batch.copy)
                else:
                    conn.execute(batch.insert.encode())
        stats = stats_delta(function_stats(conn), before) if tracked else {}
    return Run(watch.seconds, stats)


def _stream(feed: TraderFeed, book: Book, warmup: int, known: int, unfiltered: int
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The next events of the stream from traders in the book: ``warmup`` of them, then
    ``known`` more; and the first ``unfiltered`` after the warm-up ones as they come."""
    warm: list[dict[str, Any]] = []
    picked: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    for event in feed.stream():
        known_trader = book.profile_of(event) is not None
        if len(warm) < warmup:
            if known_trader:
                warm.append(event)
            continue
        if len(raw) < unfiltered:
            raw.append(event)
        if known_trader:
            picked.append(event)
        if len(picked) >= known and len(raw) >= unfiltered:
            return warm, picked, raw
    raise AssertionError("the feed's stream is endless")


@dataclass
class Workload:
    warm_engine: list[Batch]
    warm_raw: list[Batch]
    warm_plain: list[Batch]
    engine: dict[int, list[Batch]]  # chunk size → batches
    raw: dict[int, list[Batch]]
    plain: dict[int, list[Batch]]
    identity: dict[int, list[Batch]]
    # Per statement: the profiles in it and each profile's event types (for the
    # evaluation counts).
    statements: dict[int, list[dict[int, set[str]]]]


def _raw_rows(book: Book, events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [book.raw_row(e, p) for e in events if (p := book.profile_of(e))]


def _workload(book: Book, warm: list[dict[str, Any]], events: list[dict[str, Any]],
              unfiltered: list[dict[str, Any]], chunks: Sequence[int], warm_chunk: int
              ) -> Workload:
    times = [e["occurred_at"] for e in events]
    pids = [book.profile_of(e) for e in events]
    engine_rows = [engine_row(e) for e in events]
    raw_rows = _raw_rows(book, events)
    warm_times = [e["occurred_at"] for e in warm]
    work = Workload(
        _batches([engine_row(e) for e in warm], warm_times, "segflow.events", EVENT_COLUMNS,
                 warm_chunk),
        _batches(_raw_rows(book, warm), warm_times, "segflow.events", RAW_COLUMNS, warm_chunk),
        _batches(_raw_rows(book, warm), warm_times, "bench_plain.events", RAW_COLUMNS,
                 warm_chunk),
        {}, {}, {}, {}, {})
    for size in chunks:
        work.engine[size] = _batches(engine_rows, times, "segflow.events", EVENT_COLUMNS, size)
        work.raw[size] = _batches(raw_rows, times, "segflow.events", RAW_COLUMNS, size)
        work.plain[size] = _batches(raw_rows, times, "bench_plain.events", RAW_COLUMNS, size)
        work.identity[size] = _batches(
            [engine_row(e) for e in unfiltered], [e["occurred_at"] for e in unfiltered],
            "segflow.events", EVENT_COLUMNS, size)
        statements = []
        for i in range(0, len(events), size):
            seen: dict[int, set[str]] = {}
            for e, p in zip(events[i:i + size], pids[i:i + size], strict=True):
                if p:
                    seen.setdefault(p, set()).add(e["event_type"])
            statements.append(seen)
        work.statements[size] = statements
    return work


def _plain_table(url: str, first: dt.datetime, last: dt.datetime) -> None:
    """A trigger-less copy of events_stored with the same indexes and day partitions."""
    with connect(url) as conn:
        conn.execute("CREATE SCHEMA bench_plain")
        conn.execute("CREATE TABLE bench_plain.events (LIKE segflow.events_stored "
                     "INCLUDING DEFAULTS) PARTITION BY RANGE (occurred_at)")
        conn.execute("CREATE INDEX ON bench_plain.events "
                     "(profile_id, event_type, occurred_at, event_id)")
        conn.execute("CREATE INDEX ON bench_plain.events (profile_id, occurred_at, event_id)")
        day = first.date()
        while day <= last.date():
            conn.execute(
                f"CREATE TABLE bench_plain.events_{day:%Y%m%d} PARTITION OF bench_plain.events "
                f"FOR VALUES FROM ('{day} 00:00:00+00') TO ('{day + dt.timedelta(days=1)} "
                "00:00:00+00')")
            day += dt.timedelta(days=1)


@dataclass
class SegmentInfo:
    name: str
    trigger_types: list[str] | None
    trait_sensitive: bool


def _segment_info(url: str) -> dict[str, SegmentInfo]:
    """Compiled function name → what triggers the segment."""
    with connect(url) as conn:
        rows = conn.execute(
            "SELECT segment_id, name, trigger_types, trait_sensitive FROM segflow.segment_defs "
            "WHERE active AND mode = 'realtime'").fetchall()
    return {f"segflow_compiled.s{r[0]}_eval": SegmentInfo(r[1], r[2], r[3]) for r in rows}


def _evaluations(info: dict[str, SegmentInfo], statements: list[dict[int, set[str]]]
                 ) -> tuple[dict[str, int], int, int]:
    """Profile evaluations per compiled function as the engine does them (for each segment,
    the profiles whose own events have a type that can change it), with the totals: what
    choosing per statement would do (every profile of the statement for each segment one of
    its types can change) and what the engine does."""
    per_function: dict[str, int] = {}
    engine = needed = 0
    trait_types = {"identify", "consent_updated"}
    for seen in statements:
        types = set().union(*seen.values()) if seen else set()
        for function, seg in info.items():
            def hits(ts: set[str], seg: SegmentInfo = seg) -> bool:
                return (seg.trigger_types is None or bool(ts & set(seg.trigger_types))
                        or (seg.trait_sensitive and bool(ts & trait_types)))
            if hits(types):
                chosen = sum(1 for ts in seen.values() if hits(ts))
                per_function[function] = per_function.get(function, 0) + chosen
                engine += len(seen)
                needed += chosen
    return per_function, engine, needed


def run(url: str, scale: Scale, console: Console) -> Report:
    """Runs the scenario in the (migrated, empty) database at ``url`` and its clones."""
    cfg = SCALES[scale]
    report = Report("ingest", scale, "Ingest: engine vs raw")
    dbs = Databases(url)
    chunks = {"COPY": cfg.copy_chunk, "INSERT": cfg.insert_chunk}
    try:
        with connect(url) as conn:
            report.machine = Machine.probe(conn)
            console.print(f"loading {cfg.traders:,} traders' history", highlight=False)
            feed = TraderFeed(seed=11, profiles=cfg.traders, rate=max(20.0, cfg.traders / 50))
            book = load_book(conn, feed)
            warm, events, unfiltered = _stream(feed, book,
                                               cfg.warmup_statements * cfg.warmup_chunk,
                                               cfg.events, cfg.identity_events)
            start = warm[0]["occurred_at"]
            set_clock(conn, start)
            conn.execute("SELECT segflow.tick(%s)", (start,))
            vacuum_analyze(conn)
            profiles = conn.execute("SELECT count(*) FROM segflow.profiles").fetchone()
            stored = conn.execute("SELECT count(*) FROM segflow.events_stored").fetchone()
        work = _workload(book, warm, events, unfiltered, sorted(set(chunks.values())),
                         cfg.warmup_chunk)
        report.setup += [
            f"book: {profiles[0] if profiles else 0:,} profiles, "
            f"{stored[0] if stored else 0:,} stored events (9 days of history), "
            f"{len(book.identities):,} identities",
            f"measured: the next {len(events):,} stream events of known traders "
            f"({events[0]['occurred_at']:%H:%M:%S}–{events[-1]['occurred_at']:%H:%M:%S} "
            "stream time), identical in every variant; "
            f"COPY {cfg.copy_chunk:,} rows per statement, multi-row INSERT "
            f"{cfg.insert_chunk:,} rows per statement, each statement its own transaction; "
            f"each run's session first writes the {len(warm):,} stream events before them "
            f"({cfg.warmup_statements} untimed COPY statements, so that the engine's queries "
            "run on cached plans as in a long-lived session)",
            "raw = the engine switched off: the same rows with stored = true, profile_id and "
            "amount_usd under segflow.trusted_ingest into segflow.events (the statement "
            "trigger fires and returns at once); plain table = a trigger-less copy of "
            "events_stored with the same indexes and partitions",
        ]

        results: dict[str, dict[str, float]] = {}
        # The 1-minute load average right after each run: other work on the machine shows.
        loads: dict[str, list[float]] = {}
        stats: dict[tuple[str, str], FunctionStats] = {}
        n_events = len(events)

        def measure(label: str, template: str, kind: str, method: str,
                    repeats: int = 1) -> None:
            times = []
            for _ in range(repeats):
                clone = dbs.clone(template, "run")
                batches = {"engine": work.engine, "raw": work.raw, "plain": work.plain,
                           "identity": work.identity}[kind][chunks[method]]
                warmup = {"engine": work.warm_engine, "raw": work.warm_raw,
                          "plain": work.warm_plain, "identity": work.warm_engine}[kind]
                if kind == "plain":
                    _plain_table(clone, start, events[-1]["occurred_at"])
                table = "bench_plain.events" if kind == "plain" else "segflow.events"
                columns = EVENT_COLUMNS if kind in ("engine", "identity") else RAW_COLUMNS
                result = _measure(clone, method, warmup, batches, table, columns,
                                  trusted=kind == "raw")
                dbs.drop(clone)
                times.append(result.seconds)
                stats[label, method] = result.stats
            results.setdefault(label, {})[method] = median(times)
            loads.setdefault(label, []).append(load_average())
            count = len(unfiltered) if kind == "identity" else n_events
            console.print(f"{label:>28} {method:6} {fmt_rate(count, median(times))} ev/s",
                          highlight=False)

        for method in METHODS:
            measure("raw (engine off)", url, "raw", method, cfg.raw_repeats)
            measure("plain table", url, "plain", method, cfg.raw_repeats)
        evaluations: dict[tuple[int, str], tuple[dict[str, int], int, int]] = {}
        infos: dict[int, dict[str, SegmentInfo]] = {}
        for n in (0, *cfg.segment_counts):
            template = dbs.clone(url, f"s{n}")
            if n:
                console.print(f"installing and backfilling {n} segments", highlight=False)
                with connect(template, row_factory=psycopg.rows.dict_row) as conn:
                    set_clock(conn, start)
                    segments.install(conn, segments.generate(n))
                    conn.execute("SELECT segflow.tick(%s)", (start,))
                    vacuum_analyze(conn)
                infos[n] = _segment_info(template)
                for method in METHODS:
                    evaluations[n, method] = _evaluations(infos[n],
                                                          work.statements[chunks[method]])
            for method in METHODS:
                measure(f"engine, {n} segments", template, "engine", method)
            dbs.drop(template)
        if cfg.identity_events:
            for method in METHODS:
                measure("new identities, 0 segments", url, "identity", method)
    finally:
        dbs.cleanup()

    raw = results["raw (engine off)"]
    table = report.table(
        "Events per second (ratio: share of the raw rate, same method)",
        ["variant", "COPY ev/s", "COPY vs raw", "INSERT ev/s", "INSERT vs raw", "target",
         "load after"])
    for label, by_method in results.items():
        if label.startswith("new identities"):
            continue
        row = [label]
        for method in METHODS:
            seconds = by_method[method]
            row += [fmt_rate(n_events, seconds), f"{raw[method] / seconds:.1%}"]
            report.figures[f"{label} {method} ev/s"] = n_events / seconds
        n = int(label.split()[1]) if label.startswith("engine") else -1
        row.append(f"≥ {TARGETS[n]:.0%}" if n in TARGETS else "")
        row.append(" / ".join(f"{x:.1f}" for x in loads[label]))
        table.rows.append(row)
    if cfg.identity_events:
        label = "new identities, 0 segments"
        report.table(
            "The stream as it comes (newcomers, visitors, merges): identity slow path",
            ["variant", "events", "COPY ev/s", "INSERT ev/s"]).rows.append(
            [label, f"{len(unfiltered):,}",
             fmt_rate(len(unfiltered), results[label]["COPY"]),
             fmt_rate(len(unfiltered), results[label]["INSERT"])])

    # Where the time goes, per 1,000 events, for every engine run.
    runs = [(label, method) for label, method in stats if label.startswith("engine")]
    grouped = {key: grouped_self_ms(stats[key]) for key in runs}
    groups = sorted({g for key in runs for g in grouped[key]})
    per_k = 1000 / n_events
    where = report.table(
        "Where the time goes (ms per 1,000 events; function self time, track_functions = all)",
        ["part", *[f"{label.split()[1]} seg. {method}" for label, method in runs]])
    for group in groups:
        where.rows.append([group, *[fmt_ms(grouped[key].get(group, 0.0) * per_k)
                                    for key in runs]])
    trigger = {key: stats[key].get("segflow._events_after_insert", (0, 0.0, 0.0))[1]
               for key in runs}
    where.rows.append(["outside the trigger (the statement itself, transition table, commit)",
                       *[fmt_ms(max(0.0, results[key[0]][key[1]] * 1000 - trigger[key])
                                * per_k) for key in runs]])
    where.rows.append(["**statement total**",
                       *[fmt_ms(results[key[0]][key[1]] * 1000 * per_k) for key in runs]])

    if evaluations:
        counts = report.table(
            "Profile evaluations per 1,000 events",
            ["segments", "method", "statements", "evaluations", "per event",
             "if chosen per statement", "µs per evaluation", "of which compiled query"])
        for (n, method), (_, engine, needed) in evaluations.items():
            key = (f"engine, {n} segments", method)
            eval_ms = sum(v[1] for k, v in stats[key].items()
                          if k.startswith("segflow_compiled.") and k.endswith("_eval"))
            apply_ms = stats[key].get("segflow._apply", (0, 0.0, 0.0))[1]
            counts.rows.append([
                str(n), method, str(len(work.statements[chunks[method]])),
                f"{needed * per_k:,.0f}", f"{needed / n_events:.1f}",
                f"{engine * per_k:,.0f} ({needed / max(engine, 1):.0%} of it chosen)",
                f"{apply_ms * 1000 / max(needed, 1):.0f}",
                f"{eval_ms * 1000 / max(needed, 1):.0f}"])
            report.figures[f"evaluations_{n}_{method}"] = engine
            report.figures[f"evaluations_needed_{n}_{method}"] = needed
        largest = max(n for n, _ in evaluations)
        per_function = evaluations[largest, "COPY"][0]
        key = (f"engine, {largest} segments", "COPY")
        by_kind: dict[str, list[float]] = {}
        for function, seg in infos[largest].items():
            entry = by_kind.setdefault(segments.kind_of(seg.name), [0.0, 0.0, 0.0])
            entry[0] += 1
            entry[1] += stats[key].get(function, (0, 0.0, 0.0))[1]
            entry[2] += per_function.get(function, 0)
        kinds = report.table(
            f"Evaluation cost by kind ({largest} segments, COPY)",
            ["kind", "segments", "eval ms per 1,000 events", "µs per profile evaluation"])
        for kind, (n_seg, spent, evaluated) in sorted(by_kind.items(),
                                                       key=lambda kv: -kv[1][1]):
            kinds.rows.append([kind, f"{n_seg:.0f}", fmt_ms(spent * per_k),
                               f"{spent * 1000 / evaluated:.0f}" if evaluated else "–"])
    return report
