"""Delivery of segment actions (CONTRACT §7): destinations and actions stored by `apply`, one
delivery row per transition and matching action, the worker against a real HTTP receiver on
loopback (signature, retries, dead letters and replay, consent, several workers at once)."""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from typer.testing import CliRunner

from api.worker import DeliveryWorker, RetryPolicy, leader_tick_loop, run_worker
from segflow.cli import app
from segflow.paths import EXAMPLES_DIR
from tests.helpers import at, event, install, profile_of

Conn = psycopg.Connection[Any]
SECRET = "s3cret-for-tests"
T0 = "2026-12-03T10:00:00+00:00"

Reply = tuple[int, dict[str, str]]


@dataclass
class Receiver:
    """Records every POST; `reply(n)` answers the n-th request (1-based)."""

    url: str
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    reply: Callable[[int], Reply] = lambda n: (200, {})
    delay: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def keys(self) -> list[str]:
        return [h["x-segflow-delivery"] for h, _ in self.requests]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with state.lock:
                state.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                n = len(state.requests)
            time.sleep(state.delay)
            status, headers = state.reply(n)
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGFLOW_TEST_HOOK_SECRET", SECRET)


def destination(url: str, *, name: str = "hook", channel: str = "webhook",
                **extra: Any) -> dict[str, Any]:
    return {"destination": name, "url": url, "secret": {"env": "SEGFLOW_TEST_HOOK_SECRET"},
            "channel": channel, "timeout": "2s", **extra}


def depositors(*actions: dict[str, Any], name: str = "depositors") -> dict[str, Any]:
    return {"name": name, "rule": {"events": "deposit"}, "actions": list(actions)}


def setup(conn: Conn, tmp_path: Path, receiver: Receiver, *segments: dict[str, Any],
          **dest: Any) -> None:
    at(conn, T0)
    docs = {"hook": destination(receiver.url, **dest)}
    docs.update({s["name"]: s for s in segments})
    install(conn, tmp_path, extra=docs)


def deliveries(conn: Conn) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return list(cur.execute("SELECT * FROM segflow.deliveries ORDER BY delivery_id"))


@contextmanager
def workers(db_url: str, n: int = 1, **options: Any) -> Iterator[list[DeliveryWorker]]:
    options = {"poll_interval": 0.1, "retry": RetryPolicy(base=0.05, cap=0.2), **options}
    stop = threading.Event()
    running = [DeliveryWorker(db_url, **options) for _ in range(n)]
    threads = [threading.Thread(target=w.run, args=(stop,), daemon=True) for w in running]
    for thread in threads:
        thread.start()
    try:
        yield running
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)


