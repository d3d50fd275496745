"""The whole-book evaluation (backfill, preview, scheduled refreshes) against the per-profile
one: on random definitions from the whole language and random event streams, both give every
profile the same membership, next change instant and context at every checkpoint."""

from __future__ import annotations

import os
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from psycopg.types.json import Jsonb
from test_differential import INSTALL_AT, Scenario, ingest, install, reset, scenarios, set_clock

from segflow.db import query

EVALUATIONS = """
    SELECT e.profile_id, e.member, e.next_at, e.context
    FROM segflow_compiled.{function}(%(profiles)s, {instants}) e ORDER BY e.profile_id
"""


@pytest.mark.timeout(1800)
@settings(max_examples=2 * int(os.environ.get("SEGFLOW_DIFFERENTIAL_EXAMPLES", "100")),
          deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(scenario=scenarios())
def test_book_matches_per_profile(conn: psycopg.Connection[Any], scenario: Scenario) -> None:
    reset(conn)
    set_clock(conn, INSTALL_AT)
    for profile_id, traits in scenario.traits.items():
        conn.execute("INSERT INTO segflow.profiles (profile_id, traits) VALUES (%s, %s)",
                     (profile_id, Jsonb(traits)))
    install(conn, scenario.definitions)
    set_clock(conn, max(clock for clock, _ in scenario.deliveries))
    ingest(conn, [row for _, row in scenario.deliveries])
    segments = conn.execute("SELECT name, segment_id FROM segflow.segment_defs WHERE active"
                            " ORDER BY segment_id").fetchall()
    profiles = [r[0] for r in conn.execute(
        "SELECT profile_id FROM segflow.profiles WHERE merged_into IS NULL ORDER BY 1")]
    for at in scenario.checks:
        # The ledger up to `at`, as in_segment reads it.
        conn.execute(query("tick"), {"at": at})
        for name, segment_id in segments:
            params = {"profiles": profiles, "at": at, "ats": [at] * len(profiles)}
            per_profile = conn.execute(EVALUATIONS.format(
                function=f"s{segment_id}_eval", instants="%(ats)s"), params).fetchall()
            book = conn.execute(EVALUATIONS.format(
                function=f"s{segment_id}_book", instants="%(at)s"), params).fetchall()
            assert book == per_profile, f"{name} at {at.isoformat()}"
