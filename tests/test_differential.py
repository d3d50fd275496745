"""The engine against the brute-force reference evaluator on random definitions and streams.

Every example installs random definitions drawn from the whole language, ingests a random
event stream with the engine clock following ingestion (events arrive on time, late, or early
with a future occurred_at that must come due by itself), ticks at random checkpoints and
compares every segment's members with the reference at each checkpoint. Then the ledger is
replayed: per (segment, profile) it must alternate enter/exit, end in the current state and
keep the entry's context until the exit; and at every instant where a membership may change
(event instants, clocks, transitions, each plus every duration of the definitions, a
microsecond either side) it must record what the reference says, with the context the
reference computes at each entry.

Run with ``--hypothesis-show-statistics`` to see what the examples exercised.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
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
    FUTURE_TOLERANCE,
    DefinitionSet,
    Delivery,
    check_times,
    definition_sets,
    event_palettes,
    profile_traits,
    timed_event_streams,
    to_events,
)

from segflow.install import apply

INSTALL_AT = BASE_TIME - timedelta(hours=1)
MICRO = timedelta(microseconds=1)
# Reasons of the transitions that show the world moving after install.
MOVING_REASONS = frozenset({"event", "tick", "scheduled_refresh"})
DURATION_TEXT = re.compile(r"[1-9][0-9]*[smhdw]")


def offset(at: datetime) -> str:
    """``at`` as a signed offset from BASE_TIME (h:mm:ss[.µs]): short and easy to compare."""
    delta = at - BASE_TIME
    sign = "-" if delta < timedelta(0) else "+"
    delta = abs(delta)
    hours, rest = divmod(delta.days * 86400 + delta.seconds, 3600)
    text = f"{sign}{hours}:{rest // 60:02}:{rest % 60:02}"
    return f"{text}.{delta.microseconds:06}" if delta.microseconds else text


@dataclass(frozen=True)
class Transition:
    segment: str
    profile_id: int
    kind: str
    effective_at: datetime
    reason: str
    context: dict[str, Any]


@dataclass(frozen=True)
class Scenario:
    definitions: DefinitionSet
    deliveries: list[Delivery]  # in ingestion order
    traits: dict[int, dict[str, Any]]
    checks: list[datetime]

    def describe(self) -> str:
        lines = [f"scenario (times are offsets from {BASE_TIME.isoformat()}):"]
        for name, doc in self.definitions.scores.items():
            lines.append(f"  score {name}: {json.dumps(doc)}")
        for name, doc in self.definitions.segments.items():
            lines.append(f"  segment {name}: {json.dumps(doc)}")
        lines.append(f"  traits: {json.dumps(self.traits)}")
        lines.append("  events in ingestion order (event_id, clock, occurred_at, profile, …):")
        for event_id, (clock, row) in enumerate(self.deliveries, start=1):
            extra = {k: row[k] for k in ("amount", "source") if row[k] is not None}
            occurred = offset(row["occurred_at"])
            lines.append(
                f"    #{event_id:<3} clock {offset(clock):>11}  occurred {occurred:>11}"
                f"  p{row['profile_id']} {row['event_type']} {json.dumps(extra, default=str)}"
                f" {json.dumps(row['properties'])}")
        lines.append(f"  checkpoints: {', '.join(offset(c) for c in self.checks)}")
        return "\n".join(lines)

    # Hypothesis prints falsifying examples with its pretty printer, which asks for this.
    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(self.describe())


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    # The stream's event types first, so that definitions mostly filter on types that occur.
    types = draw(event_palettes())
    definitions = draw(definition_sets(types=types))
    deliveries = draw(timed_event_streams(types))
    traits = draw(profile_traits())
    anchors = sorted({r["occurred_at"] for _, r in deliveries} | {c for c, _ in deliveries})
    checks = draw(check_times(anchors=anchors))
    return Scenario(definitions, deliveries, traits, checks)


def reset(conn: psycopg.Connection[Any]) -> None:
    conn.execute("""
        TRUNCATE segflow.events, segflow.event_keys, segflow.identities, segflow.profiles,
                 segflow.profile_merges, segflow.segment_members, segflow.transition_log,
                 segflow.schedule, segflow.segment_defs, segflow.score_defs,
                 segflow.rollup_defs, segflow.rollup_users, segflow.event_rollups,
                 segflow.event_distinct_values
                 RESTART IDENTITY;
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


