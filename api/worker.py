"""The delivery worker (`segflow worker`): sends segment actions to destinations.

The database holds the whole state. Every committed transition with a matching action already
has its `segflow.deliveries` row (written by a trigger in the transition's own transaction), so
the worker never tracks a position in the ledger: it claims due rows with `FOR UPDATE SKIP
LOCKED` (several workers can run), lets `segflow.claim_deliveries` apply the campaign rules,
POSTs the signed JSON and records the outcome. `NOTIFY segflow_transitions` only cuts the wait
short; without it the poll interval still finds everything.

The worker also runs `segflow.tick()` every second, but only in the process that holds the
tick advisory lock, so several workers never tick at once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

from compiler import payload as payload_templates
from segflow.db import connect

log = logging.getLogger("segflow.worker")

CHANNEL = "segflow_transitions"
# Session advisory lock held by the ticking worker; released when its connection ends.
TICK_LOCK_KEY = 0x73656766_7469636B  # "segftick"
RELAY_LOCK_KEY = 0x73656766_6E6F7479  # "segfnoty"
SIGNATURE_HEADER = "X-Segflow-Signature"
DELIVERY_HEADER = "X-Segflow-Delivery"
MAX_RETRY_AFTER = 3600.0


def sign(secret: bytes, body: bytes) -> str:
    """HMAC-SHA256 of the exact request body, hex encoded."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def encode_body(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), sort_keys=True, default=str).encode()


class SecretError(Exception):
    pass


