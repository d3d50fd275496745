"""The simulated trader feed: coverage, realism, determinism, and writing into the database."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from segflow.feed import FX_USD_PER_UNIT, TraderFeed, copy_rows, insert_rows, load_fx_rates

# The demo's defaults: 500 traders, 20 events/s.
DEMO_START = datetime(2026, 12, 3, 12, tzinfo=UTC)
TWO_MINUTES = 2400

CATEGORIES = {
    "behavioural": {"login", "page_view", "asset_view", "app_interaction"},
    "transactional": {
        "deposit_attempt",
        "deposit",
        "trade",
        "withdrawal",
        "limit_alert",
        "margin_update",
        "positions_closed",
    },
    "support": {"ticket_opened", "chat", "call"},
    "identity": {"identify"},
    "consent": {"consent_updated"},
    "marketing": {"email_open", "email_click", "ad_impression", "webinar_attended"},
}


@pytest.fixture(scope="module")
def events() -> list[dict[str, Any]]:
    # 1 event/s over ~5.5 h of simulated time, so traders have several sessions.
    return list(TraderFeed(seed=7, profiles=300, rate=1.0).events(20_000))


def _usd(event: dict[str, Any]) -> Decimal:
    rate = FX_USD_PER_UNIT.get(event["currency"], Decimal(1))
    return Decimal(event["amount"]) * rate


def _patterns(events: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Positions of the events completing each example segment's pattern, per trader (crm_id).

    A plain restatement of examples/segments/*.yaml over the feed's own events: the tier comes
    from identify events, sessions split at 30 minutes without an event.
    """
    tier: dict[str, str] = {}
    deposits: dict[str, list[datetime]] = {}
    deposit_views: dict[str, list[datetime]] = {}
    session: dict[str, list[dict[str, Any]]] = {}
    last: dict[str, datetime] = {}
    found: dict[str, list[int]] = {
        "margin_call_risk": [],
        "deposit_abandoned": [],
        "hot_lead": [],
        "high_value_onboarding": [],
    }
    for n, e in enumerate(events):
        crm = e["identifiers"].get("crm_id")
        if crm is None:
            continue
        at, props = e["occurred_at"], e["properties"]
        if e["event_type"] == "identify" and "tier" in props:
            tier[crm] = props["tier"]
        if crm in last and at - last[crm] > timedelta(minutes=30):
            session[crm] = []
        last[crm] = at
        session.setdefault(crm, []).append(e)

        def deposited(within: timedelta, crm: str = crm, at: datetime = at) -> bool:
            return any(at - within < d <= at for d in deposits.get(crm, ()))

        if (
            e["event_type"] == "margin_update"
            and props["utilization"] > 0.95
            and tier.get(crm) in ("gold", "platinum")
            and not deposited(timedelta(hours=4))
        ):
            found["margin_call_risk"].append(n)
        if e["event_type"] == "page_view" and props["page"] == "deposit":
            views = [v for v in deposit_views.get(crm, []) if v > at - timedelta(minutes=10)]
            deposit_views[crm] = [*views, at]
            if views and not deposited(timedelta(minutes=30)):
                found["deposit_abandoned"].append(n)
        if e["event_type"] == "asset_view" and tier.get(crm) == "gold":
            viewed = [x for x in session[crm] if x["event_type"] == "asset_view"]
            assets = [x["properties"]["asset"] for x in viewed]
            if len(assets) >= 3 and len(set(assets)) == 1:
                found["hot_lead"].append(n)
        if e["event_type"] == "deposit":
            if not deposits.get(crm) and _usd(e) > 10_000:
                found["high_value_onboarding"].append(n)
            deposits.setdefault(crm, []).append(at)
    return found


def test_every_source_category_and_type(events: list[dict[str, Any]]) -> None:
    types = {e["event_type"] for e in events}
    for category, expected in CATEGORIES.items():
        assert expected <= types, f"{category}: missing {expected - types}"


def test_event_shape(events: list[dict[str, Any]]) -> None:
    keys = {"event_type", "occurred_at", "identifiers", "amount", "currency", "properties"}
    for e in events:
        assert keys | {"source", "event_key"} == set(e)
        assert e["occurred_at"].tzinfo is not None
        assert e["identifiers"] and all(isinstance(v, str) for v in e["identifiers"].values())
        assert isinstance(e["properties"], dict)
        assert (e["amount"] is None) == (e["currency"] is None)
        assert e["amount"] is None or isinstance(e["amount"], Decimal)
    assert len({e["event_key"] for e in events}) == len(events)


def test_time_ordered_at_the_configured_rate(events: list[dict[str, Any]]) -> None:
    times = [e["occurred_at"] for e in events]
    assert times == sorted(times)
    span = (times[-1] - times[0]).total_seconds()
    assert 0.9 * len(events) < span < 1.1 * len(events)  # rate 1/s