def referenced(definitions: DefinitionSet, name: str) -> list[str]:
    text = json.dumps(definitions.segments[name])
    return [n for n in definitions.segments if f'"in_segment": "{n}"' in text]


def depends_on_scheduled(definitions: DefinitionSet, name: str) -> bool:
    if definitions.segments[name].get("mode") == "scheduled":
        return True
    return any(depends_on_scheduled(definitions, n) for n in referenced(definitions, name))


def features(definition: Mapping[str, Any]) -> set[str]:
    """The parts of the language a segment uses, for the coverage statistics."""
    found: set[str] = set()

    def walk(condition: Mapping[str, Any]) -> None:
        for kind in ("all", "any"):
            if kind in condition:
                found.add(kind)
                for child in condition[kind]:
                    walk(child)
        if "not" in condition:
            found.add("not")
            walk(condition["not"])
        for kind in ("trait", "in_segment", "score"):
            if kind in condition:
                found.add(kind)
        if "last" in condition:
            found.add("last age" if "age" in condition else "last field")
            if "max_age" in condition:
                found.add("max_age")
        if "events" in condition:
            within = condition.get("within")
            found.add("events" if within is None else
                      "within session" if within == "session" else "within duration")
            if "since_last" in condition:
                found.add("since_last")
            found.update(a for a in reference.AGGREGATES if a in condition)

    walk(definition["rule"])
    found.update(k for k in ("goal", "disqualify", "context") if k in definition)
    if definition.get("mode") == "scheduled":
        found.add("scheduled")
    return found


