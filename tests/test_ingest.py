"""Ingest into segflow.events (CONTRACT §2): INSERT and COPY, FX normalisation, idempotency,
validation, day partitions and retention, the JSON helpers, and set-based trigger work."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

Conn = psycopg.Connection[Any]

CLOCK = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
COLUMNS = (
    "event_type",
    "occurred_at",
    "identifiers",
    "profile_id",
    "amount",
    "currency",
    "properties",
    "source",
    "event_key",
)


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture
def db(conn: Conn) -> Conn:
    """The test database with the clock at CLOCK and EUR/JPY rates that change once."""
    conn.execute("SELECT set_config('segflow.clock', %s, false)", (CLOCK.isoformat(),))
    conn.execute(
        "INSERT INTO segflow.fx_rates (currency, valid_from, usd_per_unit) VALUES"
        " ('EUR', '2026-11-01 00:00+00', 1.10), ('EUR', '2026-12-02 12:00+00', 1.20),"
        " ('JPY', '2026-11-01 00:00+00', 0.0065), ('JPY', '2026-12-01 00:00+00', 0.0070)"
    )
    return conn


def event(
    event_key: str | None = None,
    *,
    event_type: str | None = "deposit",
    occurred_at: datetime | str | None = CLOCK,
    identifiers: Any = None,
    profile_id: int | None = None,
    amount: Decimal | int | None = None,
    currency: str | None = None,
    properties: Any = None,
    source: str | None = "payments",
) -> dict[str, Any]:
    if identifiers is None and profile_id is None:
        identifiers = {"crm_id": "C-1", "device_id": "d-1"}
    return {
        "event_type": event_type,
        "occurred_at": occurred_at,
        "identifiers": identifiers,
        "profile_id": profile_id,
        "amount": amount,
        "currency": currency,
        "properties": properties if properties is not None else {},
        "source": source,
        "event_key": event_key,
    }


def _params(row: dict[str, Any]) -> list[Any]:
    # Jsonb for every JSON column, also for malformed shapes (a list, a string).
    return [
        Jsonb(row[c]) if c in ("identifiers", "properties") and row[c] is not None else row[c]
        for c in COLUMNS
    ]


def insert_each(conn: Conn, rows: list[dict[str, Any]]) -> None:
    """One single-row INSERT statement per event."""
    statement = sql.SQL("INSERT INTO segflow.events ({}) VALUES ({})").format(
        sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
        sql.SQL(", ").join(sql.Placeholder() * len(COLUMNS)),
    )
    for row in rows:
        conn.execute(statement, _params(row))
        assert_nothing_pending(conn)


def insert_many(conn: Conn, rows: list[dict[str, Any]]) -> None:
    """One multi-row INSERT statement for all events."""
    one = sql.SQL("({})").format(sql.SQL(", ").join(sql.Placeholder() * len(COLUMNS)))
    statement = sql.SQL("INSERT INTO segflow.events ({}) VALUES {}").format(
        sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
        sql.SQL(", ").join([one] * len(rows)),
    )
    conn.execute(statement, [p for row in rows for p in _params(row)])
    assert_nothing_pending(conn)


def copy_rows(conn: Conn, rows: list[dict[str, Any]]) -> None:
    """One COPY ... FROM STDIN statement for all events."""
    statement = sql.SQL("COPY segflow.events ({}) FROM STDIN").format(
        sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
    )
    with conn.cursor() as cur, cur.copy(statement) as copy:
        for row in rows:
            copy.write_row(_params(row))
    assert_nothing_pending(conn)


STORE = {"insert_each": insert_each, "insert_many": insert_many, "copy": copy_rows}


def assert_nothing_pending(conn: Conn) -> None:
    row = conn.execute("SELECT count(*) FROM segflow.events_pending").fetchone()
    assert row == (0,), "segflow.events_pending must be empty after every statement"


def count_events(conn: Conn) -> int:
    row = conn.execute("SELECT count(*) FROM segflow.events").fetchone()
    assert row is not None
    return int(row[0])


def stored(conn: Conn) -> dict[str, tuple[Any, ...]]:
    """event_key -> (profile_id, amount, currency, amount_usd, crm_id's profile)."""
    rows = conn.execute(
        "SELECT e.event_key, e.profile_id, e.amount, e.currency, e.amount_usd, i.profile_id"
        " FROM segflow.events e"
        " LEFT JOIN segflow.identities i"
        "   ON i.kind = 'crm_id' AND i.value = e.identifiers ->> 'crm_id'"
    ).fetchall()
    return {r[0]: tuple(r[1:]) for r in rows}


def partitions(conn: Conn) -> set[str]:
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'segflow.events_stored'::regclass"
    ).fetchall()
    return {r[0] for r in rows}


