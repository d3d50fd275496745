"""Rollups: per-profile bucketed aggregates behind ``sum``, ``min``, ``max``, ``avg`` and
``distinct``.

A rollup is one (event filter, value) pair, both as compiled SQL over an event aliased ``e``,
of one kind: ``numeric`` (sum/min/max/avg) or ``distinct``. Its signature is that SQL and its
kind, so segments aggregating the same pair share one rollup. Each profile has, per minute,
hour and UTC day bucket (aligned to the Unix epoch, so buckets nest and never span two day
partitions), the count, sum, least and greatest numeric value of its matching events
(``segflow.event_rollups``), or, for ``distinct``, one row per distinct value seen in the
bucket (``segflow.event_distinct_values``); see sql/schema/0005_rollups.sql.

An aggregate over the events with ``occurred_at`` in ``[S, T]`` reads the day buckets wholly
inside, hour buckets between them and the edges, minute buckets beyond those, and the raw
events of the partial minutes at both edges. Every range is an index range, so the rows read
are at most (days in the window) + 2·23 + 2·59 plus the events of two minutes, whatever the
profile's history (for ``distinct``, times the distinct values per bucket); windows stay exact
to the microsecond.

Pure: SQL text only, no database connection.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from psycopg import sql

EVENTS = "segflow.events_stored"
ROLLUPS = "segflow.event_rollups"
DISTINCT_VALUES = "segflow.event_distinct_values"
NUMERIC = "numeric"
DISTINCT = "distinct"
# Distinct values larger than this (bytes, uncompressed) are not keys of a bucket (a B-tree
# entry holds about 2.7 kB): their bucket keeps the marker LARGE instead, a JSON null, which
# no counted value can be.
LARGE_VALUE_BYTES = 2000
LARGE = "'null'::jsonb"


def _is_large(v: str) -> str:
    return f"pg_column_size({v}) > {LARGE_VALUE_BYTES}"
EPOCH = "'1970-01-01 00:00:00+00'::timestamptz"
MICROSECOND = "'1 microsecond'::interval"


@dataclass(frozen=True)
class Level:
    level: int
    seconds: int

    @property
    def width(self) -> str:
        # Pure microseconds: no day part, so time-zone rules never stretch a bucket.
        return f"'{self.seconds * 1_000_000} microseconds'::interval"


MINUTE = Level(1, 60)
HOUR = Level(2, 3600)
DAY = Level(3, 86400)
LEVELS = (DAY, HOUR, MINUTE)  # coarsest first


def levels_for(span_seconds: float | None) -> tuple[Level, ...]:
    """The bucket levels worth reading for a window at most ``span_seconds`` long (None:
    unbounded): those of which at least two buckets fit. None fit below two minutes; the
    window then reads its raw events, which the window itself bounds."""
    if span_seconds is None:
        return LEVELS
    return tuple(lv for lv in LEVELS if 2 * lv.seconds <= span_seconds)


@dataclass(frozen=True)
class RollupSpec:
    filter_sql: str  # over an event aliased e
    # Over an event aliased e: numeric or NULL for the numeric kind; for distinct, the value
    # as jsonb (equal values equal as the aggregate compares them), NULL when ignored.
    value_sql: str
    kind: str = NUMERIC

    @property
    def signature(self) -> str:
        text = f"{self.filter_sql}\n{self.value_sql}"
        if self.kind != NUMERIC:
            text += f"\n{self.kind}"
        return hashlib.sha256(text.encode()).hexdigest()


def _lit(value: object) -> str:
    return sql.Literal(value).as_string(None)


def _floor(level: Level, t: str) -> str:
    return f"date_bin({level.width}, {t}, {EPOCH})"


def _ceil(level: Level, t: str) -> str:
    return f"date_bin({level.width}, {t} + {level.width} - {MICROSECOND}, {EPOCH})"


def _window(rollup_id: int, levels: Sequence[Level], starts: Sequence[str], table: str,
            bucket_columns: str, raw_columns: str, matching: str, value: str) -> str:
    """FROM items yielding, as ``x``, the bucket rows (``bucket_columns`` of ``table``
    aliased r) and raw edge events (``raw_columns`` over their value ``v.v``) that together
    cover the events with ``occurred_at`` in ``[S, i.at]``: see ``window_read``."""
    assert levels, "a read without bucket levels is a plain scan"
    end = f"(i.at + {MICROSECOND})"
    if not starts:
        start = "'-infinity'::timestamptz"
    elif len(starts) == 1:
        start = starts[0]
    else:
        # Each start once (they may be subqueries); greatest() alone would skip a NULL.
        columns = ", ".join(f"{s} AS p{k}" for k, s in enumerate(starts))
        nulls = " OR ".join(f"w0.p{k} IS NULL" for k in range(len(starts)))
        start = (f"(SELECT CASE WHEN {nulls} THEN NULL ELSE "
                 f"greatest({', '.join(f'w0.p{k}' for k in range(len(starts)))}) END "
                 f"FROM (SELECT {columns}) w0)")
    bounds = [f"{start} AS s", f"{end} AS e"]
    for lv in levels:
        bounds.append(f"{_ceil(lv, 'w.s')} AS l{lv.level}")
        bounds.append(f"{_floor(lv, 'w.e')} AS u{lv.level}")
    parts: list[str] = []
    bucket = (f"SELECT {bucket_columns} FROM {table} r "
              f"WHERE r.profile_id = i.profile_id AND r.rollup_id = {_lit(rollup_id)} ")
    previous: Level | None = None
    for lv in levels:
        lo, hi = f"b.l{lv.level}", f"b.u{lv.level}"
        at_level = f"{bucket}AND r.level = {lv.level} "
        if previous is None:
            # Buckets aligned within [lo, hi) lie wholly inside the window.
            parts.append(f"{at_level}AND r.bucket_start >= {lo} AND r.bucket_start < {hi}")
        else:
            # Around what the coarser level covers, [pl, pu) when it covers anything.
            pl, pu = f"b.l{previous.level}", f"b.u{previous.level}"
            covered = f"{pl} < {pu}"
            inner_lo = f"(CASE WHEN {covered} THEN {pl} ELSE {hi} END)"
            inner_hi = f"(CASE WHEN {covered} THEN {pu} ELSE {hi} END)"
            parts.append(f"{at_level}AND r.bucket_start >= {lo} AND r.bucket_start < {inner_lo}")
            parts.append(f"{at_level}AND r.bucket_start >= {inner_hi} AND r.bucket_start < {hi}")
        previous = lv
    assert previous is not None
    # The raw edges: [s, finest lo) and [finest hi, e), or all of [s, e) when no bucket fits.
    pl, pu = f"b.l{previous.level}", f"b.u{previous.level}"
    covered = f"{pl} < {pu}"
    raw = (f"SELECT {raw_columns} FROM {EVENTS} e "
           f"CROSS JOIN LATERAL (SELECT {value} AS v) v "
           f"WHERE {matching} AND v.v IS NOT NULL ")
    parts.append(f"{raw}AND e.occurred_at >= w.s "
                 f"AND e.occurred_at < (CASE WHEN {covered} THEN {pl} ELSE w.e END)")
    parts.append(f"{raw}AND e.occurred_at >= (CASE WHEN {covered} THEN {pu} ELSE w.e END) "
                 f"AND e.occurred_at < w.e")
    union = " UNION ALL ".join(f"({p})" for p in parts)
    return (
        f"(SELECT {', '.join(bounds[:2])}) w "
        f"CROSS JOIN LATERAL (SELECT {', '.join(bounds[2:])}) b "
        f"CROSS JOIN LATERAL ({union}) x"
    )


def window_read(rollup_id: int, levels: Sequence[Level], starts: Sequence[str],
                matching: str, value: str) -> str:
    """A SELECT yielding one row ``(n, total, lo, hi)`` over the numeric values of the events
    with ``occurred_at`` in ``[S, i.at]``: ``matching`` selects the profile's matching events
    (aliased e) and ``value`` is their numeric value. S is the latest of ``starts``, NULL
    (an empty window) when one of them is; with no ``starts`` the window is unbounded."""
    source = _window(rollup_id, levels, starts, ROLLUPS, "r.n, r.total, r.lo, r.hi",
                     "1::bigint, v.v, v.v, v.v", matching, value)
    return ("SELECT sum(x.n) AS n, sum(x.total) AS total, min(x.lo) AS lo, max(x.hi) AS hi "
            f"FROM {source}")


def distinct_read(rollup_id: int, levels: Sequence[Level], starts: Sequence[str],
                  matching: str, value: str) -> str:
    """A SELECT yielding one row ``(n)``, the number of distinct values (``value``, jsonb,
    NULL ignored) of the matching events with ``occurred_at`` in ``[S, i.at]``, as
    ``window_read`` bounds them: the values of each whole bucket once, plus the raw edges."""
    width = "CASE x.l " + " ".join(f"WHEN {lv.level} THEN {lv.width}" for lv in LEVELS) + " END"
    source = _window(rollup_id, levels, starts, DISTINCT_VALUES,
                     "r.value AS v, r.level AS l, r.bucket_start AS b",
                     "v.v, NULL::smallint, NULL::timestamptz", matching, value)
    # A bucket's LARGE marker stands for its values too large to be keys: read from its
    # events (whole buckets lie inside the window), only for the buckets that have any.
    large = (f"SELECT v.v FROM {EVENTS} e CROSS JOIN LATERAL (SELECT {value} AS v) v "
             f"WHERE x.v = {LARGE} AND {matching} AND e.occurred_at >= x.b "
             f"AND e.occurred_at < x.b + {width} AND {_is_large('v.v')}")
    return (f"SELECT count(DISTINCT y.v) AS n FROM {source} "
            f"CROSS JOIN LATERAL (SELECT x.v WHERE x.v <> {LARGE} "
            f"UNION ALL ({large})) y")


def finish(func: str, alias: str) -> str:
    """The aggregate's value from a ``window_read`` row aliased ``alias``; like the SQL
    aggregates: a sum of nothing is 0, a min/max/avg of nothing NULL."""
    if func == "sum":
        return f"coalesce({alias}.total, 0)"
    if func == "min":
        return f"{alias}.lo"
    if func == "max":
        return f"{alias}.hi"
    if func == "avg":
        # numeric / numeric, as avg(numeric) itself divides.
        return f"({alias}.total / {alias}.n)"
    raise ValueError(f"no rollup for {func}")


# -- maintenance ---------------------------------------------------------------------------

_COLUMNS = ("profile_id bigint", "event_type text", "occurred_at timestamptz",
            "amount numeric", "amount_usd numeric", "currency text", "source text",
            "properties jsonb")


def _branches(rollups: Sequence[tuple[int, RollupSpec]], only: str | None) -> str:
    """One row (rollup_id, v) per rollup an event aliased e matches with a numeric value;
    ``only`` is a condition on ``{id}`` that selects the rollups to compute."""
    rows = []
    for rollup_id, spec in rollups:
        guard = f" AND {only.format(id=_lit(rollup_id))}" if only else ""
        rows.append(f"SELECT {_lit(rollup_id)}::integer AS rollup_id, ({spec.value_sql}) AS v "
                    f"WHERE ({spec.filter_sql}){guard}")
    return " UNION ALL ".join(rows)


def _aggregate_into(source: str, rollups: Sequence[tuple[int, RollupSpec]],
                    only: str | None, upsert: bool) -> str:
    """INSERT statements adding the events of ``source`` (aliased e) to the buckets of the
    given rollups, one per table that has rollups of its kind; ``upsert`` merges them into
    existing buckets. Builds and refreshes insert in primary-key order, sequentially into the
    index (a third faster than in hash order); a statement's few new events need no sort."""
    levels = ", ".join(f"({lv.level}::smallint, {lv.width})" for lv in LEVELS)
    bucket = f"date_bin(lv.width, e.occurred_at, {EPOCH})"
    statements = []
    def ordered(keys: str) -> str:
        return "" if upsert else f" ORDER BY {keys}"

    numeric = [(i, r) for i, r in rollups if r.kind == NUMERIC]
    if numeric:
        conflict = (
            " ON CONFLICT (profile_id, rollup_id, level, bucket_start) DO UPDATE "
            "SET n = event_rollups.n + excluded.n, "
            "total = event_rollups.total + excluded.total, "
            "lo = least(event_rollups.lo, excluded.lo), "
            "hi = greatest(event_rollups.hi, excluded.hi)") if upsert else ""
        statements.append(
            f"INSERT INTO {ROLLUPS} (profile_id, rollup_id, level, bucket_start, n, total, "
            f"lo, hi) "
            f"SELECT e.profile_id, r.rollup_id, lv.level, {bucket}, "
            f"count(*), sum(r.v), min(r.v), max(r.v) "
            f"FROM {source} "
            f"CROSS JOIN LATERAL ({_branches(numeric, only)}) r "
            f"CROSS JOIN (VALUES {levels}) lv(level, width) "
            f"WHERE r.v IS NOT NULL "
            f"GROUP BY 1, 2, 3, 4{ordered('1, 2, 3, 4')}{conflict}")
    distinct = [(i, r) for i, r in rollups if r.kind == DISTINCT]
    if distinct:
        conflict = (
            " ON CONFLICT (profile_id, rollup_id, level, bucket_start, value) DO UPDATE "
            "SET n = event_distinct_values.n + excluded.n") if upsert else ""
        statements.append(
            f"INSERT INTO {DISTINCT_VALUES} (profile_id, rollup_id, level, bucket_start, "
            f"value, n) "
            f"SELECT e.profile_id, r.rollup_id, lv.level, {bucket}, "
            f"CASE WHEN {_is_large('r.v')} THEN {LARGE} ELSE r.v END, count(*) "
            f"FROM {source} "
            f"CROSS JOIN LATERAL ({_branches(distinct, only)}) r "
            f"CROSS JOIN (VALUES {levels}) lv(level, width) "
            f"WHERE r.v IS NOT NULL "
            f"GROUP BY 1, 2, 3, 4, 5{ordered('1, 2, 3, 4, 5')}{conflict}")
    return ";\n".join(statements)


