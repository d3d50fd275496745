"""Rollups behind sum/min/max/avg/distinct: exact at bucket boundaries and window edges, kept
right by every path that writes events (ingest, trusted rows, merges, SQL updates and deletes,
retention), built by apply and dropped with their last user."""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import reference
from psycopg.types.json import Jsonb

from tests.helpers import at, install

DAY0 = datetime(2026, 12, 1, tzinfo=UTC)
NOW = DAY0 + timedelta(days=2, hours=12)
US = timedelta(microseconds=1)
FIELDS = {"amt": "amount", "util": "properties.util", "src": "source"}
WINDOWS: dict[str, dict[str, Any]] = {
    "w5m": {"within": "5m"},
    "w90s": {"within": "90s"},  # too short for buckets: a plain scan
    "w2h": {"within": "2h"},
    "w1d": {"within": "1d"},
    "w3d": {"within": "3d"},
    "life": {},
    "since": {"since_last": "withdrawal"},
    "since1d": {"since_last": "withdrawal", "within": "1d"},
    "sess": {"within": "session"},
}
# Every aggregate over every window, as context of segments that always hold (one segment
# per aggregate: jsonb_build_object takes at most 100 arguments).
PROBES: dict[str, dict[str, Any]] = {
    f"probe_{func}": {
        "name": f"probe_{func}",
        "rule": {"all": []},
        "context": {
            f"{field}_{window}": {"events": "deposit", **spec, func: {"field": FIELDS[field]}}
            for field in ("amt", "util")
            for window, spec in WINDOWS.items()
        },
    }
    for func in ("sum", "min", "max", "avg")
}
# distinct counts values of any type: a numeric column, a property of mixed JSON types (1 and
# 1.0 are one value, a JSON null none) and a text column.
PROBES["probe_distinct"] = {
    "name": "probe_distinct",
    "rule": {"all": []},
    "context": {
        f"{field}_{window}": {"events": "deposit", **spec, "distinct": {"field": path}}
        for field, path in FIELDS.items()
        for window, spec in WINDOWS.items()
    },
}
GATE: dict[str, Any] = {
    "name": "gate",
    "rule": {"any": [
        {"events": {"event": "deposit", "where": {"source": "web"}}, "within": "1d",
         "sum": {"field": "amount", "gte": 300}},
        {"events": "deposit", "within": "3d", "max": {"field": "amount", "gt": 900}},
    ]},
}
# distinct as a condition: its comparison, and the next change instant of its window.
GATE_DISTINCT: dict[str, Any] = {
    "name": "gate_distinct",
    "rule": {"any": [
        {"events": "deposit", "within": "1d", "distinct": {"field": "properties.util",
                                                            "gte": 4}},
        {"events": "deposit", "within": "2h", "distinct": {"field": "amount", "gte": 2}},
    ]},
}
GATES = {"gate": GATE, "gate_distinct": GATE_DISTINCT}


# Values too large to be keys of a bucket's B-tree: distinct reads them from the events.
LARGE = [{"blob": "".join(hashlib.sha256(f"{k}-{n}".encode()).hexdigest() for n in range(50))}
         for k in range(2)]


def boundary_times() -> list[datetime]:
    """Instants on and a microsecond either side of day, hour and minute boundaries, and some
    in between, over three days."""
    found: list[datetime] = []
    for day in range(3):
        midnight = DAY0 + timedelta(days=day)
        for offset in (timedelta(0), timedelta(hours=1), timedelta(hours=11, minutes=59),
                       timedelta(hours=12), timedelta(hours=23, minutes=59, seconds=30)):
            edge = midnight + offset
            found += [edge - US, edge, edge + US]
        found.append(midnight + timedelta(hours=7, minutes=13, seconds=17, microseconds=250))
    return sorted(t for t in found if t <= NOW)


def event_rows() -> list[dict[str, Any]]:
    rows = []
    for n, occurred in enumerate(boundary_times()):
        kind = "withdrawal" if n % 11 == 5 else "deposit"
        util: Any = [0.5, 1, "high", None, 0.95, 2.5, 1.0, ["high"], *LARGE][n % 10]
        rows.append({
            "event_type": kind, "occurred_at": occurred, "amount": Decimal(100 + 37 * (n % 29)),
            "source": "web" if n % 3 else "app",
            "properties": {} if util is None else {"util": util},
        })
    # Two events in the future of the clock (within the tolerance), one at the window edge.
    for ahead in (timedelta(minutes=1), timedelta(minutes=4, microseconds=1)):
        rows.append({"event_type": "deposit", "occurred_at": NOW + ahead,
                     "amount": Decimal("5000.5"), "source": "web", "properties": {"util": 9}})
    return rows