# -- storing and normalising ------------------------------------------------------------------

FX_CASES: list[tuple[dict[str, Any], Decimal | None]] = [
    # key, occurred_at, amount, currency -> expected amount_usd
    (event("eur-old", occurred_at=_ts("2026-12-02 11:59:59.999999"), amount=100,
           currency="EUR", identifiers={"crm_id": "C-1"}), Decimal("110.00")),
    # valid_from <= occurred_at: the new rate applies from its first instant.
    (event("eur-new", occurred_at=_ts("2026-12-02 12:00:00"), amount=100, currency="EUR",
           identifiers={"crm_id": "C-1"}), Decimal("120.00")),
    (event("eur-late", occurred_at=_ts("2026-12-03 09:00:00"), amount=Decimal("2.5"),
           currency="EUR", identifiers={"crm_id": "C-2"}), Decimal("3.000")),
    (event("jpy-old", occurred_at=_ts("2026-11-30 23:00:00"), amount=10000, currency="JPY",
           identifiers={"crm_id": "C-2", "email": "two@example.com"}), Decimal("65.0000")),
    (event("jpy-new", occurred_at=_ts("2026-12-01 00:00:01"), amount=10000, currency="JPY",
           identifiers={"email": "two@example.com"}), Decimal("70.0000")),
    # USD needs no rate, not even one row in fx_rates.
    (event("usd", occurred_at=_ts("2026-12-03 09:30:00"), amount=Decimal("42.42"),
           currency="USD", identifiers={"crm_id": "C-3"}), Decimal("42.42")),
    (event("no-amount", event_type="login", identifiers={"crm_id": "C-3"}), None),
]


@pytest.mark.parametrize("method", sorted(STORE))
def test_events_store_with_profile_and_amount_usd(db: Conn, method: str) -> None:
    STORE[method](db, [row for row, _ in FX_CASES])
    got = stored(db)
    assert set(got) == {row["event_key"] for row, _ in FX_CASES}
    for row, usd in FX_CASES:
        profile_id, amount, currency, amount_usd, crm_profile = got[row["event_key"]]
        assert profile_id is not None
        assert amount_usd == usd, row["event_key"]
        assert (amount, currency) == (
            None if row["amount"] is None else Decimal(row["amount"]),
            row["currency"],
        )
        if "crm_id" in row["identifiers"]:
            assert profile_id == crm_profile
    # The events of one person share a profile; different people do not.
    assert got["eur-old"][0] == got["eur-new"][0]
    assert got["eur-late"][0] == got["jpy-old"][0] == got["jpy-new"][0]
    assert len({got[k][0] for k in ("eur-old", "eur-late", "usd")}) == 3
    row = db.execute("SELECT count(*) FROM segflow.profiles").fetchone()
    assert row == (3,)


def test_select_shows_every_column(db: Conn) -> None:
    insert_each(db, [event("k1", amount=10, currency="USD", properties={"method": "card"})])
    row = db.execute(
        "SELECT event_id, event_type, occurred_at, identifiers, amount, currency, amount_usd,"
        " properties, source, event_key, profile_id FROM segflow.events"
    ).fetchone()
    assert row is not None
    assert row[0] is not None
    assert row[1:10] == (
        "deposit",
        CLOCK,
        {"crm_id": "C-1", "device_id": "d-1"},
        Decimal(10),
        "USD",
        Decimal(10),
        {"method": "card"},
        "payments",
        "k1",
    )
    assert row[10] is not None