def wait_for(conn: Conn, condition: str, timeout: float = 15.0) -> None:
    """Waits until the SQL boolean `condition` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = conn.execute(f"SELECT {condition}").fetchone()
        if row and row[0]:
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {condition}: {deliveries(conn)}")


SETTLED = ("NOT EXISTS (SELECT FROM segflow.deliveries"
           " WHERE status IN ('pending', 'sending'))")


# --- apply ---------------------------------------------------------------------------------


def test_apply_stores_destinations_and_actions(conn: Conn, tmp_path: Path,
                                               receiver: Receiver) -> None:
    action = {"on": "enter", "destination": "hook", "priority": 5,
              "payload": {"template": "welcome"}}
    setup(conn, tmp_path, receiver, depositors(action, {"on": "exit", "destination": "hook"}),
          max_attempts=3)
    rows = conn.execute(
        "SELECT name, url, channel, secret_env, timeout, max_attempts, active"
        " FROM segflow.destinations ORDER BY name").fetchall()
    assert [r[0] for r in rows] == ["account_review", "acquisition_ads", "hook"]
    assert rows[2][1:] == (receiver.url, "webhook", "SEGFLOW_TEST_HOOK_SECRET",
                           timedelta(seconds=2), 3, True)
    actions = conn.execute(
        "SELECT on_kind, destination, priority, payload, include_backfill"
        " FROM segflow.segment_actions ORDER BY position").fetchall()
    assert actions == [("enter", "hook", 5, {"template": "welcome"}, False),
                       ("exit", "hook", None, None, False)]

    # The destination gone from the set is deactivated; the segment's actions are replaced.
    install(conn, tmp_path, extra={"seg": depositors({"on": "exit",
                                                      "destination": "account_review"})})
    assert conn.execute("SELECT name, active FROM segflow.destinations ORDER BY name"
                        ).fetchall() == [("account_review", True), ("acquisition_ads", True),
                                         ("hook", False)]
    assert conn.execute("SELECT on_kind, destination FROM segflow.segment_actions"
                        ).fetchall() == [("exit", "account_review")]


def test_backfill_fires_only_actions_that_ask_for_it(conn: Conn, tmp_path: Path,
                                                      receiver: Receiver) -> None:
    at(conn, T0)
    event(conn, "deposit", "2026-12-03T09:00:00Z", "C-1", amount=10, currency="USD")
    setup(conn, tmp_path, receiver,
          depositors({"on": "enter", "destination": "hook"}, name="quiet"),
          depositors({"on": "enter", "destination": "hook", "include_backfill": True},
                     name="loud"))
    rows = conn.execute("SELECT d.name, t.reason FROM segflow.deliveries x"
                        " JOIN segflow.segment_defs d USING (segment_id)"
                        " JOIN segflow.transition_log t USING (profile_id, transition_id)"
                        ).fetchall()
    assert rows == [("loud", "backfill")]
    # Live transitions fire both.
    event(conn, "deposit", "2026-12-03T09:30:00Z", "C-2", amount=10, currency="USD")
    assert conn.execute("SELECT count(*) FROM segflow.deliveries").fetchone() == (3,)


# --- the worker ----------------------------------------------------------------------------


def test_a_transition_is_delivered_once_and_signed(db_url: str, conn: Conn, tmp_path: Path,
                                                   receiver: Receiver) -> None:
    setup(conn, tmp_path, receiver,
          depositors({"on": "enter", "destination": "hook", "payload": {"campaign": "w1"}},
                     {"on": "exit", "destination": "hook"}))
    event(conn, "identify", "2026-12-03T09:00:00Z", "C-1", properties={"tier": "gold"})
    event(conn, "deposit", "2026-12-03T09:10:00Z", "C-1", amount=500, currency="USD")
    profile = profile_of(conn, "C-1")
    [row] = deliveries(conn)
    assert (row["status"], row["destination"], row["profile_id"]) == ("pending", "hook", profile)

    with workers(db_url):
        wait_for(conn, SETTLED)
    [row] = deliveries(conn)
    assert (row["status"], row["attempts"]) == ("delivered", 1)
    [(headers, body)] = receiver.requests
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["x-segflow-signature"] == expected
    assert headers["x-segflow-delivery"] == row["delivery_key"]
    doc = json.loads(body)
    assert doc["transition_id"] == row["transition_id"]
    assert (doc["segment"], doc["profile_id"], doc["kind"]) == ("depositors", profile, "enter")
    # Membership changes when the event is ingested, at the engine clock.
    assert doc["effective_at"].startswith("2026-12-03T10:00:00")
    assert doc["profile"]["tier"] == "gold"
    assert doc["payload"] == {"campaign": "w1"}
    assert doc["context"] == {}


def test_server_errors_are_retried_with_the_same_key(db_url: str, conn: Conn, tmp_path: Path,
                                                     receiver: Receiver) -> None:
    receiver.reply = lambda n: (500, {}) if n == 1 else (429, {"Retry-After": "0"}) \
        if n == 2 else (200, {})
    setup(conn, tmp_path, receiver, depositors({"on": "enter", "destination": "hook"}))
    event(conn, "deposit", "2026-12-03T09:10:00Z", "C-1", amount=5, currency="USD")
    with workers(db_url):
        wait_for(conn, SETTLED)
    [row] = deliveries(conn)
    assert (row["status"], row["attempts"], row["last_error"]) == ("delivered", 3, None)
    assert receiver.keys() == [row["delivery_key"]] * 3


def test_a_failing_receiver_ends_in_dead_letter_and_retry_replays_it(
    db_url: str, conn: Conn, tmp_path: Path, receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failing = True
    receiver.reply = lambda n: (503, {}) if failing else (204, {})
    setup(conn, tmp_path, receiver, depositors({"on": "enter", "destination": "hook"}),
          max_attempts=3)
    event(conn, "deposit", "2026-12-03T09:10:00Z", "C-1", amount=5, currency="USD")
    with workers(db_url):
        wait_for(conn, SETTLED)
        [row] = deliveries(conn)
        assert (row["status"], row["attempts"]) == ("dead", 3)
        assert row["last_error"].startswith("HTTP 503")

        failing = False
        monkeypatch.setenv("SEGFLOW_DATABASE_URL", db_url)
        result = CliRunner().invoke(app, ["deliveries", "retry", "--all-dead"])
        assert result.exit_code == 0, result.output
        assert "1 deliveries queued again" in result.output
        wait_for(conn, SETTLED)
    [row] = deliveries(conn)
    assert (row["status"], row["attempts"]) == ("delivered", 1)
    assert receiver.keys() == [row["delivery_key"]] * 4

    result = CliRunner().invoke(app, ["deliveries", "retry", str(row["delivery_id"])])
    assert result.exit_code == 1 and "is not dead" in result.output


def test_a_client_error_is_a_dead_letter_at_once(db_url: str, conn: Conn, tmp_path: Path,
                                                 receiver: Receiver) -> None:
    receiver.reply = lambda n: (400, {})
    setup(conn, tmp_path, receiver, depositors({"on": "enter", "destination": "hook"}))
    event(conn, "deposit", "2026-12-03T09:10:00Z", "C-1", amount=5, currency="USD")
    with workers(db_url):
        wait_for(conn, SETTLED)
    [row] = deliveries(conn)
    assert (row["status"], row["attempts"]) == ("dead", 1)


def test_consent_false_is_suppressed(db_url: str, conn: Conn, tmp_path: Path,
                                     receiver: Receiver) -> None:
    setup(conn, tmp_path, receiver, depositors({"on": "enter", "destination": "hook"}),
          channel="email")
    event(conn, "consent_updated", "2026-12-03T09:00:00Z", "C-1", properties={"email": False})
    event(conn, "consent_updated", "2026-12-03T09:00:00Z", "C-2", properties={"sms": False})
    for crm in ("C-1", "C-2"):
        event(conn, "deposit", "2026-12-03T09:10:00Z", crm, amount=5, currency="USD")
    with workers(db_url):
        wait_for(conn, SETTLED)
    rows = {r["profile_id"]: (r["status"], r["skip_reason"], r["attempts"])
            for r in deliveries(conn)}
    assert rows == {profile_of(conn, "C-1"): ("skipped", "suppressed_consent", 0),
                    profile_of(conn, "C-2"): ("delivered", None, 1)}
    assert len(receiver.requests) == 1


def test_two_workers_never_send_a_delivery_twice(db_url: str, conn: Conn, tmp_path: Path,
                                                 receiver: Receiver) -> None:
    receiver.delay = 0.01
    setup(conn, tmp_path, receiver, depositors({"on": "enter", "destination": "hook"}))
    conn.execute(
        "INSERT INTO segflow.events (event_type, occurred_at, identifiers, amount, currency)"
        " SELECT 'deposit', '2026-12-03T09:10:00Z', jsonb_build_object('crm_id', 'C-' || i),"
        " 5, 'USD' FROM generate_series(1, 60) i")
    with workers(db_url, 2, concurrency=4) as running:
        wait_for(conn, SETTLED, timeout=30)
    keys = Counter(receiver.keys())
    assert len(keys) == 60 and set(keys.values()) == {1}
    assert {r["status"] for r in deliveries(conn)} == {"delivered"}
    assert sum(w.sent for w in running) == 60
    assert all(w.sent > 0 for w in running)


def test_late_commit_with_a_smaller_transition_id_is_delivered(
    db_url: str, conn: Conn, tmp_path: Path, receiver: Receiver,
) -> None:
    setup(conn, tmp_path, receiver, depositors({"on": "enter", "destination": "hook"}))
    with workers(db_url), psycopg.connect(db_url) as slow:
        at(slow, T0)
        event(slow, "deposit", "2026-12-03T09:10:00Z", "C-1", amount=5, currency="USD")
        event(conn, "deposit", "2026-12-03T09:10:00Z", "C-2", amount=5, currency="USD")
        wait_for(conn, "EXISTS (SELECT FROM segflow.deliveries WHERE status = 'delivered')")
        slow.commit()  # its transition id is smaller, yet it becomes visible later
        wait_for(conn, SETTLED + " AND (SELECT count(*) FROM segflow.deliveries) = 2")
    ids = [json.loads(body)["transition_id"] for _, body in receiver.requests]
    assert len(ids) == 2 and ids[0] > ids[1]


def test_a_claim_whose_worker_died_is_taken_over(db_url: str, conn: Conn, tmp_path: Path,
                                                 receiver: Receiver) -> None:
    setup(conn, tmp_path, receiver, depositors({"on": "enter", "destination": "hook"}),
          timeout="1s")
    event(conn, "deposit", "2026-12-03T09:10:00Z", "C-1", amount=5, currency="USD")
    # A worker claims it and dies before sending.
    [claimed] = conn.execute("SELECT delivery_key, attempts FROM segflow.claim_deliveries("
                             "10, interval '0 seconds')").fetchall()
    assert claimed[1] == 1
    with workers(db_url):
        wait_for(conn, SETTLED)
    [row] = deliveries(conn)
    assert (row["status"], row["attempts"]) == ("delivered", 2)
    assert receiver.keys() == [claimed[0]]


def test_only_one_worker_ticks(db_url: str) -> None:
    stop = threading.Event()
    ticks: list[Counter[str]] = [Counter(), Counter()]
    threads = [threading.Thread(
        target=leader_tick_loop, args=(db_url, stop, 0.05),
        kwargs={"on_tick": lambda n, c=c: c.update(["tick"])}, daemon=True) for c in ticks]
    for thread in threads:
        thread.start()
    time.sleep(0.6)
    stop.set()
    for thread in threads:
        thread.join(timeout=5)
    counts = sorted(c["tick"] for c in ticks)
    assert counts[0] == 0 and counts[1] > 3


def test_the_example_receiver_accepts_signed_deliveries(
    db_url: str, conn: Conn, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    spec = importlib.util.spec_from_file_location(
        "webhook_receiver", EXAMPLES_DIR / "webhook_receiver.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    server = module.make_server("127.0.0.1", 0, SECRET.encode())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
        bad = httpx.post(url, content=b"{}", headers={"X-Segflow-Signature": "00"})
        assert bad.status_code == 401
        setup(conn, tmp_path, Receiver(url), depositors({"on": "enter", "destination": "hook"}))
        event(conn, "deposit", "2026-12-03T09:10:00Z", "C-1", amount=5, currency="USD")
        with workers(db_url):
            wait_for(conn, SETTLED)
    finally:
        server.shutdown()
        server.server_close()
    assert [r["status"] for r in deliveries(conn)] == ["delivered"]
    assert "enter depositors profile" in capsys.readouterr().out


def test_run_worker_delivers_and_stops(db_url: str, conn: Conn, tmp_path: Path,
                                       receiver: Receiver) -> None:
    setup(conn, tmp_path, receiver, depositors({"on": "enter", "destination": "hook"}))
    event(conn, "deposit", "2026-12-03T09:10:00Z", "C-1", amount=5, currency="USD")
    stop = threading.Event()
    thread = threading.Thread(target=run_worker, args=(db_url, stop),
                              kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        wait_for(conn, SETTLED)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert [r["status"] for r in deliveries(conn)] == ["delivered"]


def test_apply_without_destinations_deactivates_them_all(conn: Conn, tmp_path: Path) -> None:
    from segflow.install import _store_destinations

    conn.execute("INSERT INTO segflow.destinations (name, url, channel, secret_env, definition)"
                 " VALUES ('old', 'http://127.0.0.1:1/', 'sms', 'X', '{}')")
    _store_destinations(conn, [])
    assert conn.execute("SELECT active FROM segflow.destinations").fetchall() == [(False,)]


def test_a_slow_receiver_does_not_hold_back_other_results(
    db_url: str, conn: Conn, tmp_path: Path, receiver: Receiver
) -> None:
    release = threading.Event()

    def reply(n: int) -> Reply:
        if n == 1:  # the first request hangs until the test lets it go
            release.wait(10)
        return (200, {})

    receiver.reply = reply
    setup(conn, tmp_path, receiver, depositors({"on": "enter", "destination": "hook"}),
          timeout="10s")
    for trader in ("C-1", "C-2", "C-3"):
        event(conn, "deposit", "2026-12-03T09:10:00Z", trader, amount=5, currency="USD")
    try:
        with workers(db_url):
            # Two deliveries are recorded while the third send is still waiting.
            wait_for(conn, "(SELECT count(*) = 2 FROM segflow.deliveries"
                           " WHERE status = 'delivered')")
            assert [r["status"] for r in deliveries(conn)].count("sending") == 1
            release.set()
            wait_for(conn, SETTLED)
    finally:
        release.set()
    assert [r["status"] for r in deliveries(conn)] == ["delivered"] * 3


def test_a_timed_out_attempt_is_retried_with_the_same_key(
    db_url: str, conn: Conn, tmp_path: Path, receiver: Receiver
) -> None:
    def reply(n: int) -> Reply:
        if n == 1:  # answers only after the destination's 1 s timeout
            time.sleep(1.5)
        return (200, {})

    receiver.reply = reply
    setup(conn, tmp_path, receiver, depositors({"on": "enter", "destination": "hook"}),
          timeout="1s")
    event(conn, "deposit", "2026-12-03T09:10:00Z", "C-1", amount=5, currency="USD")
    with workers(db_url):
        wait_for(conn, SETTLED)
    [row] = deliveries(conn)
    assert (row["status"], row["attempts"], row["last_error"]) == ("delivered", 2, None)
    assert receiver.keys() == [row["delivery_key"]] * 2


def test_null_context_values_reach_the_receiver(db_url: str, conn: Conn, tmp_path: Path,
                                               receiver: Receiver) -> None:
    segment = depositors({"on": "enter", "destination": "hook"})
    segment["context"] = {"method": {"last": "deposit", "field": "properties.method"}}
    setup(conn, tmp_path, receiver, segment)
    event(conn, "deposit", "2026-12-03T09:10:00Z", "C-1", amount=5, currency="USD")
    with workers(db_url):
        wait_for(conn, SETTLED)
    [(_, body)] = receiver.requests
    doc = json.loads(body)
    assert doc["context"] == {"method": None}
    assert "payload" not in doc
