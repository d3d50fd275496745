"""The hot evaluation queries use the events indexes and read only the partitions they need."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from compiler.parse import load_paths
from compiler.render import compile_segment
from tests.helpers import at, install, standalone_eval

NOW = datetime(2026, 12, 10, 12, 0, tzinfo=UTC)
DEFINITION = {
    "name": "recent_depositor_at_risk",
    "rule": {"all": [
        {"events": "deposit", "within": "4h", "count": {"gte": 1}},
        {"last": "margin_update", "field": "properties.utilization", "gt": 0.9},
    ]},
}


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from plan_nodes(child)


def explain(conn: psycopg.Connection[Any], tmp_path: Path, profile_id: int) -> dict[str, Any]:
    source = tmp_path / "definitions" / "recent_depositor_at_risk.json"
    project = load_paths([source])
    ids = {name: sid for name, sid in conn.execute(
        "SELECT name, segment_id FROM segflow.segment_defs").fetchall()}
    compiled = compile_segment(project.segments[DEFINITION["name"]], ids, project.scores, "")
    query = standalone_eval(compiled.eval_query)
    conn.execute("SET jit = off")
    row = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}",
                       {"profiles": [profile_id], "ats": [NOW]}).fetchone()
    assert row is not None
    plan: dict[str, Any] = row[0][0]["Plan"]
    return plan


def test_evaluation_uses_indexes_and_prunes_partitions(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    # Ten days of history for 40 traders: ten daily partitions.
    at(conn, NOW.isoformat())
    for day in range(10):
        start = NOW - timedelta(days=day, hours=1)
        rows = [(kind, start + timedelta(seconds=17 * n), {"crm_id": f"C-{n % 40}"},
                 {"utilization": 0.95})
                for n in range(200) for kind in ("deposit", "margin_update", "page_view")]
        conn.execute(
            "INSERT INTO segflow.events (event_type, occurred_at, identifiers, properties) "
            "SELECT * FROM unnest(%s::text[], %s::timestamptz[], %s::jsonb[], %s::jsonb[])",
            ([r[0] for r in rows], [r[1] for r in rows], [Jsonb(r[2]) for r in rows],
             [Jsonb(r[3]) for r in rows]))
    conn.execute("ANALYZE segflow.events_stored")
    install(conn, tmp_path, extra={"recent_depositor_at_risk": DEFINITION})
    (tmp_path / "definitions" / "recent_depositor_at_risk.json").write_text(
        json.dumps(DEFINITION))
    profile = conn.execute("SELECT profile_id FROM segflow.identities WHERE value = 'C-7'"
                           ).fetchone()
    assert profile is not None

    plan = explain(conn, tmp_path, profile[0])
    nodes = list(plan_nodes(plan))
    # Partitions without rows (those created ahead of the clock) may be planned as a
    # sequential scan of nothing; every partition holding events must be read by index.
    holding = {r[0] for r in conn.execute(
        "SELECT DISTINCT tableoid::regclass::text FROM segflow.events_stored")}
    event_scans = [n for n in nodes if str(n.get("Relation Name", "")).startswith("events_")
                   and f"segflow.{n['Relation Name']}" in holding]
    assert event_scans, "no scan of an events partition holding events"
    assert all(n["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan")
               for n in event_scans), sorted({(n["Node Type"], n["Relation Name"])
                                              for n in event_scans})

    # Each read of a profile's events (the 4 h window, the latest margin update, the next
    # future event) opens at most the partitions its instant range can overlap: the others
    # are pruned at run time from the evaluation instant ("never executed").
    appends = [n for n in nodes if n["Node Type"] in ("Append", "MergeAppend")
               and any(str(c.get("Relation Name", "")).startswith("events_")
                       for c in n.get("Plans", []))]
    assert len(appends) >= 3
    partitions = conn.execute("SELECT count(*) FROM pg_inherits "
                              "WHERE inhparent = 'segflow.events_stored'::regclass").fetchone()
    assert partitions is not None and partitions[0] >= 10
    for append in appends:
        children = append["Plans"]
        executed = [c["Relation Name"] for c in children if c.get("Actual Loops", 0) > 0]
        assert len(children) == partitions[0] and len(executed) <= 2, (len(children), executed)


def test_tick_reads_only_due_schedule_rows(conn: psycopg.Connection[Any]) -> None:
    conn.execute("INSERT INTO segflow.schedule (segment_id, profile_id, due_at) "
                 "SELECT 1, g, now() + g * interval '1 second' FROM generate_series(1, 20000) g")
    conn.execute("ANALYZE segflow.schedule")
    row = conn.execute(
        "EXPLAIN (FORMAT JSON) SELECT profile_id FROM segflow.schedule "
        "WHERE segment_id = 1 AND due_at <= now() + interval '10 seconds' "
        "ORDER BY due_at LIMIT 5000").fetchone()
    assert row is not None
    nodes = list(plan_nodes(row[0][0]["Plan"]))
    scans = [n for n in nodes if n.get("Relation Name") == "schedule"]
    assert scans and all(n.get("Index Name") == "schedule_due" for n in scans), scans


def nested_plans(conn: psycopg.Connection[Any], statement: str, params: Any,
                 function: str) -> list[dict[str, Any]]:
    """The plans auto_explain reports for the statements `function` ran (as JSON)."""
    conn.execute("LOAD 'auto_explain'")
    notices: list[tuple[str, str]] = []
    conn.add_notice_handler(
        lambda d: notices.append((d.context or "", d.message_primary or "")))
    for setting, value in (("log_min_duration", "0"), ("log_nested_statements", "on"),
                           ("log_analyze", "on"), ("log_timing", "off"),
                           ("log_format", "json"), ("log_level", "notice")):
        conn.execute(f"SET auto_explain.{setting} = {value}")
    conn.execute(statement, params)
    conn.execute("SET auto_explain.log_min_duration = -1")
    return [json.loads(message.split("plan:", 1)[1])["Plan"] for context, message in notices
            if "plan:" in message and context.startswith("SQL statement")
            and f"\nPL/pgSQL function {function}(" in context]


def test_evaluation_opens_only_the_partitions_its_instants_can_reach(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    # A year of day partitions, a trader whose events are all from the last two days.
    at(conn, NOW.isoformat())
    conn.execute("SELECT segflow.ensure_partitions(%s, %s)", (NOW - timedelta(days=365), NOW))
    definition = {"name": "mixed", "rule": {"any": [
        {"events": "deposit", "within": "4h"},
        {"last": "margin_update", "field": "properties.utilization", "gt": 0.9,
         "max_age": "1h"},
        {"last": "login", "age": {"gte": "7d"}},  # reaches back to the trader's first event
        {"events": "trade", "count": {"gte": 3}},
    ]}}
    install(conn, tmp_path, extra={"mixed": definition})
    for hours in (40, 30, 3, 1):
        conn.execute(
            "INSERT INTO segflow.events (event_type, occurred_at, identifiers, properties) "
            "VALUES ('login', %s, %s, '{}'), ('margin_update', %s, %s, %s)",
            (NOW - timedelta(hours=hours), Jsonb({"crm_id": "C-1"}),
             NOW - timedelta(hours=hours), Jsonb({"crm_id": "C-1"}),
             Jsonb({"utilization": 0.95})))
    trader = conn.execute("SELECT profile_id FROM segflow.identities WHERE value = 'C-1'"
                          ).fetchone()
    segment = conn.execute("SELECT segment_id FROM segflow.segment_defs WHERE name = 'mixed'"
                           ).fetchone()
    assert trader is not None and segment is not None
    function = f"segflow_compiled.s{segment[0]}_eval"
    for _ in range(2):  # the first call plans; the plan kept is generic
        plans = nested_plans(conn, f"SELECT * FROM {function}(%s, %s)",
                             ([trader[0]], [NOW]), function)
    assert plans
    appends = [n for plan in plans for n in plan_nodes(plan)
               if n["Node Type"] in ("Append", "MergeAppend")
               and any(str(c.get("Relation Name", "")).startswith("events_")
                       for c in n.get("Plans", []))]
    assert len(appends) >= 4
    # 366 partitions exist; each read opens at most the three days its bounds reach (the
    # trader's first event two days ago, or the window) and the partitions ahead of now.
    partitions = conn.execute("SELECT count(*) FROM segflow.event_partitions").fetchone()
    assert partitions is not None and partitions[0] > 360
    opened = [len(a["Plans"]) for a in appends]
    assert max(opened) <= 3 + 7, opened


SUM_DEFINITION = {
    "name": "monthly_volume",
    "rule": {"events": "deposit", "within": "30d", "sum": {"field": "amount_usd", "gte": 1}},
}
DISTINCT_DEFINITION = {
    "name": "monthly_assets",
    "rule": {"events": "deposit", "within": "30d",
             "distinct": {"field": "properties.asset", "gte": 2}},
}
# 40 days of deposits, one every 10 minutes, for each of 10 traders: 5,760 events each, 4,320
# in a 30-day window, on one of 3 assets.
HISTORY_TIMES = [NOW - timedelta(minutes=10 * n, seconds=7) for n in range(40 * 144)]
ASSETS = 3


def explain_rolled_up(conn: psycopg.Connection[Any], tmp_path: Path,
                      definition: dict[str, Any]) -> list[dict[str, Any]]:
    """The plan nodes of the definition's evaluation for one trader at NOW, over the history
    above, with the definition's rollups installed."""
    at(conn, NOW.isoformat())
    conn.execute(
        "INSERT INTO segflow.events (event_type, occurred_at, identifiers, amount, currency, "
        "properties) "
        "SELECT 'deposit', t, jsonb_build_object('crm_id', 'C-' || k), 10, 'USD', "
        "jsonb_build_object('asset', 'A' || (o %% %s)) "
        "FROM unnest(%s::timestamptz[]) WITH ORDINALITY u(t, o), generate_series(0, 9) k",
        (ASSETS, HISTORY_TIMES))
    name = definition["name"]
    install(conn, tmp_path, extra={name: definition})
    conn.execute("ANALYZE segflow.events_stored")
    conn.execute("ANALYZE segflow.event_rollups")
    conn.execute("ANALYZE segflow.event_distinct_values")
    (tmp_path / "definitions" / f"{name}.json").write_text(json.dumps(definition))
    profile = conn.execute("SELECT profile_id FROM segflow.identities WHERE value = 'C-1'"
                           ).fetchone()
    assert profile is not None
    project = load_paths([tmp_path / "definitions" / f"{name}.json"])
    ids = {name: sid for name, sid in conn.execute(
        "SELECT name, segment_id FROM segflow.segment_defs").fetchall()}
    rollups = {sig: rid for sig, rid in conn.execute(
        "SELECT signature, rollup_id FROM segflow.rollup_defs").fetchall()}
    compiled = compile_segment(project.segments[name], ids, project.scores, "", rollups)
    assert compiled.rollup_ids
    query = standalone_eval(compiled.eval_query)
    conn.execute("SET jit = off")
    row = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}",
                       {"profiles": [profile[0]], "ats": [NOW]}).fetchone()
    assert row is not None
    return list(plan_nodes(row[0][0]["Plan"]))