def maintenance_sql(rollups: Sequence[tuple[int, RollupSpec]]) -> str:
    """Creates the functions the rollup triggers and apply call (see 0005_rollups.sql), for
    the given installed rollups; with none, drops them."""
    drop = (
        "DROP FUNCTION IF EXISTS segflow_compiled.rollups_add("
        "bigint[], text[], timestamptz[], numeric[], numeric[], text[], text[], jsonb[]); "
        "DROP FUNCTION IF EXISTS segflow_compiled.rollups_refresh("
        "integer[], bigint[], timestamptz[]); "
        "DROP FUNCTION IF EXISTS segflow_compiled.rollups_build(integer[]);"
    )
    if not rollups:
        return drop
    # CREATE OR REPLACE keeps the functions' identity for sessions that have called them.
    names = ", ".join(c.split()[0] for c in _COLUMNS)
    add = _aggregate_into(
        "unnest(p_profile_ids, p_types, p_times, p_amounts, p_usd, p_currencies, p_sources, "
        f"p_props) AS e({names})",
        rollups, None, True,
    )
    day = DAY.width
    refresh_delete = ";\n".join(
        f"DELETE FROM {table} r USING unnest(p_profile_ids, p_days) k(profile_id, day) "
        f"WHERE r.profile_id = k.profile_id AND r.bucket_start >= k.day "
        f"AND r.bucket_start < k.day + {day} "
        f"AND (p_rollup_ids IS NULL OR r.rollup_id = ANY (p_rollup_ids))"
        for table in (ROLLUPS, DISTINCT_VALUES))
    refresh_insert = _aggregate_into(
        f"unnest(p_profile_ids, p_days) k(profile_id, day) JOIN {EVENTS} e "
        f"ON e.profile_id = k.profile_id AND e.occurred_at >= k.day "
        f"AND e.occurred_at < k.day + {day}",
        rollups, "(p_rollup_ids IS NULL OR {id} = ANY (p_rollup_ids))", False,
    )
    build_delete = ";\n".join(f"DELETE FROM {table} WHERE rollup_id = ANY (p_rollup_ids)"
                              for table in (ROLLUPS, DISTINCT_VALUES))
    build_insert = _aggregate_into(f"{EVENTS} e", rollups, "{id} = ANY (p_rollup_ids)", False)
    return (
        "-- New stored events, added to the buckets of every rollup they match.\n"
        "CREATE OR REPLACE FUNCTION segflow_compiled.rollups_add("
        "p_profile_ids bigint[], p_types text[], p_times timestamptz[], p_amounts numeric[], "
        "p_usd numeric[], p_currencies text[], p_sources text[], p_props jsonb[]) "
        "RETURNS void LANGUAGE sql AS $segflow$\n"
        f"{add};\n$segflow$;\n"
        "-- Recomputes the buckets of some (profile, UTC day) pairs from the stored events "
        "(p_rollup_ids NULL: every rollup).\n"
        "CREATE OR REPLACE FUNCTION segflow_compiled.rollups_refresh("
        "p_rollup_ids integer[], p_profile_ids bigint[], p_days timestamptz[]) "
        "RETURNS void LANGUAGE sql AS $segflow$\n"
        f"{refresh_delete};\n{refresh_insert};\n$segflow$;\n"
        "-- Builds rollups from every stored event (a new rollup, before its first evaluation).\n"
        "CREATE OR REPLACE FUNCTION segflow_compiled.rollups_build(p_rollup_ids integer[]) "
        "RETURNS void LANGUAGE sql AS $segflow$\n"
        f"{build_delete};\n{build_insert};\n$segflow$;\n"
    )
