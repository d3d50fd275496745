"""Payload templates of segment actions: checked by `segflow apply`, rendered in a jinja2
sandbox by the worker at send time; a template that fails on the data is a dead letter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner

from segflow.cli import app
from tests import test_delivery
from tests.helpers import at, event, install, profile_of
from tests.test_delivery import SETTLED, T0, Receiver, deliveries, destination, wait_for, workers

Conn = psycopg.Connection[Any]
receiver = test_delivery.receiver
_secret = test_delivery._secret


def depositors(payload: Any, name: str = "depositors") -> dict[str, Any]:
    return {"name": name, "rule": {"events": "deposit"},
            "context": {"deposit_usd": {"last": "deposit", "field": "amount_usd"}},
            "actions": [{"on": "enter", "destination": "hook", "payload": payload}]}


def test_templates_see_the_transition_context_and_profile(
    db_url: str, conn: Conn, tmp_path: Path, receiver: Receiver,
) -> None:
    at(conn, T0)
    payload = {
        "subject": "Thanks {{ profile.first_name | default('trader') }}!",
        "lines": ["{{ segment }}/{{ kind }} #{{ transition.transition_id }}",
                  "{{ '%.2f' | format(context.deposit_usd) }} USD, tier {{ profile.tier }}",
                  "{% if profile.tier == 'gold' %}gold desk{% else %}standard{% endif %}"],
        "static": {"campaign": "w1", "weight": 2.5, "enabled": True}}
    install(conn, tmp_path, extra={"hook": destination(receiver.url),
                                   "depositors": depositors(payload),
                                   "sms": depositors("Hi {{ profile.first_name }}", "sms")})
    event(conn, "identify", T0, "C-1", properties={"tier": "gold", "first_name": "Ann"})
    event(conn, "identify", T0, "C-2", properties={"tier": "silver", "first_name": "Bo"})
    event(conn, "deposit", T0, "C-1", amount=1234.5, currency="USD")
    with workers(db_url):
        wait_for(conn, SETTLED)
    bodies = {(b["profile_id"], b["segment"]): b for b in
              (json.loads(body) for _, body in receiver.requests)}
    c1 = profile_of(conn, "C-1")
    first = bodies[(c1, "depositors")]
    assert first["payload"] == {
        "subject": "Thanks Ann!",
        "lines": [f"depositors/enter #{first['transition_id']}", "1234.50 USD, tier gold",
                  "gold desk"],
        "static": {"campaign": "w1", "weight": 2.5, "enabled": True}}
    assert bodies[(c1, "sms")]["payload"] == "Hi Ann"
    # The stored row keeps the template: a replay renders it again on the data of the day.
    assert {r["payload"]["subject"] if isinstance(r["payload"], dict) else r["payload"]
            for r in deliveries(conn)} == {"Thanks {{ profile.first_name | default('trader') }}!",
                                           "Hi {{ profile.first_name }}"}


def test_a_template_failing_on_the_data_is_a_dead_letter(
    db_url: str, conn: Conn, tmp_path: Path, receiver: Receiver,
) -> None:
    at(conn, T0)
    install(conn, tmp_path, extra={
        "hook": destination(receiver.url),
        "greet": depositors({"text": "Hi {{ profile.first_name }}"}, "greet"),
        "escape": depositors("{{ profile.__class__.__mro__ }}", "escape"),
        "ratio": depositors("{{ context.deposit_usd / 0 }}", "ratio")})
    event(conn, "identify", T0, "C-2", properties={"first_name": "Bo"})
    for crm in ("C-1", "C-2"):
        event(conn, "deposit", T0, crm, amount=5, currency="USD")
    with workers(db_url) as running:
        wait_for(conn, SETTLED)
        assert all(w.sent > 0 for w in running)  # the worker lived on
    rows = {(r["profile_id"], r["segment_id"]): r for r in deliveries(conn)}
    ids = dict(conn.execute("SELECT name, segment_id FROM segflow.segment_defs").fetchall())
    c1, c2 = profile_of(conn, "C-1"), profile_of(conn, "C-2")
    missing = rows[(c1, ids["greet"])]
    assert (missing["status"], missing["attempts"]) == ("dead", 1)
    assert missing["last_error"] == ("payload template: text: UndefinedError: 'dict object'"
                                     " has no attribute 'first_name'")
    assert rows[(c2, ids["greet"])]["status"] == "delivered"
    escape = rows[(c1, ids["escape"])]
    assert escape["status"] == "dead" and "SecurityError" in escape["last_error"]
    assert "ZeroDivisionError" in rows[(c1, ids["ratio"])]["last_error"]
    assert [json.loads(b)["payload"] for _, b in receiver.requests] == [{"text": "Hi Bo"}]


@pytest.mark.parametrize(("template", "message"), [
    ("Hi {{ profile.first_name ", "actions[0].payload.subject: template syntax error on line 1"),
    ("{% if kind %}x", "actions[0].payload.subject: template syntax error on line 1"),
    ("Hi {{ profle.first_name }}", "actions[0].payload.subject: unknown template variable "
                                   "profle; available: transition, segment, kind"),
])
def test_apply_rejects_a_broken_template(db_url: str, conn: Conn, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, template: str,
                                         message: str) -> None:
    monkeypatch.setenv("SEGFLOW_DATABASE_URL", db_url)
    folder = tmp_path / "defs"
    folder.mkdir()
    (folder / "hook.json").write_text(json.dumps(destination("http://127.0.0.1:9/")))
    path = folder / "depositors.json"
    path.write_text(json.dumps(depositors({"subject": template})))
    result = CliRunner().invoke(app, ["apply", str(folder)])
    assert result.exit_code == 1
    assert f"{path}: {message}" in result.output.replace("\n", "")
    assert conn.execute("SELECT count(*) FROM segflow.segment_defs").fetchone() == (0,)
