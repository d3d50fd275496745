"""Typed definitions → SQL text. Pure: no database connection.

Each atomic condition becomes a LATERAL subquery yielding ``ok`` (never NULL) and ``nx``, the
earliest later instant at which its value could change with no new input (NULL: never). The
segment's ``next_at`` is the least of them and of the profile's earliest future event, which is
conservative: a re-evaluation that changes nothing only costs time.

Every value from a definition reaches SQL through ``psycopg.sql.Literal``; the only
identifiers are validated names (``NAME_RE``) and ids, quoted with ``sql.Identifier``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jinja2
from psycopg import sql

from compiler import rollups as rollup_sql
from compiler.model import (
    Aggregate,
    AllCond,
    AnyCond,
    Comparison,
    Condition,
    ContextEvents,
    ContextLast,
    ContextScore,
    ContextTrait,
    ContextValue,
    Duration,
    EventFilter,
    EventsCond,
    Field,
    InSegmentCond,
    LastAgeCond,
    LastFieldCond,
    NotCond,
    Score,
    ScoreCond,
    Segment,
    TraitCond,
    Window,
)

TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("compiler", "../sql/templates"),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,
)

EVENTS = "segflow.events_stored"
# An event stops counting in a score this many half-lives after it occurred (its term is
# then below 2^-1000 of its weight): an exact instant instead of float underflow, where
# the last bits of a denormal sum would decide when a score reaches 0.
FORGOTTEN_AFTER_HALF_LIVES = 1000


def lit(value: Any) -> str:
    return sql.Literal(value).as_string(None)


def ident(name: str) -> str:
    return sql.Identifier(name).as_string(None)


def interval(duration: Duration) -> str:
    # Pure microseconds: no day part, so time-zone rules never stretch a window.
    return f"'{duration.microseconds} microseconds'::interval"


def after(candidate: str) -> str:
    """A change instant only counts when it lies after the evaluation instant."""
    return f"(CASE WHEN ({candidate}) > i.at THEN ({candidate}) END)"


# -- values and comparisons -------------------------------------------------------------


@dataclass(frozen=True)
class Value:
    """A SQL expression and how it is typed: jsonb, numeric, text or interval."""

    expr: str
    kind: str


def field_value(f: Field, alias: str) -> Value:
    if f.column in ("amount", "amount_usd"):
        return Value(f"{alias}.{f.column}", "numeric")
    if f.column is not None:
        return Value(f"{alias}.{f.column}", "text")
    return Value(f"({alias}.properties #> {lit(list(f.path))}::text[])", "jsonb")


def _operand_kind(operand: Any) -> str:
    if isinstance(operand, Duration):
        return "interval"
    if isinstance(operand, bool):
        return "boolean"
    if isinstance(operand, int | float):
        return "number"
    return "string"


def _operand_sql(operand: Any) -> str:
    if isinstance(operand, Duration):
        return interval(operand)
    return lit(operand)


def _typed(value: Value, operand_kind: str) -> str | None:
    """``value`` as a SQL expression of the operand's type, or None on a type mismatch."""
    if value.kind == "jsonb":
        if operand_kind == "number":
            return (
                f"(CASE WHEN jsonb_typeof({value.expr}) = 'number' "
                f"THEN ({value.expr})::numeric END)"
            )
        if operand_kind == "string":
            return (
                f"(CASE WHEN jsonb_typeof({value.expr}) = 'string' "
                f"THEN ({value.expr} #>> '{{}}') END)"
            )
        if operand_kind == "boolean":
            return (
                f"(CASE WHEN jsonb_typeof({value.expr}) = 'boolean' "
                f"THEN ({value.expr})::boolean END)"
            )
        return None
    matches = {"numeric": "number", "text": "string", "interval": "interval"}
    return value.expr if matches.get(value.kind) == operand_kind else None


