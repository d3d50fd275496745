"""Profiles written with plain SQL: a created profile is evaluated for every segment at once,
a trait change re-evaluates the trait-driven segments, other writes and segflow's own
writes do not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from tests.helpers import at, install, members, transitions

Conn = psycopg.Connection[Any]

GOLD = {"name": "gold_book", "rule": {"trait": "tier", "eq": "gold"}}
QUIET = {"name": "no_deposit_today", "rule": {"not": {"events": "deposit", "within": "1d"}}}


def test_plain_sql_profile_writes_reach_the_segments(conn: Conn, tmp_path: Path) -> None:
    at(conn, "2026-12-03T10:00:00+00:00")
    install(conn, tmp_path, extra={"gold_book": GOLD, "no_deposit_today": QUIET})

    row = conn.execute("INSERT INTO segflow.profiles (traits) VALUES (%s) RETURNING profile_id",
                       (Jsonb({"tier": "gold"}),)).fetchone()
    assert row is not None
    pid = int(row[0])
    # Created: every segment, including one no trait feeds.
    assert pid in members(conn, "gold_book")
    assert pid in members(conn, "no_deposit_today")

    at(conn, "2026-12-03T11:00:00+00:00")
    conn.execute("UPDATE segflow.profiles SET updated_at = segflow.now() WHERE profile_id = %s",
                 (pid,))
    assert [t[0] for t in transitions(conn, "gold_book", pid)] == ["enter"]

    conn.execute("UPDATE segflow.profiles SET traits = %s WHERE profile_id = %s",
                 (Jsonb({"tier": "silver"}), pid))
    assert [t[0] for t in transitions(conn, "gold_book", pid)] == ["enter", "exit"]
    assert pid not in members(conn, "gold_book")

    # segflow's own writes are its business (ingest and merges evaluate themselves).
    with conn.transaction():
        conn.execute("SET LOCAL segflow.internal = on")
        conn.execute("UPDATE segflow.profiles SET traits = %s WHERE profile_id = %s",
                     (Jsonb({"tier": "gold"}), pid))
        conn.execute("INSERT INTO segflow.profiles (traits) VALUES (%s)",
                     (Jsonb({"tier": "gold"}),))
    assert members(conn, "gold_book") == set()
