"""Wake-ups on segflow_transitions: sent by the writing transaction (notify = on), or relayed
by one worker (notify = relay) so that many small writers do not queue for the commit lock."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from api.worker import notify_relay_loop
from tests.helpers import at, event, install

DEPOSITORS = {"name": "depositors", "rule": {"events": "deposit"}}


def wake_ups(listener: psycopg.Connection[Any], seconds: float) -> list[dict[str, Any]]:
    return [json.loads(n.payload) for n in listener.notifies(timeout=seconds)]


def test_transitions_wake_listeners_directly_or_through_the_relay(
    conn: psycopg.Connection[Any], db_url: str, tmp_path: Path
) -> None:
    at(conn, "2026-12-03 10:00:00+00")
    install(conn, tmp_path, extra={"depositors": DEPOSITORS})
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN segflow_transitions")

        event(conn, "deposit", "2026-12-03 10:00:00+00", "C-1", amount=5, currency="USD")
        assert [w for w in wake_ups(listener, 0.5) if "segment_id" in w]

        conn.execute("UPDATE segflow.config SET value = 'relay' WHERE key = 'notify'")
        event(conn, "deposit", "2026-12-03 10:00:00+00", "C-2", amount=5, currency="USD")
        # The writing transaction no longer notifies; nobody relays yet.
        assert wake_ups(listener, 0.5) == []

        stop = threading.Event()
        relay = threading.Thread(target=notify_relay_loop, args=(db_url, stop, 0.01),
                                 daemon=True)
        relay.start()
        try:
            time.sleep(0.3)  # the relay has seen the ledger as it is
            event(conn, "deposit", "2026-12-03 10:00:00+00", "C-3", amount=5, currency="USD")
            newest = conn.execute("SELECT max(transition_id) FROM segflow.transition_log"
                                  ).fetchone()
            relayed = wake_ups(listener, 2.0)
        finally:
            stop.set()
            relay.join(timeout=5)
        assert newest is not None
        assert {"relay": True, "transition_id": newest[0]} in relayed
