"""`segflow apply`, `--dry-run` and `segflow preview` as a user runs them."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row, tuple_row
from typer.testing import CliRunner

from segflow.cli import app
from segflow.install import apply
from tests.helpers import at, event, install, members, profile_of

runner = CliRunner()


@pytest.fixture
def cli_env(db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("SEGFLOW_DATABASE_URL", db_url)
    monkeypatch.setenv("PGOPTIONS", "-c segflow.clock=2026-12-03T10:00:00+00:00")
    return db_url


def write(folder: Path, name: str, doc: dict[str, Any]) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def catalog(conn: psycopg.Connection[Any]) -> list[tuple[str, int]]:
    return [(r[0], r[1]) for r in conn.execute(
        "SELECT name, version FROM segflow.segment_catalog WHERE active ORDER BY name")]


def test_dry_run_shows_the_plan_and_installs_nothing(
    cli_env: str, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    write(tmp_path, "funded", {"name": "funded", "rule": {"events": "deposit"}})
    result = runner.invoke(app, ["apply", str(tmp_path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "new       funded" in result.output and "dry run" in result.output
    assert catalog(conn) == []
    result = runner.invoke(app, ["apply", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert catalog(conn) == [("funded", 1)]
    result = runner.invoke(app, ["apply", str(tmp_path)])
    assert "unchanged funded" in result.output


def test_invalid_definition_names_file_and_path_and_installs_nothing(
    cli_env: str, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    write(tmp_path, "good", {"name": "good", "rule": {"events": "deposit"}})
    bad = write(tmp_path, "bad", {"name": "bad", "rule": {"all": [
        {"events": "login"}, {"events": "trade", "within": "3 hours"}]}})
    result = runner.invoke(app, ["apply", str(tmp_path)])
    assert result.exit_code == 1
    assert f"{bad}: rule.all[1].within:" in result.output.replace("\n", "")
    assert catalog(conn) == []


def test_preview_sizes_a_definition_without_installing_it(
    cli_env: str, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    at(conn, "2026-12-03 10:00:00+00")
    event(conn, "deposit", "2026-12-03 09:00:00+00", "C-1", amount=20000, currency="USD")
    event(conn, "deposit", "2026-12-03 09:00:00+00", "C-2", amount=20, currency="USD")
    path = write(tmp_path, "whales", {"name": "whales", "rule": {
        "events": {"event": "deposit", "where": {"amount_usd": {"gte": 10000}}}},
        "context": {"biggest": {"events": "deposit", "max": {"field": "amount_usd"}}}})
    result = runner.invoke(app, ["preview", str(path)])
    assert result.exit_code == 0, result.output
    assert "whales: 1 of 2 profiles would be members" in result.output
    assert str(profile_of(conn, "C-1")) in result.output and "20000" in result.output
    assert catalog(conn) == []
    assert conn.execute("SELECT count(*) FROM segflow.transition_log").fetchone() == (0,)


def test_strings_in_definitions_cannot_inject_sql(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    nasty = "x'); DROP TABLE segflow.profiles; --"
    at(conn, "2026-12-03 10:00:00+00")
    install(conn, tmp_path, extra={"nasty": {
        "name": "nasty", "description": "it's $segflow$ \\ quoted",
        "rule": {"events": {"event": "page_view", "where": {"properties.page": nasty}}},
        "context": {"page": {"last": "page_view", "field": "properties.page"}}}})
    event(conn, "page_view", "2026-12-03 10:00:00+00", "C-1", properties={"page": nasty})
    event(conn, "page_view", "2026-12-03 10:00:00+00", "C-2", properties={"page": "x"})
    assert members(conn, "nasty") == {profile_of(conn, "C-1")}
    row = conn.execute("SELECT page FROM segments.nasty").fetchone()
    assert row == (nasty,)
    comment = conn.execute("SELECT obj_description('segments.nasty'::regclass)").fetchone()
    assert comment is not None and "$segflow$" in comment[0]


def test_five_hundred_segments(conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    at(conn, "2026-12-03 10:00:00+00")
    kinds = ("login", "deposit", "trade", "page_view", "margin_update")
    docs = {f"s{i:03d}": {"name": f"s{i:03d}", "rule": {
        "events": kinds[i % 5], "within": f"{1 + i % 50}m", "count": {"gte": 1 + i % 3}}}
        for i in range(500)}
    plan = install(conn, tmp_path, extra=docs)
    assert len(plan.new) == 500
    for minute in range(3):
        at(conn, f"2026-12-03 10:0{minute}:00+00")
        event(conn, "login", f"2026-12-03 10:0{minute}:00+00", "C-1")
    trader = profile_of(conn, "C-1")
    # Logins: segments i % 5 == 0; three logins in the last 2 minutes satisfy "count >= 1 +
    # i % 3" when the window (1 + i % 50 minutes) holds enough of them.
    expected = set()
    for i in range(0, 500, 5):
        window = 1 + i % 50
        logins = sum(1 for minute in range(3) if 2 - minute < window)
        if logins >= 1 + i % 3:
            expected.add(f"s{i:03d}")
    found = {r[0] for r in conn.execute(
        "SELECT segment FROM segflow.memberships WHERE profile_id = %s", (trader,))}
    assert found == expected and len(found) > 50


def advisory_locks(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                       "AND pid = pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def wait_for_a_lock(conn: psycopg.Connection[Any], pid: int) -> None:
    """Until the backend ``pid`` waits on a lock (5 s at most)."""
    for _ in range(100):
        row = conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                           (pid,)).fetchone()
        if row == ("Lock",):
            return
        time.sleep(0.05)
    raise AssertionError(f"backend {pid} is not waiting on a lock: {row}")


def test_backfill_holds_one_lock_whatever_the_size_of_the_book(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    # One lock per profile, held until commit, would overflow the lock table on a book of
    # millions (max_locks_per_transaction × connections).
    conn.execute("INSERT INTO segflow.profiles (profile_id, traits) "
                 "SELECT g, '{\"tier\": \"gold\"}' FROM generate_series(1, 5000) g")
    folder = tmp_path / "defs"
    write(folder, "gold", {"name": "gold", "rule": {"trait": "tier", "eq": "gold"}})
    with psycopg.connect(conn.info.dsn, row_factory=dict_row) as applying, \
            applying.transaction():
        apply(applying, [folder])
        applying.row_factory = tuple_row
        # Still in the transaction around apply: everything it locked is held.
        assert len(members(applying, "gold")) == 5000
        assert advisory_locks(applying) <= 3


def test_events_written_during_a_backfill_count_once_it_commits(
    db_url: str, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    at(conn, "2026-12-03 10:00:00+00")
    event(conn, "deposit", "2026-12-03 09:00:00+00", "C-1", amount=50, currency="USD")
    folder = tmp_path / "defs"
    write(folder, "two_deposits", {"name": "two_deposits",
                                   "rule": {"events": "deposit", "count": {"gte": 2}}})
    with psycopg.connect(db_url, row_factory=dict_row) as applying, \
            psycopg.connect(db_url) as writer:
        at(applying, "2026-12-03 10:00:00+00")
        at(writer, "2026-12-03 10:00:00+00")
        apply(applying, [folder])
        # apply has evaluated C-1 (one deposit) and not committed: a second deposit waits
        # for it, so that the new segment sees it once committed.
        writer_pid = writer.info.backend_pid
        done = threading.Event()

        def deposit() -> None:
            event(writer, "deposit", "2026-12-03 10:00:00+00", "C-1", amount=50,
                  currency="USD")
            writer.commit()
            done.set()

        thread = threading.Thread(target=deposit)
        thread.start()
        try:
            wait_for_a_lock(conn, writer_pid)
            assert not done.is_set()
            applying.commit()
        finally:
            thread.join(timeout=30)
        assert done.is_set()
    assert members(conn, "two_deposits") == {profile_of(conn, "C-1")}


def test_a_merge_waiting_on_a_backfill_does_not_deadlock_it(
    db_url: str, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    # apply takes the events table (building rollups), then the book exclusively; a merge
    # that took the book first and then waited for the table would deadlock with it.
    at(conn, "2026-12-03 10:00:00+00")
    event(conn, "deposit", "2026-12-03 09:00:00+00", "C-1", amount=600, currency="USD")
    event(conn, "deposit", "2026-12-03 09:30:00+00", "C-2", amount=600, currency="USD")
    survivor, absorbed = profile_of(conn, "C-1"), profile_of(conn, "C-2")
    folder = tmp_path / "defs"
    write(folder, "big_depositor", {"name": "big_depositor", "rule": {
        "events": "deposit", "within": "7d", "sum": {"field": "amount_usd", "gte": 1000}}})
    with psycopg.connect(db_url, row_factory=dict_row) as applying, \
            psycopg.connect(db_url) as merging:
        at(applying, "2026-12-03 10:00:00+00")
        at(merging, "2026-12-03 10:00:00+00")
        applying.execute("LOCK TABLE segflow.events IN SHARE MODE")
        merging_pid = merging.info.backend_pid
        errors: list[BaseException] = []

        def merge() -> None:
            try:
                merging.execute("SELECT segflow.merge_profiles(%s, %s)", (survivor, absorbed))
                merging.commit()
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        thread = threading.Thread(target=merge)
        thread.start()
        try:
            wait_for_a_lock(conn, merging_pid)
            # With the merge holding the book, apply would wait on it here and after
            # deadlock_timeout one of the two would fail with "deadlock detected".
            apply(applying, [folder])
            applying.row_factory = tuple_row
            assert members(applying, "big_depositor") == set()  # $600 each, not merged yet
            applying.commit()
        finally:
            applying.rollback()  # after a failure: release the merge before joining it
            thread.join(timeout=30)
        assert not thread.is_alive() and not errors, errors
    # The merge ran after the backfill committed, and the new segment saw it.
    assert members(conn, "big_depositor") == {survivor}
