"""segflow's benchmarks (`segflow bench <scenario>|all [--scale …]`, scenarios in SCENARIOS).

Each scenario runs in a database of its own on the configured server, prints its figures
and writes them, with the machine, the PostgreSQL version and settings and the load
average, into its section of BENCHMARKS.md. Benchmarks report; they never fail for being
slow. ``tests/test_bench_smoke.py`` runs each one at the small scale to keep the code
working.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from psycopg import sql
from rich.console import Console

from bench.common import SCALES, Databases, Report, Scale, connect, load_average, wait_for_quiet

SCENARIOS: tuple[str, ...] = ("ingest", "writers", "latency", "tick", "history", "backfill",
                              "matview")
DATABASE = "segflow_bench"

__all__ = ["DATABASE", "SCALES", "SCENARIOS", "Report", "Scale", "run", "run_scenario"]


class _Scenario(Protocol):
    def run(self, url: str, scale: Scale, console: Console) -> Report: ...


def run_scenario(name: str, url: str, scale: Scale, console: Console) -> Report:
    """Runs scenario ``name`` in the migrated, empty database at ``url``."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; one of {', '.join(SCENARIOS)}")
    module: _Scenario = importlib.import_module(f"bench.{name}")
    started = time.monotonic()
    report = module.run(url, scale, console)
    report.elapsed_s = time.monotonic() - started
    report.load_after = load_average()
    return report


def _fresh_database(server_url: str) -> str:
    """An empty, migrated database ``segflow_bench`` next to ``server_url``'s."""
    from segflow.migrate import upgrade

    dbs = Databases(server_url)
    with connect(dbs.admin_url) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(DATABASE)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
    url = dbs.url(DATABASE)
    upgrade(url)
    return url


def run(scenarios: Sequence[str], scale: Scale, server_url: str, output: Path | None,
        console: Console, max_load: float | None = None,
        wait_s: float = 20 * 60) -> list[Report]:
    """Runs ``scenarios`` one after the other, each in a fresh ``segflow_bench`` database
    on the server of ``server_url`` (never in the database itself)."""
    reports = []
    for name in scenarios:
        url = _fresh_database(server_url)
        try:
            if max_load is not None:
                wait_for_quiet(max_load, wait_s, console)
            report = run_scenario(name, url, scale, console)
        finally:
            Databases(url).drop(url)
        report.print(console)
        if output is not None:
            from bench.common import write_section

            write_section(output, report)
            console.print(f"written to {output}", highlight=False)
        reports.append(report)
    return reports
