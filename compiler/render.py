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


def upto(alias: str) -> str:
    """Events of ``alias`` at or before i.at. The evaluation function's bounds over the whole
    statement (``v_to``, ``v_floor``: see segment_eval.sql.j2) are plain variables, so the
    executor drops the partitions outside them before it opens any: without them every read
    opens every partition, whose number grows with retention."""
    return (
        f"{alias}.occurred_at <= i.at AND {alias}.occurred_at <= v_to "
        f"AND {alias}.occurred_at >= v_floor"
    )


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


def latest_sql(flt: EventFilter, alias: str = "l", newer_than: Duration | None = None) -> str:
    """The latest matching event at or before i.at (ties: ingested last); with
    ``newer_than``, only if it is younger than that at every instant of the statement."""
    young = (
        f"AND {alias}.occurred_at > v_from - {interval(newer_than)} " if newer_than else ""
    )
    return (
        f"SELECT {alias}.* FROM {EVENTS} {alias} "
        f"WHERE {alias}.profile_id = i.profile_id AND {upto(alias)} {young}"
        f"AND {filter_sql(flt, alias)} "
        f"ORDER BY {alias}.occurred_at DESC, {alias}.event_id DESC LIMIT 1"
    )


def book_range(alias: str) -> str:
    """Book form: events of the batch's profile id range at or before the one instant
    (v_to = p_at), within the variable bounds the executor prunes partitions by."""
    return (
        f"{alias}.profile_id >= v_low AND {alias}.profile_id <= v_high "
        f"AND {alias}.occurred_at <= v_to AND {alias}.occurred_at >= v_floor"
    )


def book_latest_sql(flt: EventFilter, newer_than: Duration | None = None) -> str:
    """Book form of ``latest_sql``: the latest matching event of each profile (ties:
    ingested last)."""
    young = f"AND l.occurred_at > v_from - {interval(newer_than)} " if newer_than else ""
    return (
        f"SELECT DISTINCT ON (l.profile_id) l.* FROM {EVENTS} l "
        f"WHERE {book_range('l')} {young}AND {filter_sql(flt, 'l')} "
        f"ORDER BY l.profile_id, l.occurred_at DESC, l.event_id DESC"
    )


def groupable(window: Window) -> bool:
    """Whether the book form can read a window in one grouped pass: sessions and
    ``since_last`` start at a per-profile instant and stay per-profile reads."""
    return not window.session and window.since_last is None


def empty_value(func: str) -> str:
    """An aggregate over no events, as the SQL aggregates (and ``aggregate_expr``) give it."""
    return "0" if func in ("count", "sum", "distinct") else "NULL::numeric"


def window_sql(window: Window, alias: str) -> str:
    parts = [f"{alias}.profile_id = i.profile_id", upto(alias)]
    if window.within is not None:
        parts.append(f"{alias}.occurred_at > i.at - {interval(window.within)}")
        parts.append(f"{alias}.occurred_at > v_from - {interval(window.within)}")
    if window.session:
        parts.append(f"{alias}.occurred_at >= sess.start_at")
    if window.since_last is not None:
        parts.append(
            f"{alias}.occurred_at > (SELECT max(s2.occurred_at) FROM {EVENTS} s2 "
            f"WHERE s2.profile_id = i.profile_id AND {upto('s2')} "
            f"AND {filter_sql(window.since_last, 's2')})"
        )
    return " AND ".join(parts)


def numeric_of(value: Value) -> str:
    if value.kind == "numeric":
        return value.expr
    if value.kind == "jsonb":
        return f"(CASE WHEN jsonb_typeof({value.expr}) = 'number' THEN ({value.expr})::numeric END)"
    return "NULL::numeric"


def distinct_of(value: Value) -> str:
    """The value ``distinct`` counts, as jsonb: a JSON null counts as no value, and jsonb
    equality is that of the typed columns (numeric equality for numbers, text for strings),
    so a rollup can keep the values of every field in one column."""
    if value.kind == "jsonb":
        return f"(CASE WHEN jsonb_typeof({value.expr}) <> 'null' THEN {value.expr} END)"
    return f"to_jsonb({value.expr})"