def ingest(conn: psycopg.Connection[Any], profile_id: int, rows: list[dict[str, Any]]) -> None:
    conn.execute(
        "INSERT INTO segflow.events (event_type, occurred_at, profile_id, amount, currency,"
        " source, properties) VALUES "
        + ", ".join(["(%s, %s, %s, %s, 'USD', %s, %s)"] * len(rows)),
        [v for r in rows for v in (r["event_type"], r["occurred_at"], profile_id, r["amount"],
                                   r["source"], Jsonb(r["properties"]))])


def to_events(conn: psycopg.Connection[Any]) -> list[reference.Event]:
    rows = conn.execute(
        "SELECT event_id, profile_id, event_type, occurred_at, amount, amount_usd, currency,"
        " source, properties FROM segflow.events_stored ORDER BY event_id").fetchall()
    return [reference.Event(*row) for row in rows]


def critical_instants(rows: list[dict[str, Any]]) -> list[datetime]:
    """Event instants and window edges (each plus a window length), a microsecond either
    side, and the bucket boundaries."""
    lengths = [timedelta(0), timedelta(minutes=5), timedelta(seconds=90), timedelta(hours=2),
               timedelta(days=1), timedelta(days=3), timedelta(minutes=30)]
    points = {r["occurred_at"] + d + s for r in rows for d in lengths for s in (-US, 0 * US, US)}
    points |= set(boundary_times())
    return sorted(p for p in points if DAY0 <= p <= NOW + timedelta(minutes=5))


def same(engine: Any, expected: Any) -> bool:
    if engine is None or expected is None:
        return engine is None and expected is None
    return math.isclose(float(engine), float(expected), rel_tol=1e-12, abs_tol=1e-9)


def segment_id(conn: psycopg.Connection[Any], name: str) -> int:
    row = conn.execute("SELECT segment_id FROM segflow.segment_defs WHERE name = %s",
                       (name,)).fetchone()
    assert row is not None
    return int(row[0])


def check_against_reference(conn: psycopg.Connection[Any], profile_id: int,
                            instants: list[datetime]) -> None:
    world = reference.World(events=to_events(conn), traits={},
                            segments={**PROBES, **GATES}, scores={})
    ids = [profile_id] * len(instants)
    # Like the engine's entry points: JIT would compile these queries for minutes.
    conn.execute("SET jit = off")
    for name in PROBES:
        found = conn.execute(
            f"SELECT at, context FROM segflow_compiled.s{segment_id(conn, name)}_eval(%s, %s)",
            (ids, instants)).fetchall()
        assert len(found) == len(instants)
        for when, context in found:
            expected = reference.context_at(world, name, profile_id, when)
            wrong = {k: (context[k], v) for k, v in expected.items() if not same(context[k], v)}
            assert not wrong, f"{name} at {when}: (engine, reference) {wrong}"
    for name in GATES:
        gate = segment_id(conn, name)
        gated = conn.execute(f"SELECT at, member FROM segflow_compiled.s{gate}_eval(%s, %s)",
                             (ids, instants)).fetchall()
        for when, member in gated:
            assert member == reference.evaluate_segment(world, name, profile_id, when), (
                name, when)


def rollups_snapshot(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in conn.execute(
        "SELECT profile_id, rollup_id, level, bucket_start, n, total, lo, hi"
        " FROM segflow.event_rollups ORDER BY 1, 2, 3, 4").fetchall()] + [
        # 1 and 1.0 are one value, kept as whichever a bucket saw first (or sorted first).
        tuple(r) for r in conn.execute(
            "SELECT profile_id, rollup_id, level, bucket_start, CASE WHEN jsonb_typeof(value)"
            " = 'number' THEN trim_scale((value #>> '{}')::numeric)::text ELSE value::text END,"
            " n FROM segflow.event_distinct_values ORDER BY 1, 2, 3, 4, 5").fetchall()]


def assert_rollups_match_events(conn: psycopg.Connection[Any]) -> None:
    """The maintained buckets equal buckets rebuilt from the stored events."""
    kept = rollups_snapshot(conn)
    conn.execute("SELECT segflow_compiled.rollups_build("
                 "(SELECT array_agg(rollup_id) FROM segflow.rollup_defs))")
    assert kept == rollups_snapshot(conn)


