"""`GET /v1/stream` over real HTTP on loopback: transitions arrive as Server-Sent Events,
filtered by segment, and a reconnect with Last-Event-ID gets exactly the rest, including
transitions that committed late with a smaller id (CONTRACT §7)."""

from __future__ import annotations

import contextlib
import json
import queue
import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn

from api.app import create_app
from api.stream import Position, StreamSettings
from tests.helpers import at, event, install, profile_of

Conn = psycopg.Connection[Any]
T0 = "2026-12-03T10:00:00+00:00"

SEGMENTS: dict[str, Any] = {
    "depositors": {"name": "depositors", "rule": {"events": "deposit"}},
    "traders": {"name": "traders", "rule": {"events": "trade"}},
    "gold": {"name": "gold", "rule": {"trait": "tier", "eq": "gold"}},
}


@dataclass
class Message:
    """One dispatched SSE message: an event, or a comment that may carry an id."""

    id: str | None
    event: str | None
    data: str | None

    def transition(self) -> dict[str, Any]:
        assert self.event == "transition" and self.data is not None
        doc: dict[str, Any] = json.loads(self.data)
        return doc


@dataclass
class Stream:
    """An open `GET /v1/stream`, read by a thread into a queue."""

    response: httpx.Response
    client: httpx.Client
    messages: queue.Queue[Message] = field(default_factory=queue.Queue)
    last_id: str | None = None

    def next(self, timeout: float = 10.0) -> Message:
        message = self.messages.get(timeout=timeout)
        if message.id is not None:
            self.last_id = message.id
        return message

    def transitions(self, n: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        """The next `n` transitions (skipping heartbeats)."""
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            message = self.next(max(0.01, deadline - time.monotonic()))
            if message.event == "transition":
                out.append(message.transition())
        return out

    def quiet(self, seconds: float) -> list[dict[str, Any]]:
        """Transitions that arrive within `seconds` (expected: none)."""
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = self.next(left)
            except queue.Empty:
                break
            if message.event == "transition":
                out.append(message.transition())
        return out

    def close(self) -> None:
        # Shut the socket down first: closing it alone does not end the reader thread's
        # blocking read, and the server would only see the disconnect on its next write.
        network = self.response.extensions.get("network_stream")
        sock = network.get_extra_info("socket") if network is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.response.close()
        self.client.close()


def _read(response: httpx.Response, messages: queue.Queue[Message]) -> None:
    fields: dict[str, list[str]] = {}
    try:
        for line in response.iter_lines():
            if not line:
                if fields:
                    data = fields.get("data")
                    messages.put(Message((fields.get("id") or [None])[-1],
                                         (fields.get("event") or [None])[-1],
                                         "\n".join(data) if data is not None else None))
                fields = {}
                continue
            name, _, value = line.partition(":")
            fields.setdefault(name or "comment", []).append(value.removeprefix(" "))
    except (httpx.HTTPError, RuntimeError):
        pass  # closed by the test


@dataclass
class Server:
    url: str

    def open(self, *, last_event_id: str | None = None,
             params: dict[str, Any] | list[tuple[str, str]] | None = None) -> Stream:
        client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(10.0, read=None))
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        request = client.build_request("GET", "/v1/stream", headers=headers, params=params)
        response = client.send(request, stream=True)
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = Stream(response, client)
        threading.Thread(target=_read, args=(response, stream.messages), daemon=True).start()
        # Every stream opens with its start position.
        first = stream.next()
        assert first.event is None and first.id is not None
        return stream


@contextmanager
def running_server(db_url: str, settings: StreamSettings | None = None) -> Iterator[Server]:
    """The API under uvicorn in a thread, on a free loopback port."""
    settings = settings or StreamSettings(poll_interval=0.2, heartbeat=0.5)
    stop = threading.Event()
    config = uvicorn.Config(create_app(db_url, settings, stop), host="127.0.0.1", port=0,
                            log_level="warning", lifespan="on")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    port = uv.servers[0].sockets[0].getsockname()[1]
    try:
        yield Server(f"http://127.0.0.1:{port}")
    finally:
        stop.set()
        uv.should_exit = True
        thread.join(timeout=5)
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture
def server(db_url: str) -> Iterator[Server]:
    with running_server(db_url) as running:
        yield running


