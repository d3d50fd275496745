"""``segflow demo``: a live stream of simulated trader events into the database.

The caller has already migrated the database. :func:`run_demo` loads the FX rates the feed
needs, starts the background components (API, worker, ... as they are added), then streams the
trader feed into ``segflow.events`` in small COPY batches, paced so that ``occurred_at`` follows
the engine's clock, and shows what it ingests until the duration ends or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
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

__all__ = ["Component", "DemoSummary", "ThreadComponent", "run_demo"]

# How often a batch is written, and how often the database counters are refreshed.
BATCH_INTERVAL = 0.25
STATS_INTERVAL = 1.0


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
class DemoSummary:
    """What a demo run ingested (also the live display's state)."""

    events: int = 0
    by_type: Counter[str] = field(default_factory=Counter)
    profiles: int = 0
    merges: int = 0
    dead_letters: int = 0
    elapsed: float = 0.0
    failed_batches: int = 0


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
        self._t0 = time.monotonic()

    def now(self) -> datetime:
        return self._clock_start + timedelta(seconds=time.monotonic() - self._t0)

    def due(self) -> list[dict[str, Any]]:
        now = self.now()
        batch: list[dict[str, Any]] = []
        while self._next["occurred_at"] <= now:
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


def _refresh(conn: psycopg.Connection[Any], summary: DemoSummary) -> None:
    row = conn.execute(
        "SELECT (SELECT count(*) FROM segflow.profiles WHERE merged_into IS NULL),"
        " (SELECT count(*) FROM segflow.profile_merges),"
        " (SELECT count(*) FROM segflow.dead_letters)"
    ).fetchone()
    if row:
        summary.profiles, summary.merges, summary.dead_letters = (int(v) for v in row)


def _render(summary: DemoSummary, rate: float, components: Sequence[Component]) -> Group:
    head = Text.assemble(
        ("segflow demo", "bold"),
        f"  {rate:g} events/s  ·  {summary.elapsed:,.0f} s  ·  ",
        (f"{summary.events:,}", "bold"),
        " events  ·  ",
        (f"{summary.profiles:,}", "bold"),
        " profiles  ·  ",
        (f"{summary.merges:,}", "bold"),
        " merges  ·  ",
        (f"{summary.dead_letters:,}", "bold red" if summary.dead_letters else "bold"),
        " dead letters",
    )
    table = Table(show_edge=False, pad_edge=False, box=None)
    table.add_column("event type")
    table.add_column("count", justify="right")
    table.add_column("share", justify="right")
    for event_type, count in summary.by_type.most_common():
        table.add_row(event_type, f"{count:,}", f"{count / max(summary.events, 1):.1%}")
    parts: list[Any] = [head, table]
    if components:
        parts.append(Text("running: " + ", ".join(c.name for c in components), style="dim"))
    parts.append(Text("Ctrl-C to stop", style="dim"))
    return Group(*parts)


def _line(summary: DemoSummary) -> str:
    top = ", ".join(f"{t} {n}" for t, n in summary.by_type.most_common(5))
    return (
        f"{summary.elapsed:6.0f}s  {summary.events:,} events ({top})  "
        f"{summary.profiles:,} profiles  {summary.merges:,} merges  "
        f"{summary.dead_letters:,} dead letters"
    )


def run_demo(
    url: str,
    *,
    rate: float = 20.0,
    duration: float | None = None,
    seed: int = 0,
    profiles: int = 500,
    components: Sequence[Component] = (),
    console: Console | None = None,
) -> DemoSummary:
    """Streams simulated trader events into the database at ``url`` (already migrated).

    ``rate`` is events per second of real time (``occurred_at`` follows the engine clock,
    ``segflow.now()``); ``duration`` in seconds, ``None`` runs until Ctrl-C. ``components``
    are started before the stream and stopped after it, in reverse order.
    """
    if rate <= 0:
        raise ValueError("rate must be positive")
    console = console or Console()
    summary = DemoSummary()
    with _connect(url) as conn:
        row = conn.execute("SELECT segflow.now()").fetchone()
        assert row is not None
        clock_start: datetime = row[0]
        # A key prefix per run: a restarted demo stores its events instead of deduplicating
        # them against the previous run's keys.
        feed = TraderFeed(
            seed,
            profiles,
            clock_start,
            rate=rate,
            key_prefix=f"demo{seed}-{int(clock_start.timestamp())}",
        )
        load_fx_rates(conn, feed)
        started: list[Component] = []
        live = Live(console=console, refresh_per_second=4) if console.is_terminal else None
        try:
            for component in components:
                component.start()
                started.append(component)
            pacer = _Pacer(feed, clock_start)
            t0 = time.monotonic()
            next_stats = 0.0
            if live is not None:
                live.start()
            while duration is None or time.monotonic() - t0 < duration:
                batch = pacer.due()
                if batch:
                    stored = _write(conn, batch)
                    summary.failed_batches += stored < len(batch)
                    summary.events += len(batch)
                    summary.by_type.update(e["event_type"] for e in batch)
                summary.elapsed = time.monotonic() - t0
                if summary.elapsed >= next_stats:
                    _refresh(conn, summary)
                    if live is not None:
                        live.update(_render(summary, rate, started))
                    elif next_stats > 0:
                        console.print(_line(summary), highlight=False)
                    next_stats = summary.elapsed + (STATS_INTERVAL if live else 5.0)
                time.sleep(BATCH_INTERVAL)
        except KeyboardInterrupt:
            pass
        finally:
            if live is not None:
                live.stop()
            for component in reversed(started):
                component.stop()
        # Interrupted mid-statement: keep the last counters.
        with contextlib.suppress(psycopg.Error):
            _refresh(conn, summary)
    console.print(_line(summary), highlight=False)
    return summary