def rows_read(nodes: list[dict[str, Any]]) -> int:
    return sum(n.get("Actual Rows", 0) * n.get("Actual Loops", 1) for n in nodes)


def assert_bounded_raw_edges(nodes: list[dict[str, Any]]) -> None:
    events = [n for n in nodes if str(n.get("Relation Name", "")).startswith("events_")]
    executed_scans = [n for n in events if n.get("Actual Loops", 0) > 0]
    assert events and not any(n["Node Type"] == "Seq Scan" for n in executed_scans), [
        (n["Relation Name"], n["Node Type"], n.get("Filter")) for n in executed_scans]
    # The aggregate itself reads raw events only in the partial minutes at the window's edges
    # (the oldest event in the window, for the next change instant, is one more row).
    read = rows_read(events)
    assert read <= 4, read
    # Each raw read opens at most the day partitions its range can overlap.
    appends = [n for n in nodes if n["Node Type"] in ("Append", "MergeAppend")
               and any(str(c.get("Relation Name", "")).startswith("events_")
                       for c in n.get("Plans", []))]
    for append in appends:
        executed = [c["Relation Name"] for c in append["Plans"]
                    if str(c.get("Relation Name", "")).startswith("events_")
                    and c.get("Actual Loops", 0) > 0]
        assert len(executed) <= 2, executed


