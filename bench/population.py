"""Bulk-loading a trader book without the engine, and raw ("engine off") event rows.

Setting up 10⁴–10⁶ profiles through the ingest trigger would take longer than the benchmarks
themselves, so the book is written directly: profiles with their traits, identities, and
the history as stored events (``stored = true`` with ``profile_id``, under
``segflow.trusted_ingest``, which the trigger lets through untouched). Segments installed
afterwards are backfilled by ``segflow apply``, so memberships and the schedule are exactly
what the engine would have computed.
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import psycopg

from bench.common import copy_payload, run_copy
from segflow.feed import EVENT_COLUMNS, TraderFeed, load_fx_rates

# Engine-off rows carry what the trigger would have worked out.
RAW_COLUMNS: tuple[str, ...] = (*EVENT_COLUMNS, "profile_id", "amount_usd", "stored")
CHUNK = 50_000


@dataclass
class Book:
    """Who is who: identifier → profile, and the FX rates to convert amounts."""

    identities: dict[tuple[str, str], int] = field(default_factory=dict)
    fx: dict[str, list[tuple[dt.datetime, Decimal]]] = field(default_factory=dict)
    next_profile: int = 1

    def profile_of(self, event: dict[str, Any]) -> int | None:
        """The profile every identifier of ``event`` already points at (the ingest fast
        path), or None when one is unknown or they disagree."""
        found = {self.identities.get((k, str(v))) for k, v in event["identifiers"].items()}
        if len(found) != 1:
            return None
        return found.pop()

    def usd(self, amount: Decimal | None, currency: str | None,
            at: dt.datetime) -> Decimal | None:
        if amount is None or currency is None:
            return None
        if currency == "USD":
            return amount
        rates = self.fx[currency]
        i = bisect.bisect_right([r[0] for r in rates], at) - 1
        return amount * rates[i][1]

    def raw_row(self, event: dict[str, Any], profile_id: int) -> tuple[Any, ...]:
        return (event["event_type"], event["occurred_at"], event["identifiers"],
                event.get("amount"), event.get("currency"), event.get("properties"),
                event.get("source"), event.get("event_key"), profile_id,
                self.usd(event.get("amount"), event.get("currency"), event["occurred_at"]),
                True)


def engine_row(event: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(event.get(c) for c in EVENT_COLUMNS)


def trusted_copy(conn: psycopg.Connection[Any], rows: Sequence[Sequence[Any]]) -> None:
    """Stored rows straight into the day partitions (creating the days first)."""
    times = [r[1] for r in rows]
    conn.execute("SELECT segflow.ensure_partitions(%s, %s)", (min(times), max(times)))
    conn.execute("SET segflow.trusted_ingest = on")
    for i in range(0, len(rows), CHUNK):
        run_copy(conn, "segflow.events", RAW_COLUMNS, copy_payload(rows[i:i + CHUNK]))
    conn.execute("RESET segflow.trusted_ingest")


def add_profiles(conn: psycopg.Connection[Any],
                 profiles: Sequence[tuple[int, dict[str, Any], dt.datetime]],
                 identities: Sequence[tuple[str, str, int, dt.datetime]]) -> None:
    """Profiles ``(profile_id, traits, created_at)`` and identities ``(kind, value,
    profile_id, created_at)``, written without evaluating segments."""
    # Plain SQL inserts of profiles would evaluate every segment: say it is segflow's own.
    conn.execute("SET segflow.internal = on")
    run_copy(conn, "segflow.profiles", ("profile_id", "traits", "created_at", "updated_at"),
             copy_payload([(p, traits, at, at) for p, traits, at in profiles]))
    conn.execute("RESET segflow.internal")
    conn.execute("SELECT setval(pg_get_serial_sequence('segflow.profiles', 'profile_id'), "
                 "(SELECT max(profile_id) FROM segflow.profiles))")
    run_copy(conn, "segflow.identities", ("kind", "value", "profile_id", "created_at"),
             copy_payload(identities))


def load_book(conn: psycopg.Connection[Any], feed: TraderFeed,
              history: Iterable[dict[str, Any]] | None = None) -> Book:
    """Writes the feed's existing clients (``feed.history()`` unless given): profiles with
    the traits their CRM ``identify``/``consent_updated`` events set, identities, and the
    history as stored events. Returns the identifier map for later raw rows."""
    events = list(feed.history() if history is None else history)
    book = Book()
    for currency, valid_from, rate in sorted(feed.fx_rates()):
        book.fx.setdefault(currency, []).append((valid_from, rate))
    load_fx_rates(conn, feed)

    traits: dict[int, dict[str, Any]] = {}
    created: dict[int, dt.datetime] = {}
    by_crm: dict[str, int] = {}
    rows = []
    for event in events:
        ids = event["identifiers"]
        crm_id = str(ids["crm_id"])
        pid = by_crm.get(crm_id)
        if pid is None:
            pid = by_crm[crm_id] = book.next_profile
            book.next_profile += 1
            traits[pid] = {}
            created[pid] = event["occurred_at"]
        for kind, value in ids.items():
            book.identities.setdefault((kind, str(value)), pid)
        props = event.get("properties") or {}
        if event["event_type"] == "identify":
            traits[pid].update(props)
        elif event["event_type"] == "consent_updated":
            traits[pid].setdefault("consent", {}).update(props)
        rows.append(book.raw_row(event, pid))

    add_profiles(conn, [(p, traits[p], created[p]) for p in traits],
                 [(k, v, p, created[p]) for (k, v), p in book.identities.items()])
    if rows:
        trusted_copy(conn, rows)
    # Idempotency keys of the history, as ingest would have recorded them.
    conn.execute(
        "INSERT INTO segflow.event_keys (source, event_key, event_id) "
        "SELECT coalesce(source, ''), event_key, min(event_id) FROM segflow.events_stored "
        "WHERE event_key IS NOT NULL GROUP BY 1, 2 ON CONFLICT DO NOTHING")
    return book