def test_occurred_at_defaults_to_the_clock(db: Conn) -> None:
    db.execute(
        "INSERT INTO segflow.events (event_type, identifiers) VALUES ('login', %s)",
        (Jsonb({"crm_id": "C-1"}),),
    )
    assert db.execute("SELECT occurred_at FROM segflow.events").fetchone() == (CLOCK,)


def test_known_profile_id_replaces_identifiers(db: Conn) -> None:
    insert_each(db, [event("first")])
    row = db.execute("SELECT profile_id FROM segflow.events").fetchone()
    assert row is not None
    insert_each(db, [event("by-id", identifiers=None, profile_id=row[0])])
    got = stored(db)
    assert got["by-id"][0] == row[0]
    assert db.execute("SELECT count(*) FROM segflow.profiles").fetchone() == (1,)


# -- idempotency ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(STORE))
def test_resent_key_in_a_later_statement_is_stored_once(db: Conn, method: str) -> None:
    STORE[method](db, [event("pay-1", amount=100, currency="USD")])
    # Same key, different payload: the first one stays, no error.
    STORE[method](db, [event("pay-1", amount=999, currency="USD"), event("pay-2")])
    STORE[method](db, [event("pay-1", amount=5, currency="USD")])
    rows = db.execute(
        "SELECT event_key, amount FROM segflow.events ORDER BY event_key"
    ).fetchall()
    assert rows == [("pay-1", Decimal(100)), ("pay-2", None)]


@pytest.mark.parametrize("method", ["insert_many", "copy"])
def test_duplicates_inside_one_statement_are_stored_once(db: Conn, method: str) -> None:
    STORE[method](
        db,
        [
            event("dup", amount=1, currency="USD"),
            event("dup", amount=2, currency="USD"),
            event("other"),
            event("dup", amount=3, currency="USD"),
            # The key is per source: the same key from another source is another event.
            event("dup", amount=4, currency="USD", source="crm"),
            # No key: never deduplicated.
            event(None),
            event(None),
        ],
    )
    rows = db.execute(
        "SELECT source, event_key, amount FROM segflow.events"
        " ORDER BY source, event_key NULLS LAST, event_id"
    ).fetchall()
    assert rows == [
        ("crm", "dup", Decimal(4)),
        ("payments", "dup", Decimal(1)),  # the first one sent wins
        ("payments", "other", None),
        ("payments", None, None),
        ("payments", None, None),
    ]


# -- validation -------------------------------------------------------------------------------

BAD: list[tuple[str, dict[str, Any], str, str]] = [
    # id, overrides, field named by the error, words of the reason
    ("unknown-currency", {"amount": 10, "currency": "XYZ"}, "currency", "unknown currency"),
    ("lowercase-currency", {"amount": 10, "currency": "eur"}, "currency", "ISO 4217"),
    ("no-rate-yet", {"amount": 10, "currency": "EUR", "occurred_at": _ts("2026-10-31 23:59")},
     "currency", "no FX rate"),
    ("amount-without-currency", {"amount": 10}, "currency", "required when amount"),
    ("identifiers-list", {"identifiers": ["C-1"]}, "identifiers", "JSON object"),
    ("identifiers-string", {"identifiers": "C-1"}, "identifiers", "JSON object"),
    ("identifier-object-value", {"identifiers": {"crm_id": {"id": 1}}}, "identifiers",
     "non-empty string"),
    ("identifier-empty-value", {"identifiers": {"crm_id": ""}}, "identifiers",
     "non-empty string"),
    ("identifier-null-value", {"identifiers": {"crm_id": None}}, "identifiers",
     "non-empty string"),
    ("identifier-bad-kind", {"identifiers": {"CRM id": "C-9"}}, "identifiers",
     "lower-case identifier"),
    ("identifiers-empty", {"identifiers": {}}, "identifiers", "empty"),
    ("too-far-ahead", {"occurred_at": CLOCK + timedelta(minutes=5, microseconds=1)},
     "occurred_at", "ahead of segflow.now()"),
    ("empty-event-type", {"event_type": ""}, "event_type", "required"),
    ("null-event-type", {"event_type": None}, "event_type", "required"),
    ("upper-event-type", {"event_type": "Deposit"}, "event_type", "lower-case"),
    ("unknown-profile", {"identifiers": None, "profile_id": 987654}, "profile_id",
     "unknown profile"),
    ("properties-list", {"properties": [1, 2]}, "properties", "JSON object"),
]