def aggregate_expr(func: str, f: Field | None, alias: str) -> str:
    if func == "count":
        return "count(*)"
    assert f is not None
    value = field_value(f, alias)
    if func == "distinct":
        return f"count(DISTINCT {distinct_of(value)})"
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

ROLLED_UP = frozenset({"sum", "min", "max", "avg", "distinct"})


def rollup_spec(flt: EventFilter, f: Field, func: str) -> rollup_sql.RollupSpec:
    value = field_value(f, "e")
    if func == "distinct":
        return rollup_sql.RollupSpec(filter_sql(flt, "e"), distinct_of(value),
                                     rollup_sql.DISTINCT)
    return rollup_sql.RollupSpec(filter_sql(flt, "e"), numeric_of(value))


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
            spec = rollup_spec(flt, f, func)
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
    # Whole-book form: every profile at the one instant p_at, so the common conditions read
    # their events in one grouped pass over the batch's id range instead of per profile.
    book: bool = False

    def add(self, body: str) -> str:
        alias = f"c{len(self.laterals) + 1}"
        self.laterals.append(f"LEFT JOIN LATERAL ({body}) {alias} ON true")
        return alias

    def join(self, grouped: str) -> str:
        """Book form: a subquery with one row per profile of the batch that has any."""
        alias = f"c{len(self.laterals) + 1}"
        self.laterals.append(f"LEFT JOIN ({grouped}) {alias} ON {alias}.profile_id = i.profile_id")
        return alias

    def score_sum(self, name: str) -> str:
        """The score at i.at (``v``) and its latest weighted event (``last_at``): from the
        profile's accumulator (segflow.score_state) plus the events after its ref_at, or, with
        no usable accumulator, from all the profile's events."""
        score = self.scores[name]
        weights = ", ".join(f"({lit(t)}, {lit(float(w))}::float8)" for t, w in score.weights)
        half_life = f"{lit(score.half_life.microseconds / 1_000_000)}::float8"
        forgotten = FORGOTTEN_AFTER_HALF_LIVES

        def terms(after: str | None) -> str:
            halvings = f"(extract(epoch FROM (i.at - e.occurred_at))::float8 / {half_life})"
            lower = f" AND e.occurred_at > {after}" if after else ""
            return (
                f"SELECT coalesce(sum(CASE WHEN {halvings} >= {forgotten} THEN 0::float8 "
                f"ELSE segflow.decay(w.weight, {halvings}) END), 0)::float8 AS v, "
                f"max(e.occurred_at) AS last_at "
                f"FROM {EVENTS} e JOIN (VALUES {weights}) w(event_type, weight) "
                f"ON w.event_type = e.event_type "
                f"WHERE e.profile_id = i.profile_id AND {upto('e')}{lower}"
            )

        usable = (
            f"st.profile_id = i.profile_id AND st.score = {lit(name)} AND st.ref_at <= i.at"
        )
        carried = (
            f"CASE WHEN st.last_at IS NULL OR extract(epoch FROM (i.at - st.last_at))::float8 "
            f"/ {half_life} >= {forgotten} THEN 0::float8 "
            f"ELSE segflow.decay(st.value, "
            f"extract(epoch FROM (i.at - st.last_at))::float8 / {half_life}) END"
        )
        # LIMIT 1: the whole-history branch only runs when there is no usable accumulator.
        return (
            f"SELECT * FROM ("
            f"SELECT {carried} + r.v AS v, greatest(st.last_at, r.last_at) AS last_at "
            f"FROM segflow.score_state st CROSS JOIN LATERAL ({terms('st.ref_at')}) r "
            f"WHERE {usable} "
            f"UNION ALL "
            f"SELECT f.v, f.last_at FROM ({terms(None)}) f "
            f"WHERE NOT EXISTS (SELECT 1 FROM segflow.score_state st WHERE {usable})"
            f") sc LIMIT 1"
        )

    def condition(self, cond: Condition) -> str:
        if isinstance(cond, AllCond | AnyCond):
            if not cond.items:
                return "true" if isinstance(cond, AllCond) else "false"
            if len(cond.items) == 1:
                return self.condition(cond.items[0])
            return self.combined(cond)
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
            return self.last_field(cond)
        if isinstance(cond, LastAgeCond):
            return self.last_age(cond)
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

    def combined(self, cond: AllCond | AnyCond) -> str:
        """``all`` / ``any`` of two or more conditions, with the next instant the combination
        (not merely one of its parts) can change: a false ``all`` stays false until its last
        false part can change, and never while a false part never changes (a trait, say), so
        profiles that cannot enter get no schedule row; a true ``any`` likewise. Otherwise
        the first change of any part."""
        values: list[str] = []
        nexts: list[str | None] = []
        for item in cond.items:
            start = len(self.nexts)
            values.append(self.condition(item))
            own = self.nexts[start:]
            del self.nexts[start:]
            nexts.append("least(" + ", ".join(own) + ")" if own else None)
        is_all = isinstance(cond, AllCond)
        op = " AND " if is_all else " OR "
        if all(n is None for n in nexts):
            return "(" + op.join(values) + ")"
        columns = [f"coalesce({v}, false) AS b{k}" for k, v in enumerate(values)]
        columns += [f"{n} AS n{k}" for k, n in enumerate(nexts) if n is not None]
        alias = self.add("SELECT " + ", ".join(columns))
        parts = [(f"{alias}.b{k}", f"{alias}.n{k}" if n is not None else None)
                 for k, n in enumerate(nexts)]
        # all: the deciding parts are the false ones; any: the true ones.
        deciding = "NOT " if is_all else ""
        value = "(" + op.join(b for b, _ in parts) + ")"
        settled = " OR ".join(f"({deciding}{b} AND {n} IS NULL)" if n else f"{deciding}{b}"
                              for b, n in parts)
        latest = ", ".join(f"CASE WHEN {deciding}{b} THEN {n} END" for b, n in parts if n)
        first = ", ".join(n for _, n in parts if n)
        # Every deciding part must change before the answer does: the latest of their next
        # instants (none when one of them never changes). Without deciding parts, any
        # part's change can change the answer.
        undecided = value if is_all else f"NOT {value}"
        self.nexts.append(f"(CASE WHEN {undecided} THEN least({first}) "
                          f"WHEN {settled} THEN NULL::timestamptz "
                          f"ELSE greatest({latest}) END)")
        return value

    def last_field(self, cond: LastFieldCond) -> str:
        source = (self.join(book_latest_sql(cond.filter, newer_than=cond.max_age))
                  if self.book else "l")
        ok = comparison(field_value(cond.field, source), cond.comparison)
        nx = "NULL::timestamptz"
        if cond.max_age is not None:
            # An event older than max_age decides nothing: the latest one is false too.
            ok = f"({ok} AND i.at - {source}.occurred_at < {interval(cond.max_age)})"
            nx = f"{source}.occurred_at + {interval(cond.max_age)}"
        if self.book:
            if cond.max_age is not None:
                self.nexts.append(after(nx))
            return f"({source}.profile_id IS NOT NULL AND {ok})"
        latest = latest_sql(cond.filter, newer_than=cond.max_age)
        alias = self.add(f"SELECT {ok} AS ok, {nx} AS nx FROM ({latest}) l")
        self.nexts.append(after(f"{alias}.nx"))
        return f"coalesce({alias}.ok, false)"

    def last_age(self, cond: LastAgeCond) -> str:
        source = "l"
        if self.book:
            # Only the latest instant matters: a grouped max, not the latest row.
            source = self.join(
                f"SELECT l.profile_id, max(l.occurred_at) AS occurred_at FROM {EVENTS} l "
                f"WHERE {book_range('l')} AND {filter_sql(cond.filter, 'l')} "
                f"GROUP BY l.profile_id"
            )
        ok = comparison(Value(f"(i.at - {source}.occurred_at)", "interval"), cond.comparison)
        # Age grows continuously: `gte`/`lt` d flip exactly at d, `gt`/`lte` d a
        # microsecond later, the others at both.
        candidates: list[str] = []
        for op, operand in cond.comparison:
            items = operand if isinstance(operand, tuple) else (operand,)
            for d in items:
                if not isinstance(d, Duration):
                    continue
                edge = f"{source}.occurred_at + {interval(d)}"
                if op not in ("gt", "lte"):
                    candidates.append(after(edge))
                if op not in ("gte", "lt"):
                    candidates.append(after(f"{edge} + '1 microsecond'"))
        nx = f"least({', '.join(candidates)})" if candidates else "NULL::timestamptz"
        if self.book:
            self.nexts.append(nx)
            return f"({source}.profile_id IS NOT NULL AND {ok})"
        alias = self.add(f"SELECT {ok} AS ok, {nx} AS nx FROM ({latest_sql(cond.filter)}) l")
        self.nexts.append(f"{alias}.nx")
        return f"coalesce({alias}.ok, false)"

    def score_crossing(self, cmp: Comparison, half_life: str) -> str:
        """When the decaying score next crosses a threshold: S(t) = S·2^(−(t−T)/h)."""
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
                f"segflow.score_crossing(s.v, {lit(t)}::float8, i.at, {half_life}, "
                f"{FORGOTTEN_AFTER_HALF_LIVES + 1})"
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
        spec = rollup_spec(flt, f, func)
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
                f"WHERE s2.profile_id = i.profile_id AND {upto('s2')} "
                f"AND {filter_sql(window.since_last, 's2')}) + '1 microsecond'::interval)"
            )
        # The raw edges carry the statement's bounds too, so they open few partitions.
        matching = f"e.profile_id = i.profile_id AND {upto('e')} AND {filter_sql(flt, 'e')}"
        if window.within is not None:
            matching += f" AND e.occurred_at > v_from - {interval(window.within)}"
        if func == "distinct":
            read = rollup_sql.distinct_read(rollup_id, levels, starts, matching, spec.value_sql)
            return f"SELECT ru.n AS v FROM ({read}) ru"
        read = rollup_sql.window_read(rollup_id, levels, starts, matching, spec.value_sql)
        return f"SELECT {rollup_sql.finish(func, 'ru')} AS v FROM ({read}) ru"

    def grouped_aggregate(self, flt: EventFilter, window: Window, func: str,
                          f: Field | None) -> str:
        """Book form: a join yielding each profile's aggregate (``v``, NULL for profiles
        without matching events) and earliest matching event (``oldest``) in the window."""
        where = f"{book_range('e')} AND {filter_sql(flt, 'e')}"
        if window.within is not None:
            where += f" AND e.occurred_at > v_from - {interval(window.within)}"
        return self.join(
            f"SELECT e.profile_id, {aggregate_expr(func, f, 'e')} AS v, "
            f"min(e.occurred_at) AS oldest FROM {EVENTS} e WHERE {where} GROUP BY e.profile_id"
        )

    def events(self, cond: EventsCond) -> str:
        window = cond.window
        if window.session:
            self.uses_sessions = True
        agg = cond.aggregate
        if self.book and groupable(window):
            alias = self.grouped_aggregate(cond.filter, window, agg.func, agg.field)
            if window.within is not None:
                self.nexts.append(after(f"{alias}.oldest + {interval(window.within)}"))
            value = f"coalesce({alias}.v, {empty_value(agg.func)})"
            return comparison(Value(value, "numeric"), agg.comparison)
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
            if self.book:
                alias = self.join(book_latest_sql(value.filter))
                v = field_value(value.field, alias)
                return v.expr if v.kind == "jsonb" else f"to_jsonb({v.expr})"
            v = field_value(value.field, "l")
            expr = v.expr if v.kind == "jsonb" else f"to_jsonb({v.expr})"
            return f"(SELECT {expr} FROM ({latest_sql(value.filter)}) l)"
        if isinstance(value, ContextEvents):
            if value.window.session:
                self.uses_sessions = True
            if self.book and groupable(value.window):
                alias = self.grouped_aggregate(value.filter, value.window, value.func,
                                               value.field)
                return f"to_jsonb(coalesce({alias}.v, {empty_value(value.func)}))"
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
    # The whole-book evaluation (s<id>_book): every profile of p_profile_ids at p_at.
    book_query: str = ""


