"""Scores kept as a decayed accumulator per (profile, score): same answers as summing the
events (CONTRACT §4), while an evaluation reads only the events after the accumulator."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from compiler.parse import load_paths
from compiler.render import compile_segment
from segflow.install import apply
from tests.helpers import (
    at,
    event,
    install,
    members,
    profile_of,
    standalone_eval,
    tick,
    transitions,
)

HALF_LIFE = timedelta(days=3)
WEIGHTS = {"login": 1.0, "page_view": 0.2, "trade": 5.0, "deposit": 10.0}
START = datetime(2026, 12, 1, tzinfo=UTC)


def direct_score(events: list[tuple[str, datetime]], at_: datetime) -> float:
    """The contract's formula over every event at or before the instant."""
    h = HALF_LIFE.total_seconds()
    return sum(WEIGHTS.get(kind, 0.0) * 2.0 ** (-(at_ - o).total_seconds() / h)
               for kind, o in events if o <= at_)


def state(conn: psycopg.Connection[Any], profile_id: int) -> tuple[datetime, float, datetime]:
    """(ref_at, value, last_at): the score of the events up to ref_at, as of last_at."""
    row = conn.execute("SELECT ref_at, value, last_at FROM segflow.score_state "
                       "WHERE profile_id = %s AND score = 'engagement'", (profile_id,)).fetchone()
    assert row is not None, "no accumulator"
    return row[0], row[1], row[2]


def test_accumulator_equals_the_sum_over_events_with_late_and_future_events(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    at(conn, START.isoformat())
    install(conn, tmp_path, "engaged", "engagement.score")
    stream: list[tuple[datetime, str, datetime]] = [
        # (clock, type, occurred_at)
        (START, "deposit", START),
        (START + timedelta(hours=5), "trade", START + timedelta(hours=5)),
        # late: occurred before the accumulator's reference instant
        (START + timedelta(hours=6), "trade", START + timedelta(hours=1)),
        # future: counted only once the clock reaches it
        (START + timedelta(hours=7), "deposit", START + timedelta(hours=7, minutes=4)),
        (START + timedelta(hours=7, minutes=2), "login", START + timedelta(hours=7, minutes=2)),
        (START + timedelta(days=1), "login", START + timedelta(days=1)),
        (START + timedelta(days=3), "page_view", START + timedelta(days=2, hours=12)),
        (START + timedelta(days=3, hours=1), "login", START + timedelta(days=3, hours=1)),
    ]
    seen: list[tuple[str, datetime]] = []
    for clock, kind, occurred in stream:
        at(conn, clock.isoformat())
        event(conn, kind, occurred.isoformat(), "C-1")
        seen.append((kind, occurred))
        ref_at, value, last_at = state(conn, profile_of(conn, "C-1"))
        assert ref_at == clock
        assert last_at == max(o for _, o in seen if o <= ref_at)
        assert math.isclose(value, direct_score(seen, last_at), rel_tol=1e-12), (kind, occurred)

    # Membership follows the formula: the trader enters `engaged` (gte 20) when the future
    # deposit comes due and leaves at the exact instant the decaying score crosses 20.
    trader = profile_of(conn, "C-1")
    tick(conn, "2026-12-20 00:00:00+00")
    moves = transitions(conn, "engaged", trader)
    assert [(kind, when) for kind, when, _ in moves][:1] == [
        ("enter", START + timedelta(hours=7, minutes=4))]
    assert [kind for kind, _, _ in moves] == ["enter", "exit"]
    left = moves[1][1]
    assert direct_score(seen, left) < 20 <= direct_score(seen, left - timedelta(milliseconds=1))
    assert members(conn, "engaged") == set()


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from plan_nodes(child)


def events_rows_read(conn: psycopg.Connection[Any], tmp_path: Path, profile_id: int,
                     when: datetime) -> int:
    project = load_paths([tmp_path / "definitions"])
    ids = dict(conn.execute("SELECT name, segment_id FROM segflow.segment_defs").fetchall())
    compiled = compile_segment(project.segments["engaged"], ids, project.scores, "")
    query = standalone_eval(compiled.eval_query)
    conn.execute("SET jit = off")
    row = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}",
                       {"profiles": [profile_id], "ats": [when]}).fetchone()
    assert row is not None
    return sum(int(n.get("Actual Rows", 0)) * int(n.get("Actual Loops", 0))
               for n in plan_nodes(row[0][0]["Plan"])
               if str(n.get("Relation Name", "")).startswith("events_"))


