"""Scenario 7 — the alternative users have today: the same segment as a materialized view
recomputed every N seconds, side by side with segflow keeping it.

A book of the feed's clients (history ending now), the segment ``vip_depositors`` (gold or
platinum, ≥ $1,000 deposited in 30 days) installed in segflow, and the hand-written query
of the backfill scenario as ``MATERIALIZED VIEW`` (with the engine clock, so both mean the
same instant) with a unique index, refreshed ``CONCURRENTLY`` (readers are not blocked, as
in production) every N seconds. The feed's stream runs at a steady rate; probes — a fresh
gold trader's $5,000 deposit — make a new member at a steady pace.

Freshness: how long after the probe's commit the member is visible — in segflow at commit
(checked), in the view when the first refresh that started after the commit ends.
Cost: the refresh's time and its backend's CPU; for segflow, the CPU the ingest backend
spends more per event with the segment than without it (the same stream, in a copy of the
database without the segment and without the view).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from rich.console import Console

from bench import segments
from bench.backfill import DEFINITIONS
from bench.common import Databases, Machine, Report, Scale, connect, fmt_ms, median, vacuum_analyze
from bench.live import (
    Feeder,
    backend_cpu_s,
    in_thread,
    known_events,
    percentile,
    probe_event,
    probe_profiles,
    realtime_book,
)
from segflow.feed import insert_rows

DEFINITION = next(d for d in DEFINITIONS if d.doc["name"] == "vip_depositors")
VIEW = "bench_mv.vip_depositors"


@dataclass(frozen=True)
class MatviewScale:
    traders: int
    rate: float  # stream events per second
    probes_per_s: float
    refresh_s: float  # N: seconds between the starts of two refreshes
    seconds: float


SCALES: dict[Scale, MatviewScale] = {
    "small": MatviewScale(300, 20.0, 4.0, 1.0, 4.0),
    "medium": MatviewScale(20_000, 50.0, 2.0, 10.0, 60.0),
    "full": MatviewScale(1_000_000, 1_000.0, 5.0, 60.0, 600.0),
}


@dataclass
class Refresher:
    url: str
    every: float
    probe_ids: list[int]
    durations: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    seen: dict[int, float] = field(default_factory=dict)  # probe profile → time.time()
    error: BaseException | None = None

    def run(self, stop: threading.Event) -> None:
        try:
            with connect(self.url, application_name="segflow-bench-refresh") as conn:
                pid = conn.info.backend_pid
                started = time.monotonic()
                n = 0
                while not stop.is_set():
                    cpu0 = backend_cpu_s(pid)
                    t0 = time.perf_counter()
                    conn.execute(f"REFRESH MATERIALIZED VIEW CONCURRENTLY {VIEW}")
                    self.durations.append(time.perf_counter() - t0)
                    cpu1 = backend_cpu_s(pid)
                    if cpu0 is not None and cpu1 is not None:
                        self.cpu.append(cpu1 - cpu0)
                    now = time.time()
                    for (profile_id,) in conn.execute(
                            f"SELECT profile_id FROM {VIEW} WHERE profile_id = ANY (%s)",
                            (self.probe_ids,)):
                        self.seen.setdefault(int(profile_id), now)
                    n += 1
                    stop.wait(max(0.0, started + n * self.every - time.monotonic()))
        except BaseException as error:
            self.error = error


@dataclass
class Prober:
    url: str
    crm_ids: list[tuple[int, str]]
    per_s: float
    segment: str | None  # check membership right after the commit (None: no segment)
    commits: dict[int, float] = field(default_factory=dict)
    commit_ms: list[float] = field(default_factory=list)
    visible: int = 0
    error: BaseException | None = None

    def run(self, stop: threading.Event) -> None:
        try:
            with connect(self.url, application_name="segflow-bench-probe") as conn:
                started = time.monotonic()
                for n, (pid, crm) in enumerate(self.crm_ids):
                    if stop.wait(max(0.0, started + n / self.per_s - time.monotonic())):
                        return
                    event = probe_event(crm, f"probe-{pid}", {"method": "card"}, "deposit")
                    event.update(amount=5000, currency="USD")
                    t0 = time.perf_counter()
                    insert_rows(conn, [event])
                    self.commit_ms.append((time.perf_counter() - t0) * 1000)
                    self.commits[pid] = time.time()
                    if self.segment is not None and conn.execute(
                            "SELECT 1 FROM segflow.memberships WHERE segment = %s "
                            "AND profile_id = %s", (self.segment, pid)).fetchone():
                        self.visible += 1
        except BaseException as error:
            self.error = error


@dataclass
class Side:
    feeder: Feeder
    prober: Prober
    refresher: Refresher | None


def _run(url: str, cfg: MatviewScale, events: list[dict[str, Any]],
         probes: list[tuple[int, str]], with_view: bool) -> Side:
    stop = threading.Event()
    side = Side(Feeder(url, events, cfg.rate),
                Prober(url, probes, cfg.probes_per_s,
                       str(DEFINITION.doc["name"]) if with_view else None),
                Refresher(url, cfg.refresh_s, [p for p, _ in probes]) if with_view else None)
    threads = [in_thread(side.feeder.run, stop, "feed"), in_thread(side.prober.run, stop, "probe")]
    if side.refresher is not None:
        threads.append(in_thread(side.refresher.run, stop, "refresh"))
    time.sleep(cfg.seconds)
    stop.set()
    for thread in threads:
        thread.join()
    for part in (side.feeder, side.prober, side.refresher):
        if part is not None and part.error:
            raise part.error
    return side


def run(url: str, scale: Scale, console: Console) -> Report:
    cfg = SCALES[scale]
    report = Report("matview", scale, "Segflow vs a materialized view refreshed every N s")
    dbs = Databases(url)
    n_probes = int(cfg.seconds * cfg.probes_per_s) + 1
    try:
        with connect(url) as conn:
            report.machine = Machine.probe(conn)
            console.print(f"loading {cfg.traders:,} traders' history", highlight=False)
            feed, book = realtime_book(conn, cfg.traders)
            first = book.next_profile + 1000
            probes = list(zip(range(first, first + n_probes),
                              probe_profiles(conn, first, n_probes,
                                             {"tier": "gold", "country": "GB"}), strict=True))
            events = known_events(feed, book, int(cfg.rate * (cfg.seconds + 5)))
            vacuum_analyze(conn)
        # Without the segment and the view: the engine's cost of the stream alone.
        bare = dbs.clone(url, "bare")
        with connect(url, row_factory=psycopg.rows.dict_row) as setup:
            segments.install(setup, [DEFINITION.doc])
        with connect(url) as conn:
            conn.execute("CREATE SCHEMA bench_mv")
            hand = DEFINITION.hand.replace("%(at)s", "segflow.now()")
            watch = time.perf_counter()
            conn.execute(f"CREATE MATERIALIZED VIEW {VIEW} AS {hand}")
            created_s = time.perf_counter() - watch
            conn.execute(f"CREATE UNIQUE INDEX ON {VIEW} (profile_id)")
            vacuum_analyze(conn)
        console.print("segflow and the view, side by side", highlight=False)
        both = _run(url, cfg, events, probes, with_view=True)
        with connect(url) as conn:
            # Same instant for both: apply what fell due, then recompute the view.
            conn.execute("SELECT segflow.tick()")
            conn.execute(f"REFRESH MATERIALIZED VIEW {VIEW}")
            in_view = {int(r[0]) for r in conn.execute(f"SELECT profile_id FROM {VIEW}")}
            in_segflow = {int(r[0]) for r in conn.execute(
                "SELECT profile_id FROM segflow.memberships WHERE segment = %s",
                (DEFINITION.doc["name"],))}
        console.print("the same stream without the segment", highlight=False)
        alone = _run(bare, cfg, events, probes, with_view=False)
    finally:
        dbs.cleanup()

    refresher = both.refresher
    assert refresher is not None
    stale = [(refresher.seen[p] - c) * 1000 for p, c in both.prober.commits.items()
             if p in refresher.seen]
    report.setup += [
        f"book: {cfg.traders:,} traders, history ending now; segment {DEFINITION.doc['name']} "
        "(gold or platinum, ≥ $1,000 deposited in 30 days) in segflow and as a materialized "
        f"view of the hand-written query (created in {created_s * 1000:,.0f} ms) with a unique "
        "index, REFRESH … CONCURRENTLY",
        f"stream: the feed's events of known traders at {cfg.rate:g} events/s (one INSERT "
        f"every 100 ms) for {cfg.seconds:g} s (sent: {_rate(both.feeder):,.1f} events/s with "
        f"the segment and the view, {_rate(alone.feeder):,.1f} without); probes: a fresh "
        "gold trader's $5,000 deposit, "
        f"{cfg.probes_per_s:g}/s, single-row INSERT on its own connection",
        f"the view is refreshed every {cfg.refresh_s:g} s (start to start) in the same run; "
        "the engine's cost is the ingest backend's CPU time (/proc) against a run of the same "
        "stream in a copy without the segment and the view",
    ]
    fresh = report.table(
        "Freshness: commit of the event → new member visible (ms)",
        ["kept by", "probes", "visible", "p50", "p95", "max"])
    commits = both.prober.commits
    fresh.rows.append(["segflow (same transaction)", str(len(commits)),
                       f"{both.prober.visible} at commit", "0", "0", "0"])
    fresh.rows.append([f"materialized view, every {cfg.refresh_s:g} s", str(len(commits)),
                       f"{len(stale)} after a refresh", fmt_ms(percentile(stale, 0.5)),
                       fmt_ms(percentile(stale, 0.95)), fmt_ms(max(stale, default=float("nan")))])
    report.figures["segflow_visible_at_commit"] = both.prober.visible
    report.figures["probes"] = len(commits)
    report.figures["view_p50_ms"] = percentile(stale, 0.5)

    feed_cpu = both.feeder.cpu_s
    bare_cpu = alone.feeder.cpu_s
    cost = report.table("Cost", ["", "segflow", "materialized view"])
    refresh_ms = median(refresher.durations) * 1000 if refresher.durations else float("nan")
    refresh_cpu = median(refresher.cpu) * 1000 if refresher.cpu else None
    cost.rows.append(["refreshes in the run", "–", str(len(refresher.durations))])
    cost.rows.append(["time per refresh (median ms)", "–", fmt_ms(refresh_ms)])
    cost.rows.append(["CPU per refresh (median ms)", "–",
                      fmt_ms(refresh_cpu) if refresh_cpu is not None else "?"])
    if feed_cpu is not None and bare_cpu is not None and refresh_cpu is not None:
        extra = (feed_cpu / max(both.feeder.sent, 1) - bare_cpu / max(alone.feeder.sent, 1))
        rate = _rate(both.feeder)
        per_hour_engine = extra * rate * 3600
        per_hour_view = refresh_cpu / 1000 * 3600 / cfg.refresh_s
        cost.rows.append(["ingest CPU per stream event (ms): with segment / without",
                          f"{feed_cpu / max(both.feeder.sent, 1) * 1000:.2f} / "
                          f"{bare_cpu / max(alone.feeder.sent, 1) * 1000:.2f}", "–"])
        cost.rows.append([f"CPU seconds per hour at {rate:,.0f} events/s",
                          f"{per_hour_engine:,.1f}", f"{per_hour_view:,.1f}"])
        report.figures["engine_cpu_s_per_hour"] = per_hour_engine
        report.figures["view_cpu_s_per_hour"] = per_hour_view
    cost.rows.append(["probe INSERT + COMMIT (median ms): with segment / without",
                      f"{median(both.prober.commit_ms):.1f} / {median(alone.prober.commit_ms):.1f}",
                      "–"])
    report.figures["refresh_ms"] = refresh_ms
    report.notes.append(
        f"{len(commits) - len(stale)} probes committed after the run's last refresh started "
        "are not counted for the view; segflow's time-driven changes (a deposit leaving the "
        "30-day window) wait for the next tick, at most a second with `segflow worker`")
    same = in_view == in_segflow
    report.figures["same_members"] = float(same)
    report.notes.append(
        f"members at the end: {len(in_segflow):,} in segflow, {len(in_view):,} in the view "
        + ("(the same)" if same else f"({len(in_view ^ in_segflow)} differ)"))
    return report


def _rate(feeder: Feeder) -> float:
    """Events per second the feed actually sent (it falls behind when ingest cannot keep up)."""
    return feeder.sent / feeder.elapsed_s if feeder.elapsed_s else 0.0