def drop_sql(name: str, segment_id: int) -> str:
    """Removes what compile_segment installed."""
    return (
        f"DROP VIEW IF EXISTS segments.{ident(name)}; "
        f"DROP FUNCTION IF EXISTS segflow_compiled.{ident(f's{segment_id}_eval')}"
        f"(bigint[], timestamptz[]); "
        f"DROP FUNCTION IF EXISTS segflow_compiled.{ident(f's{segment_id}_book')}"
        f"(bigint[], timestamptz)"
    )


def _query(segment: Segment, segment_ids: Mapping[str, int], scores: Mapping[str, Score],
           rollups: Mapping[str, int], *, book: bool) -> tuple[str, set[int]]:
    """The evaluation as one SELECT (see segment_query.sql.j2) and the rollups it reads."""
    builder = _Builder(segment, segment_ids, scores, rollups, book=book)
    member = builder.condition(segment.rule)
    if segment.goal is not None and segment.disqualify is not None:
        member = (
            f"({member} AND NOT EXISTS (SELECT 1 FROM {EVENTS} dq "
            f"WHERE dq.profile_id = i.profile_id AND {upto('dq')} "
            f"AND {filter_sql(segment.disqualify, 'dq')} "
            f"AND dq.occurred_at > (SELECT max(g.occurred_at) FROM {EVENTS} g "
            f"WHERE g.profile_id = i.profile_id AND {upto('g')} "
            f"AND {filter_sql(segment.goal, 'g')})))"
        )
    context_pairs = [(key, builder.context_value(value)) for key, value in segment.context]
    if book:
        upcoming = builder.join(
            f"SELECT f.profile_id, min(f.occurred_at) AS at FROM {EVENTS} f "
            f"WHERE f.profile_id >= v_low AND f.profile_id <= v_high "
            f"AND f.occurred_at > v_from GROUP BY f.profile_id"
        )
        builder.nexts.append(f"{upcoming}.at")
    else:
        builder.nexts.append(
            f"(SELECT min(f.occurred_at) FROM {EVENTS} f "
            f"WHERE f.profile_id = i.profile_id AND f.occurred_at > i.at "
            f"AND f.occurred_at > v_from)"
        )
    laterals = list(builder.laterals)
    if builder.uses_sessions:
        laterals.insert(0, "LEFT JOIN LATERAL segflow.session_at(i.profile_id, i.at) sess ON true")
        builder.nexts.append("sess.ends_at")
    query = TEMPLATES.get_template("segment_query.sql.j2").render(
        rows=(
            "(SELECT p.profile_id, p_at AS at FROM unnest(p_profile_ids) p(profile_id)) AS i"
            if book
            else "unnest(p_profile_ids, p_ats) AS i(profile_id, at)"
        ),
        member=member,
        next_at="least(" + ", ".join(builder.nexts) + ")",
        context=(
            "jsonb_build_object(" + ", ".join(f"{lit(k)}, {v}" for k, v in context_pairs) + ")"
        )
        if context_pairs
        else "'{}'::jsonb",
        laterals=laterals,
    )
    return query, builder.used_rollups


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
    query, used_rollups = _query(segment, segment_ids, scores, dict(rollups or {}), book=False)
    book_query, _ = _query(segment, segment_ids, scores, {}, book=True)
    function = f"s{segment_id}_eval"
    create_sql = (
        TEMPLATES.get_template("segment_eval.sql.j2").render(
            function=ident(function), segment_name=segment.name, query=query
        )
        + TEMPLATES.get_template("segment_book.sql.j2").render(
            function=ident(f"s{segment_id}_book"), segment_name=segment.name, query=book_query
        )
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
        tuple(sorted(used_rollups)),
        book_query,
    )
