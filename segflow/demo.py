"""``segflow demo``: a live stream of simulated trader events into the database.

The caller has already migrated the database and installed the segments. :func:`run_demo`
loads the FX rates the feed needs and the existing clients' backdated history, starts the
background components (API, tick loop, ...), then streams the trader feed into
``segflow.events`` in small COPY batches, paced so that ``occurred_at`` follows the engine's
clock. It shows every segment's live member count and the transitions as they happen (read
back from the ledger), until the duration ends or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

import psycopg
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from segflow.db import connect
from segflow.feed import TraderFeed, copy_rows, event_json, insert_rows, load_fx_rates

__all__ = [
    "Component",
    "DemoSummary",
    "SegmentStats",
    "ThreadComponent",
    "Transition",
    "run_demo",
]

# How often a batch is written, how often the database is read back for the view, and how
# often a plain (non-terminal) console gets a progress line.
BATCH_INTERVAL = 0.25
STATS_INTERVAL = 1.0
LINE_INTERVAL = 5.0
# Write lag (seconds) from which the view says the database does not keep up.
LAGGING = 1.0
# Transitions kept for the live view, and read from the ledger per query.
RECENT = 15
_PAGE = 1000

_SEGMENTS = """
SELECT name, mode, member_count FROM segflow.segment_catalog WHERE active ORDER BY name
"""
_TRANSITIONS = """
SELECT t.transition_id, t.segment, t.profile_id,
       (SELECT i.value FROM segflow.identities i
         WHERE i.profile_id = t.profile_id AND i.kind = 'crm_id' ORDER BY i.value LIMIT 1),
       t.kind, t.effective_at, t.reason, t.context
FROM segflow.transitions t
WHERE t.transition_id > %s
ORDER BY t.transition_id
LIMIT %s
"""
# Traders are numbered after the ones an earlier run left (crm_id C-0000001 is number 0).
_TRADER_OFFSET = """
SELECT coalesce(max(substring(value FROM '^C-([0-9]+)$')::bigint), 0)
FROM segflow.identities WHERE kind = 'crm_id'
"""


class Component(Protocol):
    """Something the demo runs next to the feed (API server, delivery worker, tick loop)."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


class ThreadComponent:
    """A component running ``target(stop_event)`` in a daemon thread until stopped."""

    def __init__(self, name: str, target: Callable[[threading.Event], None]) -> None:
        self.name = name
        self._target = target
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._target, args=(self._stop,), name=self.name, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


@dataclass
class SegmentStats:
    """One segment in the live view: its size now and this run's enters and exits."""

    mode: str
    members: int = 0
    entered: int = 0
    exited: int = 0


@dataclass(frozen=True)
class Transition:
    """A ledger row as the live view shows it."""

    transition_id: int
    segment: str
    profile_id: int
    crm_id: str | None
    kind: str
    effective_at: datetime
    reason: str
    context: dict[str, Any]


@dataclass
class DemoSummary:
    """What a demo run ingested and saw happen (also the live view's state)."""

    events: int = 0
    by_type: Counter[str] = field(default_factory=Counter)
    profiles: int = 0
    merges: int = 0
    dead_letters: int = 0
    delivered: int = 0
    elapsed: float = 0.0
    failed_batches: int = 0
    history: int = 0
    lag: float = 0.0
    segments: dict[str, SegmentStats] = field(default_factory=dict)
    transitions: int = 0
    last_transition_id: int = 0
    recent: deque[Transition] = field(default_factory=lambda: deque(maxlen=RECENT))

    @property
    def rate(self) -> float:
        return self.events / self.elapsed if self.elapsed > 0 else 0.0



def _connect(url: str) -> psycopg.Connection[Any]:
    conn = connect(url, autocommit=True)
    conn.row_factory = tuple_row  # this module reads rows by position
    return conn


