"""What every scenario shares: databases, timing, COPY/INSERT encoding, reports.

Figures are printed with rich and written as one section per scenario and scale into
BENCHMARKS.md, between markers, so a rerun replaces its own section and nothing else.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import sql
from rich.console import Console
from rich.table import Table

Scale = Literal["small", "medium", "full"]
SCALES: tuple[Scale, ...] = ("small", "medium", "full")

# Settings that change the figures; printed with every report. (The measuring sessions set
# track_functions = all themselves, and the engine's functions turn JIT off.)
SETTINGS = ("shared_buffers", "work_mem", "effective_cache_size", "max_wal_size", "fsync",
            "synchronous_commit", "full_page_writes", "wal_level", "jit")


# -- databases ------------------------------------------------------------------------------


def with_dbname(url: str, dbname: str) -> str:
    """``url`` pointing at database ``dbname`` of the same server."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(dbname)))


def dbname_of(url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path.lstrip("/"))


def connect(url: str, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True, **kwargs)


class Databases:
    """Sibling databases of ``base_url`` on the same server, dropped by :meth:`cleanup`.

    Variants that must start from the same state are clones of one template database
    (``CREATE DATABASE … TEMPLATE``), so each measures on an identical copy.
    """

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.prefix = dbname_of(base_url)
        self.admin_url = with_dbname(base_url, "postgres")
        self.created: list[str] = []

    def url(self, name: str) -> str:
        return with_dbname(self.base_url, name)

    def clone(self, template_url: str, suffix: str) -> str:
        """A copy of ``template_url`` (which must have no open connections)."""
        name = f"{self.prefix}_{suffix}"
        with connect(self.admin_url) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
            admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(dbname_of(template_url))))
        self.created.append(name)
        return self.url(name)

    def drop(self, url: str) -> None:
        name = dbname_of(url)
        with connect(self.admin_url) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
        if name in self.created:
            self.created.remove(name)

    def cleanup(self) -> None:
        for name in list(self.created):
            self.drop(self.url(name))


def set_clock(conn: psycopg.Connection[Any], at: dt.datetime) -> None:
    conn.execute("SELECT set_config('segflow.clock', %s, false)", (at.isoformat(),))


def vacuum_analyze(conn: psycopg.Connection[Any]) -> None:
    conn.execute("VACUUM ANALYZE")


# -- the machine ----------------------------------------------------------------------------


def load_average() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(threshold: float, timeout_s: float, console: Console,
                   poll_s: float = 30.0) -> float:
    """Waits until the 1-minute load is below ``threshold`` (at most ``timeout_s``);
    returns the load when it gave up or got there."""
    deadline = time.monotonic() + timeout_s
    load = load_average()
    while load >= threshold and time.monotonic() < deadline:
        console.print(f"load {load:.2f} ≥ {threshold}: waiting {poll_s:.0f} s", highlight=False)
        time.sleep(poll_s)
        load = load_average()
    return load


def _meminfo_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class Machine:
    cores: int
    memory_gib: float | None
    cpu: str
    postgres: str
    settings: dict[str, str]

    @classmethod
    def probe(cls, conn: psycopg.Connection[Any]) -> Machine:
        version = conn.execute("SHOW server_version").fetchone()
        settings = {}
        for name in SETTINGS:
            row = conn.execute(
                "SELECT current_setting(%s, true)", (name,)).fetchone()
            settings[name] = str(row[0]) if row and row[0] is not None else "?"
        return cls(os.cpu_count() or 0, _meminfo_gib(), _cpu_model(),
                   str(version[0]) if version else "?", settings)

    def lines(self) -> list[str]:
        memory = f"{self.memory_gib:.0f} GiB" if self.memory_gib else "unknown memory"
        return [
            f"machine: {self.cores} cores ({self.cpu}), {memory}",
            f"PostgreSQL {self.postgres}: "
            + ", ".join(f"{k}={v}" for k, v in self.settings.items()),
        ]


# -- timing -----------------------------------------------------------------------------------


@dataclass
class Stopwatch:
    seconds: float = 0.0

    @contextmanager
    def running(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# -- encoding rows before the clock starts ----------------------------------------------------

_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text(value: Any) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, dict | list):
        value = json.dumps(value)
    return str(value).translate(_COPY_ESCAPES)


def copy_payload(rows: Sequence[Sequence[Any]]) -> bytes:
    """Rows in COPY text format, so the measured COPY spends no time adapting values."""
    return "".join("\t".join(_copy_text(v) for v in row) + "\n" for row in rows).encode()


def _literal(value: Any) -> str:
    if isinstance(value, dict | list):
        value = json.dumps(value)
    if isinstance(value, Decimal | int | float) and not isinstance(value, bool):
        return str(value)
    return sql.Literal(value).as_string(None)