@pytest.fixture
def segments(conn: Conn, tmp_path: Path) -> None:
    at(conn, T0)
    install(conn, tmp_path, extra=SEGMENTS)


def deposit(conn: Conn, crm: str) -> None:
    event(conn, "deposit", "2026-12-03T09:10:00Z", crm, amount=5, currency="USD")


def ledger_ids(conn: Conn, where: str = "true") -> list[int]:
    return [r[0] for r in conn.execute(
        f"SELECT transition_id FROM segflow.transitions WHERE {where} ORDER BY 1")]


def test_transitions_arrive_as_they_commit(server: Server, conn: Conn, segments: None) -> None:
    stream = server.open()
    try:
        deposit(conn, "C-1")
        [doc] = stream.transitions(1)
        [ledger] = ledger_ids(conn)
        assert doc["transition_id"] == ledger
        assert (doc["segment"], doc["profile_id"], doc["kind"], doc["reason"]) == (
            "depositors", profile_of(conn, "C-1"), "enter", "event")
        assert doc["effective_at"].startswith("2026-12-03T10:00:00")
        assert doc["context"] == {}
        # Idle: heartbeats only.
        assert stream.quiet(1.2) == []
    finally:
        stream.close()


def test_filter_by_segment(server: Server, conn: Conn, segments: None) -> None:
    only = server.open(params={"segment": "traders"})
    both = server.open(params=[("segment", "traders,gold"), ("segment", "depositors")])
    try:
        deposit(conn, "C-1")
        event(conn, "trade", "2026-12-03T09:20:00Z", "C-2")
        deposit(conn, "C-3")
        assert [d["segment"] for d in only.transitions(1)] == ["traders"]
        assert [d["segment"] for d in both.transitions(3)] == [
            "depositors", "traders", "depositors"]
        assert only.quiet(1.0) == []
    finally:
        only.close()
        both.close()


def test_bad_requests(server: Server, segments: None) -> None:
    with httpx.Client(base_url=server.url) as client:
        answer = client.get("/v1/stream", params={"segment": "nope,depositors"})
        assert answer.status_code == 400
        assert "unknown segment: nope" in answer.json()["detail"]
        answer = client.get("/v1/stream", headers={"Last-Event-ID": "12-x"})
        assert answer.status_code == 400 and "not a stream position" in answer.json()["detail"]
        answer = client.get("/v1/stream", params={"last_event_id": str(2**62)})
        assert answer.status_code == 400 and "ahead" in answer.json()["detail"]


def test_positions_round_trip() -> None:
    for text in ("0", "742", "700-742-18"):
        assert str(Position.parse(text)) == text
    for bad in ("", "-1", "5-5-0", "7-3-1", "1-2", "abc"):
        with pytest.raises(ValueError):
            Position.parse(bad)


def test_resume_after_a_late_commit_with_a_smaller_id(
    server: Server, conn: Conn, db_url: str, segments: None,
) -> None:
    stream = server.open()
    with psycopg.connect(db_url) as slow:
        at(slow, T0)
        deposit(slow, "C-1")  # draws the smaller transition id, commits last
        deposit(conn, "C-2")
        # C-2 is held back while the older transaction is open: sending it now and C-1
        # later would let a client that resumes after C-2 skip C-1.
        assert stream.quiet(1.0) == []
        stream.close()
        slow.commit()
    deposit(conn, "C-3")
    c1, c2, c3 = (ledger_ids(conn, f"profile_id = {profile_of(conn, c)}")[0]
                  for c in ("C-1", "C-2", "C-3"))
    assert c1 < c2

    resumed = server.open(last_event_id=stream.last_id)
    try:
        first = resumed.transitions(1)
        resumed.close()
        # Resume again after the first one, now with the query parameter.
        rest = server.open(params={"last_event_id": resumed.last_id or ""})
        try:
            later = rest.transitions(2)
            assert rest.quiet(1.0) == []
        finally:
            rest.close()
    finally:
        resumed.close()
    assert [d["transition_id"] for d in first + later] == [c1, c2, c3]


def test_zero_replays_the_whole_ledger(server: Server, conn: Conn, segments: None) -> None:
    for crm in ("C-1", "C-2", "C-3"):
        deposit(conn, crm)
    stream = server.open(last_event_id="0")
    try:
        got = [d["transition_id"] for d in stream.transitions(3)]
        assert stream.quiet(0.8) == []
    finally:
        stream.close()
    assert got == ledger_ids(conn)