class _Pacer:
    """Hands out the feed's events as they come due on the engine's clock."""

    def __init__(self, feed: TraderFeed, clock_start: datetime) -> None:
        self._stream: Iterator[dict[str, Any]] = feed.stream()
        self._next = next(self._stream)
        self._clock_start = clock_start
        self.t0 = time.monotonic()
        self.elapsed = 0.0  # stream seconds handed out so far

    def due(self, until: float | None = None) -> list[dict[str, Any]]:
        """Events up to now, or up to ``until`` seconds into the stream."""
        if until is None:
            until = time.monotonic() - self.t0
        self.elapsed = max(self.elapsed, until)
        cut = self._clock_start + timedelta(seconds=until)
        batch: list[dict[str, Any]] = []
        while self._next["occurred_at"] <= cut:
            batch.append(self._next)
            self._next = next(self._stream)
        return batch


def _write(conn: psycopg.Connection[Any], batch: list[dict[str, Any]]) -> int:
    """Writes one batch with COPY; on an error, row by row, dead-lettering the failures."""
    with contextlib.suppress(psycopg.Error):
        return copy_rows(conn, batch)
    failed = 0
    for event in batch:
        try:
            insert_rows(conn, [event])
        except psycopg.Error as exc:
            failed += 1
            conn.execute(
                "INSERT INTO segflow.dead_letters (origin, payload, error) VALUES ('demo', %s, %s)",
                [Jsonb(event_json(event)), str(exc).strip()],
            )
    return len(batch) - failed


def _last_transition_id(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT coalesce(max(transition_id), 0) FROM segflow.transitions").fetchone()
    return int(row[0]) if row else 0


def _refresh(conn: psycopg.Connection[Any], summary: DemoSummary) -> list[Transition]:
    """Re-reads the counters and member counts; returns the transitions new since last time.

    The view resumes from the ledger by ``transition_id``: a transaction that commits a
    smaller id late is missed here, which is fine for a display (deliveries do not work so).
    """
    row = conn.execute(
        "SELECT (SELECT count(*) FROM segflow.profiles WHERE merged_into IS NULL),"
        " (SELECT count(*) FROM segflow.profile_merges),"
        " (SELECT count(*) FROM segflow.dead_letters),"
        " (SELECT count(*) FILTER (WHERE status = 'delivered') FROM segflow.deliveries)"
    ).fetchone()
    if row:
        summary.profiles, summary.merges, summary.dead_letters, summary.delivered = (
            int(v) for v in row
        )
    segments: dict[str, SegmentStats] = {}
    for name, mode, members in conn.execute(_SEGMENTS):
        stats = summary.segments.get(name) or SegmentStats(mode)
        stats.mode, stats.members = mode, int(members)
        segments[name] = stats
    summary.segments = segments
    new: list[Transition] = []
    while True:
        rows = conn.execute(_TRANSITIONS, (summary.last_transition_id, _PAGE)).fetchall()
        for tid, segment, profile_id, crm_id, kind, effective_at, reason, context in rows:
            transition = Transition(
                tid, segment, profile_id, crm_id, kind, effective_at, reason, context or {}
            )
            new.append(transition)
            summary.last_transition_id = tid
            counted = segments.get(segment)
            if counted is not None:
                counted.entered += kind == "enter"
                counted.exited += kind == "exit"
        if len(rows) < _PAGE:
            break
    summary.transitions += len(new)
    summary.recent.extend(new)
    return new


def _value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float | Decimal):
        number = float(value)
        return f"{number:,.0f}" if abs(number) >= 1000 or number == int(number) else f"{number:.4g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def _context(context: dict[str, Any], width: int = 60) -> str:
    text = ", ".join(f"{k}={_value(v)}" for k, v in context.items())
    return text if len(text) <= width else text[: width - 1] + "…"


def _who(t: Transition) -> str:
    return f"{t.crm_id} #{t.profile_id}" if t.crm_id else f"#{t.profile_id}"


