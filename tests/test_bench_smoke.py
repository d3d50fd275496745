"""The benchmarks' code keeps working: every scenario at its small scale.

These check that the scenarios run and report figures; they assert nothing about speed.
"""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from bench import run_scenario
from bench.common import Report, write_section
from bench.segments import KINDS, generate, kind_of
from compiler.parse import build_project, parse_document


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def test_generated_definitions_are_valid_and_mixed() -> None:
    docs = generate(500)
    project = build_project([parse_document(d) for d in docs])
    assert len(project.segments) == 500 and "engagement" in project.scores
    kinds = {kind_of(name) for name in project.segments}
    assert {k for k, _ in KINDS} | {"of_segments"} == kinds
    # Every kind already in the first ten; the same seed gives the same definitions.
    assert {kind_of(str(d["name"])) for d in docs[:10]} == {k for k, _ in KINDS}
    assert generate(100) == docs[:100] + [docs[-1]]


def test_write_section_replaces_only_its_own_block(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nhand-written analysis\n")
    first = Report("tick", "small", "Tick")
    first.table("t", ["a"]).rows.append(["1"])
    write_section(path, first)
    second = Report("tick", "small", "Tick")
    second.table("t", ["a"]).rows.append(["2"])
    write_section(path, second)
    write_section(path, Report("ingest", "small", "Ingest"))
    text = path.read_text()
    assert "hand-written analysis" in text
    assert text.count("bench:tick:small:begin") == 1 and "| 2 |" in text and "| 1 |" not in text
    assert "bench:ingest:small:begin" in text


def test_ingest_small(db_url: str) -> None:
    report = run_scenario("ingest", db_url, "small", quiet())
    for variant in ("raw (engine off)", "plain table", "engine, 0 segments",
                    "engine, 10 segments"):
        for method in ("COPY", "INSERT"):
            assert report.figures[f"{variant} {method} ev/s"] > 0
    for method in ("COPY", "INSERT"):
        engine = report.figures[f"evaluations_10_{method}"]
        assert engine >= report.figures[f"evaluations_needed_10_{method}"] > 0
    assert "Where the time goes" in report.markdown()


def test_tick_small(db_url: str) -> None:
    report = run_scenario("tick", db_url, "small", quiet())
    # The backlog is the same at every step: all of it is applied, whatever the book size.
    assert report.figures["changes_300"] == report.figures["changes_600"] == 400
    assert report.figures["tick_ms_600"] > 0


def test_history_small(db_url: str) -> None:
    report = run_scenario("history", db_url, "small", quiet())
    assert report.figures["median_ms_10"] > 0 and report.figures["median_ms_300"] > 0
    assert report.figures["wide_mean_ms_10"] > 0
    assert "Time per event" in report.markdown()


def test_writers_small(db_url: str) -> None:
    report = run_scenario("writers", db_url, "small", quiet())
    for notify in ("off", "on", "relay"):
        assert report.figures[f"notify_{notify}_events_per_s"] > 0
        # Every event flips its trader in or out of the segment: one transition each.
        assert report.figures[f"notify_{notify}_transitions_per_event"] == 1.0
    assert "What the writers' backends were doing" in report.markdown()


def test_latency_small(db_url: str) -> None:
    report = run_scenario("latency", db_url, "small", quiet())
    # Every probe's webhook arrives, through the worker subprocess.
    assert report.figures["received"] > 0 and report.figures["missing"] == 0
    assert 0 < report.figures["p50_ms"] <= report.figures["p99_ms"]


def test_backfill_small(db_url: str) -> None:
    report = run_scenario("backfill", db_url, "small", quiet())
    for name in ("vip_depositors", "dormant_7d", "active_traders"):
        # The hand-written query, preview and apply agree on who is a member.
        assert report.figures[f"{name}_same"] == 1.0 and report.figures[f"{name}_members"] > 0
        assert report.figures[f"{name}_apply_ratio"] > 0


def test_matview_small(db_url: str) -> None:
    report = run_scenario("matview", db_url, "small", quiet())
    # segflow shows every new member at commit; the view agrees once refreshed.
    assert report.figures["segflow_visible_at_commit"] == report.figures["probes"] > 0
    assert report.figures["same_members"] == 1.0
    assert report.figures["refresh_ms"] > 0
