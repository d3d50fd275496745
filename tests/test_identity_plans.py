"""Identity resolution reads identities and profiles by primary key, whatever the size of the
book: no statement of resolve_batch or resolve_identifiers scans either table, as the plans
auto_explain reports for a real ingest show (EXPLAIN in JSON, not the SQL text)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

Conn = psycopg.Connection[Any]

CLOCK = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
BOOK = 5_000
RESOLVERS = ("segflow.resolve_batch", "segflow.resolve_identifiers")
TABLES = ("identities", "profiles")


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from plan_nodes(child)


def insert(conn: Conn, rows: list[tuple[str, dict[str, str] | None, int | None]]) -> None:
    conn.execute(
        "INSERT INTO segflow.events (event_type, identifiers, profile_id)"
        " SELECT * FROM unnest(%s::text[], %s::jsonb[], %s::bigint[])",
        ([r[0] for r in rows], [None if r[1] is None else Jsonb(r[1]) for r in rows],
         [r[2] for r in rows]))


def test_identity_resolution_probes_by_primary_key(conn: Conn) -> None:
    conn.execute("LOAD 'auto_explain'")
    conn.execute("SELECT set_config('segflow.clock', %s, false)", (CLOCK.isoformat(),))
    # A book of 5,000 traders with a CRM id and a device each, written directly: small
    # enough that a scan of the identities looks cheaper to the planner than the 100
    # probes it expects for each jsonb_each_text, so only the query's shape keeps it away.
    conn.execute("SET segflow.internal = on")
    conn.execute("INSERT INTO segflow.profiles (profile_id)"
                 " SELECT g FROM generate_series(1, %s) g", (BOOK,))
    conn.execute("RESET segflow.internal")
    conn.execute("SELECT setval(pg_get_serial_sequence('segflow.profiles', 'profile_id'), %s)",
                 (BOOK,))
    conn.execute("INSERT INTO segflow.identities (kind, value, profile_id)"
                 " SELECT k, CASE k WHEN 'crm_id' THEN 'C-' ELSE 'd-' END || g, g"
                 " FROM generate_series(1, %s) g, unnest(ARRAY['crm_id', 'device_id']) k",
                 (BOOK,))
    conn.execute("ANALYZE segflow.profiles, segflow.identities")
    insert(conn, [("page_view", {"anonymous_id": "a-early"}, None)])

    # (context, message) of each notice: a Diagnostic is valid only inside the handler.
    notices: list[tuple[str, str]] = []
    conn.add_notice_handler(
        lambda d: notices.append((d.context or "", d.message_primary or "")))
    for setting, value in (("log_min_duration", "0"), ("log_nested_statements", "on"),
                           ("log_format", "json"), ("log_level", "notice")):
        conn.execute(f"SET auto_explain.{setting} = {value}")
    # Every path at once: known traders, a known profile_id, new visitors (one of them
    # twice), a known device bringing a new CRM id, and a login merging earlier browsing.
    insert(conn, [
        ("login", {"crm_id": "C-5", "device_id": "d-5"}, None),
        ("trade", {"crm_id": "C-5"}, None),
        ("deposit", None, 7),
        ("page_view", {"anonymous_id": "a-1", "device_id": "d-new-1"}, None),
        ("page_view", {"anonymous_id": "a-1", "device_id": "d-new-1"}, None),
        ("page_view", {"anonymous_id": "a-2"}, None),
        ("login", {"device_id": "d-9", "crm_id": "C-new-9"}, None),
        ("login", {"anonymous_id": "a-early", "crm_id": "C-11"}, None),
    ])
    conn.execute("SET auto_explain.log_min_duration = -1")

    plans = []
    for context, message in notices:
        # The innermost function of the context is the one that ran the statement.
        caller = re.search(r'^(?:PL/pgSQL function ([\w.]+)\(|SQL function "(\w+)")',
                           context, re.MULTILINE)
        if "plan:" in message and caller and caller.group(1) in RESOLVERS:
            plans.append(json.loads(message.split("plan:", 1)[1])["Plan"])
    assert len(plans) >= 10, f"too few resolver statements reported: {len(plans)}"

    scans = [n for plan in plans for n in plan_nodes(plan) if n.get("Relation Name") in TABLES]
    seq = [(n["Relation Name"], n["Node Type"]) for n in scans if n["Node Type"] == "Seq Scan"]
    assert not seq, seq
    indexes = {n.get("Index Name") for n in scans}
    assert {"identities_pkey", "profiles_pkey"} <= indexes, indexes

    # And the batch resolved as the contract says.
    owners = dict(conn.execute(
        "SELECT value, profile_id FROM segflow.identities"
        " WHERE value IN ('a-1', 'd-new-1', 'a-2', 'a-early', 'C-new-9')").fetchall())
    assert owners["a-1"] == owners["d-new-1"] > BOOK
    assert owners["a-2"] > BOOK and owners["a-2"] != owners["a-1"]
    assert owners["a-early"] == 11
    assert "C-new-9" not in owners
    assert conn.execute("SELECT count(*) FROM segflow.profiles WHERE merged_into = 11"
                        ).fetchone() == (1,)
