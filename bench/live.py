"""What the scenarios run in real time share: wall-clock event time, a steadily paced feed,
probe profiles, a loopback webhook receiver, wait-event sampling and backend CPU time.

The latency, writers and matview scenarios measure what a user sees on the wall clock (a
webhook arriving, a membership becoming visible), so their events happen *now*: the engine
clock is the transaction time, the book's history ends just before the run starts, and every
stream event gets the wall-clock time at which it is sent.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import hmac
import json
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg

from bench.common import connect
from bench.population import Book, add_profiles, load_book, trusted_copy
from segflow.feed import TraderFeed, insert_rows

# Event type of probe events: no generated segment counts it (session segments still see it as
# activity), so a probe makes its trader enter only the segment built to observe it.
PROBE_TYPE = "bench_probe"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0…1) by the nearest-rank method."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[rank]


# -- a book whose history ends now ------------------------------------------------------------


def realtime_book(conn: psycopg.Connection[Any], traders: int, seed: int = 11
                  ) -> tuple[TraderFeed, Book]:
    """The feed's existing clients with nine days of history ending six hours ago (the feed
    starts now); partitions for the days of the run."""
    start = utcnow().replace(microsecond=0)
    feed = TraderFeed(seed=seed, profiles=traders, start=start, rate=max(20.0, traders / 50))
    book = load_book(conn, feed)
    conn.execute("SELECT segflow.ensure_partitions(%s, %s)",
                 (start - dt.timedelta(days=1), start + dt.timedelta(days=2)))
    return feed, book


def known_events(feed: TraderFeed, book: Book, n: int) -> list[dict[str, Any]]:
    """The next ``n`` stream events of traders in the book (the identity fast path)."""
    out: list[dict[str, Any]] = []
    for event in feed.stream():
        if book.profile_of(event) is not None:
            out.append(event)
            if len(out) >= n:
                return out
    raise AssertionError("the feed's stream is endless")


def probe_profiles(conn: psycopg.Connection[Any], first: int, n: int,
                   traits: dict[str, Any] | None = None, *, seen: bool = False) -> list[str]:
    """``n`` profiles (ids from ``first``) known by ``crm_id`` ``P-…``; returns the ids.

    ``seen``: each has a login a day ago, so that its next event is not its first (a first
    event evaluates every segment, the next ones only those its type can change)."""
    created = utcnow() - dt.timedelta(days=30)
    crm = [f"P-{first + i:07d}" for i in range(n)]
    add_profiles(conn, [(first + i, traits or {"tier": "gold"}, created) for i in range(n)],
                 [("crm_id", c, first + i, created) for i, c in enumerate(crm)])
    if seen:
        at = utcnow() - dt.timedelta(days=1)
        trusted_copy(conn, [("login", at, {"crm_id": c}, None, None, {"platform": "web"},
                             "bench", f"seen-{first + i}", first + i, None, True)
                            for i, c in enumerate(crm)])
    return crm


# -- a feed paced at a steady rate ----------------------------------------------------------------


@dataclass
class Feeder:
    """Sends ``events`` at ``rate`` per second in one multi-row INSERT every ``interval``
    seconds (how a service batches), each with ``occurred_at`` set to the sending instant.
    When a statement takes longer than its slot the feed falls behind; ``sent`` and
    ``statement_s`` show it."""

    url: str
    events: list[dict[str, Any]]
    rate: float
    interval: float = 0.1
    application_name: str = "segflow-bench-feed"
    sent: int = 0
    statement_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    backend_pid: int | None = None
    cpu_s: float | None = None
    error: BaseException | None = None

    def run(self, stop: threading.Event) -> None:
        try:
            self._run(stop)
        except BaseException as error:  # reported by the scenario, not lost in a thread
            self.error = error

    def _run(self, stop: threading.Event) -> None:
        with connect(self.url, application_name=self.application_name) as conn:
            self.backend_pid = conn.info.backend_pid
            cpu0 = backend_cpu_s(self.backend_pid)
            started = time.monotonic()
            slot = 0
            due = 0.0
            while not stop.is_set() and self.sent < len(self.events):
                slot += 1
                due = slot * self.interval * self.rate
                n = int(due) - self.sent
                if n > 0:
                    now = utcnow()
                    chunk = [dict(e, occurred_at=now)
                             for e in self.events[self.sent:self.sent + n]]
                    t0 = time.perf_counter()
                    insert_rows(conn, chunk, chunk_size=len(chunk))
                    self.statement_s.append(time.perf_counter() - t0)
                    self.sent += len(chunk)
                wait = started + slot * self.interval - time.monotonic()
                if wait > 0:
                    stop.wait(wait)
            self.elapsed_s = time.monotonic() - started
            cpu1 = backend_cpu_s(self.backend_pid)
            if cpu0 is not None and cpu1 is not None:
                self.cpu_s = cpu1 - cpu0


# -- server-side observation ------------------------------------------------------------------


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def backend_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a server process, when it runs on this machine and its
    /proc entry is readable (None otherwise)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # Fields 14 and 15 of stat(5) (utime, stime), counted after the command name.
    return (int(fields[11]) + int(fields[12])) / _TICKS


@dataclass
class WaitSampler:
    """Samples what the backends of ``application_name`` (one or several) are doing every
    ``period`` s: pg_stat_activity's wait event, or CPU when active without one. With
    several names, each count is prefixed with the name."""

    url: str
    application_name: str | tuple[str, ...]
    period: float = 0.02
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    samples: int = 0

    def run(self, stop: threading.Event) -> None:
        names = ([self.application_name] if isinstance(self.application_name, str)
                 else list(self.application_name))
        with connect(self.url, application_name="segflow-bench-sampler") as conn:
            while not stop.is_set():
                rows = conn.execute(
                    "SELECT application_name, state, wait_event_type, wait_event "
                    "FROM pg_stat_activity WHERE application_name = ANY (%s)",
                    (names,)).fetchall()
                for app, state, wait_type, wait in rows:
                    if state == "active":
                        what = f"{wait_type}: {wait}" if wait_type else "CPU (no wait)"
                    else:
                        what = f"{state} (client side)"
                    self.counts[what if len(names) == 1 else f"{app} — {what}"] += 1
                self.samples += 1
                # pg_stat_activity is a snapshot per transaction: leave it each time.
                stop.wait(self.period)

    def shares(self, prefix: str = "", top: int = 6) -> list[tuple[str, float]]:
        """The most frequent states among the counts starting with ``prefix``."""
        chosen = {k: n for k, n in self.counts.items() if k.startswith(prefix)}
        total = sum(chosen.values()) or 1
        ordered = sorted(chosen.items(), key=lambda kv: -kv[1])[:top]
        return [(name[len(prefix):], n / total) for name, n in ordered]


def in_thread(target: Any, stop: threading.Event, name: str) -> threading.Thread:
    thread = threading.Thread(target=target, args=(stop,), name=name, daemon=True)
    thread.start()
    return thread


# -- a loopback webhook receiver -------------------------------------------------------------------


@dataclass
class Receipt:
    at: float  # time.time() when the request arrived
    body: dict[str, Any]


class Receiver:
    """A local HTTP server that checks each webhook's signature and notes when it arrived."""

    def __init__(self, secret: bytes) -> None:
        self.receipts: list[Receipt] = []
        self.rejected = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                at = time.time()
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
                ok = hmac.compare_digest(expected, self.headers.get("X-Segflow-Signature", ""))
                with lock:
                    if ok:
                        outer.receipts.append(Receipt(at, json.loads(body)))
                    else:
                        outer.rejected += 1
                self.send_response(204 if ok else 401)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       name="segflow-bench-receiver")

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def by_profile(self) -> dict[int, float]:
        """Profile → first receipt time."""
        out: dict[int, float] = {}
        for r in list(self.receipts):
            out.setdefault(int(r.body["profile_id"]), r.at)
        return out


def probe_event(crm_id: str, key: str, properties: dict[str, Any],
                event_type: str = PROBE_TYPE) -> dict[str, Any]:
    return {"event_type": event_type, "occurred_at": utcnow(), "identifiers": {"crm_id": crm_id},
            "properties": properties, "source": "bench", "event_key": key}
