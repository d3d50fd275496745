"""segflow.event_profiles: which profiles have events, and since when."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from tests.helpers import at, event, install, members, profile_of


def first_at(conn: psycopg.Connection[Any], profile_id: int) -> Any:
    row = conn.execute("SELECT first_at FROM segflow.event_profiles WHERE profile_id = %s",
                       (profile_id,)).fetchone()
    return row[0] if row else None


def test_first_event_late_events_merges_and_bulk_loads(conn: psycopg.Connection[Any],
                                                       tmp_path: Path) -> None:
    at(conn, "2026-12-03 12:00:00+00")
    # "No deposit within 4h" holds for a trader from their very first event, whatever its type.
    install(conn, tmp_path, extra={"no_recent_deposit": {
        "name": "no_recent_deposit", "rule": {"not": {"events": "deposit", "within": "4h"}}}})
    event(conn, "login", "2026-12-03 11:00:00+00", "C-1")
    trader = profile_of(conn, "C-1")
    assert members(conn, "no_recent_deposit") == {trader}
    assert str(first_at(conn, trader)) == "2026-12-03 11:00:00+00:00"
    event(conn, "login", "2026-12-02 09:00:00+00", "C-1")  # late
    assert str(first_at(conn, trader)) == "2026-12-02 09:00:00+00:00"

    event(conn, "page_view", "2026-11-30 08:00:00+00", "", identifiers={"anonymous_id": "a-1"})
    visitor = conn.execute("SELECT profile_id FROM segflow.identities WHERE value = 'a-1'"
                           ).fetchone()
    assert visitor is not None
    event(conn, "login", "2026-12-03 11:30:00+00", "C-1",
          identifiers={"crm_id": "C-1", "anonymous_id": "a-1"})
    assert first_at(conn, visitor[0]) is None
    assert str(first_at(conn, trader)) == "2026-11-30 08:00:00+00:00"

    # Rows stored directly by a bulk load count too.
    conn.execute("INSERT INTO segflow.profiles (profile_id) VALUES (9001)")
    conn.execute("SELECT segflow.ensure_partitions('2026-10-01', '2026-10-01')")
    conn.execute("SET segflow.trusted_ingest = on")
    conn.execute("INSERT INTO segflow.events (event_type, occurred_at, identifiers, profile_id,"
                 " stored) VALUES ('login', '2026-10-01 00:00+00', '{}', 9001, true)")
    conn.execute("RESET segflow.trusted_ingest")
    assert str(first_at(conn, 9001)) == "2026-10-01 00:00:00+00:00"


def test_deleting_or_truncating_events_forgets_the_kept_state(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    at(conn, "2026-12-03 12:00:00+00")
    install(conn, tmp_path, "engaged", "engagement.score",
            extra={"busy": {"name": "busy", "rule": {"events": "login", "within": "session",
                                                     "count": {"gte": 2}}}})
    event(conn, "trade", "2026-12-03 11:59:00+00", "C-1")
    event(conn, "login", "2026-12-03 11:59:30+00", "C-2")
    kept = "SELECT (SELECT count(*) FROM segflow.score_state), " \
           "(SELECT count(*) FROM segflow.session_state), " \
           "(SELECT count(*) FROM segflow.event_profiles)"
    assert conn.execute(kept).fetchone() == (2, 2, 2)
    # A DBA removes a trader's trades: their score must not keep counting them.
    conn.execute("DELETE FROM segflow.events WHERE event_type = 'trade'")
    assert conn.execute(kept).fetchone() == (1, 1, 2)
    conn.execute("TRUNCATE segflow.events")
    assert conn.execute(kept).fetchone() == (0, 0, 0)