# 29 whole days, up to 23 hours and 59 minutes at each edge.
WINDOW_BUCKETS = 29 + 2 * (23 + 59)
INDEXED = ("Index Scan", "Index Only Scan", "Bitmap Heap Scan")


def test_window_sum_reads_rollups_and_bounded_raw_edges(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    nodes = explain_rolled_up(conn, tmp_path, SUM_DEFINITION)
    buckets = [n for n in nodes if n.get("Relation Name") == "event_rollups"]
    assert buckets and all(n["Node Type"] in INDEXED for n in buckets), sorted(
        {n["Node Type"] for n in buckets})
    # Never the 4,320 events.
    assert rows_read(buckets) < WINDOW_BUCKETS
    assert_bounded_raw_edges(nodes)


def test_window_distinct_reads_bucket_values_and_bounded_raw_edges(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    nodes = explain_rolled_up(conn, tmp_path, DISTINCT_DEFINITION)
    values = [n for n in nodes if n.get("Relation Name") == "event_distinct_values"]
    assert values and all(n["Node Type"] in INDEXED for n in values), sorted(
        {n["Node Type"] for n in values})
    # At most one row per asset per bucket, never the 4,320 events.
    assert rows_read(values) <= ASSETS * WINDOW_BUCKETS < len(HISTORY_TIMES) * 3 // 4
    assert not any(n.get("Relation Name") == "event_rollups" for n in nodes)
    assert_bounded_raw_edges(nodes)