def test_properties_are_realistic(events: list[dict[str, Any]]) -> None:
    by_type: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_type.setdefault(e["event_type"], []).append(e)
    pages = {e["properties"]["page"] for e in by_type["page_view"]}
    assert pages == {"home", "deposit", "markets", "asset"}
    assets = {e["properties"]["asset"] for e in by_type["asset_view"]}
    assert {"EURUSD", "BTCUSD", "XAUUSD", "TSLA"} <= assets
    statuses = Counter(e["properties"]["status"] for e in by_type["deposit_attempt"])
    assert statuses["success"] > statuses["failed"] > 0
    for trade in by_type["trade"]:
        p = trade["properties"]
        assert p["side"] in ("buy", "sell") and p["volume"] > 0 and p["amount"] > 0
    utilization = [e["properties"]["utilization"] for e in by_type["margin_update"]]
    assert all(0 <= u <= 1.2 for u in utilization)
    assert any(u > 0.95 for u in utilization), "some traders must be under margin stress"
    assert all("exposure_usd" in e["properties"] for e in by_type["margin_update"])
    tiers = {e["properties"].get("tier") for e in by_type["identify"]}
    assert {"bronze", "silver", "gold", "platinum"} <= tiers
    consent = by_type["consent_updated"][0]["properties"]
    assert set(consent) == {"email", "sms", "push", "ads"}
    assert all(isinstance(v, bool) for v in consent.values())


def test_currencies_and_amounts(events: list[dict[str, Any]]) -> None:
    money = [e for e in events if e["amount"] is not None]
    assert {"USD", "EUR", "GBP", "JPY", "AUD"} <= {e["currency"] for e in money}
    for e in money:
        assert e["currency"] == "USD" or e["currency"] in FX_USD_PER_UNIT
        if e["currency"] == "JPY":
            assert e["amount"] == e["amount"].to_integral_value()
    deposits = [e for e in money if e["event_type"] == "deposit"]
    usd = [_usd(e) for e in deposits]
    assert min(usd) >= 50 and max(usd) <= 200_000
    jpy = [e["amount"] for e in deposits if e["currency"] == "JPY"]
    assert jpy and min(jpy) >= 10_000  # yen amounts are in yen, not dollars
    large_first = [
        e
        for e, amount in zip(deposits, usd, strict=True)
        if e["properties"]["first_deposit"] and amount >= 20_000
    ]
    assert large_first, "a few traders start with a large first deposit"


def test_anonymous_sessions_log_in_and_merge(events: list[dict[str, Any]]) -> None:
    crm_seen: set[str] = set()
    anon_without_crm: set[str] = set()
    merges = 0
    for e in events:
        ids = e["identifiers"]
        anon = ids.get("anonymous_id")
        crm = ids.get("crm_id")
        if anon and crm and anon in anon_without_crm and crm in crm_seen:
            merges += 1  # a known trader's anonymous profile gets absorbed
        if anon and not crm:
            anon_without_crm.add(anon)
        if crm:
            crm_seen.add(crm)
    assert merges >= 10


