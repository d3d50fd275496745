"""Ad suppression audiences (`channel: ads`): a trader entering a segment whose action targets
an ads destination joins the audience at once and leaves it on exit, through the
`segflow.ad_suppression` view (pull) and the destination's webhooks (push). Audience
updates are not messages: no frequency cap, priority or de-duplication applies to them."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner

from compiler.errors import DefinitionError, DefinitionErrors
from compiler.parse import build_project, parse_document
from segflow.cli import app
from segflow.paths import EXAMPLES_DIR
from tests import test_delivery
from tests.helpers import at, event, install, profile_of, tick
from tests.test_delivery import SETTLED, T0, Receiver, deliveries, destination, wait_for, workers

Conn = psycopg.Connection[Any]
receiver = test_delivery.receiver
_secret = test_delivery._secret


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def audience(url: str, name: str = "audience") -> dict[str, Any]:
    return destination(url, name=name, channel="ads")


def segment(name: str, rule: Any, *actions: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "rule": rule, "actions": list(actions)}


def view(conn: Conn) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT profile_id, audience, segment, since, crm_id, email_sha256,"
                        " phone_sha256 FROM segflow.ad_suppression"
                        " ORDER BY profile_id, segment").fetchall()


def sent(receiver: Receiver) -> list[tuple[str, str, int]]:
    """(kind, segment, profile_id) of every request, in arrival order."""
    docs = [json.loads(body) for _, body in receiver.requests]
    return [(d["kind"], d["segment"], d["profile_id"]) for d in docs]


def test_a_converted_trader_joins_at_once_and_leaves_on_exit(
    db_url: str, conn: Conn, tmp_path: Path, receiver: Receiver,
) -> None:
    at(conn, T0)
    install(conn, tmp_path, extra={
        "audience": audience(receiver.url),
        "recent": segment("recent", {"events": "deposit", "within": "1d"},
                          {"on": "enter", "destination": "audience"})})
    event(conn, "identify", T0, "C-1", identifiers={
        "crm_id": "C-1", "email": " Ann.Lee@Example.COM ", "phone": "+44 7700 900123"})
    event(conn, "deposit", T0, "C-1", amount=500, currency="USD")
    trader = profile_of(conn, "C-1")
    # In the view as soon as the deposit commits, with identifiers hashed for matching.
    assert view(conn) == [(trader, "audience", "recent", datetime.fromisoformat(T0), "C-1",
                           [sha256("ann.lee@example.com")], [sha256("+447700900123")])]
    with workers(db_url):
        wait_for(conn, SETTLED)
        assert sent(receiver) == [("enter", "recent", trader)]
        # The deposit leaves the window: out of the audience, and the platform is told.
        tick(conn, "2026-12-04T10:00:00Z")
        assert view(conn) == []
        wait_for(conn, SETTLED + " AND (SELECT count(*) FROM segflow.deliveries) = 2")
    assert sent(receiver) == [("enter", "recent", trader), ("exit", "recent", trader)]
    assert [(r["kind"], r["status"]) for r in deliveries(conn)] == [
        ("enter", "delivered"), ("exit", "delivered")]


def test_audience_updates_are_not_rationed_like_messages(
    db_url: str, conn: Conn, tmp_path: Path, receiver: Receiver,
) -> None:
    at(conn, T0)
    promo = destination(receiver.url, name="promo", channel="email",
                        frequency_cap={"max": 1, "per": "24h"})
    docs: dict[str, Any] = {"audience": audience(receiver.url), "promo": promo}
    for priority, (name, kind) in enumerate((("a", "deposit"), ("b", "trade"), ("c", "login"))):
        docs[name] = segment(name, {"events": kind},
                             {"on": "enter", "destination": "audience"},
                             {"on": "enter", "destination": "promo", "priority": priority})
    docs["browsing"] = segment("browsing", {"events": "page_view", "within": "10m"},
                               {"on": "enter", "destination": "audience"})
    install(conn, tmp_path, extra=docs)
    event(conn, "deposit", T0, "C-1", amount=5, currency="USD")
    event(conn, "trade", T0, "C-1")
    event(conn, "login", T0, "C-1")
    # In, out and back in within minutes: each is an audience change.
    event(conn, "page_view", T0, "C-1")
    tick(conn, "2026-12-03T10:10:00Z")
    at(conn, "2026-12-03T10:20:00Z")
    event(conn, "page_view", "2026-12-03T10:20:00Z", "C-1")
    with workers(db_url):
        wait_for(conn, SETTLED)
    rows = conn.execute(
        "SELECT d.destination, sd.name, d.kind, d.status, d.skip_reason"
        " FROM segflow.deliveries d JOIN segflow.segment_defs sd USING (segment_id)"
        " ORDER BY d.destination, d.delivery_id").fetchall()
    assert rows == [
        ("audience", "a", "enter", "delivered", None),
        ("audience", "b", "enter", "delivered", None),
        ("audience", "c", "enter", "delivered", None),
        ("audience", "browsing", "enter", "delivered", None),
        ("audience", "browsing", "exit", "delivered", None),
        ("audience", "browsing", "enter", "delivered", None),
        ("promo", "a", "enter", "skipped", "suppressed_priority"),
        ("promo", "b", "enter", "skipped", "suppressed_priority"),
        ("promo", "c", "enter", "delivered", None)]


def test_consent_to_ads_gates_joining_but_never_leaving(
    db_url: str, conn: Conn, tmp_path: Path, receiver: Receiver,
) -> None:
    at(conn, T0)
    install(conn, tmp_path, extra={
        "audience": audience(receiver.url),
        "recent": segment("recent", {"events": "deposit", "within": "1d"},
                          {"on": "enter", "destination": "audience"})})
    event(conn, "consent_updated", T0, "C-2", properties={"ads": False})
    for crm in ("C-1", "C-2"):
        event(conn, "deposit", T0, crm, amount=5, currency="USD")
    c1, c2 = profile_of(conn, "C-1"), profile_of(conn, "C-2")
    assert [r[0] for r in view(conn)] == [c1]
    with workers(db_url):
        wait_for(conn, SETTLED)
        # C-1 withdraws consent while in the audience: pulled audiences drop them at once,
        # and their exit still reaches the platform (removing data needs no consent).
        event(conn, "consent_updated", T0, "C-1", properties={"ads": False})
        assert view(conn) == []
        tick(conn, "2026-12-04T10:00:00Z")
        wait_for(conn, SETTLED + " AND (SELECT count(*) FROM segflow.deliveries) = 4")
    outcome = {(r["profile_id"], r["kind"]): (r["status"], r["skip_reason"])
               for r in deliveries(conn)}
    assert outcome == {(c1, "enter"): ("delivered", None), (c1, "exit"): ("delivered", None),
                       (c2, "enter"): ("skipped", "suppressed_consent"),
                       (c2, "exit"): ("skipped", "suppressed_consent")}
    assert sent(receiver) == [("enter", "recent", c1), ("exit", "recent", c1)]


def test_removing_a_segment_empties_its_audience_but_messages_nobody(
    conn: Conn, tmp_path: Path, receiver: Receiver,
) -> None:
    at(conn, T0)
    dests = {"audience": audience(receiver.url), "hook": destination(receiver.url)}
    install(conn, tmp_path, extra={**dests, "recent": segment(
        "recent", {"events": "deposit"}, {"on": "enter", "destination": "audience"},
        {"on": "exit", "destination": "hook"})})
    event(conn, "deposit", T0, "C-1", amount=5, currency="USD")
    install(conn, tmp_path, extra=dests)
    rows = conn.execute("SELECT d.destination, d.kind, t.reason FROM segflow.deliveries d"
                        " JOIN segflow.transition_log t USING (profile_id, transition_id)"
                        " ORDER BY d.delivery_id").fetchall()
    assert rows == [("audience", "enter", "event"), ("audience", "exit", "segment_removed")]
    assert conn.execute("SELECT count(*) FROM segflow.segment_actions").fetchone() == (0,)
    assert view(conn) == []


@pytest.mark.parametrize(("doc", "path", "message"), [
    ({"frequency_cap": {"max": 1, "per": "1d"}}, "frequency_cap",
     "an ads destination is an audience, not messages: it takes no frequency_cap"),
    ({"on": "exit"}, "actions[0].on",
     "audience is an ads audience: use on: enter (members are removed from the audience when "
     "they exit)"),
    ({"priority": 3}, "actions[0].priority",
     "audience is an ads audience: priority does not apply (audience membership is never "
     "suppressed by other segments)"),
])
def test_rules_that_make_no_sense_for_an_audience_are_refused(
    doc: dict[str, Any], path: str, message: str,
) -> None:
    dest = {**audience("http://127.0.0.1:9/"),
            **{k: v for k, v in doc.items() if k == "frequency_cap"}}
    action = {"on": "enter", "destination": "audience",
              **{k: v for k, v in doc.items() if k != "frequency_cap"}}
    with pytest.raises((DefinitionError, DefinitionErrors)) as info:
        build_project([parse_document(dest, "audience.yaml"),
                       parse_document(segment("s", {"events": "deposit"}, action), "s.yaml")])
    assert f": {path}: {message}" in str(info.value)


def test_the_examples_apply_and_keep_funded_traders_out_of_acquisition_ads(
    db_url: str, conn: Conn, monkeypatch: pytest.MonkeyPatch,
) -> None:
    at(conn, T0)
    event(conn, "identify", T0, "C-1", identifiers={"crm_id": "C-1", "email": "a@example.com"},
          properties={"country": "DE"})
    event(conn, "deposit", T0, "C-1", amount=100, currency="USD")
    monkeypatch.setenv("SEGFLOW_DATABASE_URL", db_url)
    monkeypatch.setenv("PGOPTIONS", f"-c segflow.clock={T0}")
    result = CliRunner().invoke(app, ["apply", str(EXAMPLES_DIR / "segments")])
    assert result.exit_code == 0, result.output
    c1 = profile_of(conn, "C-1")
    # Traders funded before the install are in the audience too (pulled, and pushed since
    # the action includes the backfill).
    assert [r[:3] + r[4:6] for r in view(conn)] == [
        (c1, "acquisition_ads", "funded", "C-1", [sha256("a@example.com")])]
    event(conn, "deposit", T0, "C-2", amount=100, currency="USD")
    rows = conn.execute("SELECT profile_id, kind, payload FROM segflow.deliveries"
                        " WHERE destination = 'acquisition_ads' ORDER BY delivery_id").fetchall()
    payload = {"audience": "acquisition_suppression",
               "country": "{{ profile.country | default('') }}"}
    assert rows == [(c1, "enter", payload), (profile_of(conn, "C-2"), "enter", payload)]
