"""Sessions kept per profile: the same sessions as splitting the events at every gap over
the timeout (CONTRACT §4), while finding the current one reads only the events since the
last insert."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from tests.helpers import at, event, install, members, profile_of

START = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
BUSY = {
    "name": "busy_session",
    "rule": {"events": ["login", "asset_view", "trade"], "within": "session",
             "count": {"gte": 4}},
}


def session(conn: psycopg.Connection[Any], profile_id: int,
            when: datetime) -> tuple[datetime, datetime] | None:
    row = conn.execute("SELECT start_at, last_at FROM segflow.session_at(%s, %s)",
                       (profile_id, when)).fetchone()
    return (row[0], row[1]) if row else None


def test_a_late_event_can_join_two_sessions(conn: psycopg.Connection[Any],
                                            tmp_path: Path) -> None:
    at(conn, START.isoformat())
    install(conn, tmp_path, extra={"busy_session": BUSY})
    for minutes in (0, 20):
        when = START + timedelta(minutes=minutes)
        at(conn, when.isoformat())
        event(conn, "asset_view", when.isoformat(), "C-1")
    # 40 minutes later: a new session.
    for minutes in (60, 65):
        when = START + timedelta(minutes=minutes)
        at(conn, when.isoformat())
        event(conn, "asset_view", when.isoformat(), "C-1")
    trader = profile_of(conn, "C-1")
    now = START + timedelta(minutes=66)
    assert session(conn, trader, now) == (START + timedelta(minutes=60),
                                          START + timedelta(minutes=65))
    assert members(conn, "busy_session") == set()

    # A login that happened at 10:45 arrives late: 20 → 45 → 60 are all within 30 minutes,
    # so the two sessions are one, with five events.
    at(conn, now.isoformat())
    event(conn, "login", (START + timedelta(minutes=45)).isoformat(), "C-1")
    assert session(conn, trader, now) == (START, START + timedelta(minutes=65))
    assert members(conn, "busy_session") == {trader}

    # An event inside the session or long before it changes neither end.
    event(conn, "trade", (START + timedelta(minutes=50)).isoformat(), "C-1")
    event(conn, "trade", (START - timedelta(hours=3)).isoformat(), "C-1")
    assert session(conn, trader, now) == (START, START + timedelta(minutes=65))
    # No session once the timeout has passed after the latest event.
    assert session(conn, trader, START + timedelta(minutes=95)) is None
    assert session(conn, trader, START + timedelta(minutes=94)) is not None


def events_tuples_read(conn: psycopg.Connection[Any], profile_id: int, when: datetime) -> int:
    """Rows fetched from the events partitions by one session lookup (in its own
    transaction, counted by the statistics collector's transaction-local counters)."""
    with conn.transaction():
        def fetched() -> int:
            row = conn.execute(
                "SELECT coalesce(sum(idx_tup_fetch + seq_tup_read), 0) "
                "FROM pg_stat_xact_user_tables "
                "WHERE schemaname = 'segflow' AND relname LIKE 'events\\_2%%'").fetchone()
            assert row is not None
            return int(row[0])
        before = fetched()
        assert session(conn, profile_id, when) is not None
        return fetched() - before


def test_finding_the_current_session_reads_only_new_events(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    at(conn, START.isoformat())
    install(conn, tmp_path, extra={"busy_session": BUSY})
    # One long session: 600 events five seconds apart, stored in one statement.
    times = [START - timedelta(seconds=5 * n) for n in range(600)]
    conn.execute(
        "INSERT INTO segflow.events (event_type, occurred_at, identifiers) "
        "SELECT 'asset_view', o, %s FROM unnest(%s::timestamptz[]) o",
        (Jsonb({"crm_id": "C-2"}), times))
    trader = profile_of(conn, "C-2")
    later = START + timedelta(seconds=3)
    at(conn, later.isoformat())
    event(conn, "trade", later.isoformat(), "C-2")
    assert session(conn, trader, later) == (times[-1], later)

    with_state = events_tuples_read(conn, trader, later)
    conn.execute("DELETE FROM segflow.session_state")
    from_events = events_tuples_read(conn, trader, later)
    assert with_state <= 2, with_state
    assert from_events >= 600, from_events
