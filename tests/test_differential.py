"""The engine against the brute-force reference evaluator on random definitions and streams.

Every example installs random definitions drawn from the whole language, ingests a random
event stream (in ingestion order, late events included) with the engine clock following it,
ticks at random checkpoints and compares, at each checkpoint, every segment's members with
the reference. At the end the ledger must alternate enter/exit per (segment, profile), end in
the current state, and every change must have happened exactly at its effective_at.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import reference
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from strategies import (
    BASE_TIME,
    DefinitionSet,
    check_times,
    definition_sets,
    event_streams,
    profile_traits,
    to_events,
)

from segflow.install import apply

INSTALL_AT = BASE_TIME - timedelta(hours=1)
MICRO = timedelta(microseconds=1)


def reset(conn: psycopg.Connection[Any]) -> None:
    conn.execute("""
        TRUNCATE segflow.events, segflow.event_keys, segflow.identities, segflow.profiles,
                 segflow.profile_merges, segflow.segment_members, segflow.transition_log,
                 segflow.schedule, segflow.segment_defs, segflow.score_defs RESTART IDENTITY;
        ALTER SEQUENCE segflow.event_id_seq RESTART;
        DROP SCHEMA segments CASCADE; CREATE SCHEMA segments;
        DROP SCHEMA segflow_compiled CASCADE; CREATE SCHEMA segflow_compiled;
    """)


def set_clock(conn: psycopg.Connection[Any], at: datetime) -> None:
    conn.execute("SELECT set_config('segflow.clock', %s, false)", (at.isoformat(),))


def install(conn: psycopg.Connection[Any], definitions: DefinitionSet) -> None:
    with tempfile.TemporaryDirectory() as folder:
        for name, doc in {**definitions.scores, **definitions.segments}.items():
            kind = "score" if name in definitions.scores else "segment"
            (Path(folder) / f"{kind}_{name}.json").write_text(json.dumps(doc))
        with psycopg.connect(conn.info.dsn, row_factory=dict_row) as own:
            set_clock(own, INSTALL_AT)
            apply(own, [folder])


def ingest(conn: psycopg.Connection[Any], rows: Sequence[dict[str, Any]]) -> None:
    conn.execute("INSERT INTO segflow.profiles (profile_id) SELECT unnest(%s::bigint[]) "
                 "ON CONFLICT DO NOTHING", (sorted({r["profile_id"] for r in rows}),))
    conn.execute(
        "INSERT INTO segflow.events (event_type, occurred_at, profile_id, amount, currency,"
        " source, properties) VALUES "
        + ", ".join(["(%s, %s, %s, %s, %s, %s, %s)"] * len(rows)),
        [v for r in rows for v in (r["event_type"], r["occurred_at"], r["profile_id"],
                                   r["amount"], r["currency"], r["source"],
                                   Jsonb(r["properties"]))])


def db_members(conn: psycopg.Connection[Any]) -> dict[str, set[int]]:
    found: dict[str, set[int]] = defaultdict(set)
    for segment, profile_id in conn.execute(
            "SELECT segment, profile_id FROM segflow.memberships").fetchall():
        found[segment].add(profile_id)
    return found


def depends_on_scheduled(definitions: DefinitionSet, name: str) -> bool:
    segment = definitions.segments[name]
    if segment.get("mode") == "scheduled":
        return True
    refs = [n for n in definitions.segments if f'"in_segment": "{n}"' in json.dumps(segment)]
    return any(depends_on_scheduled(definitions, n) for n in refs)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[DefinitionSet, list[dict[str, Any]],
                                        dict[int, dict[str, Any]], list[datetime]]:
    definitions = draw(definition_sets())
    rows = draw(event_streams())
    traits = draw(profile_traits())
    checks = draw(check_times(anchors=sorted({r["occurred_at"] for r in rows})))
    return definitions, rows, traits, checks


@pytest.mark.timeout(1800)
@settings(max_examples=int(os.environ.get("SEGFLOW_DIFFERENTIAL_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(scenario=scenarios())
def test_engine_matches_reference(conn: psycopg.Connection[Any], scenario: Any) -> None:
    definitions, rows, traits, checks = scenario
    reset(conn)
    set_clock(conn, INSTALL_AT)
    # Profiles exist from their traits or first event on, as they would in production.
    for profile_id in traits:
        conn.execute("INSERT INTO segflow.profiles (profile_id, traits) VALUES (%s, %s)",
                     (profile_id, Jsonb(traits[profile_id])))
    install(conn, definitions)

    events = to_events(rows)
    world = reference.World(events=[], traits=traits, segments=definitions.segments,
                            scores=definitions.scores)
    scheduled = [n for n, s in definitions.segments.items() if s.get("mode") == "scheduled"]
    refreshed_at = {n: INSTALL_AT for n in scheduled}
    for name in scheduled:
        world.scheduled_members[name] = reference.refresh_members(world, name, INSTALL_AT)

    # The engine clock follows ingestion: an event arrives at the latest occurred_at so far,
    # so an event older than that is a late one.
    clocks: list[datetime] = []
    for row in rows:
        clocks.append(max([row["occurred_at"], *clocks[-1:]]))
    pending = list(checks)

    def checkpoint(at: datetime, ingested: int) -> None:
        set_clock(conn, at)
        conn.execute("SELECT segflow.tick(%s)", (at,))
        current = replace(world, events=events[:ingested])
        for name in scheduled:
            period = reference.parse_duration(definitions.segments[name]["refresh"])
            boundary = datetime.fromtimestamp(
                (at.timestamp() // period.total_seconds()) * period.total_seconds(), at.tzinfo)
            if refreshed_at[name] < boundary:
                refreshed_at[name] = at
                world.scheduled_members[name] = reference.refresh_members(current, name, at)
        current = replace(current, scheduled_members=world.scheduled_members)
        found = db_members(conn)
        for name in definitions.segments:
            expected = reference.members(current, name, at)
            assert found.get(name, set()) == expected, (
                f"segment {name} at {at.isoformat()}: engine {sorted(found.get(name, set()))}"
                f" reference {sorted(expected)}")

    i = 0
    while i < len(rows):
        j = i
        while j < len(rows) and clocks[j] == clocks[i]:
            j += 1
        while pending and pending[0] < clocks[i]:
            checkpoint(pending.pop(0), i)
        set_clock(conn, clocks[i])
        ingest(conn, rows[i:j])
        i = j
    for at in pending:
        checkpoint(at, len(rows))

    # The ledger: alternating, ending in the current state, each change at its exact instant.
    ledger = conn.execute(
        "SELECT segment, profile_id, kind, effective_at FROM segflow.transitions "
        "ORDER BY transition_id").fetchall()
    per_key: dict[tuple[str, int], list[tuple[str, datetime]]] = defaultdict(list)
    for segment, profile_id, kind, effective_at in ledger:
        per_key[(segment, profile_id)].append((kind, effective_at))
    reasons = {r for (r,) in conn.execute("SELECT DISTINCT reason FROM segflow.transitions")}
    for reason in sorted(reasons):
        event(f"ledger has {reason} transitions")
    final = db_members(conn)
    for (segment, profile_id), changes in per_key.items():
        kinds = [k for k, _ in changes]
        assert kinds == ["enter", "exit"] * (len(kinds) // 2) + ["enter"] * (len(kinds) % 2), (
            segment, profile_id, changes)
        assert (kinds[-1] == "enter") == (profile_id in final.get(segment, set()))
        if depends_on_scheduled(definitions, segment):
            continue
        for at in sorted({t for _, t in changes}):
            if at <= INSTALL_AT:
                continue
            group = [k for k, t in changes if t == at]
            before = replace(world, events=[e for e, c in zip(events, clocks, strict=True)
                                            if c < at])
            after = replace(world, events=[e for e, c in zip(events, clocks, strict=True)
                                           if c <= at])
            # A profile exists from its traits or its first ingested event on.
            existed = profile_id in traits or any(e.profile_id == profile_id
                                                  for e in before.events)
            was = existed and reference.is_member(before, segment, profile_id, at - MICRO)
            now = reference.is_member(after, segment, profile_id, at)
            assert was == (group[0] == "exit"), (segment, profile_id, at, "state before")
            assert now == (group[-1] == "enter"), (segment, profile_id, at, "state after")
