"""Scenario 2 — many small writers: concurrent connections, one event per transaction, every
insert a transition; with NOTIFY and without.

Each writer owns its own traders (no two writers touch one profile, as with a service
sharded by account) and sends single-row INSERTs in autocommit, so every event is its own
transaction. One realtime segment reads the latest margin update (``utilization > 0.9``);
each trader's events alternate between 0.95 and 0.5, so every event makes its trader enter
or exit: one transition, and with notifications on one ``NOTIFY segflow_transitions``, per
transaction. The run with ``segflow.config`` ``notify = off`` is the baseline. A listener
consumes the notifications the whole time, as the delivery worker does.

Both variants run in copies of the same database, in turns (off, on, off, on, …), and
pg_stat_activity is sampled during the runs: what the writers wait on shows why one is
slower.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import psycopg
from rich.console import Console

from api.worker import notify_relay_loop
from bench import segments
from bench.common import Databases, Machine, Report, Scale, connect, median, vacuum_analyze
from bench.live import WaitSampler, in_thread, percentile, probe_profiles

SEGMENT: segments.Doc = {
    "name": "bench_margin_toggle",
    "description": "latest margin update above 90% (every benchmark event flips it)",
    "rule": {"last": "margin_update", "field": "properties.utilization", "gt": 0.9},
}
TARGET = 0.70
APP = "segflow-bench-writer"
INSERT = ("INSERT INTO segflow.events (event_type, identifiers, properties, source, event_key) "
          "VALUES ('margin_update', %s, %s, 'bench', %s)")


@dataclass(frozen=True)
class WritersScale:
    writers: int
    traders_per_writer: int
    seconds: float  # measured per run
    rounds: int  # each variant runs this many times, in turns
    warmup: int = 10  # untimed events per writer first (plans cached, as in a pooled session)


SCALES: dict[Scale, WritersScale] = {
    "small": WritersScale(16, 4, 1.5, 1, warmup=3),
    "medium": WritersScale(16, 50, 15.0, 3),
    "full": WritersScale(16, 1000, 60.0, 3),
}


@dataclass
class Writer:
    index: int
    crm_ids: list[str]
    committed: int = 0
    latencies: list[float] = field(default_factory=list)
    error: BaseException | None = None


@dataclass
class RunResult:
    events: int
    seconds: float
    transitions: int
    stored: int
    commit_ms: list[float]
    waits: Counter[str]

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def _write(url: str, writer: Writer, warmup: int, start: threading.Barrier,
           measuring: threading.Event, stop: threading.Event) -> None:
    try:
        with connect(url, application_name=APP) as conn:
            high = dict.fromkeys(writer.crm_ids, False)
            n = 0

            def one() -> float:
                nonlocal n
                crm = writer.crm_ids[n % len(writer.crm_ids)]
                high[crm] = not high[crm]
                props = {"utilization": 0.95 if high[crm] else 0.5}
                t0 = time.perf_counter()
                conn.execute(INSERT, (psycopg.types.json.Jsonb({"crm_id": crm}),
                                      psycopg.types.json.Jsonb(props),
                                      f"w{writer.index}-{n}"))
                n += 1
                return time.perf_counter() - t0

            for _ in range(warmup):
                one()
            start.wait()
            while not stop.is_set():
                took = one()
                if measuring.is_set() and not stop.is_set():
                    writer.committed += 1
                    writer.latencies.append(took)
    except BaseException as error:
        writer.error = error
        start.abort()


def _listen(url: str, stop: threading.Event) -> None:
    """Consumes notifications as the delivery worker does, so the queue never fills."""
    with connect(url) as conn:
        conn.execute("LISTEN segflow_transitions")
        while not stop.is_set():
            for _ in conn.notifies(timeout=0.2):
                pass


def _run_once(url: str, cfg: WritersScale, crm_ids: list[list[str]]) -> RunResult:
    writers = [Writer(i, ids) for i, ids in enumerate(crm_ids)]
    stop = threading.Event()
    measuring = threading.Event()
    start = threading.Barrier(len(writers) + 1)
    listener_stop = threading.Event()
    listener = in_thread(lambda s: _listen(url, s), listener_stop, "listener")
    # notify = relay: one worker's relay sends the wake-ups, as `segflow worker` would.
    relay = in_thread(lambda s: notify_relay_loop(url, s), listener_stop, "relay")
    threads = [threading.Thread(target=_write, args=(url, w, cfg.warmup, start, measuring, stop),
                                daemon=True) for w in writers]
    for t in threads:
        t.start()
    sampler = WaitSampler(url, APP)
    sampler_stop = threading.Event()
    with connect(url) as conn:
        before = conn.execute("SELECT (SELECT count(*) FROM segflow.transition_log), "
                              "(SELECT count(*) FROM segflow.events_stored)").fetchone()
    try:
        start.wait(timeout=120)
    except threading.BrokenBarrierError:
        stop.set()
        for t in threads:
            t.join()
        raise next(w.error for w in writers if w.error) from None
    # Let every writer be in its loop before counting.
    time.sleep(0.2)
    sampled = in_thread(sampler.run, sampler_stop, "sampler")
    measuring.set()
    t0 = time.perf_counter()
    time.sleep(cfg.seconds)
    stop.set()
    seconds = time.perf_counter() - t0
    sampler_stop.set()
    for t in threads:
        t.join()
    sampled.join()
    listener_stop.set()
    listener.join()
    relay.join()
    errors = [w.error for w in writers if w.error]
    if errors:
        raise errors[0]
    with connect(url) as conn:
        after = conn.execute("SELECT (SELECT count(*) FROM segflow.transition_log), "
                             "(SELECT count(*) FROM segflow.events_stored)").fetchone()
    assert before is not None and after is not None
    return RunResult(sum(w.committed for w in writers), seconds,
                     int(after[0]) - int(before[0]), int(after[1]) - int(before[1]),
                     [x * 1000 for w in writers for x in w.latencies], sampler.counts)


def run(url: str, scale: Scale, console: Console) -> Report:
    cfg = SCALES[scale]
    report = Report("writers", scale, "Many small writers: NOTIFY on, relayed and off")
    dbs = Databases(url)
    results: dict[str, list[RunResult]] = {"off": [], "on": [], "relay": []}
    try:
        with connect(url) as conn:
            report.machine = Machine.probe(conn)
            crm_ids = [probe_profiles(conn, 1 + i * cfg.traders_per_writer,
                                      cfg.traders_per_writer)
                       for i in range(cfg.writers)]
            now = conn.execute("SELECT now()").fetchone()
            assert now is not None
            conn.execute("SELECT segflow.ensure_partitions(%s::timestamptz - interval '1 day', "
                         "%s::timestamptz + interval '2 days')", (now[0], now[0]))
        with connect(url, row_factory=psycopg.rows.dict_row) as setup:
            segments.install(setup, [SEGMENT])
        with connect(url) as conn:
            vacuum_analyze(conn)
        for round_ in range(cfg.rounds):
            for notify in ("off", "on", "relay"):
                clone = dbs.clone(url, "w")
                with connect(clone) as conn:
                    conn.execute("UPDATE segflow.config SET value = %s WHERE key = 'notify'",
                                 (notify,))
                result = _run_once(clone, cfg, crm_ids)
                dbs.drop(clone)
                results[notify].append(result)
                console.print(f"round {round_ + 1} notify {notify:3}: "
                              f"{result.rate:,.0f} events/s", highlight=False)
    finally:
        dbs.cleanup()

    report.setup += [
        f"{cfg.writers} connections, each with its own {cfg.traders_per_writer} traders, "
        "single-row INSERT in autocommit (one event per transaction, the trader's next in "
        "turn); every event flips its trader in or out of one realtime segment "
        "(latest margin update above 0.9), so every transaction writes one transition",
        f"each variant {cfg.rounds}× for {cfg.seconds:g} s in a fresh copy of the same "
        f"database, in turns (off, on, relay, …), after {cfg.warmup} untimed events per "
        "writer; median run; a listener consumes the notifications in all; the relay "
        "(`notify = relay`, what `segflow worker` runs) polls the ledger every 10 ms",
        "pg_stat_activity of the writers sampled every 20 ms during the runs",
    ]
    table = report.table(
        "Events per second (one event per transaction)",
        ["notify", "events/s (median)", "runs", "vs notify off", "target",
         "transitions per event", "commit p50 ms", "commit p99 ms"])
    rates = {k: median([r.rate for r in v]) for k, v in results.items()}
    for notify in ("off", "on", "relay"):
        runs = results[notify]
        latencies = sorted(x for r in runs for x in r.commit_ms)
        per_event = sum(r.transitions for r in runs) / max(1, sum(r.stored for r in runs))
        table.rows.append([
            notify, f"{rates[notify]:,.0f}", " / ".join(f"{r.rate:,.0f}" for r in runs),
            f"{rates[notify] / rates['off']:.0%}",
            f"≥ {TARGET:.0%}" if notify in ("on", "relay") else "",
            f"{per_event:.2f}", f"{percentile(latencies, 0.5):.1f}",
            f"{percentile(latencies, 0.99):.1f}"])
        report.figures[f"notify_{notify}_events_per_s"] = rates[notify]
        report.figures[f"notify_{notify}_transitions_per_event"] = per_event
    report.figures["ratio"] = rates["on"] / rates["off"]
    report.figures["relay_ratio"] = rates["relay"] / rates["off"]

    waits = report.table(
        "What the writers' backends were doing (share of pg_stat_activity samples)",
        ["state / wait event", "notify off", "notify on", "notify relay"])
    totals = {k: sum((r.waits for r in v), Counter()) for k, v in results.items()}
    names = sorted(set(totals["off"]) | set(totals["on"]) | set(totals["relay"]),
                   key=lambda n: -(totals["off"][n] + totals["on"][n] + totals["relay"][n]))
    for name in names[:8]:
        waits.rows.append([name, *[
            f"{totals[k][name] / max(1, sum(totals[k].values())):.0%}"
            for k in ("off", "on", "relay")]])
    return report
