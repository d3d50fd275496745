"""Small helpers for tests that drive the engine with a controlled clock."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from segflow.install import Plan, apply
from segflow.paths import EXAMPLES_DIR

SEGMENTS = EXAMPLES_DIR / "segments"


def install(conn: psycopg.Connection[Any], tmp_path: Path, *names: str,
            extra: dict[str, Any] | None = None) -> Plan:
    """Installs example definitions by file stem (plus `extra` documents) as the full set."""
    folder = tmp_path / "definitions"
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    destinations = [p.name.split(".")[0] for p in SEGMENTS.glob("*.destination.yaml")]
    for name in (*names, *destinations):
        source = next(SEGMENTS.glob(f"{name}.*"))
        (folder / source.name).write_text(source.read_text())
    for key, doc in (extra or {}).items():
        (folder / f"{key}.json").write_text(json.dumps(doc))
    with psycopg.connect(conn.info.dsn, row_factory=dict_row) as own:
        clock = conn.execute("SELECT current_setting('segflow.clock', true)").fetchone()
        if clock and clock[0]:
            own.execute("SELECT set_config('segflow.clock', %s, false)", (clock[0],))
        return apply(own, [folder])


def at(conn: psycopg.Connection[Any], when: str) -> None:
    """Moves the engine clock of this connection."""
    conn.execute("SELECT set_config('segflow.clock', %s, false)", (when,))


def event(conn: psycopg.Connection[Any], event_type: str, occurred_at: str, crm_id: str, *,
          amount: float | None = None, currency: str | None = None,
          properties: dict[str, Any] | None = None,
          identifiers: dict[str, str] | None = None) -> None:
    conn.execute(
        "INSERT INTO segflow.events (event_type, occurred_at, identifiers, amount, currency,"
        " properties) VALUES (%s, %s, %s, %s, %s, %s)",
        (event_type, occurred_at, Jsonb(identifiers or {"crm_id": crm_id}), amount, currency,
         Jsonb(properties or {})))


def tick(conn: psycopg.Connection[Any], when: str) -> int:
    row = conn.execute("SELECT segflow.tick(%s)", (when,)).fetchone()
    assert row is not None
    return int(row[0])


def profile_of(conn: psycopg.Connection[Any], crm_id: str) -> int:
    row = conn.execute("SELECT profile_id FROM segflow.identities WHERE kind = 'crm_id' "
                       "AND value = %s", (crm_id,)).fetchone()
    assert row is not None, f"no profile for {crm_id}"
    return int(row[0])


def members(conn: psycopg.Connection[Any], segment: str) -> set[int]:
    rows = conn.execute("SELECT profile_id FROM segflow.memberships WHERE segment = %s",
                        (segment,)).fetchall()
    return {int(r[0]) for r in rows}


def transitions(conn: psycopg.Connection[Any], segment: str,
                profile_id: int | None = None) -> list[tuple[str, datetime, str]]:
    rows = conn.execute(
        "SELECT kind, effective_at, reason FROM segflow.transitions WHERE segment = %s "
        "AND (%s::bigint IS NULL OR profile_id = %s) ORDER BY transition_id",
        (segment, profile_id, profile_id)).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def standalone_eval(eval_query: str) -> str:
    """A compiled evaluation query as a plain statement (for EXPLAIN): the function's
    parameters and bounds become the named parameters `profiles` and `ats`."""
    return (eval_query
            .replace("p_profile_ids", "%(profiles)s::bigint[]")
            .replace("p_ats", "%(ats)s::timestamptz[]")
            .replace("v_from", "(SELECT min(a) FROM unnest(%(ats)s::timestamptz[]) a)")
            .replace("v_to", "(SELECT max(a) FROM unnest(%(ats)s::timestamptz[]) a)")
            .replace("v_floor", "'-infinity'::timestamptz"))