def test_evaluation_reads_only_events_after_the_accumulator(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    at(conn, (START + timedelta(days=10)).isoformat())
    install(conn, tmp_path, "engaged", "engagement.score")
    # Ten days of page views: 2,000 events in one statement.
    times = [START + timedelta(minutes=7 * n) for n in range(2000)]
    conn.execute(
        "INSERT INTO segflow.events (event_type, occurred_at, identifiers) "
        "SELECT 'page_view', o, %s FROM unnest(%s::timestamptz[]) o",
        (Jsonb({"crm_id": "C-2"}), times))
    trader = profile_of(conn, "C-2")
    now = START + timedelta(days=10, minutes=1)
    at(conn, now.isoformat())
    event(conn, "trade", now.isoformat(), "C-2")
    conn.execute("ANALYZE segflow.events_stored")

    with_accumulator = events_rows_read(conn, tmp_path, trader, now)
    conn.execute("DELETE FROM segflow.score_state")
    from_history = events_rows_read(conn, tmp_path, trader, now)
    # The evaluation's other reads (the next future event) are a few rows either way.
    assert with_accumulator <= 5, with_accumulator
    assert from_history >= 2000, from_history


def member_at(conn: psycopg.Connection[Any], segment: str, profile_id: int,
              when: datetime) -> bool:
    """Evaluates a segment's compiled function directly at an instant."""
    row = conn.execute(
        "SELECT segment_id FROM segflow.segment_defs WHERE name = %s", (segment,)).fetchone()
    assert row is not None
    result = conn.execute(
        f"SELECT member FROM segflow_compiled.s{row[0]}_eval(%s::bigint[], %s::timestamptz[])",
        ([profile_id], [when])).fetchone()
    assert result is not None
    return bool(result[0])


def test_extreme_weights_and_thresholds_never_fail_evaluation(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    # Products and quotients of these leave the double range long before the event is
    # forgotten (1000 half-lives); evaluation must still answer, and ingest must not fail.
    at(conn, START.isoformat())
    install(conn, tmp_path, extra={
        "dust.score": {"score": "dust", "half_life": "1s", "weights": {"tick_dust": 1e-30}},
        "any_dust": {"name": "any_dust", "rule": {"score": "dust", "gt": 0}},
        "below_huge": {"name": "below_huge", "rule": {"all": [
            {"score": "dust", "lt": 1e30}, {"score": "dust", "gt": -1e-300}]}},
    })
    event(conn, "tick_dust", START.isoformat(), "C-3")
    trader = profile_of(conn, "C-3")
    assert members(conn, "any_dust") == {trader}
    assert members(conn, "below_huge") == {trader}
    for seconds in (900, 960, 999.5, 1000, 1001, 5000):
        when = START + timedelta(seconds=seconds)
        expected = seconds <= 960  # 1e-30·2^-960 is still a (subnormal) double
        assert member_at(conn, "any_dust", trader, when) is expected, seconds
        # 0 also lies between the thresholds.
        assert member_at(conn, "below_huge", trader, when), seconds
    tick(conn, (START + timedelta(seconds=5000)).isoformat())
    later = START + timedelta(seconds=6000)
    at(conn, later.isoformat())
    event(conn, "tick_dust", later.isoformat(), "C-3")
    # Forgotten exactly 1000 half-lives after the event, back in with the new one.
    assert transitions(conn, "any_dust", trader) == [
        ("enter", START, "event"),
        ("exit", START + timedelta(seconds=1000), "tick"),
        ("enter", later, "event"),
    ]


def test_merge_and_changed_weights_rebuild_the_accumulator(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    at(conn, START.isoformat())
    install(conn, tmp_path, "engaged", "engagement.score")
    event(conn, "trade", START.isoformat(), "C-4")
    anon = {"anonymous_id": "anon-4"}
    event(conn, "deposit", START.isoformat(), "", identifiers=anon)
    known = profile_of(conn, "C-4")
    assert members(conn, "engaged") == set()  # 5 and 10 points on two profiles

    later = START + timedelta(hours=1)
    at(conn, later.isoformat())
    event(conn, "login", later.isoformat(), "C-4",
          identifiers={"anonymous_id": "anon-4", "crm_id": "C-4"})
    merged = [("trade", START), ("deposit", START), ("login", later)]
    assert members(conn, "engaged") == set()  # 5 + 10 + 1 on one profile now
    _, value, last_at = state(conn, known)
    assert math.isclose(value, direct_score(merged, last_at), rel_tol=1e-12)

    # New weights: the accumulator built under the old ones must not be used.
    definitions = tmp_path / "definitions"
    score_file = next(definitions.glob("engagement.*"))
    score_file.write_text(score_file.read_text().replace("trade: 5", "trade: 50"))
    (definitions / "engaged.yaml").write_text(
        (definitions / "engaged.yaml").read_text().replace("gte: 20", "gte: 60"))
    # The absorbed profile's accumulator is gone, the survivor's was rebuilt by the login.
    assert conn.execute("SELECT count(*) FROM segflow.score_state").fetchone() == (1,)
    with psycopg.connect(conn.info.dsn, row_factory=dict_row) as own:
        own.execute("SELECT set_config('segflow.clock', %s, false)", (later.isoformat(),))
        apply(own, [definitions])
    assert conn.execute("SELECT count(*) FROM segflow.score_state").fetchone() == (0,)
    # 50 + 10 + 1 decayed an hour ≈ 60.4: a member under the new definition.
    assert members(conn, "engaged") == {known}


def test_rows_stored_directly_drop_the_accumulator(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    at(conn, START.isoformat())
    install(conn, tmp_path, "engaged", "engagement.score")
    event(conn, "trade", START.isoformat(), "C-5")
    trader = profile_of(conn, "C-5")
    state(conn, trader)
    # A bulk load of already-resolved rows (the trusted path) does not go through the
    # triggers that keep accumulators, so the profile's accumulator must not be used again.
    conn.execute("SET segflow.trusted_ingest = on")
    conn.execute(
        "INSERT INTO segflow.events (event_type, occurred_at, identifiers, profile_id, stored) "
        "VALUES ('deposit', %s, '{}', %s, true), ('deposit', %s, '{}', %s, true)",
        (START, trader, START, trader))
    conn.execute("RESET segflow.trusted_ingest")
    assert conn.execute("SELECT count(*) FROM segflow.score_state WHERE profile_id = %s",
                        (trader,)).fetchone() == (0,)
    # 5 + 10 + 10: the next evaluation sees the loaded deposits.
    later = START + timedelta(minutes=1)
    at(conn, later.isoformat())
    event(conn, "login", later.isoformat(), "C-5")
    assert members(conn, "engaged") == {trader}
