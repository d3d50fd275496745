"""`segflow worker` as real processes: one killed with SIGKILL in the middle of a delivery and
restarted loses nothing and re-sends only under the same X-Segflow-Delivery key; two running
at once never have the same delivery in flight twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.helpers import event
from tests.test_delivery import SECRET, SETTLED, deliveries, depositors, setup, wait_for
from tests.test_delivery import Receiver as Destination

Conn = psycopg.Connection[Any]
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Receiver:
    """A loopback webhook receiver. With `block_first`, the first request waits for
    `release`; with `fail_first`, each delivery key's first attempt gets a 500."""

    url: str = ""
    block_first: bool = False
    fail_first: bool = False
    delay: float = 0.0
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    in_flight: Counter[str] = field(default_factory=Counter)
    overlaps: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def keys(self) -> list[str]:
        return [h["x-segflow-delivery"] for h, _ in self.requests]


@contextmanager
def serve(receiver: Receiver) -> Iterator[Receiver]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            length = int(self.headers["Content-Length"])
            body = self.rfile.read(length)
            if len(body) < length:
                return  # the sender died while sending: nothing was received
            headers = {k.lower(): v for k, v in self.headers.items()}
            key = headers["x-segflow-delivery"]
            with receiver.lock:
                receiver.requests.append((headers, body))
                n = len(receiver.requests)
                attempt = receiver.keys().count(key)
                if receiver.in_flight[key]:
                    receiver.overlaps.append(key)
                receiver.in_flight[key] += 1
            try:
                if n == 1 and receiver.block_first:
                    receiver.arrived.set()
                    receiver.release.wait(30)
                time.sleep(receiver.delay)
            finally:
                with receiver.lock:
                    receiver.in_flight[key] -= 1
            self.send_response(500 if receiver.fail_first and attempt == 1 else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield receiver
    finally:
        receiver.release.set()
        server.shutdown()
        server.server_close()


@contextmanager
def worker_process(db_url: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`segflow worker` with a short lease, so a dead worker's claims expire in a second."""
    env = {**os.environ, "SEGFLOW_DATABASE_URL": db_url, "SEGFLOW_TEST_HOOK_SECRET": SECRET}
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "segflow", "worker", "--poll-interval", "0.1",
             "--lease", "0.5", "--concurrency", "4"],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGFLOW_TEST_HOOK_SECRET", SECRET)


def status(conn: Conn, key: str) -> tuple[str, int]:
    row = conn.execute("SELECT status, attempts FROM segflow.deliveries WHERE delivery_key = %s",
                       (key,)).fetchone()
    assert row is not None
    return row[0], row[1]


def test_a_worker_killed_mid_delivery_loses_nothing(db_url: str, conn: Conn,
                                                    tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    with serve(Receiver(block_first=True)) as receiver:
        setup(conn, tmp_path, Destination(receiver.url),
              depositors({"on": "enter", "destination": "hook"}), timeout="1s")
        for crm in ("C-1", "C-2", "C-3"):
            event(conn, "deposit", "2026-12-03T09:10:00Z", crm, amount=5, currency="USD")
        keys = {r["delivery_key"] for r in deliveries(conn)}
        assert len(keys) == 3

        with worker_process(db_url, log) as first:
            assert receiver.arrived.wait(30), log.read_text()
            blocked = receiver.keys()[0]
            assert status(conn, blocked) == ("sending", 1)
            first.send_signal(signal.SIGKILL)
            assert first.wait(10) == -signal.SIGKILL
        # The receiver got it (it may well have acted on it), the database never heard back.
        receiver.release.set()
        assert status(conn, blocked) == ("sending", 1)

        with worker_process(db_url, log):
            wait_for(conn, SETTLED, timeout=30)

    rows = deliveries(conn)
    assert [r["status"] for r in rows] == ["delivered"] * 3
    assert status(conn, blocked) == ("delivered", 2)
    sent = Counter(receiver.keys())
    assert set(sent) == keys and sent[blocked] == 2
    # At least once: whatever the dead worker had in hand is sent again, and a re-send is
    # the same request (same key, body and signature) so the receiver can drop it.
    assert set(sent.values()) <= {1, 2}
    for key in keys:
        copies = {(h["x-segflow-signature"], body) for h, body in receiver.requests
                  if h["x-segflow-delivery"] == key}
        assert len(copies) == 1


def test_two_worker_processes_never_send_one_delivery_at_once(db_url: str, conn: Conn,
                                                              tmp_path: Path) -> None:
    logs = [tmp_path / "worker1.log", tmp_path / "worker2.log"]
    with serve(Receiver(fail_first=True, delay=0.02)) as receiver:
        setup(conn, tmp_path, Destination(receiver.url),
              depositors({"on": "enter", "destination": "hook"}))
        conn.execute(
            "INSERT INTO segflow.events (event_type, occurred_at, identifiers, amount, currency)"
            " SELECT 'deposit', '2026-12-03T09:10:00Z', jsonb_build_object('crm_id', 'C-' || i),"
            " 5, 'USD' FROM generate_series(1, 40) i")
        with worker_process(db_url, logs[0]), worker_process(db_url, logs[1]):
            wait_for(conn, SETTLED, timeout=60)
    assert receiver.overlaps == []
    # Both took part (each logs the 500s it got).
    assert all("attempt 1 failed" in log.read_text() for log in logs)
    # Each delivery: one 500, then one success; none sent a third time.
    sent = Counter(receiver.keys())
    assert len(sent) == 40 and set(sent.values()) == {2}
    assert {r["status"] for r in deliveries(conn)} == {"delivered"}
