"""`segflow apply` and `segflow preview`: definitions on disk → compiled SQL in the database.

The given paths are the complete desired state: new segments are installed and backfilled,
changed ones become a new version (their membership differences recorded as
`definition_changed`), unchanged ones are left alone, and active segments missing from the
paths are removed (their members exit with `segment_removed`). Everything happens in one
transaction, so a failure installs nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from compiler.model import Destination, Project, Score, Segment
from compiler.parse import load_paths
from compiler.render import compile_segment, drop_sql, rollup_specs
from segflow import rollups
from segflow.db import fetch_all, fetch_one, query

Progress = Callable[[str, int, int], None]
"""(segment name, profiles done, profiles total)"""


def definition_hash(segment: Segment, project: Project) -> str:
    """Changes when the segment's own text or any score it reads changes."""
    parts = {"segment": segment.raw,
             "scores": {n: project.scores[n].raw for n in sorted(segment.referenced_scores())}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def score_hash(score: Score) -> str:
    return hashlib.sha256(json.dumps(score.raw, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Plan:
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    transitions: int = 0

    def lines(self) -> list[str]:
        out = []
        for label, names in (("new", self.new), ("changed", self.changed),
                             ("unchanged", self.unchanged), ("removed", self.removed)):
            out += [f"{label:9} {name}" for name in names]
        return out


def _closure(project: Project, name: str) -> tuple[list[str] | None, bool]:
    """Event types that can change `name`, including through its dependencies (None: any),
    and whether traits can."""
    types: set[str] | None = set()
    traits = False
    seen: set[str] = set()
    stack = [name]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        segment = project.segments[current]
        own = project.event_types(current)
        if own is None:
            types = None
        elif types is not None:
            types |= own
        traits = traits or segment.uses_traits()
        stack.extend(segment.referenced_segments())
    return (sorted(types) if types is not None else None), traits


def _evaluate_all(conn: psycopg.Connection[Any], name: str, segment_id: int, at: datetime,
                  reason: str, total: int, progress: Progress | None) -> None:
    """Evaluates the whole book in one set-based pass: the compiled book form reads each
    window once, as a hand-written GROUP BY would, where batches would read it once each."""
    if progress:
        progress(name, 0, total)
    fetch_one(conn, "evaluate_batch", segment_id=segment_id, after=0, limit=None, at=at,
              reason=reason)
    if progress:
        progress(name, total, total)


def apply(conn: psycopg.Connection[Any], paths: Iterable[str | Path], *, dry_run: bool = False,
          progress: Progress | None = None) -> Plan:
    """Installs the definitions found under `paths` (see the module doc)."""
    project = load_paths(list(paths))
    plan = Plan()
    with conn.transaction(force_rollback=dry_run):
        # One apply at a time.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('segflow.apply'))")
        at = fetch_one(conn, "now")["now"]
        installed = {r["name"]: r for r in fetch_all(conn, "installed_segments")}
        scores = {r["name"]: r["definition_hash"] for r in fetch_all(conn, "installed_scores")}
        for score in project.scores.values():
            if scores.get(score.name) != score_hash(score):
                conn.execute(query("upsert_score"), {
                    "name": score.name, "half_life_s": score.half_life.seconds,
                    "weights": Jsonb(dict(score.weights)), "definition": Jsonb(score.raw),
                    "hash": score_hash(score)})

        hashes = {name: definition_hash(s, project) for name, s in project.segments.items()}
        for name in project.segments:
            row = installed.get(name)
            if row is None or not row["active"]:
                plan.new.append(name)
            elif row["definition_hash"] != hashes[name]:
                plan.changed.append(name)
            else:
                plan.unchanged.append(name)
        plan.removed = sorted(n for n, r in installed.items()
                              if r["active"] and n not in project.segments)

        ids = {n: r["segment_id"] for n, r in installed.items()}
        for name in plan.new:
            segment = project.segments[name]
            ids[name] = fetch_one(conn, "reserve_segment", name=name, mode=segment.mode,
                                  refresh_s=segment.refresh.seconds if segment.refresh else None,
                                  definition=Jsonb(segment.raw))["segment_id"]

        # Destinations and actions go in before any evaluation, so the transitions written
        # below (backfill, definition_changed) already see them.
        _store_destinations(conn, project.destinations.values())
        for name, segment in project.segments.items():
            _store_actions(conn, ids[name], segment)

        for name in plan.removed:
            segment_id = ids[name]
            # A removed segment's mass exit is not a message to anyone, but its members do
            # leave the ads audiences it fed.
            conn.execute(query("clear_message_actions"), {"segment_id": segment_id})
            plan.transitions += fetch_one(conn, "exit_all", segment_id=segment_id, at=at,
                                          reason="segment_removed")["n"]
            conn.execute(query("clear_actions"), {"segment_id": segment_id})
            conn.execute(query("deactivate_segment"), {"segment_id": segment_id})
            conn.execute(drop_sql(name, segment_id))

        # Rollups are built from the stored events before anything reading them is evaluated.
        rollup_ids = rollups.register(conn, [
            spec for name in (*plan.new, *plan.changed)
            for spec in rollup_specs(project.segments[name])])
        total = fetch_one(conn, "live_profile_count")["n"]
        for order, (name, segment) in enumerate(project.segments.items()):
            trigger_types, trait_sensitive = _closure(project, name)
            params = {
                "segment_id": ids[name], "trigger_types": trigger_types,
                "trait_sensitive": trait_sensitive, "reads_sessions": segment.uses_sessions(),
                "depends_on": sorted(segment.referenced_segments()), "topo_order": order}
            if name in plan.unchanged:
                conn.execute(query("store_segment_order"), params)
                continue
            compiled = compile_segment(segment, ids, project.scores,
                                       json.dumps(segment.raw, indent=2, default=str),
                                       rollup_ids)
            rollups.record_users(conn, ids[name], compiled.rollup_ids)
            conn.execute(compiled.create_sql)
            conn.execute(f"DROP VIEW IF EXISTS {compiled.view}")
            conn.execute(compiled.view_sql)
            conn.execute(query("store_segment"), {
                **params, "bump": name in plan.changed, "mode": segment.mode,
                "refresh_s": segment.refresh.seconds if segment.refresh else None,
                "description": segment.description, "definition": Jsonb(segment.raw),
                "hash": hashes[name]})
            before = _transition_count(conn)
            _evaluate_all(conn, name, ids[name], at,
                          "backfill" if name in plan.new else "definition_changed",
                          total, progress)
            plan.transitions += _transition_count(conn) - before
        rollups.drop_unused(conn)
    return plan


def _store_destinations(conn: psycopg.Connection[Any],
                        destinations: Iterable[Destination]) -> None:
    """Upserts the given destinations and deactivates the others (deliveries refer to them by
    name, so rows are kept)."""
    names = []
    for d in destinations:
        names.append(d.name)
        conn.execute(query("upsert_destination"), {
            "name": d.name, "url": d.url, "channel": d.channel, "secret_env": d.secret_env,
            "secret_file": d.secret_file, "timeout_s": d.timeout.seconds,
            "max_attempts": d.max_attempts,
            "cap_max": d.frequency_cap.max if d.frequency_cap else None,
            "cap_per_s": d.frequency_cap.per.seconds if d.frequency_cap else None,
            "dedup_window_s": d.dedup_window.seconds if d.dedup_window else None,
            "definition": Jsonb(d.raw)})
    conn.execute(query("deactivate_destinations"), {"keep": names})


def _store_actions(conn: psycopg.Connection[Any], segment_id: int, segment: Segment) -> None:
    conn.execute(query("clear_actions"), {"segment_id": segment_id})
    for position, action in enumerate(segment.actions):
        conn.execute(query("insert_action"), {
            "segment_id": segment_id, "position": position, "on": action.on,
            "destination": action.destination, "priority": action.priority,
            "payload": Jsonb(action.payload) if action.payload is not None else None,
            "include_backfill": action.include_backfill})


def _transition_count(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT coalesce(max(transition_id), 0) AS n "
                       "FROM segflow.transition_log").fetchone()
    assert row is not None
    return int(row["n"])


@dataclass(frozen=True)
class Preview:
    name: str
    size: int
    profiles: int
    sample: list[dict[str, Any]]


def preview(conn: psycopg.Connection[Any], path: str | Path, *, sample: int = 10) -> Preview:
    """Evaluates one segment definition on current data without installing it."""
    target = Path(path)
    siblings = [p for p in target.parent.iterdir() if p.suffix in (".yaml", ".yml", ".json")]
    project = load_paths(siblings)
    names = [n for n, s in project.segments.items()
             if s.source_file and Path(s.source_file).resolve() == target.resolve()]
    if not names:
        raise ValueError(f"{target}: no segment definition found")
    name = names[0]
    segment = project.segments[name]
    with conn.transaction(force_rollback=True):
        # Like the engine's entry points: JIT would spend far longer compiling than running.
        conn.execute("SET LOCAL jit = off")
        ids = {r["name"]: r["segment_id"] for r in fetch_all(conn, "installed_segments")}
        ids[name] = 0  # a function name no installed segment uses; rolled back below
        # Rollups already installed serve the preview; any other aggregate scans its window.
        compiled = compile_segment(segment, ids, project.scores, "", rollups.installed(conn))
        conn.execute(compiled.create_sql)
        found = [dict(r) for r in conn.execute(query("preview_members"))]
        total = fetch_one(conn, "live_profile_count")["n"]
    return Preview(name, len(found), total, found[:sample])