def read_secret(env: str | None, file: str | None) -> bytes:
    """The destination's signing secret, read at send time so rotations need no restart."""
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise SecretError(f"secret environment variable {env} is not set")
        return value.encode()
    if file is not None:
        try:
            return Path(file).read_bytes().strip()
        except OSError as error:
            raise SecretError(f"cannot read secret file {file}: {error.strerror}") from None
    raise SecretError("destination has no secret")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt n waits between half and all of
    min(cap, base · 2^(n−1)) seconds, so retries of many deliveries spread out."""

    base: float = 1.0
    cap: float = 600.0

    def delay(self, attempt: int) -> float:
        full = min(self.cap, self.base * 2 ** max(0, attempt - 1))
        return full / 2 + random.uniform(0, full / 2)


@dataclass(frozen=True)
class Outcome:
    ok: bool
    error: str = ""
    retry_after: float | None = None
    permanent: bool = False


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as delta seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def render_body(row: dict[str, Any]) -> dict[str, Any]:
    """The claimed body with its payload templates rendered (raises `PayloadError`)."""
    body: dict[str, Any] = row["body"]
    if body.get("payload") is None:
        return body
    values = payload_templates.variables(body, row["destination"])
    return {**body, "payload": payload_templates.render(body["payload"], values)}


def send(client: httpx.Client, row: dict[str, Any]) -> Outcome:
    """One attempt of one claimed delivery."""
    try:
        rendered = render_body(row)
    except payload_templates.PayloadError as exc:
        # The same data renders the same way on every attempt: a dead letter at once.
        return Outcome(False, f"payload template: {exc}", permanent=True)
    try:
        secret = read_secret(row["secret_env"], row["secret_file"])
    except SecretError as exc:
        return Outcome(False, str(exc))
    body = encode_body(rendered)
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(secret, body),
        DELIVERY_HEADER: row["delivery_key"],
        "User-Agent": "segflow-worker",
    }
    try:
        response = client.post(row["url"], content=body, headers=headers,
                               timeout=row["timeout_s"])
    except httpx.TimeoutException:
        return Outcome(False, f"timeout after {row['timeout_s']:g}s")
    except httpx.TransportError as exc:
        return Outcome(False, f"{type(exc).__name__}: {exc}")
    status = response.status_code
    if 200 <= status < 300:
        return Outcome(True)
    message = f"HTTP {status}: {response.text[:200]}"
    if status == 429 or status >= 500:
        return Outcome(False, message, retry_after_seconds(response.headers.get("Retry-After")))
    # Other answers (4xx, redirects) will not change by themselves: dead letter at once.
    return Outcome(False, message, permanent=True)


class DeliveryWorker:
    """Claims, sends and records deliveries until stopped; reconnects after errors."""

    def __init__(self, url: str, *, concurrency: int = 16, poll_interval: float = 1.0,
                 lease: float = 30.0, retry: RetryPolicy | None = None,
                 client: httpx.Client | None = None) -> None:
        self.url = url
        # One claim is never larger than what can be sent at once, so no claimed row waits
        # in a queue while its lease runs out.
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.lease = lease
        self.retry = retry or RetryPolicy()
        self.client = client or httpx.Client(follow_redirects=False)
        self.sent = 0

    def run(self, stop: threading.Event) -> None:
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="segflow-send") as pool:
            while not stop.is_set():
                try:
                    with connect(self.url, autocommit=True) as conn:
                        conn.execute(f"LISTEN {CHANNEL}")
                        log.info("delivery worker connected")
                        while not stop.is_set():
                            if self.process(conn, pool) < self.concurrency:
                                self._wait(conn)
                except psycopg.Error as error:
                    log.warning("delivery worker: %s; reconnecting", error)
                    stop.wait(min(self.poll_interval * 5, 5.0))

    def _wait(self, conn: psycopg.Connection[Any]) -> None:
        # A notification only ends the wait early; what it says does not matter.
        for _ in conn.notifies(timeout=self.poll_interval, stop_after=1):
            pass

    def process(self, conn: psycopg.Connection[Any], pool: ThreadPoolExecutor) -> int:
        """Claims and sends one batch; returns how many deliveries were attempted."""
        rows = conn.execute(
            "SELECT * FROM segflow.claim_deliveries(%s, make_interval(secs => %s))",
            (self.concurrency, self.lease)).fetchall()
        if not rows:
            return 0
        # Each outcome is recorded as soon as its send ends: a slow receiver must not hold
        # back the others' results (a crash meanwhile would send them again).
        sending = {pool.submit(send, self.client, row): row for row in rows}
        for done in as_completed(sending):
            self._record(conn, sending[done], done.result())
        return len(rows)

    def _record(self, conn: psycopg.Connection[Any], row: dict[str, Any],
                outcome: Outcome) -> None:
        key = (row["profile_id"], row["delivery_id"], row["attempts"])
        if outcome.ok:
            conn.execute("SELECT segflow.delivery_succeeded(%s, %s, %s)", key)
            self.sent += 1
            return
        delay = outcome.retry_after
        if delay is None:
            delay = self.retry.delay(row["attempts"])
        result = conn.execute(
            "SELECT segflow.delivery_failed(%s, %s, %s, %s, %s, %s) AS status",
            (*key, outcome.error, timedelta(seconds=delay), outcome.permanent)).fetchone()
        status = result["status"] if result else None
        log.warning("delivery %s to %s attempt %s failed: %s (%s)", row["delivery_id"],
                    row["destination"], row["attempts"], outcome.error,
                    "dead letter" if status == "dead" else f"retry in {delay:.1f}s")


def leader_tick_loop(url: str, stop: threading.Event, interval: float = 1.0,
                     on_tick: Callable[[int], None] | None = None) -> None:
    """`segflow.tick()` every `interval` seconds while this process holds the tick lock; the
    other workers keep trying to take it over, which they can once its holder disconnects."""
    while not stop.is_set():
        try:
            with connect(url, autocommit=True) as conn:
                leader = False
                while not stop.is_set():
                    if not leader:
                        row = conn.execute("SELECT pg_try_advisory_lock(%s) AS ok",
                                           (TICK_LOCK_KEY,)).fetchone()
                        leader = bool(row and row["ok"])
                        if leader:
                            log.info("this worker now runs segflow.tick()")
                    if leader:
                        row = conn.execute("SELECT segflow.tick() AS n").fetchone()
                        if on_tick is not None and row is not None:
                            on_tick(int(row["n"]))
                    stop.wait(interval)
        except psycopg.Error as error:
            log.warning("tick: %s; reconnecting", error)
            stop.wait(interval)


def notify_relay_loop(url: str, stop: threading.Event, interval: float = 0.01) -> None:
    """With `notify = relay`, announces new transitions on behalf of the transactions that
    wrote them: each NOTIFY makes its transaction take an instance-wide lock at commit, which
    serialises many small writers. One worker (the holder of the relay lock) watches the
    ledger's newest id and sends one wake-up per change it sees."""
    last: int | None = None
    while not stop.is_set():
        try:
            with connect(url, autocommit=True) as conn:
                leader = False
                while not stop.is_set():
                    row = conn.execute("SELECT segflow.config_value('notify') AS mode"
                                       ).fetchone()
                    if row is None or row["mode"] != "relay":
                        stop.wait(1.0)
                        continue
                    if not leader:
                        row = conn.execute("SELECT pg_try_advisory_lock(%s) AS ok",
                                           (RELAY_LOCK_KEY,)).fetchone()
                        leader = bool(row and row["ok"])
                        if not leader:
                            stop.wait(1.0)
                            continue
                        log.info("this worker now relays transition notifications")
                    for _ in range(100):  # re-read the mode every 100 polls
                        row = conn.execute("SELECT coalesce(max(transition_id), 0) AS id"
                                           " FROM segflow.transition_log").fetchone()
                        newest = int(row["id"]) if row else 0
                        if last is not None and newest != last:
                            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps(
                                {"relay": True, "transition_id": newest})))
                        last = newest
                        if stop.wait(interval):
                            break
        except psycopg.Error as error:
            log.warning("notify relay: %s; reconnecting", error)
            stop.wait(1.0)


def run_worker(url: str, stop: threading.Event, *, tick_interval: float = 1.0,
               poll_interval: float = 1.0, concurrency: int = 16,
               lease: float = 30.0) -> None:
    """The `segflow worker` process: delivery loop and (leader-only) tick loop. A claim
    that is not settled within the destination's timeout plus `lease` seconds (its worker
    died) is taken over by another worker."""
    ticker = threading.Thread(target=leader_tick_loop, args=(url, stop, tick_interval),
                              name="segflow-tick", daemon=True)
    relay = threading.Thread(target=notify_relay_loop, args=(url, stop),
                             name="segflow-notify-relay", daemon=True)
    ticker.start()
    relay.start()
    try:
        DeliveryWorker(url, concurrency=concurrency, poll_interval=poll_interval,
                       lease=lease).run(stop)
    finally:
        stop.set()
        ticker.join(timeout=5)
        relay.join(timeout=5)


def retry_dead(url: str, delivery_id: int | None) -> int:
    """Puts one dead delivery (or all of them, for None) back in the queue."""
    with connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT segflow.retry_deliveries(%s) AS n", (delivery_id,)).fetchone()
    return int(row["n"]) if row else 0