def test_sessions_have_realistic_gaps(events: list[dict[str, Any]]) -> None:
    last: dict[str, datetime] = {}
    gaps: list[float] = []
    for e in events:
        crm = e["identifiers"].get("crm_id")
        if crm is None:
            continue
        if crm in last:
            gaps.append((e["occurred_at"] - last[crm]).total_seconds())
        last[crm] = e["occurred_at"]
    within = [g for g in gaps if g <= 1800]
    between = [g for g in gaps if g > 1800]
    assert len(within) > 5 * len(between) > 0  # mostly in-session, with real breaks
    assert sorted(within)[len(within) // 2] < 120  # in-session clicks are close together


def test_deterministic_per_seed() -> None:
    def take(seed: int) -> list[dict[str, Any]]:
        return list(TraderFeed(seed=seed, profiles=50).events(2000))

    assert take(11) == take(11)
    assert take(11) != take(12)
    feed = TraderFeed(seed=11, profiles=50)
    assert list(feed.events(700)) + list(feed.events(1300)) == take(11)


def test_large_population_is_cheap() -> None:
    feed = TraderFeed(seed=1, profiles=1_000_000, rate=500.0)
    crm_ids = {e["identifiers"].get("crm_id") for e in feed.events(20_000)}
    assert len(crm_ids) > 2000
    assert sum(1 for _ in TraderFeed(seed=1, profiles=1000).crm_import()) == 2000


def test_fx_rates_precede_the_feed() -> None:
    feed = TraderFeed(seed=1)
    rows = list(feed.fx_rates())
    assert {c for c, _, _ in rows} == set(FX_USD_PER_UNIT) == {"EUR", "GBP", "JPY", "AUD"}
    assert all(valid_from <= feed.start - timedelta(days=1) for _, valid_from, _ in rows)


@pytest.mark.parametrize(("seed", "history"), [(0, True), (1, True), (2, True), (0, False)])
def test_scenarios_show_up_within_two_minutes(seed: int, history: bool) -> None:
    feed = TraderFeed(seed, profiles=500, start=DEMO_START, rate=20.0)
    past = feed.history() if history else []
    stream = list(feed.events(TWO_MINUTES))
    found = _patterns(past + stream)
    for segment, positions in found.items():
        live = [n - len(past) for n in positions if n >= len(past)]
        assert live, f"no {segment} pattern in the first two minutes"
        # Well within: the first one comes in the first half on these seeds.
        assert stream[live[0]]["occurred_at"] - DEMO_START < timedelta(seconds=90), segment


def test_scenarios_play_out(events: list[dict[str, Any]]) -> None:
    """Margin calls end in closed positions, a deposit or continued exposure; abandoned
    deposits mostly stay abandoned; large first deposits come in several currencies."""
    found = _patterns(events)
    assert all(len(v) >= 10 for v in found.values()), {k: len(v) for k, v in found.items()}
    outcomes: Counter[str] = Counter()
    for n in found["margin_call_risk"]:
        crm = events[n]["identifiers"]["crm_id"]
        after = [
            e["event_type"]
            for e in events[n + 1 : n + 400]
            if e["identifiers"].get("crm_id") == crm
            and e["event_type"] in ("positions_closed", "deposit", "margin_update")
        ]
        outcomes[after[0] if after else "none"] += 1
    assert outcomes["positions_closed"] > 0 and outcomes["deposit"] > 0
    assert outcomes["margin_update"] + outcomes["none"] > 0  # still exposed
    large = {events[n]["currency"] for n in found["high_value_onboarding"]}
    assert len(large) >= 3


def test_history_backdates_the_existing_clients() -> None:
    feed = TraderFeed(seed=4, profiles=300, start=DEMO_START)
    past = feed.history()
    times = [e["occurred_at"] for e in past]
    assert times == sorted(times)
    assert times[0] >= DEMO_START - timedelta(days=9)
    assert times[-1] < DEMO_START - timedelta(hours=5)
    existing = {feed.trader(i)["crm_id"] for i in range(300) if feed.trader(i)["existing"]}
    imported = {
        e["identifiers"]["crm_id"]
        for e in past
        if e["event_type"] == "identify" and e["occurred_at"] == times[0]
    }
    assert imported == existing
    funded = {e["identifiers"]["crm_id"] for e in past if e["event_type"] == "deposit"}
    assert len(funded) > 0.6 * len(existing)
    last_login: dict[str, datetime] = {}
    for e in past:
        if e["event_type"] == "login":
            last_login[e["identifiers"]["crm_id"]] = e["occurred_at"]
    quiet = [c for c, at in last_login.items() if at < DEMO_START - timedelta(days=7)]
    assert 0.05 * len(existing) < len(quiet) < 0.3 * len(existing)  # inactive_7d material
    # The stream goes on from `start` and knows the imported clients: no second CRM sync.
    stream = list(feed.events(3000))
    assert min(e["occurred_at"] for e in stream) >= DEMO_START
    assert not any(
        e["event_type"] == "identify" and e["source"] == "crm" and "name" in e["properties"]
        for e in stream
    )
    assert len({e["event_key"] for e in past + stream}) == len(past) + len(stream)


def test_history_is_deterministic() -> None:
    def take(seed: int) -> list[dict[str, Any]]:
        feed = TraderFeed(seed=seed, profiles=60, start=DEMO_START)
        return feed.history() + list(feed.events(500))

    assert take(3) == take(3)
    assert take(3) != take(4)
    with pytest.raises(ValueError, match="8 days"):
        TraderFeed(profiles=10).history(days=2)


def test_trader_offset_brings_other_people() -> None:
    base = TraderFeed(seed=1, profiles=520)
    later = TraderFeed(seed=1, profiles=20, trader_offset=500)
    assert later.trader(0) == base.trader(500)
    assert later.trader(0)["crm_id"] == "C-0000501"
    events = list(later.events(3000))
    crm_ids = {e["identifiers"]["crm_id"] for e in events if "crm_id" in e["identifiers"]}
    assert crm_ids <= {f"C-{n:07d}" for n in range(501, 521)}
    anonymous = {e["identifiers"].get("anonymous_id") for e in events} - {None}
    earlier = {e["identifiers"].get("anonymous_id") for e in TraderFeed(1, 20).events(3000)}
    assert anonymous and not anonymous & earlier


def _count(conn: psycopg.Connection[Any], query: str, *params: Any) -> int:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return int(row[0])


def test_copy_and_insert_store_the_feed(conn: psycopg.Connection[Any]) -> None:
    start = datetime.now(UTC) - timedelta(hours=3)
    feed = TraderFeed(seed=3, profiles=150, start=start, rate=0.5)
    assert load_fx_rates(conn, feed) == 8
    assert load_fx_rates(conn, feed) == 0  # already there
    events = list(feed.events(3000))  # about 100 minutes, all in the past

    assert copy_rows(conn, events[:2000], chunk_size=700) == 2000
    assert insert_rows(conn, events[2000:], chunk_size=400) == 1000
    assert _count(conn, "SELECT count(*) FROM segflow.events") == 3000
    # Re-sending the same (source, event_key) pairs stores nothing.
    copy_rows(conn, events[:500])
    assert _count(conn, "SELECT count(*) FROM segflow.events") == 3000

    money = [e for e in events if e["amount"] is not None]
    assert _count(
        conn, "SELECT count(*) FROM segflow.events WHERE amount IS NOT NULL AND amount_usd > 0"
    ) == len(money)
    row = conn.execute(
        "SELECT amount, currency, amount_usd FROM segflow.events"
        " WHERE currency = 'EUR' ORDER BY event_id LIMIT 1"
    ).fetchone()
    assert row is not None
    latest = {currency: rate for currency, _, rate in feed.fx_rates()}  # the revision wins
    assert row[2] == row[0] * latest["EUR"]

    # Anonymous browsing followed by a login of a known trader merged into the trader.
    merged = 0
    for e in events:
        ids = e["identifiers"]
        if e["event_type"] != "login" or "anonymous_id" not in ids:
            continue
        profiles = {
            r[0]
            for r in conn.execute(
                "SELECT profile_id FROM segflow.identities"
                " WHERE (kind, value) IN (('anonymous_id', %s), ('crm_id', %s))",
                (ids["anonymous_id"], ids["crm_id"]),
            )
        }
        assert len(profiles) == 1
        anon_events = {
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT profile_id FROM segflow.events WHERE identifiers @> %s",
                (psycopg.types.json.Jsonb({"anonymous_id": ids["anonymous_id"]}),),
            )
        }
        assert anon_events == profiles
        merged += 1
    assert merged > 0

    # identify and consent_updated events became traits.
    synced = next(e for e in events if e["event_type"] == "identify" and e["source"] == "crm")
    row = conn.execute(
        "SELECT p.traits FROM segflow.profiles p JOIN segflow.identities i USING (profile_id)"
        " WHERE i.kind = 'crm_id' AND i.value = %s",
        (synced["identifiers"]["crm_id"],),
    ).fetchone()
    assert row is not None
    assert row[0]["country"] == synced["properties"]["country"]
    assert isinstance(row[0]["consent"]["email"], bool)
    tiers = {
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT traits->>'tier' FROM segflow.profiles WHERE traits ? 'tier'"
        )
    }
    assert len(tiers) >= 3


