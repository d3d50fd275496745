"""The schema built by the migrations: contract objects (CONTRACT §1–2, §6), an idempotent
upgrade, and the engine clock."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from segflow.migrate import upgrade

Conn = psycopg.Connection[Any]

# Contract columns and their types (information_schema.columns.data_type); more are allowed.
CONTRACT_COLUMNS: dict[str, dict[str, str | None]] = {
    "events": {
        "event_id": "bigint",
        "event_type": "text",
        "occurred_at": "timestamp with time zone",
        "identifiers": "jsonb",
        "profile_id": "bigint",
        "amount": "numeric",
        "currency": "text",
        "amount_usd": "numeric",
        "properties": "jsonb",
        "source": "text",
        "event_key": "text",
    },
    "profiles": {
        "profile_id": "bigint",
        "traits": "jsonb",
        "created_at": "timestamp with time zone",
        "updated_at": "timestamp with time zone",
    },
    "identities": {"kind": "text", "value": "text", "profile_id": "bigint"},
    "fx_rates": {
        "currency": "text",
        "valid_from": "timestamp with time zone",
        "usd_per_unit": "numeric",
    },
    "dead_letters": {"payload": "jsonb", "error": "text"},
    "segment_catalog": {
        "name": "text",
        "mode": "text",
        "version": "integer",
        "description": "text",
        "active": "boolean",
        "member_count": "bigint",
        "definition": "jsonb",
        "updated_at": "timestamp with time zone",
    },
    "memberships": {
        "segment": "text",
        "profile_id": "bigint",
        "entered_at": "timestamp with time zone",
        "context": "jsonb",
    },
    "transitions": {
        "transition_id": "bigint",
        "segment": "text",
        "profile_id": "bigint",
        "kind": "text",
        "effective_at": "timestamp with time zone",
        "recorded_at": "timestamp with time zone",
        "reason": "text",
        "context": "jsonb",
    },
}
VIEWS = {"segment_catalog", "memberships", "transitions"}


def _columns(conn: Conn, relation: str) -> dict[str, str]:
    rows = conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = 'segflow' AND table_name = %s",
        (relation,),
    ).fetchall()
    return {name: data_type for name, data_type in rows}


@pytest.mark.parametrize("relation", sorted(CONTRACT_COLUMNS))
def test_contract_relation_has_its_columns(conn: Conn, relation: str) -> None:
    columns = _columns(conn, relation)
    assert columns, f"segflow.{relation} does not exist"
    for name, data_type in CONTRACT_COLUMNS[relation].items():
        assert name in columns, f"segflow.{relation} lacks column {name}"
        assert columns[name] == data_type, f"segflow.{relation}.{name} is {columns[name]}"
    kind = conn.execute(
        "SELECT relkind FROM pg_class WHERE oid = %s::regclass", (f"segflow.{relation}",)
    ).fetchone()
    assert kind is not None
    # Catalog views must be views; the rest are tables (events is partitioned).
    assert (kind[0] == "v") == (relation in VIEWS)


def test_contract_schemas_exist(conn: Conn) -> None:
    rows = conn.execute(
        "SELECT nspname FROM pg_namespace WHERE nspname IN ('segflow', 'segments')"
    ).fetchall()
    assert {r[0] for r in rows} == {"segflow", "segments"}


def test_catalog_views_are_queryable_and_empty(conn: Conn) -> None:
    for view in sorted(VIEWS):
        row = conn.execute(f"SELECT count(*) FROM segflow.{view}").fetchone()
        assert row == (0,), view


def test_identities_key_is_kind_and_value(conn: Conn) -> None:
    row = conn.execute(
        "SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_index i"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)"
        " WHERE i.indrelid = 'segflow.identities'::regclass AND i.indisprimary"
    ).fetchone()
    assert row == (["kind", "value"],)


def test_clock_and_tick_functions(conn: Conn) -> None:
    rows = conn.execute(
        "SELECT p.proname, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid)"
        " FROM pg_proc p WHERE p.pronamespace = 'segflow'::regnamespace"
        " AND p.proname IN ('now', 'tick')"
    ).fetchall()
    functions = {name: (args, result) for name, args, result in rows}
    assert functions["now"] == ("", "timestamp with time zone")
    tick_args, tick_result = functions["tick"]
    assert tick_result == "integer"
    assert tick_args.endswith("timestamp with time zone DEFAULT segflow.now()")
    # With no segments nothing is due: both call forms work and write no transitions.
    assert conn.execute("SELECT segflow.tick()").fetchone() == (0,)
    assert conn.execute("SELECT segflow.tick('2026-12-03 10:00:00+00')").fetchone() == (0,)


def test_events_insert_goes_through_the_ingest_trigger(conn: Conn) -> None:
    row = conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = 'segflow.events'::regclass"
        " AND tgfoid = 'segflow._events_after_insert'::regproc"
    ).fetchone()
    assert row is not None


def _schema_state(conn: Conn) -> tuple[Any, ...]:
    version = conn.execute("SELECT version_num FROM public.alembic_version").fetchall()
    objects = conn.execute(
        "SELECT count(*) FROM pg_class WHERE relnamespace = 'segflow'::regnamespace"
    ).fetchone()
    functions = conn.execute(
        "SELECT count(*) FROM pg_proc WHERE pronamespace = 'segflow'::regnamespace"
    ).fetchone()
    config = conn.execute("SELECT count(*) FROM segflow.config").fetchone()
    kinds = conn.execute("SELECT count(*) FROM segflow.identity_kinds").fetchone()
    return (version, objects, functions, config, kinds)


def test_upgrade_again_is_a_no_op(conn: Conn, db_url: str) -> None:
    before = _schema_state(conn)
    assert len(before[0]) == 1, "exactly one alembic version row"
    # Data must survive the second run: nothing is recreated.
    conn.execute("INSERT INTO segflow.fx_rates VALUES ('EUR', '2026-01-01', 1.1)")
    upgrade(db_url)
    upgrade(db_url)
    assert _schema_state(conn) == before
    assert conn.execute("SELECT count(*) FROM segflow.fx_rates").fetchone() == (1,)


def test_now_follows_the_clock_setting(conn: Conn) -> None:
    conn.execute("SET segflow.clock = '2026-12-03 10:00:00+00'")
    row = conn.execute("SELECT segflow.now()").fetchone()
    assert row == (datetime(2026, 12, 3, 10, 0, tzinfo=UTC),)
    # Any time zone notation names the same instant.
    conn.execute("SET segflow.clock = '2026-12-03 12:30:00.000001+02'")
    row = conn.execute("SELECT segflow.now()").fetchone()
    assert row == (datetime(2026, 12, 3, 10, 30, 0, 1, tzinfo=UTC),)
    # Defaults that use the clock follow it too.
    row = conn.execute(
        "INSERT INTO segflow.profiles DEFAULT VALUES RETURNING created_at"
    ).fetchone()
    assert row == (datetime(2026, 12, 3, 10, 30, 0, 1, tzinfo=UTC),)


def test_now_falls_back_to_transaction_time(conn: Conn) -> None:
    conn.execute("SET segflow.clock = '2001-01-01 00:00:00+00'")
    conn.execute("RESET segflow.clock")
    with conn.transaction():
        first = conn.execute("SELECT segflow.now(), transaction_timestamp()").fetchone()
        assert first is not None
        assert first[0] == first[1]
        conn.execute("SELECT pg_sleep(0.01)")
        # Stable within the transaction, like now().
        again = conn.execute("SELECT segflow.now()").fetchone()
        assert again == (first[0],)
    later = conn.execute("SELECT segflow.now(), transaction_timestamp()").fetchone()
    assert later is not None
    assert later[0] == later[1]
    assert later[0] > first[0]
    # Never set on this connection at all: also transaction time.
    with psycopg.connect(conn.info.dsn, autocommit=True) as fresh:
        row = fresh.execute("SELECT segflow.now() = transaction_timestamp()").fetchone()
        assert row == (True,)
