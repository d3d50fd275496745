"""Campaign rules applied when deliveries are claimed (CONTRACT §7): frequency caps per profile
and channel, priority between deliveries competing for the cap, de-duplication. Sent through
the real worker to a receiver on loopback; every skipped delivery keeps its row and reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from tests import test_delivery
from tests.helpers import at, event, install, profile_of, tick
from tests.test_delivery import (
    SETTLED,
    T0,
    Receiver,
    deliveries,
    destination,
    wait_for,
    workers,
)

Conn = psycopg.Connection[Any]
# The loopback receiver and the signing secret of the delivery tests.
receiver = test_delivery.receiver
_secret = test_delivery._secret
CAP_1_PER_DAY = {"max": 1, "per": "24h"}


def segment(name: str, rule: Any, *actions: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "rule": rule, "actions": list(actions)}


def enter(dest: str, **extra: Any) -> dict[str, Any]:
    return {"on": "enter", "destination": dest, **extra}


def capped(url: str, cap: dict[str, Any] = CAP_1_PER_DAY, channel: str = "email",
           name: str = "promo") -> dict[str, Any]:
    return destination(url, name=name, channel=channel, frequency_cap=cap)


def outcomes(conn: Conn) -> list[tuple[str, str, str, str, str | None]]:
    """(crm_id, segment, destination, status, skip_reason) of every delivery, in order."""
    rows = conn.execute(
        "SELECT i.value, sd.name, d.destination, d.status, d.skip_reason"
        " FROM segflow.deliveries d JOIN segflow.segment_defs sd USING (segment_id)"
        " JOIN segflow.identities i ON i.profile_id = d.profile_id AND i.kind = 'crm_id'"
        " ORDER BY d.delivery_id").fetchall()
    return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]


def delivered_count(conn: Conn) -> int:
    row = conn.execute(
        "SELECT count(*) FROM segflow.deliveries WHERE status = 'delivered'").fetchone()
    assert row is not None
    return int(row[0])


def shift_sent_back(conn: Conn, interval: str) -> None:
    """Pretends the messages sent so far went out `interval` earlier."""
    conn.execute("UPDATE segflow.deliveries SET delivered_at = delivered_at - %s::interval"
                 " WHERE status = 'delivered'", (interval,))


def test_apply_stores_caps_and_dedup_windows(conn: Conn, tmp_path: Path,
                                             receiver: Receiver) -> None:
    at(conn, T0)
    install(conn, tmp_path, extra={
        "promo": destination(receiver.url, name="promo", channel="email",
                             frequency_cap={"max": 2, "per": "12h"}, dedup_window="30m"),
        "hook": destination(receiver.url, name="hook", dedup_window=False)})
    rows = conn.execute("SELECT name, cap_max, cap_per::text, dedup_window::text"
                        " FROM segflow.destinations ORDER BY name").fetchall()
    assert rows == [("account_review", None, None, "01:00:00"),
                    ("acquisition_ads", None, None, "01:00:00"),
                    ("hook", None, None, None),
                    ("promo", 2, "12:00:00", "00:30:00")]


def test_frequency_cap_counts_every_message_on_the_channel(
    db_url: str, conn: Conn, tmp_path: Path, receiver: Receiver,
) -> None:
    at(conn, T0)
    install(conn, tmp_path, extra={
        "promo": capped(receiver.url),
        "alerts": destination(receiver.url, name="alerts", channel="email"),
        "hook": destination(receiver.url, name="hook"),
        "depositors": segment("depositors", {"events": "deposit"}, enter("promo")),
        "traders": segment("traders", {"events": "trade"}, enter("promo"), enter("hook")),
        "logins": segment("logins", {"events": "login"}, enter("alerts")),
        "viewers": segment("viewers", {"events": "page_view"}, enter("promo")),
        "tickets": segment("tickets", {"events": "ticket_opened"}, enter("promo"))})
    with workers(db_url):
        event(conn, "deposit", T0, "C-1", amount=5, currency="USD")
        wait_for(conn, SETTLED)
        # A second email the same day is capped; the webhook channel has its own count,
        # and another trader has their own cap.
        event(conn, "trade", T0, "C-1")
        event(conn, "trade", T0, "C-2")
        wait_for(conn, SETTLED)
        assert outcomes(conn) == [
            ("C-1", "depositors", "promo", "delivered", None),
            ("C-1", "traders", "promo", "skipped", "suppressed_frequency_cap"),
            ("C-1", "traders", "hook", "delivered", None),
            ("C-2", "traders", "promo", "delivered", None),
            ("C-2", "traders", "hook", "delivered", None)]

        # A day later the cap has room again, but an uncapped email (an alert) fills it:
        # the trader still got an email today.
        shift_sent_back(conn, "25 hours")
        event(conn, "login", T0, "C-1")
        wait_for(conn, SETTLED)
        event(conn, "page_view", T0, "C-1")
        wait_for(conn, SETTLED)
        shift_sent_back(conn, "25 hours")
        event(conn, "ticket_opened", T0, "C-1")
        wait_for(conn, SETTLED)
    assert outcomes(conn)[5:] == [
        ("C-1", "logins", "alerts", "delivered", None),
        ("C-1", "viewers", "promo", "skipped", "suppressed_frequency_cap"),
        ("C-1", "tickets", "promo", "delivered", None)]
    assert len(receiver.requests) == delivered_count(conn) == 6


def test_priority_decides_between_deliveries_due_together(
    db_url: str, conn: Conn, tmp_path: Path, receiver: Receiver,
) -> None:
    at(conn, T0)
    install(conn, tmp_path, extra={
        "promo": capped(receiver.url, {"max": 2, "per": "24h"}),
        "low": segment("low", {"events": "deposit"}, enter("promo", priority=1)),
        "unranked": segment("unranked", {"events": "trade"}, enter("promo")),
        "high": segment("high", {"events": "login"}, enter("promo", priority=10)),
        "vip": segment("vip", {"events": "page_view"}, enter("promo", priority=100))})
    # Three entries (in arrival order low, unranked, high) wait for the worker together:
    # the two slots of the cap go to the two highest priorities.
    event(conn, "deposit", T0, "C-1", amount=5, currency="USD")
    event(conn, "trade", T0, "C-1")
    event(conn, "login", T0, "C-1")
    with workers(db_url):
        wait_for(conn, SETTLED)
        assert outcomes(conn) == [
            ("C-1", "low", "promo", "delivered", None),
            ("C-1", "unranked", "promo", "skipped", "suppressed_priority"),
            ("C-1", "high", "promo", "delivered", None)]
        # A message already sent cannot be recalled: a later delivery of even higher
        # priority finds the cap full.
        event(conn, "page_view", T0, "C-1")
        wait_for(conn, SETTLED)
    assert outcomes(conn)[3] == ("C-1", "vip", "promo", "skipped", "suppressed_frequency_cap")
    assert len(receiver.requests) == 2


def test_a_tie_is_decided_by_arrival_and_recorded_as_the_cap(
    db_url: str, conn: Conn, tmp_path: Path, receiver: Receiver,
) -> None:
    at(conn, T0)
    install(conn, tmp_path, extra={
        "promo": capped(receiver.url, channel="sms"),
        "first": segment("first", {"events": "deposit"}, enter("promo", priority=5)),
        "second": segment("second", {"events": "trade"}, enter("promo", priority=5))})
    event(conn, "deposit", T0, "C-1", amount=5, currency="USD")
    event(conn, "trade", T0, "C-1")
    with workers(db_url):
        wait_for(conn, SETTLED)
    assert outcomes(conn) == [("C-1", "first", "promo", "delivered", None),
                              ("C-1", "second", "promo", "skipped", "suppressed_frequency_cap")]


def test_a_retried_delivery_keeps_its_place_under_the_cap(
    db_url: str, conn: Conn, tmp_path: Path, receiver: Receiver,
) -> None:
    at(conn, T0)
    install(conn, tmp_path, extra={
        "promo": capped(receiver.url),
        "depositors": segment("depositors", {"events": "deposit"}, enter("promo")),
        "vip": segment("vip", {"events": "login"}, enter("promo", priority=100))})
    event(conn, "deposit", T0, "C-1", amount=5, currency="USD")
    # A worker claims it and its attempt fails: it waits for a retry, holding its slot.
    [claimed] = conn.execute("SELECT profile_id, delivery_id, attempts"
                             " FROM segflow.claim_deliveries(10)").fetchall()
    conn.execute("SELECT segflow.delivery_failed(%s, %s, %s, 'HTTP 503', interval '0 s')",
                 claimed)
    event(conn, "login", T0, "C-1")
    with workers(db_url):
        wait_for(conn, SETTLED)
    assert outcomes(conn) == [("C-1", "depositors", "promo", "delivered", None),
                              ("C-1", "vip", "promo", "skipped", "suppressed_frequency_cap")]
    assert [r["attempts"] for r in deliveries(conn)] == [2, 0]


def test_consent_is_checked_again_on_a_retry(
    db_url: str, conn: Conn, tmp_path: Path, receiver: Receiver,
) -> None:
    at(conn, T0)
    install(conn, tmp_path, extra={
        "promo": capped(receiver.url),
        "depositors": segment("depositors", {"events": "deposit"}, enter("promo"))})
    event(conn, "deposit", T0, "C-1", amount=5, currency="USD")
    [claimed] = conn.execute("SELECT profile_id, delivery_id, attempts"
                             " FROM segflow.claim_deliveries(10)").fetchall()
    conn.execute("SELECT segflow.delivery_failed(%s, %s, %s, 'HTTP 503', interval '0 s')",
                 claimed)
    event(conn, "consent_updated", T0, "C-1", properties={"email": False})
    with workers(db_url):
        wait_for(conn, SETTLED)
    assert outcomes(conn) == [("C-1", "depositors", "promo", "skipped", "suppressed_consent")]
    assert receiver.requests == []


def test_a_repeat_of_the_last_message_is_a_duplicate(
    db_url: str, conn: Conn, tmp_path: Path, receiver: Receiver,
) -> None:
    at(conn, T0)
    active = {"events": "login", "within": "10m"}
    install(conn, tmp_path, extra={
        "hook": destination(receiver.url, name="hook"),  # default window: 1h
        "always": destination(receiver.url, name="always", dedup_window=False),
        "mirror": destination(receiver.url, name="mirror"),
        "active": segment("active", active, enter("hook"), enter("always"), enter("mirror"),
                          {"on": "exit", "destination": "mirror"})})
    with workers(db_url):
        event(conn, "login", T0, "C-1")
        wait_for(conn, SETTLED)
        tick(conn, "2026-12-03T10:10:00Z")  # the login leaves the window: exit
        at(conn, "2026-12-03T10:20:00Z")
        event(conn, "login", "2026-12-03T10:20:00Z", "C-1")  # back in
        wait_for(conn, SETTLED + " AND (SELECT count(*) FROM segflow.deliveries) = 7")
        # The same enter again: `hook` got nothing new to say; `mirror` heard the exit in
        # between, so this enter is news to it.
        assert outcomes(conn)[4:] == [
            ("C-1", "active", "hook", "skipped", "suppressed_duplicate"),
            ("C-1", "active", "always", "delivered", None),
            ("C-1", "active", "mirror", "delivered", None)]

        # Outside the window, the repeat is sent.
        shift_sent_back(conn, "2 hours")
        tick(conn, "2026-12-03T10:30:00Z")
        at(conn, "2026-12-03T10:40:00Z")
        event(conn, "login", "2026-12-03T10:40:00Z", "C-1")
        wait_for(conn, SETTLED + " AND (SELECT count(*) FROM segflow.deliveries) = 11")
    assert outcomes(conn)[8] == ("C-1", "active", "hook", "delivered", None)
    assert len(receiver.requests) == delivered_count(conn) == 10


def test_duplicates_waiting_together_are_sent_once(
    db_url: str, conn: Conn, tmp_path: Path, receiver: Receiver,
) -> None:
    at(conn, T0)
    install(conn, tmp_path, extra={
        "hook": destination(receiver.url, name="hook"),
        "active": segment("active", {"events": "login", "within": "10m"}, enter("hook"))})
    event(conn, "login", T0, "C-1")
    tick(conn, "2026-12-03T10:10:00Z")
    at(conn, "2026-12-03T10:20:00Z")
    event(conn, "login", "2026-12-03T10:20:00Z", "C-1")
    with workers(db_url):
        wait_for(conn, SETTLED)
    assert [r[3:] for r in outcomes(conn)] == [("delivered", None),
                                               ("skipped", "suppressed_duplicate")]
    assert len(receiver.requests) == 1


def test_two_workers_never_exceed_a_cap(db_url: str, conn: Conn, tmp_path: Path,
                                        receiver: Receiver) -> None:
    receiver.delay = 0.01
    at(conn, T0)
    install(conn, tmp_path, extra={
        "promo": capped(receiver.url),
        **{name: segment(name, {"events": kind}, enter("promo"))
           for name, kind in (("a", "deposit"), ("b", "trade"), ("c", "login"))}})
    with workers(db_url, 2, concurrency=4):
        # Each trader's three entries commit in separate transactions while the workers
        # run, so they are judged by whichever worker claims them first.
        for kind in ("deposit", "trade", "login"):
            conn.execute(
                "INSERT INTO segflow.events (event_type, occurred_at, identifiers, amount,"
                " currency) SELECT %s, %s, jsonb_build_object('crm_id', 'C-' || i), 5, 'USD'"
                " FROM generate_series(1, 30) i", (kind, T0))
        wait_for(conn, SETTLED + " AND (SELECT count(*) FROM segflow.deliveries) = 90",
                 timeout=60)
    rows = deliveries(conn)
    sent = [r["profile_id"] for r in rows if r["status"] == "delivered"]
    assert sorted(sent) == sorted({r["profile_id"] for r in rows}) and len(sent) == 30
    assert {r["skip_reason"] for r in rows if r["status"] == "skipped"} == {
        "suppressed_frequency_cap"}
    assert len(receiver.requests) == 30
    assert profile_of(conn, "C-1") in sent


def test_a_profile_and_channel_is_judged_by_one_claim_at_a_time(
    db_url: str, conn: Conn, tmp_path: Path, receiver: Receiver,
) -> None:
    at(conn, T0)
    install(conn, tmp_path, extra={
        "promo": capped(receiver.url),
        "depositors": segment("depositors", {"events": "deposit"}, enter("promo")),
        "traders": segment("traders", {"events": "trade"}, enter("promo"))})
    event(conn, "deposit", T0, "C-1", amount=5, currency="USD")
    with psycopg.connect(db_url) as first:
        # One worker's claim, not committed yet: its row is on its way.
        assert len(first.execute("SELECT * FROM segflow.claim_deliveries(10)").fetchall()) == 1
        event(conn, "trade", T0, "C-1")
        # Another worker cannot see that decision yet, so it leaves the trader's email
        # deliveries alone instead of sending a second one.
        claim = "SELECT count(*) FROM segflow.claim_deliveries(10)"
        assert conn.execute(claim).fetchone() == (0,)
        assert [r[3] for r in outcomes(conn)] == ["pending", "pending"]
        first.commit()
    assert conn.execute(claim).fetchone() == (0,)
    assert [r[3:] for r in outcomes(conn)] == [("sending", None),
                                               ("skipped", "suppressed_frequency_cap")]