def _render(
    summary: DemoSummary, rate: float, components: Sequence[Component], width: int = 120
) -> Group:
    head = Text.assemble(
        ("segflow demo", "bold"),
        f"  {summary.elapsed:,.0f} s  ·  ",
        (f"{summary.events:,}", "bold"),
        f" events ({summary.rate:,.1f}/s of {rate:g}/s)  ·  ",
        (f"{summary.history:,}", "bold"),
        " backdated  ·  ",
        (f"{summary.profiles:,}", "bold"),
        " profiles  ·  ",
        (f"{summary.merges:,}", "bold"),
        " merges  ·  ",
        (f"{summary.dead_letters:,}", "bold red" if summary.dead_letters else "bold"),
        " dead letters  ·  ",
        (f"{summary.delivered:,}", "bold"),
        " webhooks delivered",
    )
    if summary.lag > LAGGING:
        head.append(f"  ·  ingest {summary.lag:,.1f} s behind", style="bold red")
    segments = Table(title="segments", title_justify="left", box=None, pad_edge=False)
    segments.add_column("segment")
    segments.add_column("mode", style="dim")
    segments.add_column("members", justify="right", style="bold")
    segments.add_column("entered", justify="right", style="green")
    segments.add_column("exited", justify="right", style="red")
    for name, stats in summary.segments.items():
        segments.add_row(
            name, stats.mode, f"{stats.members:,}", f"+{stats.entered:,}", f"-{stats.exited:,}"
        )
    top: Any = segments
    if width >= 100:  # room for the event types next to the segments
        types = Table(title="events by type", title_justify="left", box=None, pad_edge=False)
        types.add_column("event type")
        types.add_column("count", justify="right")
        types.add_column("share", justify="right")
        for event_type, count in summary.by_type.most_common(len(summary.segments) or 10):
            types.add_row(event_type, f"{count:,}", f"{count / max(summary.events, 1):.1%}")
        top = Table.grid(padding=(0, 4))
        top.add_row(segments, types)
    recent = Table(
        title=f"latest transitions ({summary.transitions:,} this run)",
        title_justify="left",
        box=None,
        pad_edge=False,
    )
    # Narrow terminals lose the context first, then the crm_id.
    wide = width >= 100
    recent.add_column("effective at" if wide else "at", min_width=8)
    recent.add_column("", min_width=5)
    recent.add_column("segment", min_width=21)
    recent.add_column("profile", min_width=16 if wide else 6)
    recent.add_column("reason", style="dim", min_width=6)
    recent.add_column("context", overflow="ellipsis", no_wrap=True)
    for t in reversed(summary.recent):
        kind = Text(t.kind, style="green" if t.kind == "enter" else "red")
        when = f"{t.effective_at:%H:%M:%S}"
        who = _who(t) if wide else f"#{t.profile_id}"
        recent.add_row(when, kind, t.segment, who, t.reason, _context(t.context))
    parts: list[Any] = [head, Text(), top, Text(), recent, Text()]
    if components:
        parts.append(Text("running: " + ", ".join(c.name for c in components), style="dim"))
    parts.append(Text("Ctrl-C to stop", style="dim"))
    return Group(*parts)


def _line(summary: DemoSummary) -> str:
    top = ", ".join(f"{t} {n}" for t, n in summary.by_type.most_common(4))
    members = ", ".join(f"{name} {s.members:,}" for name, s in summary.segments.items())
    behind = f" (ingest {summary.lag:,.1f} s behind)" if summary.lag > LAGGING else ""
    return (
        f"{summary.elapsed:6.0f}s  {summary.events:,} events ({summary.rate:,.1f}/s{behind}: "
        f"{top})  {summary.profiles:,} profiles  {summary.merges:,} merges  "
        f"{summary.dead_letters:,} dead letters  {summary.transitions:,} transitions  "
        f"{summary.delivered:,} webhooks delivered"
        f"  |  members: {members}"
    )


def _transition_line(t: Transition) -> str:
    sign = "+" if t.kind == "enter" else "-"
    return (
        f"  {sign} {t.kind:5} {t.segment:22} {_who(t):18} at {t.effective_at:%H:%M:%S}"
        f"  {t.reason:16} {_context(t.context, 80)}"
    )


def _load_history(
    conn: psycopg.Connection[Any], feed: TraderFeed, summary: DemoSummary, console: Console
) -> None:
    started = time.monotonic()
    with console.status("loading the existing clients' history"):
        history = feed.history()
        summary.history = _write(conn, history)
    console.print(
        f"history: {summary.history:,} backdated events of the existing clients"
        f" ({time.monotonic() - started:.1f} s)",
        highlight=False,
    )


