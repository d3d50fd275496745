"""Identity resolution and traits (CONTRACT §3): profile creation, attaching identifiers,
merges into the older profile, merge protection, trait merge policies, and concurrent ingest."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

Conn = psycopg.Connection[Any]

CLOCK = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
COLUMNS = ("event_type", "occurred_at", "identifiers", "properties", "source", "event_key")


def at(conn: Conn, when: datetime) -> None:
    conn.execute("SELECT set_config('segflow.clock', %s, false)", (when.isoformat(),))


def send(
    conn: Conn,
    event_type: str,
    identifiers: dict[str, str],
    *,
    occurred_at: datetime | None = None,
    properties: dict[str, Any] | None = None,
    source: str | None = None,
    event_key: str | None = None,
) -> int:
    """Inserts one event and returns the profile it was stored under."""
    row = conn.execute(
        "INSERT INTO segflow.events (event_type, occurred_at, identifiers, properties, source,"
        " event_key) VALUES (%s, coalesce(%s, segflow.now()), %s, %s, %s, %s)"
        " RETURNING event_id",
        (event_type, occurred_at, Jsonb(identifiers), Jsonb(properties or {}), source,
         event_key),
    ).fetchone()
    assert row is not None
    found = conn.execute(
        "SELECT profile_id FROM segflow.events WHERE event_id = %s", (row[0],)
    ).fetchone()
    assert found is not None, "event not stored"
    return int(found[0])


def identify(conn: Conn, crm_id: str, occurred_at: datetime, traits: dict[str, Any],
             source: str | None = None) -> None:
    send(conn, "identify", {"crm_id": crm_id}, occurred_at=occurred_at, properties=traits,
         source=source)


def owner(conn: Conn, kind: str, value: str) -> int | None:
    row = conn.execute(
        "SELECT profile_id FROM segflow.identities WHERE kind = %s AND value = %s", (kind, value)
    ).fetchone()
    return None if row is None else int(row[0])


def traits(conn: Conn, profile_id: int) -> dict[str, Any]:
    row = conn.execute(
        "SELECT traits FROM segflow.profiles WHERE profile_id = %s", (profile_id,)
    ).fetchone()
    assert row is not None
    return dict(row[0])


def merged_into(conn: Conn, profile_id: int) -> int | None:
    row = conn.execute(
        "SELECT merged_into FROM segflow.profiles WHERE profile_id = %s", (profile_id,)
    ).fetchone()
    assert row is not None
    return row[0]


def event_profiles(conn: Conn) -> set[int]:
    return {r[0] for r in conn.execute("SELECT DISTINCT profile_id FROM segflow.events")}


def count(conn: Conn, query: str) -> int:
    row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def db(conn: Conn) -> Conn:
    at(conn, CLOCK)
    return conn


# -- resolution ---------------------------------------------------------------------------------


def test_unknown_identifiers_create_one_profile(db: Conn) -> None:
    pid = send(db, "login", {"crm_id": "C-1", "device_id": "d-1", "phone": "+351900"})
    assert owner(db, "crm_id", "C-1") == pid
    assert owner(db, "device_id", "d-1") == pid
    assert owner(db, "phone", "+351900") == pid
    # Kinds nobody configured are accepted too.
    other = send(db, "page_view", {"loyalty_card": "LC-7"})
    assert other != pid
    assert owner(db, "loyalty_card", "LC-7") == other
    row = db.execute(
        "SELECT created_at, merged_into FROM segflow.profiles WHERE profile_id = %s", (pid,)
    ).fetchone()
    assert row == (CLOCK, None)
    assert count(db, "SELECT count(*) FROM segflow.profiles") == 2
    # Known identifiers resolve to the same profile again.
    assert send(db, "deposit", {"crm_id": "C-1"}) == pid
    assert send(db, "page_view", {"device_id": "d-1"}) == pid
    assert count(db, "SELECT count(*) FROM segflow.profiles") == 2


def test_numeric_identifier_values_resolve_like_strings(db: Conn) -> None:
    pid = send(db, "login", {"crm_id": 1001})  # type: ignore[dict-item]
    assert owner(db, "crm_id", "1001") == pid
    assert send(db, "login", {"crm_id": "1001"}) == pid


def test_known_device_plus_new_crm_id_attaches_it(db: Conn) -> None:
    pid = send(db, "app_open", {"device_id": "d-2"})
    assert owner(db, "crm_id", "C-2") is None
    assert send(db, "login", {"device_id": "d-2", "crm_id": "C-2"}) == pid
    assert owner(db, "crm_id", "C-2") == pid
    assert send(db, "deposit", {"crm_id": "C-2"}) == pid
    assert count(db, "SELECT count(*) FROM segflow.profiles") == 1


def test_login_merges_anonymous_browsing_into_the_older_profile(db: Conn) -> None:
    at(db, CLOCK - timedelta(days=2))
    older = send(db, "login", {"crm_id": "C-3", "device_id": "laptop"})
    send(db, "deposit", {"crm_id": "C-3"})

    at(db, CLOCK - timedelta(minutes=30))
    anonymous = send(db, "page_view", {"anonymous_id": "anon-3"})
    assert anonymous != older
    send(db, "asset_view", {"anonymous_id": "anon-3", "device_id": "phone"},
         properties={"symbol": "XAUUSD"})
    assert owner(db, "device_id", "phone") == anonymous

    at(db, CLOCK)
    assert send(db, "login", {"anonymous_id": "anon-3", "crm_id": "C-3"}) == older

    # Every event of the absorbed profile now belongs to the survivor.
    assert event_profiles(db) == {older}
    assert count(db, "SELECT count(*) FROM segflow.events") == 5
    assert owner(db, "anonymous_id", "anon-3") == older
    assert owner(db, "device_id", "phone") == older
    assert count(
        db, f"SELECT count(*) FROM segflow.identities WHERE profile_id = {anonymous}"
    ) == 0
    assert merged_into(db, anonymous) == older
    assert merged_into(db, older) is None
    history = db.execute(
        "SELECT survivor_id, absorbed_id, merged_at, identifiers FROM segflow.profile_merges"
    ).fetchall()
    assert len(history) == 1
    survivor, absorbed, merged_at, identifiers = history[0]
    assert (survivor, absorbed, merged_at) == (older, anonymous, CLOCK)
    assert ["anonymous_id", "anon-3"] in identifiers
    # Events sent later with the absorbed profile's id go to the survivor.
    row = db.execute(
        "INSERT INTO segflow.events (event_type, profile_id) VALUES ('login', %s)"
        " RETURNING event_id", (anonymous,)
    ).fetchone()
    assert row is not None
    assert event_profiles(db) == {older}


def test_survivor_is_the_older_profile_even_with_a_larger_id(db: Conn) -> None:
    first = send(db, "page_view", {"anonymous_id": "anon-4"})
    second = send(db, "login", {"crm_id": "C-4"})
    assert first < second
    # Imported from another system: the crm profile is older although created later here.
    db.execute("UPDATE segflow.profiles SET created_at = %s WHERE profile_id = %s",
               (CLOCK - timedelta(days=400), second))
    assert send(db, "login", {"anonymous_id": "anon-4", "crm_id": "C-4"}) == second
    assert merged_into(db, first) == second
    assert event_profiles(db) == {second}


def test_one_event_can_merge_several_profiles(db: Conn) -> None:
    a = send(db, "page_view", {"anonymous_id": "a"})
    b = send(db, "page_view", {"anonymous_id": "b"})
    c = send(db, "page_view", {"device_id": "c"})
    assert send(db, "login", {"anonymous_id": "b", "device_id": "c", "crm_id": "C-5"}) == b
    assert send(db, "login", {"anonymous_id": "a", "crm_id": "C-5"}) == a
    assert merged_into(db, b) == a
    assert merged_into(db, c) == a
    assert event_profiles(db) == {a}
    assert {owner(db, k, v) for k, v in
            [("anonymous_id", "a"), ("anonymous_id", "b"), ("device_id", "c"),
             ("crm_id", "C-5")]} == {a}
    assert count(db, "SELECT count(*) FROM segflow.profiles WHERE merged_into IS NULL") == 1


# -- merge protection ---------------------------------------------------------------------------


def test_no_merge_when_both_profiles_have_a_crm_id(db: Conn) -> None:
    p1 = send(db, "login", {"crm_id": "C-10", "email": "ann@example.com"})
    p2 = send(db, "login", {"crm_id": "C-11", "device_id": "shared-tablet"})
    identities_before = db.execute(
        "SELECT kind, value, profile_id FROM segflow.identities ORDER BY 1, 2"
    ).fetchall()

    # Linking them would give one profile two crm_ids: no merge; the event goes to the owner
    # of the highest-priority identifier (email 20 beats device_id 50)...
    assert send(db, "login", {"email": "ann@example.com", "device_id": "shared-tablet"}) == p1
    # ... and crm_id 10 beats email 20.
    assert send(db, "deposit", {"crm_id": "C-11", "email": "ann@example.com"}) == p2
    assert send(db, "deposit", {"email": "ann@example.com", "crm_id": "C-11"}) == p2
    assert count(db, "SELECT count(*) FROM segflow.profile_merges") == 0
    assert count(db, "SELECT count(*) FROM segflow.profiles WHERE merged_into IS NOT NULL") == 0
    assert db.execute(
        "SELECT kind, value, profile_id FROM segflow.identities ORDER BY 1, 2"
    ).fetchall() == identities_before

    # Priorities are configuration: make email win over crm_id.
    db.execute("UPDATE segflow.identity_kinds SET priority = 5 WHERE kind = 'email'")
    assert send(db, "deposit", {"crm_id": "C-11", "email": "ann@example.com"}) == p1
    assert count(db, "SELECT count(*) FROM segflow.profile_merges") == 0

    # So are limits: with any number of crm_ids per profile the link merges into the older.
    db.execute("UPDATE segflow.identity_kinds SET max_per_profile = NULL WHERE kind = 'crm_id'")
    assert send(db, "deposit", {"crm_id": "C-11", "email": "ann@example.com"}) == p1
    assert merged_into(db, p2) == p1
    assert owner(db, "crm_id", "C-11") == p1
    assert owner(db, "device_id", "shared-tablet") == p1
    assert event_profiles(db) == {p1}


def test_a_limit_of_two_allows_a_second_email(db: Conn) -> None:
    p1 = send(db, "login", {"email": "one@example.com"})
    p2 = send(db, "login", {"email": "two@example.com", "device_id": "d"})
    # Limit 1: a second email is neither merged nor attached.
    assert send(db, "login", {"email": "one@example.com", "device_id": "d"}) == p1
    assert merged_into(db, p2) is None
    db.execute("UPDATE segflow.identity_kinds SET max_per_profile = 2 WHERE kind = 'email'")
    assert send(db, "login", {"email": "one@example.com", "device_id": "d"}) == p1
    assert merged_into(db, p2) == p1
    # Attaching a third email to a full profile does not happen.
    assert send(db, "login", {"email": "one@example.com", "phone": "+1"}) == p1
    send(db, "login", {"device_id": "d", "email": "three@example.com"})
    assert owner(db, "email", "three@example.com") is None


# -- traits -------------------------------------------------------------------------------------


def test_identify_latest_by_occurred_at(db: Conn) -> None:
    identify(db, "C-20", CLOCK - timedelta(hours=1), {"tier": "gold", "name": "Ann"})
    pid = owner(db, "crm_id", "C-20")
    assert pid is not None
    assert traits(db, pid) == {"tier": "gold", "name": "Ann"}
    # Arrives late but happened earlier: does not overwrite.
    identify(db, "C-20", CLOCK - timedelta(hours=2), {"tier": "silver", "country": "PT"})
    assert traits(db, pid) == {"tier": "gold", "name": "Ann", "country": "PT"}
    identify(db, "C-20", CLOCK - timedelta(minutes=30), {"tier": "platinum"})
    assert traits(db, pid)["tier"] == "platinum"
    # Equal occurred_at: the one ingested last is the latest.
    identify(db, "C-20", CLOCK - timedelta(minutes=30), {"tier": "diamond"})
    assert traits(db, pid)["tier"] == "diamond"
    # Nested objects merge leaf by leaf.
    identify(db, "C-20", CLOCK, {"address": {"city": "Lisbon"}})
    identify(db, "C-20", CLOCK, {"address": {"zip": "1000"}})
    assert traits(db, pid)["address"] == {"city": "Lisbon", "zip": "1000"}


def test_identify_order_inside_one_statement_is_by_occurred_at(db: Conn) -> None:
    rows = [
        ("identify", CLOCK - timedelta(minutes=1), {"crm_id": "C-21"}, {"tier": "new"}),
        ("identify", CLOCK - timedelta(minutes=9), {"crm_id": "C-21"}, {"tier": "old"}),
    ]
    db.execute(
        "INSERT INTO segflow.events (event_type, occurred_at, identifiers, properties)"
        " VALUES (%s, %s, %s, %s), (%s, %s, %s, %s)",
        [v if not isinstance(v, dict) else Jsonb(v) for row in rows for v in row],
    )
    pid = owner(db, "crm_id", "C-21")
    assert pid is not None
    assert traits(db, pid) == {"tier": "new"}


def test_trait_policies(db: Conn) -> None:
    db.execute(
        "INSERT INTO segflow.trait_policies (trait, policy, source_priority) VALUES"
        " ('signup_channel', 'first', NULL), ('peak_equity', 'max', NULL),"
        " ('lowest_margin', 'min', NULL), ('lifetime_deposit_usd', 'sum', NULL),"
        " ('kyc_status', 'source_priority', '{backoffice,crm}')"
    )
    t0 = CLOCK - timedelta(hours=3)
    identify(db, "C-22", t0, {"signup_channel": "ads", "peak_equity": 100,
                               "lowest_margin": 0.5, "lifetime_deposit_usd": 100,
                               "kyc_status": "pending"}, source="crm")
    pid = owner(db, "crm_id", "C-22")
    assert pid is not None
    identify(db, "C-22", t0 + timedelta(hours=1),
             {"signup_channel": "web", "peak_equity": 50, "lowest_margin": 0.7,
              "lifetime_deposit_usd": 50.5}, source="crm")
    assert traits(db, pid) == {"signup_channel": "ads", "peak_equity": 100,
                               "lowest_margin": 0.5, "lifetime_deposit_usd": 150.5,
                               "kyc_status": "pending"}
    # first is by occurred_at, not arrival; max/min keep the extreme whatever the time.
    identify(db, "C-22", t0 - timedelta(days=1),
             {"signup_channel": "referral", "peak_equity": 250, "lowest_margin": 0.1},
             source="crm")
    t = traits(db, pid)
    assert (t["signup_channel"], t["peak_equity"], t["lowest_margin"]) == ("referral", 250, 0.1)

    # A higher-priority source wins even with an older value ...
    identify(db, "C-22", t0 - timedelta(hours=1), {"kyc_status": "verified"},
             source="backoffice")
    assert traits(db, pid)["kyc_status"] == "verified"
    # ... lower-priority or unlisted sources never overwrite it, however recent ...
    identify(db, "C-22", CLOCK, {"kyc_status": "rejected"}, source="crm")
    identify(db, "C-22", CLOCK, {"kyc_status": "unknown"}, source="web")
    identify(db, "C-22", CLOCK, {"kyc_status": "unknown"})
    assert traits(db, pid)["kyc_status"] == "verified"
    # ... and within the same source the latest wins.
    identify(db, "C-22", CLOCK, {"kyc_status": "expired"}, source="backoffice")
    assert traits(db, pid)["kyc_status"] == "expired"


def test_sum_is_not_doubled_by_a_resent_event(db: Conn) -> None:
    db.execute("INSERT INTO segflow.trait_policies (trait, policy) VALUES ('deposits', 'sum')")
    send(db, "identify", {"crm_id": "C-23"}, properties={"deposits": 10},
         source="backoffice", event_key="k-1")
    for _ in range(2):
        db.execute(
            "INSERT INTO segflow.events (event_type, identifiers, properties, source, event_key)"
            " VALUES ('identify', %s, %s, 'backoffice', 'k-1')",
            (Jsonb({"crm_id": "C-23"}), Jsonb({"deposits": 10})),
        )
    send(db, "identify", {"crm_id": "C-23"}, properties={"deposits": 5},
         source="backoffice", event_key="k-2")
    pid = owner(db, "crm_id", "C-23")
    assert pid is not None
    assert traits(db, pid) == {"deposits": 15}


def test_consent_updated_writes_nested_consent(db: Conn) -> None:
    pid = send(db, "consent_updated", {"crm_id": "C-24"}, occurred_at=CLOCK - timedelta(hours=1),
               properties={"email": False})
    assert traits(db, pid) == {"consent": {"email": False}}
    send(db, "consent_updated", {"crm_id": "C-24"}, properties={"sms": True, "push": False})
    assert traits(db, pid) == {"consent": {"email": False, "sms": True, "push": False}}
    # An older consent change arriving late does not undo a newer one.
    send(db, "consent_updated", {"crm_id": "C-24"}, occurred_at=CLOCK - timedelta(hours=2),
         properties={"email": True, "ads": True})
    assert traits(db, pid)["consent"] == {"email": False, "sms": True, "push": False,
                                          "ads": True}
    send(db, "consent_updated", {"crm_id": "C-24"}, properties={"email": True})
    assert traits(db, pid)["consent"]["email"] is True
    # Other event types never touch traits.
    send(db, "page_view", {"crm_id": "C-24"}, properties={"tier": "gold"})
    assert "tier" not in traits(db, pid)


def test_traits_merge_under_the_policies(db: Conn) -> None:
    db.execute(
        "INSERT INTO segflow.trait_policies (trait, policy) VALUES"
        " ('signup_channel', 'first'), ('peak_equity', 'max'), ('lifetime_deposit_usd', 'sum')"
    )
    day = timedelta(days=1)
    at(db, CLOCK - 3 * day)
    send(db, "identify", {"crm_id": "C-30"}, occurred_at=CLOCK - 3 * day - timedelta(hours=1),
         properties={"tier": "silver", "peak_equity": 100, "lifetime_deposit_usd": 100,
                     "signup_channel": "web", "name": "Ann", "risk": "high"})
    at(db, CLOCK - 2 * day)
    send(db, "consent_updated", {"crm_id": "C-30"}, properties={"email": False})
    survivor = owner(db, "crm_id", "C-30")
    assert survivor is not None

    at(db, CLOCK)
    absorbed = send(db, "identify", {"anonymous_id": "anon-30"},
                    occurred_at=CLOCK - 4 * day,
                    properties={"signup_channel": "ads", "peak_equity": 300,
                                "lifetime_deposit_usd": 50, "risk": "low",
                                "consent": {"email": True, "sms": True}})
    send(db, "identify", {"anonymous_id": "anon-30"}, occurred_at=CLOCK - timedelta(hours=1),
         properties={"tier": "gold", "country": "PT"})
    assert absorbed != survivor

    assert send(db, "login", {"anonymous_id": "anon-30", "crm_id": "C-30"}) == survivor
    assert merged_into(db, absorbed) == survivor
    assert traits(db, survivor) == {
        "tier": "gold",  # latest: the absorbed value is newer
        "risk": "high",  # latest: the survivor's value is newer
        "peak_equity": 300,  # max
        "lifetime_deposit_usd": 150,  # sum
        "signup_channel": "ads",  # first: the absorbed value is older
        "name": "Ann",
        "country": "PT",
        "consent": {"email": False, "sms": True},
    }


# -- concurrency ----------------------------------------------------------------------------------

THREADS = 8
EVENTS_PER_THREAD = 50
CRM_IDS = [f"C-{n}" for n in range(4)]
DEVICES = [f"dev-{n}" for n in range(6)]
ANONYMOUS = [f"anon-{n}" for n in range(10)]


def _random_identifiers(rng: random.Random) -> dict[str, str]:
    shape = rng.randrange(6)
    crm, device, anon = rng.choice(CRM_IDS), rng.choice(DEVICES), rng.choice(ANONYMOUS)
    if shape == 0:
        return {"anonymous_id": anon}
    if shape == 1:
        return {"anonymous_id": anon, "device_id": device}  # links anonymous profiles
    if shape == 2:
        return {"device_id": device, "crm_id": crm}  # a device seen with a trader
    if shape == 3:
        return {"anonymous_id": anon, "crm_id": crm}  # login after browsing
    if shape == 4:
        return {"crm_id": crm}
    return {"device_id": device, "anonymous_id": anon, "crm_id": crm}


def _worker(url: str, seed: int, barrier: threading.Barrier, errors: list[str]) -> None:
    rng = random.Random(seed)
    events = [
        (rng.choice(["page_view", "login", "deposit", "asset_view"]),
         CLOCK - timedelta(seconds=rng.randrange(3600)), _random_identifiers(rng),
         f"t{seed}-{n}")
        for n in range(EVENTS_PER_THREAD)
    ]
    statement = ""
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            at(conn, CLOCK)
            barrier.wait(timeout=60)
            i = 0
            while i < len(events):
                # Services send single rows, multi-row INSERTs and COPYs.
                size = rng.choice([1, 1, 3, 5])
                batch = events[i:i + size]
                i += size
                params = [(t, when, Jsonb(ids), "{}", "feed", key)
                          for t, when, ids, key in batch]
                if size > 1 and rng.random() < 0.5:
                    statement = f"COPY {[ids for _, _, ids, _ in batch]}"
                    with conn.cursor() as cur, cur.copy(
                        "COPY segflow.events (event_type, occurred_at, identifiers, properties,"
                        " source, event_key) FROM STDIN"
                    ) as copy:
                        for p in params:
                            copy.write_row(p)
                else:
                    statement = f"INSERT {[ids for _, _, ids, _ in batch]}"
                    values = sql.SQL(", ").join(
                        [sql.SQL("(%s, %s, %s, %s, %s, %s)")] * len(batch))
                    conn.execute(
                        sql.SQL("INSERT INTO segflow.events (event_type, occurred_at,"
                                " identifiers, properties, source, event_key) VALUES {}")
                        .format(values),
                        [v for p in params for v in p],
                    )
    except Exception as error:  # reported by the test with the statement involved
        diag = getattr(error, "diag", None)
        errors.append(
            f"thread {seed}: {type(error).__name__}: {error}"
            f" | detail: {getattr(diag, 'message_detail', None)}"
            f" | context: {getattr(diag, 'context', None)} | statement: {statement}"
        )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_concurrent_ingest_keeps_identities_consistent(db: Conn, db_url: str, seed: int) -> None:
    # Traders are known up front (the CRM sync), so every crm_id has its profile.
    for crm in CRM_IDS:
        send(db, "identify", {"crm_id": crm}, properties={"tier": "gold"})
    barrier = threading.Barrier(THREADS)
    errors: list[str] = []
    threads = [
        threading.Thread(target=_worker, args=(db_url, seed * 100 + n, barrier, errors))
        for n in range(THREADS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert not any(t.is_alive() for t in threads), "a worker is stuck"
    assert errors == [], "\n".join(errors)

    # No event lost, none duplicated.
    assert count(db, "SELECT count(*) FROM segflow.events") == THREADS * EVENTS_PER_THREAD + 4
    # Every identifier belongs to a live profile, and so does every event.
    assert count(db, "SELECT count(*) FROM segflow.identities i JOIN segflow.profiles p"
                     " USING (profile_id) WHERE p.merged_into IS NOT NULL") == 0
    assert count(db, "SELECT count(*) FROM segflow.events e JOIN segflow.profiles p"
                     " USING (profile_id) WHERE p.merged_into IS NOT NULL") == 0
    assert count(db, "SELECT count(*) FROM segflow.events e WHERE NOT EXISTS"
                     " (SELECT 1 FROM segflow.profiles p WHERE p.profile_id = e.profile_id)") == 0
    # Each crm_id has exactly one profile, and no live profile has two crm_ids.
    rows = db.execute(
        "SELECT value, profile_id FROM segflow.identities WHERE kind = 'crm_id'"
    ).fetchall()
    assert sorted(r[0] for r in rows) == CRM_IDS
    assert len({r[1] for r in rows}) == len(CRM_IDS)
    # crm_id has the top priority, so an event carrying one is on that trader's profile.
    assert count(
        db,
        "SELECT count(*) FROM segflow.events e JOIN segflow.identities i"
        " ON i.kind = 'crm_id' AND i.value = e.identifiers ->> 'crm_id'"
        " WHERE e.profile_id <> i.profile_id",
    ) == 0
    # Merges point at live profiles, and a profile is absorbed once.
    assert count(db, "SELECT count(*) FROM segflow.profiles p JOIN segflow.profiles s"
                     " ON s.profile_id = p.merged_into WHERE s.merged_into IS NOT NULL") == 0
    assert count(db, "SELECT count(*) - count(DISTINCT absorbed_id)"
                     " FROM segflow.profile_merges") == 0
    assert count(db, "SELECT count(*) FROM segflow.profile_merges m JOIN segflow.profiles p"
                     " ON p.profile_id = m.absorbed_id WHERE p.merged_into IS NULL") == 0
    # The traits of the traders survive whatever was merged into them.
    assert count(db, "SELECT count(*) FROM segflow.profiles p JOIN segflow.identities i"
                     " USING (profile_id) WHERE i.kind = 'crm_id'"
                     " AND p.traits ->> 'tier' = 'gold'") == len(CRM_IDS)
    assert count(db, "SELECT count(*) FROM segflow.events_pending") == 0


def test_decimal_amounts_survive_a_merge(db: Conn) -> None:
    db.execute("INSERT INTO segflow.fx_rates VALUES ('EUR', '2026-01-01', 1.25)")
    db.execute(
        "INSERT INTO segflow.events (event_type, identifiers, amount, currency)"
        " VALUES ('deposit', %s, 80, 'EUR')", (Jsonb({"anonymous_id": "anon-40"}),)
    )
    anonymous = owner(db, "anonymous_id", "anon-40")
    trader = send(db, "login", {"crm_id": "C-40"})
    # The anonymous profile is the older one here, so it survives and takes the crm_id.
    assert send(db, "login", {"crm_id": "C-40", "anonymous_id": "anon-40"}) == anonymous
    assert merged_into(db, trader) == anonymous
    assert owner(db, "crm_id", "C-40") == anonymous
    survivor = anonymous
    row = db.execute(
        "SELECT profile_id, amount_usd FROM segflow.events WHERE event_type = 'deposit'"
    ).fetchone()
    assert row == (survivor, Decimal("100.00"))


def _wait_for_lock_wait(conn: Conn, pid: int) -> None:
    """Returns once backend `pid` is blocked on a lock."""
    for _ in range(500):
        row = conn.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
        if row is not None and row[0] == "Lock":
            return
        threading.Event().wait(0.02)
    raise AssertionError(f"backend {pid} never waited for a lock")


def test_merge_committed_while_waiting_is_followed_without_deadlock(db: Conn, db_url: str) -> None:
    # Ids ascend in creation order: trader < device profile < anonymous profile.
    trader = send(db, "login", {"crm_id": "C-50", "email": "c50@example.com"})
    device = send(db, "login", {"device_id": "dev-50", "phone": "+50"})
    anonymous = send(db, "page_view", {"anonymous_id": "anon-50", "cookie_id": "ck-50"})
    assert trader < device < anonymous

    connections = [psycopg.connect(db_url) for _ in range(3)]
    merger, late, other = connections
    errors: list[str] = []

    def run(conn: Conn, identifiers: dict[str, str]) -> None:
        try:
            send(conn, "login", identifiers)
            conn.commit()
        except Exception as error:  # reported below
            errors.append(f"{identifiers}: {type(error).__name__}: {error}")
            conn.rollback()

    try:
        for c in connections:
            at(c, CLOCK)
            c.execute("SET deadlock_timeout = '50ms'")
            c.commit()
        # The merger absorbs the anonymous profile into the trader and keeps its locks.
        assert send(merger, "login", {"crm_id": "C-50", "anonymous_id": "anon-50"}) == trader
        # `late` shares no identifier with the merger and read the owners before its commit:
        # it locks the device profile and waits for the anonymous one, which turns out to be
        # merged into the trader, so it then needs the trader as well.
        first = threading.Thread(target=run, args=(late, {"cookie_id": "ck-50",
                                                          "device_id": "dev-50"}))
        first.start()
        _wait_for_lock_wait(db, late.info.backend_pid)
        # `other` waits for the trader and, once it has it, for the device profile.
        second = threading.Thread(target=run, args=(other, {"email": "c50@example.com",
                                                            "phone": "+50"}))
        second.start()
        _wait_for_lock_wait(db, other.info.backend_pid)
        merger.commit()
        first.join(timeout=60)
        second.join(timeout=60)
        assert not first.is_alive() and not second.is_alive()
    finally:
        for c in connections:
            c.close()
    assert errors == [], "\n".join(errors)
    assert count(db, "SELECT count(*) FROM segflow.events") == 6
    assert event_profiles(db) == {trader}
    owners = {owner(db, k, v) for k, v in [
        ("crm_id", "C-50"), ("email", "c50@example.com"), ("device_id", "dev-50"),
        ("phone", "+50"), ("anonymous_id", "anon-50"), ("cookie_id", "ck-50")]}
    assert owners == {trader}
    assert merged_into(db, device) == trader
    assert merged_into(db, anonymous) == trader
