"""The seed scenarios of a trading desk, each with a controlled clock (CONTRACT §4–6)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from tests.helpers import at, event, install, members, profile_of, tick, transitions


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_margin_call_risk_enters_exactly_four_hours_after_the_last_deposit(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    at(conn, "2026-12-03 08:00:00+00")
    install(conn, tmp_path, "margin_call_risk")
    event(conn, "identify", "2026-12-03 08:00:00+00", "C-1", properties={"tier": "gold"})
    event(conn, "deposit", "2026-12-03 08:00:00+00", "C-1", amount=1000, currency="USD")
    at(conn, "2026-12-03 09:00:00+00")
    event(conn, "margin_update", "2026-12-03 09:00:00+00", "C-1",
          properties={"utilization": 0.97, "exposure_usd": 25000})
    trader = profile_of(conn, "C-1")
    assert members(conn, "margin_call_risk") == set()

    # A late tick still records the exact instant the deposit left the 4 h window.
    assert tick(conn, "2026-12-03 12:00:30+00") == 1
    assert transitions(conn, "margin_call_risk", trader) == [
        ("enter", ts("2026-12-03 12:00:00"), "tick")]
    row = conn.execute("SELECT exposure_usd, tier FROM segments.margin_call_risk "
                       "WHERE profile_id = %s", (trader,)).fetchone()
    assert row is not None and float(row[0]) == 25000 and row[1] == "gold"

    at(conn, "2026-12-03 12:10:00+00")
    event(conn, "positions_closed", "2026-12-03 12:10:00+00", "C-1")
    assert members(conn, "margin_call_risk") == set()
    assert transitions(conn, "margin_call_risk", trader)[-1] == (
        "exit", ts("2026-12-03 12:10:00"), "event")


def test_margin_call_risk_leaves_when_the_margin_reading_gets_too_old(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    at(conn, "2026-12-03 08:00:00+00")
    install(conn, tmp_path, "margin_call_risk")
    event(conn, "identify", "2026-12-03 08:00:00+00", "C-2", properties={"tier": "platinum"})
    event(conn, "margin_update", "2026-12-03 08:00:00+00", "C-2",
          properties={"utilization": 0.99, "exposure_usd": 1})
    trader = profile_of(conn, "C-2")
    assert members(conn, "margin_call_risk") == {trader}
    tick(conn, "2026-12-03 13:00:00+00")
    assert transitions(conn, "margin_call_risk", trader) == [
        ("enter", ts("2026-12-03 08:00:00"), "event"),
        ("exit", ts("2026-12-03 12:00:00"), "tick"),
    ]


def test_hot_lead_three_views_of_one_asset_in_a_session_then_the_session_ends(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    at(conn, "2026-12-03 10:00:00+00")
    install(conn, tmp_path, "hot_lead")
    event(conn, "identify", "2026-12-03 10:00:00+00", "C-3", properties={"tier": "gold"})
    for minute in (1, 10, 25):
        when = f"2026-12-03 10:{minute:02d}:00+00"
        at(conn, when)
        event(conn, "asset_view", when, "C-3", properties={"asset": "XAUUSD"})
    trader = profile_of(conn, "C-3")
    assert members(conn, "hot_lead") == {trader}
    row = conn.execute("SELECT asset, views FROM segments.hot_lead").fetchone()
    assert row == ("XAUUSD", 3)
    # The session ends 30 minutes after its last event.
    tick(conn, "2026-12-03 11:30:00+00")
    assert transitions(conn, "hot_lead", trader) == [
        ("enter", ts("2026-12-03 10:25:00"), "event"),
        ("exit", ts("2026-12-03 10:55:00"), "tick"),
    ]


def test_hot_lead_needs_the_same_asset(conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    at(conn, "2026-12-03 10:00:00+00")
    install(conn, tmp_path, "hot_lead")
    event(conn, "identify", "2026-12-03 10:00:00+00", "C-4", properties={"tier": "gold"})
    for minute, asset in ((1, "EURUSD"), (2, "EURUSD"), (3, "BTCUSD")):
        when = f"2026-12-03 10:{minute:02d}:00+00"
        at(conn, when)
        event(conn, "asset_view", when, "C-4", properties={"asset": asset})
    assert members(conn, "hot_lead") == set()


def test_deposit_abandoned(conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    at(conn, "2026-12-03 10:00:00+00")
    install(conn, tmp_path, "deposit_abandoned")
    event(conn, "deposit", "2026-12-03 09:40:00+00", "C-5", amount=50, currency="USD")
    event(conn, "page_view", "2026-12-03 10:00:00+00", "C-5", properties={"page": "deposit"})
    at(conn, "2026-12-03 10:05:00+00")
    event(conn, "page_view", "2026-12-03 10:05:00+00", "C-5", properties={"page": "deposit"})
    trader = profile_of(conn, "C-5")
    # The deposit at 09:40 is still within 30 minutes: not abandoned yet.
    assert members(conn, "deposit_abandoned") == set()
    tick(conn, "2026-12-03 10:20:00+00")
    # In at 10:10 (deposit left the 30 m window), out at 10:10 too? No: the first view
    # leaves the 10 m window at 10:10 as well, so it never became a member.
    assert transitions(conn, "deposit_abandoned", trader) == []

    at(conn, "2026-12-03 11:00:00+00")
    event(conn, "page_view", "2026-12-03 11:00:00+00", "C-5", properties={"page": "deposit"})
    at(conn, "2026-12-03 11:04:00+00")
    event(conn, "page_view", "2026-12-03 11:04:00+00", "C-5", properties={"page": "deposit"})
    assert members(conn, "deposit_abandoned") == {trader}
    row = conn.execute("SELECT deposit_page_views FROM segments.deposit_abandoned").fetchone()
    assert row == (2,)
    at(conn, "2026-12-03 11:06:00+00")
    event(conn, "deposit", "2026-12-03 11:06:00+00", "C-5", amount=500, currency="USD")
    assert transitions(conn, "deposit_abandoned", trader) == [
        ("enter", ts("2026-12-03 11:04:00"), "event"),
        ("exit", ts("2026-12-03 11:06:00"), "event"),
    ]


def test_inactive_7d_enters_at_the_exact_instant_and_leaves_on_login(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    at(conn, "2026-11-20 09:15:00.5+00")
    install(conn, tmp_path, "inactive_7d")
    event(conn, "login", "2026-11-20 09:15:00.5+00", "C-6")
    trader = profile_of(conn, "C-6")
    assert tick(conn, "2026-11-27 09:15:00.499999+00") == 0
    assert tick(conn, "2026-11-28 00:00:00+00") == 1
    at(conn, "2026-11-29 08:00:00+00")
    event(conn, "login", "2026-11-29 08:00:00+00", "C-6")
    assert transitions(conn, "inactive_7d", trader) == [
        ("enter", ts("2026-11-27 09:15:00.5"), "tick"),
        ("exit", ts("2026-11-29 08:00:00"), "event"),
    ]


def test_high_value_onboarding_any_currency(conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    at(conn, "2026-12-03 10:00:00+00")
    conn.execute("INSERT INTO segflow.fx_rates VALUES ('EUR', '2026-01-01', 1.10)")
    install(conn, tmp_path, "high_value_onboarding")
    event(conn, "deposit", "2026-12-03 10:00:00+00", "C-7", amount=9500, currency="EUR")
    event(conn, "deposit", "2026-12-03 10:00:00+00", "C-8", amount=9000, currency="EUR")
    big, small = profile_of(conn, "C-7"), profile_of(conn, "C-8")
    assert members(conn, "high_value_onboarding") == {big}
    row = conn.execute("SELECT first_deposit_usd, currency FROM segments.high_value_onboarding"
                       ).fetchone()
    assert row is not None and float(row[0]) == 10450 and row[1] == "EUR"
    # A second deposit means it is no longer the first one.
    at(conn, "2026-12-03 10:01:00+00")
    event(conn, "deposit", "2026-12-03 10:01:00+00", "C-7", amount=20000, currency="USD")
    assert members(conn, "high_value_onboarding") == set()
    assert small not in members(conn, "high_value_onboarding")


def test_engaged_drops_out_at_the_computed_instant(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    at(conn, "2026-12-01 00:00:00+00")
    install(conn, tmp_path, "engaged", "engagement.score")
    # Score 30 (a deposit and four trades) at midnight; it halves every 3 days, so it
    # reaches 20 when 30 * 2^(-t/3d) = 20.
    event(conn, "deposit", "2026-12-01 00:00:00+00", "C-9", amount=10, currency="USD")
    for _ in range(4):
        event(conn, "trade", "2026-12-01 00:00:00+00", "C-9")
    trader = profile_of(conn, "C-9")
    assert members(conn, "engaged") == {trader}
    tick(conn, "2026-12-05 00:00:00+00")
    expected = ts("2026-12-01 00:00:00") + timedelta(days=3 * math.log2(30 / 20))
    kinds = transitions(conn, "engaged", trader)
    assert [k for k, _, _ in kinds] == ["enter", "exit"]
    assert abs((kinds[1][1] - expected).total_seconds()) < 1e-5
    # At the recorded instant the score is already below 20, a microsecond earlier not.
    score_at = conn.execute(
        "SELECT 30 * power(2::float8, -extract(epoch FROM (%s - %s::timestamptz))::float8 "
        "/ 259200)", (kinds[1][1], ts("2026-12-01 00:00:00"))).fetchone()
    assert score_at is not None and score_at[0] < 20


def test_segment_of_segments_combines_a_scheduled_and_a_realtime_segment(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    at(conn, "2026-12-03 09:10:00+00")
    event(conn, "identify", "2026-12-03 09:00:00+00", "C-10", properties={"tier": "gold"})
    install(conn, tmp_path, "gold_traders", "margin_call_risk", "gold_and_at_risk")
    trader = profile_of(conn, "C-10")
    assert members(conn, "gold_traders") == {trader}
    # A margin spike: realtime membership at once, and the combination with it.
    at(conn, "2026-12-03 09:20:00+00")
    event(conn, "margin_update", "2026-12-03 09:20:00+00", "C-10",
          properties={"utilization": 0.98, "exposure_usd": 5})
    assert members(conn, "margin_call_risk") == {trader}
    assert members(conn, "gold_and_at_risk") == {trader}
    # Demoted to silver: margin_call_risk (gold or platinum) and the combination follow at
    # once; the scheduled segment only notices at the next full hour.
    at(conn, "2026-12-03 09:30:00+00")
    event(conn, "identify", "2026-12-03 09:30:00+00", "C-10", properties={"tier": "silver"})
    assert members(conn, "gold_and_at_risk") == set()
    assert members(conn, "gold_traders") == {trader}
    # A trader promoted to gold at risk now: in the combination only once gold_traders
    # refreshes, at the first tick at or after 10:00.
    at(conn, "2026-12-03 09:40:00+00")
    event(conn, "identify", "2026-12-03 09:40:00+00", "C-14", properties={"tier": "gold"})
    event(conn, "margin_update", "2026-12-03 09:40:00+00", "C-14",
          properties={"utilization": 0.99, "exposure_usd": 7})
    promoted = profile_of(conn, "C-14")
    assert members(conn, "margin_call_risk") == {promoted}
    assert members(conn, "gold_and_at_risk") == set()
    tick(conn, "2026-12-03 09:59:59+00")
    assert members(conn, "gold_traders") == {trader}
    tick(conn, "2026-12-03 10:00:00.2+00")
    assert members(conn, "gold_traders") == {promoted}
    assert members(conn, "gold_and_at_risk") == {promoted}
    assert transitions(conn, "gold_traders", trader)[-1] == (
        "exit", ts("2026-12-03 10:00:00.2"), "scheduled_refresh")
    assert transitions(conn, "gold_and_at_risk", promoted) == [
        ("enter", ts("2026-12-03 10:00:00.2"), "tick")]


def test_anonymous_visitor_merges_into_known_trader_and_is_evaluated_as_one(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    at(conn, "2026-12-03 10:00:00+00")
    install(conn, tmp_path, "hot_lead")
    event(conn, "identify", "2026-12-02 10:00:00+00", "C-11", properties={"tier": "gold"})
    known = profile_of(conn, "C-11")
    anon = {"anonymous_id": "anon-1"}
    for minute in (1, 2):
        when = f"2026-12-03 10:{minute:02d}:00+00"
        at(conn, when)
        event(conn, "asset_view", when, "", identifiers=anon, properties={"asset": "TSLA"})
    visitor = conn.execute("SELECT profile_id FROM segflow.identities WHERE value = 'anon-1'"
                           ).fetchone()
    assert visitor is not None and visitor[0] != known
    # Login: the visitor is merged into the known gold trader; their third view makes
    # three views of one asset in one session for the merged profile.
    at(conn, "2026-12-03 10:03:00+00")
    event(conn, "login", "2026-12-03 10:03:00+00", "C-11",
          identifiers={"anonymous_id": "anon-1", "crm_id": "C-11"})
    at(conn, "2026-12-03 10:04:00+00")
    event(conn, "asset_view", "2026-12-03 10:04:00+00", "C-11", properties={"asset": "TSLA"})
    assert members(conn, "hot_lead") == {known}
    merged = conn.execute("SELECT merged_into FROM segflow.profiles WHERE profile_id = %s",
                          (visitor[0],)).fetchone()
    assert merged == (known,)


def test_removed_segment_exits_its_members_and_changed_one_records_differences(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    at(conn, "2026-12-03 10:00:00+00")
    event(conn, "deposit", "2026-12-03 09:00:00+00", "C-12", amount=50, currency="USD")
    event(conn, "deposit", "2026-12-03 09:00:00+00", "C-13", amount=5000, currency="USD")
    plan = install(conn, tmp_path, "funded")
    assert plan.new == ["funded"]
    small, big = profile_of(conn, "C-12"), profile_of(conn, "C-13")
    assert transitions(conn, "funded", small) == [("enter", ts("2026-12-03 10:00:00"),
                                                   "backfill")]
    assert install(conn, tmp_path, "funded").unchanged == ["funded"]

    at(conn, "2026-12-03 10:05:00+00")
    changed = {"name": "funded", "rule": {"events": {"event": "deposit",
                                                      "where": {"amount_usd": {"gte": 100}}}}}
    plan = install(conn, tmp_path, extra={"funded": changed})
    assert plan.changed == ["funded"]
    assert members(conn, "funded") == {big}
    assert transitions(conn, "funded", small)[-1] == ("exit", ts("2026-12-03 10:05:00"),
                                                      "definition_changed")
    version = conn.execute("SELECT version FROM segflow.segment_catalog WHERE name = 'funded'"
                           ).fetchone()
    assert version == (2,)

    plan = install(conn, tmp_path)
    assert plan.removed == ["funded"]
    assert transitions(conn, "funded", big)[-1] == ("exit", ts("2026-12-03 10:05:00"),
                                                    "segment_removed")
    view = conn.execute("SELECT to_regclass('segments.funded')").fetchone()
    assert view == (None,)