def test_demo_streams_into_the_database(db_url: str, conn: psycopg.Connection[Any]) -> None:
    from rich.console import Console

    from segflow.db import connect
    from segflow.demo import run_demo
    from segflow.install import apply
    from segflow.paths import EXAMPLES_DIR

    def install() -> None:
        with connect(db_url) as own:
            apply(own, [EXAMPLES_DIR / "segments"])

    summary = run_demo(db_url, rate=40.0, duration=3.0, seed=5, profiles=100, install=install,
                       console=Console(quiet=True))
    # Paced by the feed's clock: exactly the events of the first 3 s, about 40/s.
    assert summary.elapsed == 3.0 and 80 < summary.events < 160
    assert summary.history > 300
    stored = _count(conn, "SELECT count(*) FROM segflow.events")
    assert stored == summary.events + summary.history
    assert summary.profiles > 0 and summary.dead_letters == 0
    latest = conn.execute("SELECT max(occurred_at) - segflow.now() FROM segflow.events").fetchone()
    assert latest is not None and latest[0] <= timedelta(0)  # paced by the engine's clock
    # The view knows every segment and its members (the history funded most clients).
    assert set(summary.segments) >= {"margin_call_risk", "funded", "engaged", "hot_lead"}
    funded = _count(conn, "SELECT member_count FROM segflow.segment_catalog WHERE name = 'funded'")
    assert summary.segments["funded"].members == funded > 30
    # Installed after the history: the scheduled segment was backfilled over it too.
    # (Tier changes in the stream wait for the hourly refresh.)
    backfilled = _count(conn, "SELECT count(*) FROM segflow.transitions"
                              " WHERE segment = 'gold_traders' AND reason = 'backfill'")
    assert backfilled > 0 and summary.segments["gold_traders"].members > 0
    # Transitions are read back from the ledger, after the history's.
    assert len(summary.recent) == min(summary.transitions, summary.recent.maxlen or 0)
    ids = [t.transition_id for t in summary.recent]
    assert ids == sorted(ids)