@pytest.mark.timeout(1800)
@settings(max_examples=int(os.environ.get("SEGFLOW_DIFFERENTIAL_EXAMPLES", "100")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(scenario=scenarios())
def test_engine_matches_reference(conn: psycopg.Connection[Any], scenario: Scenario) -> None:
    definitions, traits, checks = scenario.definitions, scenario.traits, scenario.checks
    reset(conn)
    set_clock(conn, INSTALL_AT)
    # Profiles exist from their traits or first event on, as they would in production.
    for profile_id in traits:
        conn.execute("INSERT INTO segflow.profiles (profile_id, traits) VALUES (%s, %s)",
                     (profile_id, Jsonb(traits[profile_id])))
    install(conn, definitions)
    if conn.execute("SELECT EXISTS (SELECT 1 FROM segflow.rollup_defs)").fetchone() == (True,):
        event("an aggregate reads a rollup")
    if conn.execute("SELECT EXISTS (SELECT 1 FROM segflow.rollup_defs WHERE kind = 'distinct')"
                    ).fetchone() == (True,):
        event("distinct reads a rollup")

    clocks = [clock for clock, _ in scenario.deliveries]
    rows = [row for _, row in scenario.deliveries]
    assert clocks == sorted(clocks), "the engine clock never goes backwards"
    assert all(r["occurred_at"] - c <= FUTURE_TOLERANCE for c, r in scenario.deliveries)
    events = to_events(rows)
    world = reference.World(events=[], traits=traits, segments=definitions.segments,
                            scores=definitions.scores)
    scheduled = [n for n, s in definitions.segments.items() if s.get("mode") == "scheduled"]
    refreshed_at = {n: INSTALL_AT for n in scheduled}
    for name in scheduled:
        world.scheduled_members[name] = reference.refresh_members(world, name, INSTALL_AT)
    pending = list(checks)

    def checkpoint(at: datetime, ingested: int) -> None:
        set_clock(conn, at)
        conn.execute("SELECT segflow.tick(%s)", (at,))
        # What the engine has seen by now: the events ingested so far; the reference itself
        # leaves out those whose occurred_at is still ahead.
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
                f"segment {name} at {offset(at)} after {ingested} events: "
                f"engine {sorted(found.get(name, set()))}, reference {sorted(expected)}")

    # Events sharing a clock go in one statement; a checkpoint at that clock comes after it.
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

    ledger = [Transition(*row) for row in conn.execute(
        "SELECT segment, profile_id, kind, effective_at, reason, context"
        " FROM segflow.transitions ORDER BY transition_id").fetchall()]
    record_statistics(scenario, ledger)
    check_ledger(scenario, world, ledger, db_members(conn))


def durations_of(definitions: DefinitionSet) -> set[timedelta]:
    """Every duration written in the definitions, and the session timeout."""
    found = {reference.World([], {}, {}, {}).session_timeout}

    def walk(value: Any) -> None:
        if isinstance(value, Mapping):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and DURATION_TEXT.fullmatch(value):
            found.add(reference.parse_duration(value))

    walk(definitions.segments)
    walk(definitions.scores)
    return found


def critical_instants(occurred: set[datetime], others: set[datetime],
                      durations: set[timedelta], until: datetime, middles: bool,
                      ) -> list[datetime]:
    """Where a membership may change: at an instant of ``others`` (clocks, transitions) or
    ``occurred`` (occurred_at), or a duration after one of ``occurred`` (windows, ages,
    max_age, sessions), each with the microsecond before and after. With ``middles`` also a
    point between each two of these, for changes no edge predicts (a decaying score crossing
    a threshold)."""
    edges = {o + d for o in occurred for d in durations}
    points = {e + s for e in edges for s in (-MICRO, timedelta(0), MICRO)}
    points |= {b + s for b in occurred | others for s in (-MICRO, timedelta(0))}
    ordered = sorted(p for p in points if INSTALL_AT < p <= until)
    if not middles:
        return ordered
    between = [a + (b - a) // 2 for a, b in zip(ordered, ordered[1:], strict=False)
               if b - a > 2 * MICRO]
    return sorted({*ordered, *between})


def same_value(engine: Any, expected: Any) -> bool:
    """JSON equality of a context value, numbers within rounding."""
    if isinstance(engine, bool) or isinstance(expected, bool):
        # Python takes True for 1; JSON does not.
        return type(engine) is type(expected) and engine == expected
    numbers = (int, float, Decimal)
    if isinstance(engine, numbers) and isinstance(expected, numbers):
        # Scores are stored rounded to 6 decimals.
        return math.isclose(float(engine), float(expected), rel_tol=1e-9, abs_tol=1e-6)
    return bool(engine == expected)


def check_ledger(scenario: Scenario, world: reference.World, ledger: Sequence[Transition],
                 final: Mapping[str, set[int]]) -> None:
    """The ledger alternates enter/exit per (segment, profile), ends in the current state,
    carries the context of the entry, and replays the reference at every instant that
    matters: a membership changes exactly at its effective_at, never in between."""
    definitions = scenario.definitions
    per_key: dict[tuple[str, int], list[Transition]] = defaultdict(list)
    for transition in ledger:
        per_key[(transition.segment, transition.profile_id)].append(transition)
    for (segment, profile_id), changes in per_key.items():
        history = [(t.kind, offset(t.effective_at), t.reason) for t in changes]
        where = f"segment {segment}, profile {profile_id}, ledger {history}"
        kinds = [t.kind for t in changes]
        assert kinds == ["enter", "exit"] * (len(kinds) // 2) + ["enter"] * (len(kinds) % 2), (
            f"{where}: transitions do not alternate")
        assert (kinds[-1] == "enter") == (profile_id in final.get(segment, set())), (
            f"{where}: the last transition disagrees with the current members")
        instants = [t.effective_at for t in changes]
        assert instants == sorted(instants), f"{where}: effective_at goes backwards"
        for entry, leave in zip(changes[::2], changes[1::2], strict=False):
            assert leave.context == entry.context, f"{where}: context changed before the exit"

    # The state the ledger records at any instant up to the last tick, against the reference
    # over what the engine had ingested by then (for profiles that existed by then).
    if not scenario.checks:
        return
    until = scenario.checks[-1]
    clocks = [clock for clock, _ in scenario.deliveries]
    events = to_events([row for _, row in scenario.deliveries])
    durations = durations_of(definitions)
    realtime = [n for n in definitions.segments if not depends_on_scheduled(definitions, n)]
    profiles = sorted(set(scenario.traits) | {e.profile_id for e in events})
    scored = any("score" in features(definitions.segments[n]) for n in realtime)
    for profile_id in profiles:
        mine = [(e, c) for e, c in zip(events, clocks, strict=True) if e.profile_id == profile_id]
        occurred = {e.occurred_at for e, _ in mine}
        others = {c for _, c in mine} | {t.effective_at for t in ledger
                                         if t.profile_id == profile_id}
        for at in critical_instants(occurred, others, durations, until, scored):
            known = replace(world, events=[e for e, c in mine if c <= at])
            existed = profile_id in scenario.traits or bool(known.events)
            for segment in realtime:
                changes = per_key.get((segment, profile_id), [])
                recorded = [t for t in changes if t.effective_at <= at]
                member = bool(recorded) and recorded[-1].kind == "enter"
                expected = existed and reference.is_member(known, segment, profile_id, at)
                assert member == expected, (
                    f"segment {segment}, profile {profile_id} at {offset(at)}: the ledger says "
                    f"{'member' if member else 'no member'}, the reference "
                    f"{'member' if expected else 'no member'}; ledger "
                    f"{[(t.kind, offset(t.effective_at), t.reason) for t in changes]}")
                last = recorded[-1] if recorded else None
                if last is None or last.effective_at != at or last.kind != "enter":
                    continue
                # Context is what the entering evaluation saw: a tick's (and a new profile's)
                # comes before the events ingested at that very clock.
                if last.reason in ("tick", "trait"):
                    seen = replace(world, events=[e for e, c in mine if c < at])
                else:
                    seen = known
                context = reference.context_at(seen, segment, profile_id, at)
                assert set(last.context) == set(context) and all(
                    same_value(last.context[k], context[k]) for k in context), (
                    f"segment {segment}, profile {profile_id} entering at {offset(at)} "
                    f"({last.reason}): context {last.context}, reference {context}")


def record_statistics(scenario: Scenario, ledger: Sequence[Transition]) -> None:
    """What the example exercised, for ``--hypothesis-show-statistics``: the reasons in the
    ledger, the parts of the language of segments that moved, and the arrival patterns."""
    for reason in sorted({t.reason for t in ledger}):
        event(f"ledger has {reason} transitions")
    moving = {t.segment for t in ledger
              if t.reason in MOVING_REASONS and t.effective_at > INSTALL_AT}
    used: set[str] = set()
    for name in moving:
        used |= features(scenario.definitions.segments[name])
    for feature in sorted(used):
        event(f"moving segment uses {feature}")
    late = {c for c, r in scenario.deliveries if c > r["occurred_at"]}
    early = {(r["profile_id"], r["occurred_at"]) for c, r in scenario.deliveries
             if c < r["occurred_at"]}
    if any(t.reason == "event" and t.effective_at in late for t in ledger):
        event("a late event changed a membership")
    if any(t.reason == "tick" and (t.profile_id, t.effective_at) in early for t in ledger):
        event("a future occurred_at came due in a tick")