def insert_statement(table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """One multi-row INSERT with literal values (rendered before the clock starts)."""
    values = ",\n".join("(" + ", ".join(_literal(v) for v in row) + ")" for row in rows)
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES\n{values}"


def run_copy(conn: psycopg.Connection[Any], table: str, columns: Sequence[str],
             payload: bytes) -> None:
    with conn.cursor() as cur, cur.copy(
            f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        copy.write(payload)


# -- function statistics (track_functions = all) ----------------------------------------------


FunctionStats = dict[str, tuple[int, float, float]]
"""function name → (calls, total ms, self ms)"""


def track_functions(conn: psycopg.Connection[Any]) -> bool:
    """Counts time per PL/pgSQL function in this session; False when not allowed."""
    try:
        conn.execute("SET track_functions = 'all'")
    except psycopg.errors.InsufficientPrivilege:
        return False
    return True


def function_stats(conn: psycopg.Connection[Any]) -> FunctionStats:
    """Cumulative statistics of segflow's functions in this database (flushed first)."""
    # Pending counters reach shared memory when the session goes idle; force it.
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT pg_stat_clear_snapshot()")
    rows = conn.execute(
        "SELECT schemaname || '.' || funcname, calls, total_time, self_time "
        "FROM pg_stat_user_functions "
        "WHERE schemaname IN ('segflow', 'segflow_compiled')").fetchall()
    return {r[0]: (int(r[1]), float(r[2]), float(r[3])) for r in rows}


def stats_delta(after: FunctionStats, before: FunctionStats) -> FunctionStats:
    out = {}
    for name, (calls, total, self_ms) in after.items():
        c0, t0, s0 = before.get(name, (0, 0.0, 0.0))
        if calls > c0:
            out[name] = (calls - c0, total - t0, self_ms - s0)
    return out


# Where the engine's functions spend their own time, in a few buckets.
_GROUPS: tuple[tuple[str, re.Pattern[str]], ...] = (
    # Before the evaluation group: rollups_add is compiled, but it keeps state.
    ("per-profile state: rollups, scores, sessions, first events",
     re.compile(r"(\._events_stored_\w+|\._rollups_\w+|\.rollups_add|\.session_bounds|"
                r"\._note_event_profiles|\._events_stored_changed)$")),
    ("evaluation (compiled s<id>_eval)", re.compile(r"^segflow_compiled\.")),
    ("sessions (session_at)", re.compile(r"\.session_at$")),
    ("segment of segments (was_member)", re.compile(r"\.was_member$")),
    ("diff + write membership/log/schedule (_apply)", re.compile(r"\._apply$")),
    ("time-driven catch-up (_before_events, _catch_up)",
     re.compile(r"\.(_before_events|_catch_up)$")),
    ("identity (resolve_*, merge_*, lock_profiles)",
     re.compile(r"\.(resolve_batch|resolve_identifiers|merge_profiles|_after_merge|"
                r"lock_profiles)$")),
    ("validation + FX (event_problem, usd_rate)",
     re.compile(r"\.(event_problem|usd_rate|fx_problem)$")),
    ("traits (apply_trait, profile triggers)",
     re.compile(r"\.(apply_trait|jsonb_set_deep|jsonb_leaves|_profiles_after_\w+|"
                r"_after_traits)$")),
    ("trigger body: move pending→stored, keys (_events_after_insert)",
     re.compile(r"\._events_after_insert$")),
)


def grouped_self_ms(stats: FunctionStats) -> dict[str, float]:
    """Self time (ms) per bucket of :data:`_GROUPS`; the rest under "other"."""
    out: dict[str, float] = {}
    for name, (_, _, self_ms) in stats.items():
        group = next((g for g, pattern in _GROUPS if pattern.search(name)), "other functions")
        out[group] = out.get(group, 0.0) + self_ms
    return out


# -- reports ------------------------------------------------------------------------------------


@dataclass
class Section:
    caption: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)


@dataclass
class Report:
    """The figures of one scenario run, printable and writable as markdown."""

    scenario: str
    scale: Scale
    title: str
    setup: list[str] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Raw numbers for tests and for whoever reads the report programmatically.
    figures: dict[str, float] = field(default_factory=dict)
    started: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    load_before: float = field(default_factory=load_average)
    load_after: float | None = None
    elapsed_s: float = 0.0
    machine: Machine | None = None

    def table(self, caption: str, columns: list[str]) -> Section:
        section = Section(caption, columns)
        self.sections.append(section)
        return section

    def context_lines(self) -> list[str]:
        lines = list(self.machine.lines()) if self.machine else []
        after = f"{self.load_after:.2f}" if self.load_after is not None else "?"
        lines.append(f"1-minute load average: {self.load_before:.2f} before, {after} after; "
                     f"run took {self.elapsed_s:.0f} s, started {self.started:%Y-%m-%d %H:%M} UTC")
        return lines

    def print(self, console: Console) -> None:
        console.rule(f"{self.title} — scale {self.scale}")
        for line in self.setup + self.context_lines():
            console.print(line, highlight=False)
        for section in self.sections:
            table = Table(*section.columns, title=section.caption, title_justify="left")
            for row in section.rows:
                table.add_row(*row)
            console.print(table)
        for note in self.notes:
            console.print(f"• {note}", highlight=False)

    def markdown(self) -> str:
        out = [f"### {self.title} (scale `{self.scale}`)", ""]
        out += [f"- {line}" for line in self.setup + self.context_lines()]
        for section in self.sections:
            out += ["", f"**{section.caption}**", ""]
            out.append("| " + " | ".join(section.columns) + " |")
            out.append("|" + "|".join("---" for _ in section.columns) + "|")
            out += ["| " + " | ".join(row) + " |" for row in section.rows]
        if self.notes:
            out.append("")
            out += [f"- {note}" for note in self.notes]
        return "\n".join(out) + "\n"


def write_section(path: Path, report: Report) -> None:
    """Replaces (or appends) the report's own marked section of ``path``."""
    begin = f"<!-- bench:{report.scenario}:{report.scale}:begin -->"
    end = f"<!-- bench:{report.scenario}:{report.scale}:end -->"
    block = f"{begin}\n{report.markdown()}{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def fmt_rate(events: int, seconds: float) -> str:
    return f"{events / seconds:,.0f}" if seconds > 0 else "–"


def fmt_ms(ms: float) -> str:
    return f"{ms:,.1f}" if ms < 100 else f"{ms:,.0f}"