def test_aggregates_exact_on_bucket_boundaries_and_window_edges(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    rows = event_rows()
    first, rest = rows[: len(rows) // 2], rows[len(rows) // 2:]
    at(conn, NOW.isoformat())
    conn.execute("INSERT INTO segflow.profiles (profile_id) VALUES (1)")
    ingest(conn, 1, first)  # before install: apply builds the rollups from these
    install(conn, tmp_path, extra={**PROBES, **GATES})
    # The gate shares the probes' rollups: three numeric pairs, three distinct ones.
    assert conn.execute("SELECT kind, count(*) FROM segflow.rollup_defs GROUP BY 1 ORDER BY 1"
                        ).fetchall() == [("distinct", 3), ("numeric", 3)]
    for k in range(0, len(rest), 7):  # after install: added statement by statement
        ingest(conn, 1, rest[k:k + 7])
    assert_rollups_match_events(conn)
    check_against_reference(conn, 1, critical_instants(rows))


def test_merges_updates_deletes_and_trusted_rows_keep_rollups_right(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    rows = event_rows()
    at(conn, NOW.isoformat())
    # merge_profiles evaluates segments: JIT would compile those queries for minutes.
    conn.execute("SET jit = off")
    conn.execute("INSERT INTO segflow.profiles (profile_id, created_at) VALUES (1, %s), (2, %s)",
                 (DAY0 - timedelta(days=9), DAY0 - timedelta(days=1)))
    install(conn, tmp_path, extra={**PROBES, **GATES})
    ingest(conn, 1, rows[::2])
    ingest(conn, 2, rows[1::2])
    conn.execute("SELECT segflow.merge_profiles(1, 2)")
    assert conn.execute("SELECT count(*) FROM segflow.event_rollups WHERE profile_id = 2"
                        ).fetchone() == (0,)
    assert_rollups_match_events(conn)
    check_against_reference(conn, 1, critical_instants(rows))

    conn.execute("UPDATE segflow.events_stored SET amount = amount * 3 "
                 "WHERE event_id % 4 = 0")
    conn.execute("DELETE FROM segflow.events_stored WHERE event_id % 5 = 0")
    conn.execute("SET segflow.trusted_ingest = on")
    conn.execute(
        "INSERT INTO segflow.events (event_type, occurred_at, profile_id, amount, currency,"
        " amount_usd, properties, stored) VALUES"
        " ('deposit', %s, 1, 70, 'USD', 70, '{\"util\": 3}', true),"
        " ('deposit', %s, 1, 1, 'USD', 1, '{}', true)",
        (DAY0 + timedelta(days=1), DAY0 + timedelta(days=2, hours=3)))
    conn.execute("RESET segflow.trusted_ingest")
    assert_rollups_match_events(conn)
    check_against_reference(conn, 1, critical_instants(rows))


def test_retention_drops_the_buckets_of_dropped_days(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    at(conn, NOW.isoformat())
    conn.execute("INSERT INTO segflow.profiles (profile_id) VALUES (1)")
    install(conn, tmp_path, extra={**PROBES, **GATES})
    ingest(conn, 1, event_rows())
    assert conn.execute("SELECT segflow.apply_retention('36 hours')").fetchone()[0] >= 1
    for table in ("event_rollups", "event_distinct_values"):
        assert conn.execute(f"SELECT min(bucket_start) FROM segflow.{table}").fetchone() == (
            DAY0 + timedelta(days=1),)
    assert_rollups_match_events(conn)


def test_apply_shares_rollups_and_drops_them_with_their_last_user(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    at(conn, NOW.isoformat())
    conn.execute("INSERT INTO segflow.profiles (profile_id) VALUES (1)")
    ingest(conn, 1, event_rows())
    one = {"name": "one", "rule": {"events": "deposit", "within": "1d",
                                   "sum": {"field": "amount", "gte": 1}}}
    two = {"name": "two", "rule": {"events": "deposit", "within": "3d",
                                   "avg": {"field": "amount", "gte": 1}},
           "context": {"total": {"events": "deposit", "sum": {"field": "amount"}}}}
    three = {"name": "three", "rule": {"events": "deposit", "within": "1d",
                                       "distinct": {"field": "amount", "gte": 2}},
             "context": {"amounts": {"events": "deposit", "distinct": {"field": "amount"}}}}
    install(conn, tmp_path, extra={"one": one, "two": two, "three": three})
    # One (filter, field) pair, one rollup per kind: the numeric one read by both sums.
    assert conn.execute("SELECT kind, count(*) FROM segflow.rollup_defs GROUP BY 1 ORDER BY 1"
                        ).fetchall() == [("distinct", 1), ("numeric", 1)]
    assert conn.execute("SELECT count(*) FROM segflow.rollup_users").fetchone() == (3,)
    assert conn.execute("SELECT count(*) > 0 FROM segflow.event_distinct_values").fetchone() == (
        True,)
    assert_rollups_match_events(conn)
    install(conn, tmp_path, extra={"two": two})
    assert conn.execute("SELECT count(*) FROM segflow.rollup_users").fetchone() == (1,)
    assert conn.execute("SELECT count(*) > 0 FROM segflow.event_rollups").fetchone() == (True,)
    assert conn.execute("SELECT count(*) FROM segflow.event_distinct_values").fetchone() == (0,)
    install(conn, tmp_path, extra={"one": {**one, "rule": {"events": "trade"}}})
    assert conn.execute("SELECT count(*) FROM segflow.rollup_defs").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM segflow.event_rollups").fetchone() == (0,)
    assert conn.execute("SELECT to_regproc('segflow_compiled.rollups_add')").fetchone() == (
        None,)
    ingest(conn, 1, event_rows()[:3])  # no rollup: the trigger has nothing to do