def test_one_profile_keeps_its_order_when_transaction_ids_do_not(
    server: Server, conn: Conn, db_url: str, segments: None,
) -> None:
    """A transaction that got its id first but writes a profile after a newer transaction
    committed its own change: the stream still sends the two changes in the ledger's order."""
    stream = server.open(params={"segment": "gold"})
    try:
        with psycopg.connect(db_url) as older, psycopg.connect(db_url) as holder:
            at(older, T0)
            older.execute("SELECT pg_current_xact_id()")
            holder.execute("SELECT pg_current_xact_id()")  # keeps the horizon between them
            event(conn, "identify", "2026-12-03T09:00:00Z", "C-1", properties={"tier": "gold"})
            event(older, "identify", "2026-12-03T09:30:00Z", "C-1",
                  properties={"tier": "silver"})
            older.commit()
            # Only the exit's transaction has ended: sending it alone would put it first.
            assert stream.quiet(1.0) == []
            holder.commit()
        docs = stream.transitions(2)
        assert [d["kind"] for d in docs] == ["enter", "exit"]
        assert [d["transition_id"] for d in docs] == ledger_ids(conn, "segment = 'gold'")
    finally:
        stream.close()


def test_reconnecting_clients_see_every_transition_once_under_concurrent_writers(
    server: Server, conn: Conn, db_url: str, segments: None,
) -> None:
    """Writers commit out of id order while a client keeps dropping and resuming."""
    rng = random.Random(7)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            with psycopg.connect(db_url) as own:
                at(own, T0)
                for i in range(25):
                    deposit(own, f"W{k}-{i}")
                    if i % 3 == 0:
                        event(own, "trade", "2026-12-03T09:20:00Z", f"W{k}-{i}")
                    time.sleep(rng.random() * 0.05)  # commit late, after others
                    own.commit()
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    received: list[int] = []
    last_id = "0"
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    try:
        while any(t.is_alive() for t in threads) or not stop.is_set():
            if not any(t.is_alive() for t in threads):
                stop.set()  # one more round after the writers are done
            stream = server.open(last_event_id=last_id)
            try:
                deadline = time.monotonic() + rng.uniform(0.1, 0.6)
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        message = stream.next(left)
                    except queue.Empty:
                        break
                    if message.event == "transition":
                        received.append(message.transition()["transition_id"])
            finally:
                stream.close()
            last_id = stream.last_id or last_id
        stream = server.open(last_event_id=last_id)
        try:
            received += [d["transition_id"] for d in stream.quiet(1.5)]
        finally:
            stream.close()
    finally:
        for thread in threads:
            thread.join()
    assert not errors
    ledger = ledger_ids(conn)
    assert len(ledger) == 4 * 25 + 4 * 9
    assert sorted(received) == ledger  # every one, none twice


def test_open_streams_end_when_the_server_stops(db_url: str) -> None:
    with running_server(db_url) as running:
        stream = running.open()
    try:
        # The server ended the response: the reader sees the end of the stream.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not stream.response.is_closed:
            time.sleep(0.05)
        assert stream.response.is_stream_consumed
    finally:
        stream.close()


def test_a_notification_wakes_the_stream_and_polling_works_without(
    db_url: str, conn: Conn, segments: None,
) -> None:
    with running_server(db_url, StreamSettings(poll_interval=30, heartbeat=60)) as running:
        stream = running.open()
        try:
            assert stream.quiet(1.0) == []  # past the first wake-up, when LISTEN began
            started = time.monotonic()
            deposit(conn, "C-1")
            assert len(stream.transitions(1, timeout=5)) == 1
            assert time.monotonic() - started < 5  # well before the 30 s poll
        finally:
            stream.close()
    conn.execute("UPDATE segflow.config SET value = 'off' WHERE key = 'notify'")
    with running_server(db_url, StreamSettings(poll_interval=0.3)) as running:
        stream = running.open()
        try:
            deposit(conn, "C-2")
            [doc] = stream.transitions(1)
            assert doc["profile_id"] == profile_of(conn, "C-2")
        finally:
            stream.close()
