"""Scenario 3 — latency: an event's commit → its webhook received, through the real worker.

A book of the feed's clients (history ending now) with the generated realtime segments
installed, and the feed's stream of those traders sent at a steady rate (one multi-row
INSERT every 100 ms, ``occurred_at`` = the wall clock). Alongside, on their own connection,
probe events at a steady pace: each is the first ``bench_probe`` event of a trader seen a day
before, which enters the segment ``bench_probe_seen`` whose ``enter`` action posts to a loopback
receiver in this process. ``segflow worker`` runs as a subprocess on the database, exactly
as deployed (it also ticks every second).

Latency = the receiver's ``time.time()`` when the POST arrives − the client's ``time.time()``
right after ``COMMIT`` returned. Both clocks are this process's.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from rich.console import Console

from bench import segments
from bench.common import (
    FunctionStats,
    Machine,
    Report,
    Scale,
    connect,
    fmt_ms,
    function_stats,
    grouped_self_ms,
    stats_delta,
    track_functions,
    vacuum_analyze,
)
from bench.live import (
    PROBE_TYPE,
    Feeder,
    Receiver,
    WaitSampler,
    in_thread,
    known_events,
    percentile,
    probe_profiles,
    realtime_book,
)

ROOT = Path(__file__).resolve().parent.parent
SECRET_ENV = "SEGFLOW_BENCH_WEBHOOK_SECRET"
PROBE_APP = "segflow-bench-probe"
TARGETS = {"p50": 20.0, "p99": 100.0}


@dataclass(frozen=True)
class LatencyScale:
    traders: int
    segment_count: int
    rate: float  # stream events per second
    probes_per_s: float
    seconds: float
    warmup_probes: int = 5


SCALES: dict[Scale, LatencyScale] = {
    "small": LatencyScale(200, 3, 20.0, 5.0, 4.0, warmup_probes=2),
    "medium": LatencyScale(5_000, 100, 5.0, 2.0, 90.0),
    "full": LatencyScale(1_000_000, 100, 1_000.0, 20.0, 300.0),
}

PROBE_SEGMENT: segments.Doc = {
    "name": "bench_probe_seen",
    "description": "a profile's first probe event (benchmark)",
    "rule": {"events": PROBE_TYPE},
    "actions": [{"on": "enter", "destination": "bench_receiver"}],
}


def _destination(port: int) -> segments.Doc:
    return {"destination": "bench_receiver", "url": f"http://127.0.0.1:{port}/hook",
            "secret": {"env": SECRET_ENV}, "channel": "webhook", "timeout": "10s"}


@dataclass
class Probes:
    commits: dict[int, float]  # profile → time.time() after COMMIT returned
    sent: dict[int, float]  # profile → time.time() before the INSERT was sent
    commit_ms: list[float]
    stats: FunctionStats = field(default_factory=dict)  # the probe session's functions
    error: BaseException | None = None


def _probe(url: str, crm_ids: list[tuple[int, str]], per_s: float, probes: Probes,
           stop: threading.Event) -> None:
    try:
        with connect(url, application_name=PROBE_APP) as conn:
            tracked = track_functions(conn)
            before = function_stats(conn) if tracked else {}
            started = time.monotonic()
            for n, (pid, crm) in enumerate(crm_ids):
                wait = started + n / per_s - time.monotonic()
                if stop.wait(max(0.0, wait)):
                    break
                probes.sent[pid] = time.time()
                t0 = time.perf_counter()
                conn.execute(
                    "INSERT INTO segflow.events (event_type, identifiers, properties, source, "
                    "event_key) VALUES (%s, %s, %s, 'bench', %s)",
                    (PROBE_TYPE, Jsonb({"crm_id": crm}), Jsonb({"n": n}), f"probe-{pid}"))
                probes.commits[pid] = time.time()
                probes.commit_ms.append((time.perf_counter() - t0) * 1000)
            if tracked:
                probes.stats = stats_delta(function_stats(conn), before)
    except BaseException as error:
        probes.error = error


def _worker(url: str, secret: str, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, SEGFLOW_DATABASE_URL=url, **{SECRET_ENV: secret})
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "segflow", "worker"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def _wait_for(receiver: Receiver, pids: set[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pids <= set(receiver.by_profile()):
            return True
        time.sleep(0.05)
    return False


def run(url: str, scale: Scale, console: Console) -> Report:
    cfg = SCALES[scale]
    report = Report("latency", scale, "Latency: event commit → webhook received")
    secret = os.urandom(16).hex()
    n_probes = cfg.warmup_probes + int(cfg.seconds * cfg.probes_per_s) + 1
    with connect(url) as conn:
        report.machine = Machine.probe(conn)
        console.print(f"loading {cfg.traders:,} traders' history", highlight=False)
        feed, book = realtime_book(conn, cfg.traders)
        first = book.next_profile + 1000
        crm = probe_profiles(conn, first, n_probes, seen=True)
        probe_ids = list(zip(range(first, first + n_probes), crm, strict=True))
        events = known_events(feed, book, int(cfg.rate * (cfg.seconds + 30)))
    with Receiver(secret.encode()) as receiver, tempfile.TemporaryDirectory(
            prefix="segflow-bench-") as folder:
        docs = [*segments.generate(cfg.segment_count), PROBE_SEGMENT,
                _destination(receiver.port)]
        console.print(f"installing and backfilling {cfg.segment_count} segments",
                      highlight=False)
        with connect(url, row_factory=psycopg.rows.dict_row) as setup:
            segments.install(setup, docs)
        with connect(url) as conn:
            conn.execute("SELECT segflow.tick()")
            vacuum_analyze(conn)
            deliveries_before = _count(conn, "segflow.deliveries")
        log = Path(folder) / "worker.log"
        worker = _worker(url, secret, log)
        try:
            # The worker is ready once it has delivered the warm-up probes.
            warm = Probes({}, {}, [])
            _probe(url, probe_ids[:cfg.warmup_probes], 5.0, warm, threading.Event())
            if warm.error:
                raise warm.error
            if not _wait_for(receiver, set(warm.commits), 60):
                raise RuntimeError(f"the worker delivered nothing: {log.read_text()[-2000:]}")
            stop = threading.Event()
            feeder = Feeder(url, events, cfg.rate)
            probes = Probes({}, {}, [])
            sampler = WaitSampler(url, (feeder.application_name, PROBE_APP))
            sampling = in_thread(sampler.run, stop, "sampler")
            feeding = in_thread(feeder.run, stop, "feed")
            time.sleep(1.0)  # the feed at its pace before the first measured probe
            probing = in_thread(
                lambda s: _probe(url, probe_ids[cfg.warmup_probes:], cfg.probes_per_s, probes,
                                 s), stop, "probe")
            probing.join(timeout=cfg.seconds + 30)
            stop.set()
            for thread in (probing, feeding, sampling):
                thread.join()
            for thing in (feeder, probes):
                if thing.error:
                    raise thing.error
            _wait_for(receiver, set(probes.commits), 30)
        finally:
            worker.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.wait(10)
            if worker.poll() is None:
                worker.kill()
        with connect(url) as conn:
            deliveries = _count(conn, "segflow.deliveries") - deliveries_before
            stored = _count(conn, "segflow.events_stored")

    received = receiver.by_profile()
    latencies = [(received[p] - c) * 1000 for p, c in probes.commits.items() if p in received]
    end_to_end = [(received[p] - probes.sent[p]) * 1000 for p in probes.commits if p in received]
    missing = len(probes.commits) - len(latencies)
    behind = feeder.statement_s
    report.setup += [
        f"book: {cfg.traders:,} traders ({len(book.identities):,} identities, {stored:,} stored "
        f"events at the end), history ending now; {cfg.segment_count} generated realtime "
        "segments plus the probe segment, whose enter action posts to a loopback receiver",
        f"stream: the feed's events of known traders at {cfg.rate:g} events/s, one multi-row "
        f"INSERT every 100 ms (sent {feeder.sent:,} in {feeder.elapsed_s:.0f} s: "
        f"{feeder.sent / max(feeder.elapsed_s, 1e-9):,.0f} events/s; statement median "
        f"{percentile(behind, 0.5) * 1000:.0f} ms, p99 {percentile(behind, 0.99) * 1000:.0f} ms)",
        f"probes: {cfg.probes_per_s:g}/s on their own connection, single-row INSERT in "
        f"autocommit, each the first probe event of a trader seen a day ago "
        f"({len(probes.commits)} "
        f"measured after {cfg.warmup_probes} untimed)",
        "worker: `segflow worker` as a subprocess (defaults: 16 sends at once, 1 s poll, "
        "woken by NOTIFY, ticking every second)",
    ]
    table = report.table(
        f"Webhook received, ms after the probe's commit ({len(latencies)} of "
        f"{len(probes.commits)} received); for reference the probe's INSERT + COMMIT itself, "
        "and INSERT sent → webhook",
        ["measured", "p50", "p95", "p99", "max", "target"])
    for label, values, target in (
            ("commit → webhook received", latencies,
             f"p50 ≤ {TARGETS['p50']:g}, p99 ≤ {TARGETS['p99']:g}"),
            ("INSERT + COMMIT (client)", probes.commit_ms, ""),
            ("INSERT sent → webhook received", end_to_end, "")):
        table.rows.append([label, fmt_ms(percentile(values, 0.5)),
                           fmt_ms(percentile(values, 0.95)), fmt_ms(percentile(values, 0.99)),
                           fmt_ms(max(values, default=float("nan"))), target])
    for q in (0.5, 0.95, 0.99):
        report.figures[f"p{round(q * 100)}_ms"] = percentile(latencies, q)
    report.figures["received"] = len(latencies)
    report.figures["missing"] = missing
    report.figures["stream_events_per_s"] = feeder.sent / max(feeder.elapsed_s, 1e-9)
    waits = report.table(
        "What the feed's and the probes' backends were doing (share of pg_stat_activity "
        "samples every 20 ms)", ["connection", "state / wait event", "share"])
    for app, label in ((PROBE_APP, "probes"), (feeder.application_name, "stream")):
        for what, share in sampler.shares(f"{app} — ", top=5):
            waits.rows.append([label, what, f"{share:.0%}"])
    if probes.stats:
        n = max(1, len(probes.commit_ms))
        where = report.table("Where a probe's INSERT spends its time (ms per probe, function "
                             "self time, track_functions = all)", ["part", "ms"])
        for group, ms in sorted(grouped_self_ms(probes.stats).items(), key=lambda kv: -kv[1]):
            where.rows.append([group, fmt_ms(ms / n)])
        evaluated = sum(c for k, (c, _, _) in probes.stats.items()
                        if k.startswith("segflow_compiled."))
        report.notes.append(f"compiled segment evaluations per probe: {evaluated / n:.1f}")
    report.notes.append(f"deliveries written during the run: {deliveries:,}; "
                        f"rejected signatures: {receiver.rejected}")
    if missing:
        report.notes.append(f"{missing} probes not received within 30 s of the run's end")
    return report


def _count(conn: psycopg.Connection[Any], table: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(row[0]) if row else 0
