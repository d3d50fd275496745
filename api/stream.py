"""`GET /v1/stream`: the transition ledger as Server-Sent Events, resumable without gaps.

Positions
---------
`transition_id` comes from a sequence, so a transaction can commit a smaller id after a larger
one was streamed: "resume after id N" would lose it. Every ledger row records the transaction
that wrote it (`xact_id`, sql/schema/0005_stream.sql). Rows whose `xact_id` is below the xmin
of a reader's snapshot are final (their transaction has ended), and rows not yet visible have
an `xact_id` at or above it. The stream therefore sends the ledger in *batches*: batch
`[lo, hi)` holds every row written by a transaction `lo <= xact_id < hi`, with `hi` at most the
snapshot's xmin, sent in `transition_id` order. A position is

- `"<lo>"`: every row written by a transaction below `lo` has been sent;
- `"<lo>-<hi>-<t>"`: that, plus the rows of batch `[lo, hi)` with `transition_id <= t`.

Each event's id is the position just after it, so `Last-Event-ID` resumes exactly after the
last event received: no gaps and no repeats, whatever order transactions committed in.

Order within one (segment, profile) follows `transition_id` (its writers are serialised by
the engine's profile locks). Transaction ids need not follow commit order, though: a
transaction that started earlier may write a profile after a later one committed. A batch's
upper end is lowered until no row in it comes after a row of the same (segment, profile) that
is outside it, so such a pair is always sent in one batch, in `transition_id` order.

NOTIFY on `segflow_transitions` only wakes the streams up (one LISTEN connection per API
process); they also poll, so a stream keeps going with notifications switched off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from sse_starlette import ServerSentEvent
from starlette.concurrency import run_in_threadpool

__all__ = ["Feed", "Position", "StreamSettings", "Wakeups", "event_stream"]

log = logging.getLogger("segflow.stream")

CHANNEL = "segflow_transitions"
_POSITION = re.compile(r"^(\d{1,20})(?:-(\d{1,20})-(\d{1,20}))?$")


@dataclass(frozen=True)
class Position:
    """Where a stream stands in the ledger (see the module documentation)."""

    lo: int
    hi: int
    after: int = 0

    @classmethod
    def boundary(cls, xid: int) -> Position:
        return cls(xid, xid, 0)

    @classmethod
    def parse(cls, text: str) -> Position:
        match = _POSITION.match(text.strip())
        if not match:
            raise ValueError(f"{text!r} is not a stream position (an event id, or 0)")
        lo = int(match[1])
        if match[2] is None:
            return cls.boundary(lo)
        hi, after = int(match[2]), int(match[3])
        if hi <= lo:
            raise ValueError(f"{text!r} is not a stream position: its batch is empty")
        return cls(lo, hi, after)

    @property
    def in_batch(self) -> bool:
        return self.hi > self.lo

    def __str__(self) -> str:
        return f"{self.lo}-{self.hi}-{self.after}" if self.in_batch else str(self.lo)


@dataclass(frozen=True)
class StreamSettings:
    poll_interval: float = 1.0  # longest wait without a notification, seconds
    heartbeat: float = 15.0  # a comment after this long without an event, seconds
    page: int = 500  # rows per query
    retry_ms: int = 2000  # what EventSource clients wait before reconnecting


class Feed:
    """Reads the ledger from a position; every call is short and runs in a worker thread."""

    def __init__(self, pool: ConnectionPool[Any]) -> None:
        self.pool = pool

    def horizon(self) -> int:
        """The xmin of a current snapshot: every transaction below it has ended."""
        with self.pool.connection() as conn:
            row = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text").fetchone()
        assert row is not None
        return int(row[0])

    def unknown_segments(self, names: list[str]) -> list[str]:
        with self.pool.connection() as conn:
            rows = conn.execute(
                "SELECT n FROM unnest(%s::text[]) n"
                " WHERE NOT EXISTS (SELECT FROM segflow.segment_defs d WHERE d.name = n)"
                " ORDER BY n",
                (names,),
            ).fetchall()
        return [r[0] for r in rows]

    def read(self, pos: Position, segments: list[str] | None,
             page: int) -> tuple[list[tuple[str, dict[str, Any]]], Position]:
        """Up to `page` transitions after `pos` (each with the position just after it), and
        the position after all of them."""
        with self.pool.connection() as conn:
            if not pos.in_batch:
                hi = self._batch_end(conn, pos.lo)
                if hi <= pos.lo:
                    return [], pos
                pos = Position(pos.lo, hi, 0)
            cur = conn.cursor(row_factory=dict_row)
            rows = cur.execute(
                "SELECT t.transition_id, d.name AS segment, t.profile_id, t.kind,"
                "       t.effective_at, t.recorded_at, t.reason, t.context, t.version"
                " FROM segflow.transition_log t"
                " JOIN segflow.segment_defs d ON d.segment_id = t.segment_id"
                " WHERE t.xact_id >= %(lo)s::text::xid8 AND t.xact_id < %(hi)s::text::xid8"
                "   AND t.transition_id > %(after)s"
                "   AND (%(segments)s::text[] IS NULL OR d.name = ANY (%(segments)s::text[]))"
                " ORDER BY t.transition_id LIMIT %(page)s",
                {"lo": str(pos.lo), "hi": str(pos.hi), "after": pos.after,
                 "segments": segments, "page": page},
            ).fetchall()
        out = [(str(Position(pos.lo, pos.hi, r["transition_id"])), _event(r)) for r in rows]
        if len(rows) < page:
            # The batch is done: the last event's id says so, and so does the next position.
            done = Position.boundary(pos.hi)
            if out:
                out[-1] = (str(done), out[-1][1])
            return out, done
        return out, Position(pos.lo, pos.hi, rows[-1]["transition_id"])

    @staticmethod
    def _batch_end(conn: psycopg.Connection[Any], lo: int) -> int:
        """The end of the next batch from `lo`: the snapshot's xmin, lowered while a row
        below it comes after a row of the same (segment, profile) at or above it."""
        row = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text").fetchone()
        assert row is not None
        hi = int(row[0])
        while hi > lo:
            row = conn.execute(
                "SELECT min(r.xact_id)::text FROM segflow.transition_log q"
                " JOIN segflow.transition_log r"
                "   ON r.segment_id = q.segment_id AND r.profile_id = q.profile_id"
                "  AND r.transition_id > q.transition_id"
                " WHERE q.xact_id >= %(hi)s::text::xid8"
                "   AND r.xact_id >= %(lo)s::text::xid8 AND r.xact_id < %(hi)s::text::xid8",
                {"lo": str(lo), "hi": str(hi)},
            ).fetchone()
            if row is None or row[0] is None:
                break
            hi = int(row[0])
        return hi


def _event(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


class Wakeups:
    """One LISTEN connection per process; every notification wakes every open stream."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def current(self) -> asyncio.Event:
        """Set by the next notification (take it before reading, so none is missed)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._listen())
        return self._event

    def _fire(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def _listen(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, application_name="segflow-stream"
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    # Anything may have committed while not listening.
                    self._fire()
                    async for _ in conn.notifies():
                        self._fire()
            except (psycopg.Error, OSError) as error:
                log.warning("stream notifications: %s; polling until reconnected", error)
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


async def event_stream(feed: Feed, wakeups: Wakeups, start: Position,
                       segments: list[str] | None, settings: StreamSettings,
                       stop: threading.Event | None = None) -> AsyncIterator[ServerSentEvent]:
    """The SSE messages of one client, from `start` until the client goes away or `stop` is
    set (a server run in a thread gets no signal, and would wait for its streams to end)."""
    pos = start
    # The start position first, so a client that sees no event still resumes from here.
    yield ServerSentEvent(comment="segflow transitions", id=str(pos), retry=settings.retry_ms)
    sent_id = str(pos)
    last_write = time.monotonic()
    while stop is None or not stop.is_set():
        wake = wakeups.current()
        try:
            events, pos = await run_in_threadpool(feed.read, pos, segments, settings.page)
        except (psycopg.Error, OSError) as error:
            # The client reconnects with its Last-Event-ID and loses nothing.
            log.warning("stream: %s; closing it", error)
            return
        for event_id, body in events:
            yield ServerSentEvent(json.dumps(body, separators=(",", ":")), event="transition",
                                  id=event_id)
            sent_id = event_id
            last_write = time.monotonic()
        if len(events) == settings.page:
            continue
        if time.monotonic() - last_write >= settings.heartbeat:
            # A comment keeps proxies from closing an idle connection; its id moves the
            # client's resume point past rows it filtered out or that never came.
            yield ServerSentEvent(comment="heartbeat",
                                  id=str(pos) if str(pos) != sent_id else None)
            sent_id = str(pos)
            last_write = time.monotonic()
        await _wait(wake, settings.poll_interval, stop)


async def _wait(wake: asyncio.Event, seconds: float, stop: threading.Event | None) -> None:
    """Until `wake` is set or `seconds` have passed; `stop` is looked at twice a second."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and not (stop and stop.is_set()):
        try:
            await asyncio.wait_for(wake.wait(), min(left, 0.5))
            return
        except TimeoutError:
            pass