@pytest.mark.parametrize(("overrides", "field", "reason"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
@pytest.mark.parametrize("method", ["insert_each", "insert_many", "copy"])
def test_bad_input_is_rejected_naming_the_field(
    db: Conn, method: str, overrides: dict[str, Any], field: str, reason: str
) -> None:
    insert_each(db, [event("before", identifiers={"crm_id": "C-0"})])
    before = db.execute(
        "SELECT (SELECT count(*) FROM segflow.events), (SELECT count(*) FROM segflow.profiles),"
        " (SELECT count(*) FROM segflow.identities), (SELECT count(*) FROM segflow.event_keys)"
    ).fetchone()
    bad = event("bad", **{"identifiers": {"crm_id": "C-2"}, **overrides})
    rows = [bad] if method == "insert_each" else [event("good-1"), bad, event("good-2")]
    with pytest.raises(psycopg.Error) as caught:
        STORE[method](db, rows)
    error = caught.value
    assert error.diag.column_name == field
    message = error.diag.message_primary or ""
    assert f"{field}:" in message
    assert reason in message
    # Nothing of the statement is kept: no event, no profile, no identity, no key.
    after = db.execute(
        "SELECT (SELECT count(*) FROM segflow.events), (SELECT count(*) FROM segflow.profiles),"
        " (SELECT count(*) FROM segflow.identities), (SELECT count(*) FROM segflow.event_keys)"
    ).fetchone()
    assert after == before
    assert_nothing_pending(db)
    # The connection and the keys are still usable.
    STORE[method](db, [event("good-1"), event("good-2")])
    assert count_events(db) == 3


def test_occurred_at_exactly_at_the_tolerance_is_accepted(db: Conn) -> None:
    insert_each(db, [event("edge", occurred_at=CLOCK + timedelta(minutes=5))])
    assert count_events(db) == 1


def test_future_tolerance_follows_the_clock(db: Conn) -> None:
    ahead = CLOCK + timedelta(hours=1)
    with pytest.raises(psycopg.Error, match="occurred_at"):
        insert_each(db, [event("later", occurred_at=ahead)])
    db.execute("SELECT set_config('segflow.clock', %s, false)", (ahead.isoformat(),))
    insert_each(db, [event("later", occurred_at=ahead)])
    assert count_events(db) == 1


def test_stored_flag_cannot_be_set_by_callers(db: Conn) -> None:
    with pytest.raises(psycopg.Error) as caught:
        db.execute(
            "INSERT INTO segflow.events (event_type, identifiers, stored)"
            " VALUES ('login', %s, true)",
            (Jsonb({"crm_id": "C-1"}),),
        )
    assert caught.value.diag.column_name == "stored"
    assert count_events(db) == 0


def function_calls(db: Conn) -> Counter[str]:
    """Calls of segflow's functions counted for this backend. The counts of earlier
    transactions can still be in them until the statistics are flushed (at most once a
    second), so callers take the difference across the statements they measure."""
    return Counter(dict(db.execute(
        "SELECT funcname, calls FROM pg_stat_xact_user_functions WHERE schemaname = 'segflow'"
    ).fetchall()))


# -- partitions and retention ------------------------------------------------------------------


def test_events_create_their_day_partitions(db: Conn) -> None:
    assert "events_20240229" not in partitions(db)
    insert_each(db, [event("leap", occurred_at=_ts("2024-02-29 23:59:59.999999"))])
    assert "events_20240229" in partitions(db)

    # Just before midnight a little-ahead event falls on a day nobody has created yet.
    clock = _ts("2027-03-31 23:58:00")
    db.execute("SELECT set_config('segflow.clock', %s, false)", (clock.isoformat(),))
    assert not {"events_20270331", "events_20270401"} & partitions(db)
    copy_rows(db, [event("now", occurred_at=clock),
                   event("ahead", occurred_at=clock + timedelta(minutes=4))])
    assert {"events_20270331", "events_20270401"} <= partitions(db)

    rows = db.execute(
        "SELECT event_key, tableoid::regclass::text FROM segflow.events ORDER BY event_key"
    ).fetchall()
    assert rows == [
        ("ahead", "segflow.events_20270401"),
        ("leap", "segflow.events_20240229"),
        ("now", "segflow.events_20270331"),
    ]


def test_ensure_partitions_creates_ahead(db: Conn) -> None:
    names = {"events_20270601", "events_20270602", "events_20270603"}
    assert not names & partitions(db)
    created = db.execute(
        "SELECT segflow.ensure_partitions('2027-06-01 05:00+00', '2027-06-03 00:00+00')"
    ).fetchone()
    assert created == (3,)
    assert names <= partitions(db)
    again = db.execute(
        "SELECT segflow.ensure_partitions('2027-06-01 00:00+00', '2027-06-03 23:00+00')"
    ).fetchone()
    assert again == (0,)
    # Bounds are UTC days.
    bound = db.execute(
        "SELECT pg_get_expr(relpartbound, oid) FROM pg_class"
        " WHERE oid = 'segflow.events_20270602'::regclass"
    ).fetchone()
    assert bound is not None
    assert "2027-06-02 00:00:00+00" in bound[0] and "2027-06-03 00:00:00+00" in bound[0]


def test_maintain_partitions_follows_the_clock(db: Conn) -> None:
    db.execute("SET segflow.clock = '2027-08-10 12:00:00+00'")
    expected = {f"events_202708{d:02d}" for d in range(9, 18)}
    assert not expected & partitions(db)
    # One day back, partitions_ahead (7) days ahead.
    assert db.execute("SELECT segflow.maintain_partitions()").fetchone() == (9,)
    assert expected <= partitions(db)
    assert "events_20270818" not in partitions(db)
    assert db.execute("SELECT segflow.maintain_partitions()").fetchone() == (0,)
    db.execute("UPDATE segflow.config SET value = '10' WHERE key = 'partitions_ahead'")
    assert db.execute("SELECT segflow.maintain_partitions()").fetchone() == (3,)
    assert "events_20270820" in partitions(db)


def test_apply_retention_drops_only_whole_old_days(db: Conn) -> None:
    insert_many(
        db,
        [
            event("leap", occurred_at=_ts("2024-02-29 12:00")),
            event("old", occurred_at=_ts("2026-11-25 23:59:59.999999")),
            event("partly", occurred_at=_ts("2026-11-26 00:30")),
            event("recent", occurred_at=_ts("2026-12-01 09:00")),
        ],
    )
    kept = partitions(db) - {"events_20240229"}
    # Nothing configured: no retention.
    assert db.execute("SELECT segflow.apply_retention()").fetchone() == (0,)

    # Cut-off 1 µs before the end of 2026-11-25: that day still holds a young enough instant.
    db.execute("SET segflow.clock = '2026-12-02 23:59:59.999999+00'")
    assert db.execute("SELECT segflow.apply_retention('7 days')").fetchone() == (1,)
    assert partitions(db) == kept
    keys = db.execute("SELECT event_key FROM segflow.events ORDER BY event_key").fetchall()
    assert keys == [("old",), ("partly",), ("recent",)]

    # Cut-off exactly at the end of 2026-11-25: the whole day is older than 7 days.
    db.execute("SET segflow.clock = '2026-12-03 00:00:00+00'")
    assert db.execute("SELECT segflow.apply_retention('7 days')").fetchone() == (1,)
    assert partitions(db) == kept - {"events_20261125"}
    keys = db.execute("SELECT event_key FROM segflow.events ORDER BY event_key").fetchall()
    assert keys == [("partly",), ("recent",)]

    # The configured retention is used by default and by maintain_partitions.
    db.execute("UPDATE segflow.config SET value = '2 days' WHERE key = 'retention'")
    db.execute("SET segflow.clock = '2026-12-03 10:00:00+00'")
    db.execute("SELECT segflow.maintain_partitions()")
    assert "events_20261126" not in partitions(db)
    assert {"events_20261201", "events_20261202"} <= partitions(db)
    keys = db.execute("SELECT event_key FROM segflow.events ORDER BY event_key").fetchall()
    assert keys == [("recent",)]


# -- JSON helpers -------------------------------------------------------------------------------


def test_check_events_reports_each_problem(db: Conn) -> None:
    insert_each(db, [event("first", identifiers={"crm_id": "C-1"})])
    batch = [
        {"event_type": "login", "identifiers": {"crm_id": "C-1"}},
        {"event_type": "deposit", "identifiers": {"crm_id": "C-1"}, "amount": 5,
         "currency": "XYZ"},
        {"event_type": "login"},
        {"event_type": "login", "identifiers": {"crm_id": "C-1"},
         "occurred_at": "2026-12-03T11:00:00Z"},
        {"event_type": "login", "profile_id": 987654},
        {"event_type": "", "identifiers": {"crm_id": "C-1"}},
        {"event_type": "deposit", "identifiers": {"crm_id": "C-1"}, "amount": 5,
         "currency": "EUR", "occurred_at": "2026-01-01T00:00:00Z"},
        {"event_type": "deposit", "identifiers": {"crm_id": "C-1"}, "amount": 5,
         "currency": "EUR", "occurred_at": "2026-12-03T09:00:00Z"},
    ]
    rows = db.execute("SELECT idx, field, reason FROM segflow.check_events(%s)",
                      (Jsonb(batch),)).fetchall()
    assert [(idx, field) for idx, field, _ in rows] == [
        (1, "currency"),
        (2, "identifiers"),
        (3, "occurred_at"),
        (4, "profile_id"),
        (5, "event_type"),
        (6, "currency"),
    ]
    reasons = {idx: reason for idx, _, reason in rows}
    assert "unknown currency" in reasons[1]
    assert "no FX rate" in reasons[6]
    assert "987654" in reasons[4]
    # The reason does not repeat the field prefix.
    assert not any(reason.startswith(f"{field}:") for _, field, reason in rows)
    # Checking stores nothing.
    assert count_events(db) == 1


def test_ingest_json_returns_the_stored_count(db: Conn) -> None:
    insert_each(db, [event("pay-1")])
    batch = [
        {"event_type": "deposit", "identifiers": {"crm_id": "C-1"}, "amount": 10,
         "currency": "EUR", "source": "payments", "event_key": "pay-1"},
        {"event_type": "deposit", "identifiers": {"crm_id": "C-1"}, "amount": 10,
         "currency": "EUR", "source": "payments", "event_key": "pay-2"},
        {"event_type": "login", "identifiers": {"crm_id": "C-7"}},
    ]
    assert db.execute("SELECT segflow.ingest_json(%s)", (Jsonb(batch),)).fetchone() == (2,)
    assert_nothing_pending(db)
    assert count_events(db) == 3
    # occurred_at defaults to the clock; amount_usd is normalised like any insert.
    row = db.execute(
        "SELECT occurred_at, amount_usd FROM segflow.events WHERE event_key = 'pay-2'"
    ).fetchone()
    assert row == (CLOCK, Decimal("12.00"))
    # All re-sent: nothing stored, nothing counted.
    assert db.execute("SELECT segflow.ingest_json(%s)", (Jsonb(batch[:2]),)).fetchone() == (0,)
    assert db.execute("SELECT segflow.ingest_json('[]')").fetchone() == (0,)
    with pytest.raises(psycopg.Error, match="currency"):
        db.execute("SELECT segflow.ingest_json(%s)",
                   (Jsonb([batch[2], {**batch[1], "event_key": "x", "currency": "XYZ"}]),))
    assert count_events(db) == 3


# -- set-based work -------------------------------------------------------------------------------


def test_copy_of_10000_rows_runs_the_trigger_once(db: Conn) -> None:
    rows = [
        event(
            f"bulk-{n}",
            occurred_at=CLOCK - timedelta(seconds=n),
            identifiers={"crm_id": f"C-{n % 500}", "device_id": f"d-{n % 500}"},
            amount=n,
            currency="EUR" if n % 2 else "USD",
        )
        for n in range(10_000)
    ]
    db.execute("SET track_functions = 'all'")
    with db.transaction():
        before = function_calls(db)
        copy_rows(db, rows)
        calls = function_calls(db) - before
    assert calls["_events_after_insert"] == 1
    assert calls["resolve_batch"] == 1
    # New identifier sets take the slow path once per distinct set, not per row.
    assert calls["resolve_identifiers"] == 500
    summary = db.execute(
        "SELECT count(*), count(DISTINCT profile_id), count(amount_usd),"
        " sum(amount_usd) FILTER (WHERE currency = 'EUR'),"
        " sum(amount_usd) FILTER (WHERE currency = 'USD')"
        " FROM segflow.events"
    ).fetchone()
    eur = sum(n for n in range(10_000) if n % 2) * Decimal("1.20")
    usd = sum(n for n in range(10_000) if not n % 2)
    assert summary == (10_000, 500, 10_000, eur, usd)
    assert db.execute("SELECT count(*) FROM segflow.profiles").fetchone() == (500,)

    # A second batch of known identifiers takes the fast path only.
    with db.transaction():
        before = function_calls(db)
        copy_rows(db, [
            event(f"again-{n}", identifiers={"crm_id": f"C-{n % 500}"}) for n in range(2_000)
        ])
        calls = function_calls(db) - before
    assert calls["_events_after_insert"] == 1
    assert "resolve_identifiers" not in calls
    assert count_events(db) == 12_000


def test_wider_partitions_fit_between_existing_ones(db: Conn) -> None:
    # Daily partitions exist for 2027-09-01..03 (a Wednesday to Friday); then the width
    # becomes a week: the new partitions keep to ISO weeks where nothing is in the way.
    db.execute("SELECT segflow.ensure_partitions('2027-09-01 00:00+00', '2027-09-03 00:00+00')")
    db.execute("UPDATE segflow.config SET value = 'week' WHERE key = 'partition_width'")
    created = db.execute(
        "SELECT segflow.ensure_partitions('2027-08-25 00:00+00', '2027-09-14 00:00+00')"
    ).fetchone()
    ranges = db.execute(
        "SELECT name, from_at, to_at FROM segflow.event_partitions"
        " WHERE from_at >= '2027-08-23' AND from_at < '2027-09-20' ORDER BY from_at").fetchall()
    assert created == (5,)
    assert [(name, f"{a:%m-%d}", f"{b:%m-%d}") for name, a, b in ranges] == [
        ("events_20270823", "08-23", "08-30"),  # a whole week, Monday to Monday
        ("events_20270830", "08-30", "09-01"),  # up to the daily partitions
        ("events_20270901", "09-01", "09-02"),
        ("events_20270902", "09-02", "09-03"),
        ("events_20270903", "09-03", "09-04"),
        ("events_20270904", "09-04", "09-06"),  # the rest of that week
        ("events_20270906", "09-06", "09-13"),
        ("events_20270913", "09-13", "09-20"),
    ]
    # Events land in them; retention drops a week only once all of it is old enough.
    db.execute("SET segflow.clock = '2027-09-10 00:00:00+00'")
    insert_many(db, [event("monday", occurred_at=_ts("2027-08-23 00:00")),
                     event("sunday", occurred_at=_ts("2027-08-29 23:59:59.999999"))])
    db.execute("SELECT segflow.apply_retention('12 days')")
    assert "events_20270823" in partitions(db)
    db.execute("SELECT segflow.apply_retention('11 days')")
    assert "events_20270823" not in partitions(db)
    assert "events_20270830" in partitions(db)
    assert count_events(db) == 0
    db.execute("UPDATE segflow.config SET value = 'fortnight' WHERE key = 'partition_width'")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="partition_width"):
        db.execute("SELECT segflow.ensure_partitions('2030-01-01 00:00+00', '2030-01-01 00:00+00')")


def test_each_event_is_validated_once_and_converted_only_with_an_amount(db: Conn) -> None:
    rows = [
        event(f"once-{n}", identifiers={"crm_id": f"C-{n % 7}"},
              amount=n if n % 3 else None, currency="EUR" if n % 3 else None)
        for n in range(300)
    ]
    db.execute("SET track_functions = 'all'")
    with db.transaction():
        before = function_calls(db)
        copy_rows(db, rows)
        calls = function_calls(db) - before
    assert calls["event_problem"] == 300
    assert calls["usd_rate"] == 200
    assert count_events(db) == 300
