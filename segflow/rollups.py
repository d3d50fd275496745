"""Installed rollups (compiler/rollups.py, sql/schema/0005_rollups.sql) kept in step with the
installed segments by `segflow apply`.

A rollup is registered, and built from the stored events, before the first segment reading it
is evaluated; it is dropped with its rows once no active segment reads it. The maintenance
functions are regenerated whenever the set of rollups changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import psycopg

from compiler.rollups import RollupSpec, maintenance_sql


def installed(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Rollup ids by signature."""
    rows = conn.execute("SELECT signature, rollup_id FROM segflow.rollup_defs").fetchall()
    return {_get(r, 0, "signature"): _get(r, 1, "rollup_id") for r in rows}


def _get(row: Any, index: int, name: str) -> Any:
    return row[name] if isinstance(row, dict) else row[index]


def _regenerate(conn: psycopg.Connection[Any]) -> None:
    rows = conn.execute(
        "SELECT rollup_id, filter_sql, value_sql, kind FROM segflow.rollup_defs"
        " ORDER BY rollup_id").fetchall()
    specs = [(_get(r, 0, "rollup_id"),
              RollupSpec(_get(r, 1, "filter_sql"), _get(r, 2, "value_sql"), _get(r, 3, "kind")))
             for r in rows]
    conn.execute(maintenance_sql(specs))


def register(conn: psycopg.Connection[Any], specs: Iterable[RollupSpec]) -> dict[str, int]:
    """Installs the rollups of ``specs`` that are missing and builds them from the stored
    events; returns every installed rollup id by signature."""
    have = installed(conn)
    new: dict[str, RollupSpec] = {}
    for spec in specs:
        if spec.signature not in have:
            new.setdefault(spec.signature, spec)
    if not new:
        return have
    # Inserting transactions that began with the old maintenance functions must have
    # committed before the build reads the events, and later ones must wait for the new
    # functions: ingestion pauses until apply commits. Taken before apply locks any profile,
    # and on the table every insert opens first, so it cannot deadlock with ingestion.
    conn.execute("LOCK TABLE segflow.events IN SHARE MODE")
    ids = []
    for signature, spec in new.items():
        row = conn.execute(
            "INSERT INTO segflow.rollup_defs (signature, filter_sql, value_sql, kind) "
            "VALUES (%s, %s, %s, %s) RETURNING rollup_id",
            (signature, spec.filter_sql, spec.value_sql, spec.kind)).fetchone()
        assert row is not None
        ids.append(_get(row, 0, "rollup_id"))
    _regenerate(conn)
    conn.execute("SELECT segflow_compiled.rollups_build(%s::integer[])", (ids,))
    return installed(conn)


def record_users(conn: psycopg.Connection[Any], segment_id: int, rollup_ids: Iterable[int]
                 ) -> None:
    """The rollups the segment's installed version reads."""
    conn.execute("DELETE FROM segflow.rollup_users WHERE segment_id = %s", (segment_id,))
    ids = sorted(set(rollup_ids))
    if ids:
        conn.execute("INSERT INTO segflow.rollup_users (rollup_id, segment_id) "
                     "SELECT unnest(%s::integer[]), %s", (ids, segment_id))


def drop_unused(conn: psycopg.Connection[Any]) -> list[int]:
    """Drops the rollups no active segment reads, with their rows; returns their ids."""
    conn.execute("DELETE FROM segflow.rollup_users u USING segflow.segment_defs d "
                 "WHERE d.segment_id = u.segment_id AND NOT d.active")
    rows = conn.execute(
        "DELETE FROM segflow.rollup_defs r WHERE NOT EXISTS ("
        " SELECT 1 FROM segflow.rollup_users u"
        " JOIN segflow.segment_defs d ON d.segment_id = u.segment_id"
        " WHERE u.rollup_id = r.rollup_id AND d.active) RETURNING r.rollup_id").fetchall()
    ids = [_get(r, 0, "rollup_id") for r in rows]
    if ids:
        for table in ("event_rollups", "event_distinct_values"):
            conn.execute(f"DELETE FROM segflow.{table} WHERE rollup_id = ANY (%s::integer[])",
                         (ids,))
        _regenerate(conn)
    return ids