_SQL_OPS = {"eq": "=", "ne": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def comparison(value: Value, cmp: Comparison) -> str:
    """A never-NULL predicate: missing, null and mistyped values make every operator false
    except ``exists: false``."""
    parts: list[str] = []
    present = (
        f"({value.expr} IS NOT NULL AND jsonb_typeof({value.expr}) <> 'null')"
        if value.kind == "jsonb"
        else f"({value.expr} IS NOT NULL)"
    )
    for op, operand in cmp:
        if op == "exists":
            parts.append(present if operand else f"(NOT {present})")
            continue
        items = list(operand) if isinstance(operand, tuple) else [operand]
        typed = _typed(value, _operand_kind(items[0]))
        if typed is None:
            parts.append("false")
        elif op in _SQL_OPS:
            parts.append(f"coalesce({typed} {_SQL_OPS[op]} {_operand_sql(operand)}, false)")
        else:
            listed = ", ".join(_operand_sql(item) for item in items)
            negate = "NOT " if op == "not_in" else ""
            parts.append(f"coalesce({typed} {negate}IN ({listed}), false)")
    return "(" + " AND ".join(parts) + ")" if parts else "true"


# -- events ----------------------------------------------------------------------------


def filter_sql(flt: EventFilter, alias: str) -> str:
    types = ", ".join(lit(t) for t in flt.event_types)
    parts = [f"{alias}.event_type IN ({types})"]
    parts += [comparison(field_value(f, alias), cmp) for f, cmp in flt.where]
    return " AND ".join(parts)


def latest_sql(flt: EventFilter, alias: str = "l") -> str:
    """The latest matching event at or before i.at (ties: ingested last)."""
    return (
        f"SELECT {alias}.* FROM {EVENTS} {alias} "
        f"WHERE {alias}.profile_id = i.profile_id AND {alias}.occurred_at <= i.at "
        f"AND {filter_sql(flt, alias)} "
        f"ORDER BY {alias}.occurred_at DESC, {alias}.event_id DESC LIMIT 1"
    )


def window_sql(window: Window, alias: str) -> str:
    parts = [f"{alias}.profile_id = i.profile_id", f"{alias}.occurred_at <= i.at"]
    if window.within is not None:
        parts.append(f"{alias}.occurred_at > i.at - {interval(window.within)}")
    if window.session:
        parts.append(f"{alias}.occurred_at >= sess.start_at")
    if window.since_last is not None:
        parts.append(
            f"{alias}.occurred_at > (SELECT max(s2.occurred_at) FROM {EVENTS} s2 "
            f"WHERE s2.profile_id = i.profile_id AND s2.occurred_at <= i.at "
            f"AND {filter_sql(window.since_last, 's2')})"
        )
    return " AND ".join(parts)


def numeric_of(value: Value) -> str:
    if value.kind == "numeric":
        return value.expr
    if value.kind == "jsonb":
        return f"(CASE WHEN jsonb_typeof({value.expr}) = 'number' THEN ({value.expr})::numeric END)"
    return "NULL::numeric"


def aggregate_expr(func: str, f: Field | None, alias: str) -> str:
    if func == "count":
        return "count(*)"
    assert f is not None
    value = field_value(f, alias)
    if func == "distinct":
        if value.kind == "jsonb":
            return (
                f"count(DISTINCT CASE WHEN jsonb_typeof({value.expr}) <> 'null' "
                f"THEN {value.expr} END)"
            )
        return f"count(DISTINCT {value.expr})"
    if func == "sum":
        return f"coalesce(sum({numeric_of(value)}), 0)"
    return f"{func}({numeric_of(value)})"


def count_cap(aggregate: Aggregate) -> int | None:
    """For a count, a number of events past which its comparison cannot change (every
    numeric operand is below it); None for other aggregates."""
    if aggregate.func != "count":
        return None
    numbers = [0.0]
    for _, operand in aggregate.comparison:
        items = operand if isinstance(operand, tuple) else (operand,)
        numbers += [
            float(x) for x in items if isinstance(x, int | float) and not isinstance(x, bool)
        ]
    return math.floor(max(numbers)) + 1


# -- rollups (compiler/rollups.py) -----------------------------------------------------

ROLLED_UP = frozenset({"sum", "min", "max", "avg"})


def rollup_spec(flt: EventFilter, f: Field) -> rollup_sql.RollupSpec:
    return rollup_sql.RollupSpec(filter_sql(flt, "e"), numeric_of(field_value(f, "e")))


def rollup_levels(window: Window) -> tuple[rollup_sql.Level, ...]:
    """Bucket levels for an aggregate over ``window``: bounded by ``within`` when given;
    sessions, ``since_last`` and all-history windows can be of any length."""
    span = window.within.microseconds / 1_000_000 if window.within is not None else None
    return rollup_sql.levels_for(span)


def _aggregates(segment: Segment) -> list[tuple[EventFilter, Window, str, Field | None]]:
    """(filter, window, aggregate, field) of every events condition and context value."""
    found: list[tuple[EventFilter, Window, str, Field | None]] = []

    def walk(cond: Condition) -> None:
        if isinstance(cond, AllCond | AnyCond):
            for item in cond.items:
                walk(item)
        elif isinstance(cond, NotCond):
            walk(cond.item)
        elif isinstance(cond, EventsCond):
            found.append((cond.filter, cond.window, cond.aggregate.func, cond.aggregate.field))

    walk(segment.rule)
    for _, value in segment.context:
        if isinstance(value, ContextEvents):
            found.append((value.filter, value.window, value.func, value.field))
    return found


def rollup_specs(segment: Segment) -> list[rollup_sql.RollupSpec]:
    """The rollups the segment's evaluation reads when they are installed, without repeats."""
    specs: dict[str, rollup_sql.RollupSpec] = {}
    for flt, window, func, f in _aggregates(segment):
        if func in ROLLED_UP and f is not None and rollup_levels(window):
            spec = rollup_spec(flt, f)
            specs.setdefault(spec.signature, spec)
    return list(specs.values())


# -- the segment -----------------------------------------------------------------------


@dataclass
class _Builder:
    segment: Segment
    segment_ids: Mapping[str, int]
    scores: Mapping[str, Score]
    # Installed rollups by signature; aggregates without one scan their window.
    rollups: Mapping[str, int] = field(default_factory=dict)
    laterals: list[str] = field(default_factory=list)
    nexts: list[str] = field(default_factory=list)
    uses_sessions: bool = False
    used_rollups: set[int] = field(default_factory=set)

    def add(self, body: str) -> str:
        alias = f"c{len(self.laterals) + 1}"
        self.laterals.append(f"LEFT JOIN LATERAL ({body}) {alias} ON true")
        return alias

    def score_sum(self, name: str) -> str:
        score = self.scores[name]
        weights = ", ".join(f"({lit(t)}, {lit(float(w))}::float8)" for t, w in score.weights)
        half_life = lit(score.half_life.microseconds / 1_000_000)
        halvings = f"(extract(epoch FROM (i.at - e.occurred_at))::float8 / {half_life}::float8)"
        return (
            f"SELECT coalesce(sum(w.weight * CASE WHEN {halvings} >= {FORGOTTEN_AFTER_HALF_LIVES} "
            f"THEN 0::float8 ELSE power(2::float8, -{halvings}) END), 0)::float8 AS v, "
            f"max(e.occurred_at) AS last_at "
            f"FROM {EVENTS} e JOIN (VALUES {weights}) w(event_type, weight) "
            f"ON w.event_type = e.event_type "
            f"WHERE e.profile_id = i.profile_id AND e.occurred_at <= i.at"
        )

    def condition(self, cond: Condition) -> str:
        if isinstance(cond, AllCond):
            return (
                "(" + " AND ".join(self.condition(c) for c in cond.items) + ")"
                if cond.items
                else "true"
            )
        if isinstance(cond, AnyCond):
            return (
                "(" + " OR ".join(self.condition(c) for c in cond.items) + ")"
                if cond.items
                else "false"
            )
        if isinstance(cond, NotCond):
            return f"(NOT {self.condition(cond.item)})"
        if isinstance(cond, TraitCond):
            value = Value(f"(pr.traits #> {lit(list(cond.path))}::text[])", "jsonb")
            return comparison(value, cond.comparison)
        if isinstance(cond, InSegmentCond):
            segment_id = lit(self.segment_ids[cond.name])
            # A tick applies the referenced segment's changes up to its own instant first;
            # those already recorded after i.at are changes of this one too.
            self.nexts.append(
                f"(SELECT min(t.effective_at) FROM segflow.transition_log t "
                f"WHERE t.segment_id = {segment_id} AND t.profile_id = i.profile_id "
                f"AND t.effective_at > i.at)"
            )
            return f"segflow.was_member({segment_id}, i.profile_id, i.at)"
        if isinstance(cond, EventsCond):
            return self.events(cond)
        if isinstance(cond, LastFieldCond):
            ok = comparison(field_value(cond.field, "l"), cond.comparison)
            nx = "NULL::timestamptz"
            if cond.max_age is not None:
                ok = f"({ok} AND i.at - l.occurred_at < {interval(cond.max_age)})"
                nx = f"l.occurred_at + {interval(cond.max_age)}"
            alias = self.add(f"SELECT {ok} AS ok, {nx} AS nx FROM ({latest_sql(cond.filter)}) l")
            self.nexts.append(after(f"{alias}.nx"))
            return f"coalesce({alias}.ok, false)"
        if isinstance(cond, LastAgeCond):
            ok = comparison(Value("(i.at - l.occurred_at)", "interval"), cond.comparison)
            edges: list[Duration] = []
            for _, operand in cond.comparison:
                items = operand if isinstance(operand, tuple) else (operand,)
                edges += [d for d in items if isinstance(d, Duration)]
            candidates = []
            for d in edges:
                candidates.append(after(f"l.occurred_at + {interval(d)}"))
                candidates.append(after(f"l.occurred_at + {interval(d)} + '1 microsecond'"))
            nx = f"least({', '.join(candidates)})" if candidates else "NULL::timestamptz"
            alias = self.add(f"SELECT {ok} AS ok, {nx} AS nx FROM ({latest_sql(cond.filter)}) l")
            self.nexts.append(f"{alias}.nx")
            return f"coalesce({alias}.ok, false)"
        if isinstance(cond, ScoreCond):
            half_life = self.scores[cond.name].half_life
            crossing = self.score_crossing(
                cond.comparison, f"{lit(half_life.microseconds / 1_000_000)}::float8"
            )
            # The score becomes exactly 0 once every event is forgotten.
            zero = after(f"s.last_at + {FORGOTTEN_AFTER_HALF_LIVES} * {interval(half_life)}")
            alias = self.add(
                f"SELECT s.v, least({crossing}, {zero}) AS nx FROM ({self.score_sum(cond.name)}) s"
            )
            self.nexts.append(f"{alias}.nx")
            return comparison(Value(f"{alias}.v", "numeric"), cond.comparison)
        raise TypeError(f"unknown condition {cond!r}")

    def score_crossing(self, cmp: Comparison, half_life: str) -> str:
        """When the decaying score next crosses a threshold: S(t) = S·2^(−(t−T)/h); a score
        exactly on a threshold leaves it a microsecond later."""
        thresholds: set[float] = set()
        for op, operand in cmp:
            if op == "exists":
                continue
            items = operand if isinstance(operand, tuple) else (operand,)
            thresholds.update(
                float(x)
                for x in items
                if isinstance(x, int | float) and not isinstance(x, bool) and x
            )
        if not thresholds:
            return "NULL::timestamptz"
        return (
            "least("
            + ", ".join(
                f"(CASE WHEN s.v / {lit(t)}::float8 >= 1 THEN greatest("
                f"i.at + make_interval(secs => {half_life} * ln(s.v / {lit(t)}::float8)"
                f" / ln(2::float8)), i.at + '1 microsecond'::interval) END)"
                for t in sorted(thresholds)
            )
            + ")"
        )

    def rolled_up(self, flt: EventFilter, window: Window, func: str,
                  f: Field | None) -> str | None:
        """A SELECT of the aggregate as ``v`` read from its rollup, or None when it has none:
        the window's bucket rows plus the raw events of its partial edges."""
        if func not in ROLLED_UP or f is None:
            return None
        levels = rollup_levels(window)
        spec = rollup_spec(flt, f)
        rollup_id = self.rollups.get(spec.signature)
        if not levels or rollup_id is None:
            return None
        self.used_rollups.add(rollup_id)
        starts: list[str] = []
        if window.within is not None:
            starts.append(f"(i.at - {interval(window.within)} + '1 microsecond'::interval)")
        if window.session:
            starts.append("sess.start_at")
        if window.since_last is not None:
            starts.append(
                f"((SELECT max(s2.occurred_at) FROM {EVENTS} s2 "
                f"WHERE s2.profile_id = i.profile_id AND s2.occurred_at <= i.at "
                f"AND {filter_sql(window.since_last, 's2')}) + '1 microsecond'::interval)"
            )
        read = rollup_sql.window_read(
            rollup_id, levels, starts,
            f"e.profile_id = i.profile_id AND {filter_sql(flt, 'e')}", spec.value_sql)
        return f"SELECT {rollup_sql.finish(func, 'ru')} AS v FROM ({read}) ru"

    def events(self, cond: EventsCond) -> str:
        window = cond.window
        if window.session:
            self.uses_sessions = True
        agg = cond.aggregate
        ok = comparison(Value("a.v", "numeric"), agg.comparison)
        where = f"{window_sql(window, 'e')} AND {filter_sql(cond.filter, 'e')}"
        cap = count_cap(agg)
        rolled = self.rolled_up(cond.filter, window, agg.func, agg.field)
        if rolled is not None:
            body = rolled
        elif cap is not None:
            # Whether a count passes its thresholds needs at most cap events, however long
            # the profile's history in the window is.
            body = (
                f"SELECT count(*) AS v FROM (SELECT 1 FROM {EVENTS} e WHERE {where} LIMIT {cap}) e"
            )
        else:
            body = (
                f"SELECT {aggregate_expr(agg.func, agg.field, 'e')} AS v "
                f"FROM {EVENTS} e WHERE {where}"
            )
        oldest = "NULL::timestamptz"
        if window.within is not None:
            oldest = (
                f"(SELECT e.occurred_at FROM {EVENTS} e WHERE {where} "
                f"ORDER BY e.occurred_at LIMIT 1)"
            )
        alias = self.add(f"SELECT {ok} AS ok, {oldest} AS oldest FROM ({body}) a")
        if window.within is not None:
            self.nexts.append(after(f"{alias}.oldest + {interval(window.within)}"))
        return f"coalesce({alias}.ok, false)"

    def context_value(self, value: ContextValue) -> str:
        if isinstance(value, ContextTrait):
            return f"(pr.traits #> {lit(list(value.path))}::text[])"
        if isinstance(value, ContextLast):
            v = field_value(value.field, "l")
            expr = v.expr if v.kind == "jsonb" else f"to_jsonb({v.expr})"
            return f"(SELECT {expr} FROM ({latest_sql(value.filter)}) l)"
        if isinstance(value, ContextEvents):
            if value.window.session:
                self.uses_sessions = True
            rolled = self.rolled_up(value.filter, value.window, value.func, value.field)
            if rolled is not None:
                return f"(SELECT to_jsonb(rv.v) FROM ({rolled}) rv)"
            return (
                f"(SELECT to_jsonb({aggregate_expr(value.func, value.field, 'e')}) "
                f"FROM {EVENTS} e WHERE {window_sql(value.window, 'e')} "
                f"AND {filter_sql(value.filter, 'e')})"
            )
        if isinstance(value, ContextScore):
            return (
                f"(SELECT to_jsonb(round(s.v::numeric, 6)) FROM ({self.score_sum(value.name)}) s)"
            )
        raise TypeError(f"unknown context value {value!r}")


@dataclass(frozen=True)
class CompiledSegment:
    name: str
    segment_id: int
    view: str
    eval_function: str
    # The evaluation as one SELECT over the parameters p_profile_ids and p_ats.
    eval_query: str
    create_sql: str
    view_sql: str
    # Rollups the evaluation reads (segflow.rollup_users).
    rollup_ids: tuple[int, ...] = ()


def drop_sql(name: str, segment_id: int) -> str:
    """Removes what compile_segment installed."""
    return (
        f"DROP VIEW IF EXISTS segments.{ident(name)}; "
        f"DROP FUNCTION IF EXISTS segflow_compiled.{ident(f's{segment_id}_eval')}"
        f"(bigint[], timestamptz[])"
    )


def compile_segment(
    segment: Segment,
    segment_ids: Mapping[str, int],
    scores: Mapping[str, Score],
    definition_text: str,
    rollups: Mapping[str, int] | None = None,
) -> CompiledSegment:
    """SQL that installs (create_sql, view_sql) or removes (drop_sql) one segment.
    ``rollups``: installed rollup ids by signature (see ``rollup_specs``)."""
    segment_id = segment_ids[segment.name]
    builder = _Builder(segment, segment_ids, scores, dict(rollups or {}))
    member = builder.condition(segment.rule)
    if segment.goal is not None and segment.disqualify is not None:
        member = (
            f"({member} AND NOT EXISTS (SELECT 1 FROM {EVENTS} dq "
            f"WHERE dq.profile_id = i.profile_id AND dq.occurred_at <= i.at "
            f"AND {filter_sql(segment.disqualify, 'dq')} "
            f"AND dq.occurred_at > (SELECT max(g.occurred_at) FROM {EVENTS} g "
            f"WHERE g.profile_id = i.profile_id AND g.occurred_at <= i.at "
            f"AND {filter_sql(segment.goal, 'g')})))"
        )
    context_pairs = [(key, builder.context_value(value)) for key, value in segment.context]
    laterals = list(builder.laterals)
    if builder.uses_sessions:
        laterals.insert(0, "LEFT JOIN LATERAL segflow.session_at(i.profile_id, i.at) sess ON true")
        builder.nexts.append("sess.ends_at")
    nexts = builder.nexts + [
        f"(SELECT min(f.occurred_at) FROM {EVENTS} f "
        f"WHERE f.profile_id = i.profile_id AND f.occurred_at > i.at)"
    ]
    function = f"s{segment_id}_eval"
    query = TEMPLATES.get_template("segment_query.sql.j2").render(
        member=member,
        next_at="least(" + ", ".join(nexts) + ")",
        context=(
            "jsonb_build_object(" + ", ".join(f"{lit(k)}, {v}" for k, v in context_pairs) + ")"
        )
        if context_pairs
        else "'{}'::jsonb",
        laterals=laterals,
    )
    create_sql = TEMPLATES.get_template("segment_eval.sql.j2").render(
        function=ident(function), segment_name=segment.name, query=query
    )
    view_sql = TEMPLATES.get_template("segment_view.sql.j2").render(
        view=ident(segment.name),
        segment_id=segment_id,
        columns=[(lit(k), ident(k)) for k, _ in segment.context],
        comment=lit(definition_text),
    )
    return CompiledSegment(
        segment.name,
        segment_id,
        f"segments.{ident(segment.name)}",
        function,
        query,
        create_sql,
        view_sql,
        tuple(sorted(builder.used_rollups)),
    )