def run_demo(
    url: str,
    *,
    rate: float = 20.0,
    duration: float | None = None,
    seed: int = 0,
    profiles: int = 500,
    history: bool = True,
    install: Callable[[], object] | None = None,
    components: Sequence[Component] = (),
    console: Console | None = None,
) -> DemoSummary:
    """Streams simulated trader events into the database at ``url`` (already migrated).

    ``rate`` is events per second of real time (``occurred_at`` follows the engine clock,
    ``segflow.now()``); ``duration`` in seconds of streaming, ``None`` runs until Ctrl-C.
    With ``history`` the existing clients' backdated past is loaded first (not counted in
    ``events``). ``install`` runs after the history, before the stream: segments installed
    then are backfilled over the clients' past, as when segflow arrives on a platform with
    data; scheduled ones would otherwise wait for their first refresh. ``components`` are
    started before the stream and stopped after it, in reverse order.
    """
    if rate <= 0:
        raise ValueError("rate must be positive")
    console = console or Console()
    summary = DemoSummary()
    with _connect(url) as conn:
        row = conn.execute("SELECT segflow.now(), (" + _TRADER_OFFSET + ")").fetchone()
        assert row is not None
        clock_start: datetime = row[0]
        # A key prefix per run: a restarted demo stores its events instead of deduplicating
        # them against the previous run's keys; new traders keep their history their own.
        feed = TraderFeed(
            seed,
            profiles,
            clock_start,
            rate=rate,
            key_prefix=f"demo{seed}-{int(clock_start.timestamp())}",
            trader_offset=int(row[1]),
        )
        load_fx_rates(conn, feed)
        summary.last_transition_id = _last_transition_id(conn)
        started: list[Component] = []
        live = Live(console=console, refresh_per_second=4) if console.is_terminal else None
        try:
            if history:
                _load_history(conn, feed, summary, console)
            if install is not None:
                install()
            # The view shows what the stream causes, not the history's backfill.
            summary.last_transition_id = _last_transition_id(conn)
            for component in components:
                component.start()
                started.append(component)
            pacer = _Pacer(feed, clock_start)
            next_batch = next_stats = pacer.t0
            next_line = pacer.t0 + LINE_INTERVAL
            if live is not None:
                live.start()
            while True:
                now = time.monotonic()
                # The last round takes exactly the events up to `duration`, however long the
                # writes before it took.
                last = duration is not None and now - pacer.t0 >= duration
                batch = pacer.due(duration if last else None)
                if batch:
                    stored = _write(conn, batch)
                    summary.failed_batches += stored < len(batch)
                    summary.events += len(batch)
                    summary.by_type.update(e["event_type"] for e in batch)
                summary.elapsed = pacer.elapsed
                summary.lag = max(0.0, time.monotonic() - pacer.t0 - pacer.elapsed)
                if last or now >= next_stats:
                    new = _refresh(conn, summary)
                    next_stats = now + STATS_INTERVAL
                    if live is not None:
                        live.update(_render(summary, rate, started, console.width))
                    else:
                        for t in new:
                            console.print(_transition_line(t), highlight=False, soft_wrap=True)
                        if now >= next_line and not last:  # the summary line follows
                            console.print(_line(summary), highlight=False, soft_wrap=True)
                            next_line += LINE_INTERVAL
                if last:
                    break
                # Wake on a fixed grid, so time spent writing is not added to the interval.
                next_batch = max(next_batch + BATCH_INTERVAL, now)
                wake = next_batch if duration is None else min(next_batch, pacer.t0 + duration)
                time.sleep(max(0.0, wake - time.monotonic()))
        except KeyboardInterrupt:
            pass
        finally:
            if live is not None:
                live.stop()
            for component in reversed(started):
                component.stop()
        # Interrupted mid-statement: keep the last counters.
        with contextlib.suppress(psycopg.Error):
            for t in _refresh(conn, summary):
                if live is None:
                    console.print(_transition_line(t), highlight=False, soft_wrap=True)
    console.print(_line(summary), highlight=False, soft_wrap=True)
    return summary
