"""Reference evaluator of the segment language, written straight from the contract (§4, §5).

This is the oracle the in-database engine is compared against, so it is deliberately naive:
every question is answered by scanning all events again, numbers are compared exactly, and it
shares no code with the compiler. Clarity beats speed everywhere.

Decisions taken where the contract is silent (the project's choices, kept in one place):

- Numbers compare exactly, as rationals. A float is taken at its shortest repr, which is the
  JSON text the database stores, so ``0.95`` equals the jsonb number ``0.95``; int, float and
  Decimal compare alike. Booleans are not numbers.
- ``ne`` and ``not_in`` are false for a missing or null value and for a value of another type,
  like every other operator except ``exists: false``.
- ``in`` / ``not_in`` lists hold one type. An empty ``in`` is false; an empty ``not_in`` is true
  for any present scalar value.
- Strings order by code point (PostgreSQL's ``COLLATE "C"``); booleans order false < true.
- ``sum``/``min``/``max``/``avg`` ignore values that are not numbers (treated as null); a sum over
  no numbers is 0, a min/max/avg over no numbers is null. ``distinct`` counts distinct non-null
  values of any type under JSON equality (``1`` equals ``1.0``, ``true`` differs from ``1``).
- ``last`` with ``field`` is false when no event matches, even for ``exists: false``: the
  contract asks for "the latest event … has field f …", and there is no such event.
- ``age`` comparisons take duration operands; a bare duration means ``eq``.
- ``disqualify`` with no goal event at or before T disqualifies nothing: nothing is "after" a
  goal that never happened (the same convention as ``since_last``'s "empty if there is none").
  "After" compares ``occurred_at`` strictly, so a disqualify event at the goal's instant does
  not count.
- Context values are JSON-compatible: ``count`` and ``distinct`` are ints; ``sum``, ``min``,
  ``max``, ``avg`` and scores are floats (``sum`` of nothing is ``0.0``, the others ``None``);
  ``last``/``trait`` values are returned as stored, except Decimal columns become floats;
  anything missing is ``None``. Compare them numerically (``500 == 500.0``).
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

__all__ = [
    "AGGREGATES",
    "COMPARISON_KEYS",
    "DefinitionError",
    "Event",
    "MISSING",
    "World",
    "compare",
    "context_at",
    "evaluate_rule",
    "evaluate_segment",
    "event_field",
    "is_member",
    "matches_filter",
    "members",
    "parse_duration",
    "refresh_members",
    "score_value",
    "window_events",
]

COMPARISON_KEYS = frozenset({"eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "exists"})
AGGREGATES = ("count", "sum", "min", "max", "avg", "distinct")
EVENT_COLUMNS = frozenset({"amount", "amount_usd", "currency", "source"})

_DURATION_RE = re.compile(r"([1-9][0-9]*)([smhdw])")
_UNITS = {
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
}
_MAX_DURATION = timedelta(days=400)


class DefinitionError(ValueError):
    """The definition is outside the language; the reference refuses to guess."""


class _Missing(enum.Enum):
    MISSING = "missing"


# A path that leads nowhere; distinct from a JSON null, although both compare the same.
MISSING = _Missing.MISSING


@dataclass(frozen=True)
class Event:
    event_id: int  # ingestion order: greater means ingested later
    profile_id: int
    event_type: str
    occurred_at: datetime  # tz-aware
    amount: Decimal | None
    amount_usd: Decimal | None
    currency: str | None
    source: str | None
    properties: dict[str, Any]


@dataclass
class World:
    # Mutable on purpose: a harness grows it as it ingests events and refreshes segments.
    events: list[Event]
    traits: dict[int, dict[str, Any]]
    segments: dict[str, dict[str, Any]]
    scores: dict[str, dict[str, Any]]
    session_timeout: timedelta = timedelta(minutes=30)
    scheduled_members: dict[str, set[int]] = field(default_factory=dict)


# --- durations ---------------------------------------------------------------------------


def parse_duration(text: object) -> timedelta:
    """``90s 30m 4h 7d 2w`` → timedelta; from 1s up to 400d."""
    if not isinstance(text, str):
        raise DefinitionError(f"duration must be a string like '4h', got {text!r}")
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        raise DefinitionError(f"malformed duration {text!r}")
    value = int(match.group(1)) * _UNITS[match.group(2)]
    if value > _MAX_DURATION:
        raise DefinitionError(f"duration {text!r} is longer than 400d")
    return value


# --- values and comparisons --------------------------------------------------------------


def _is_number(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, Decimal):
        return value.is_finite()
    return isinstance(value, int | Fraction)


def _to_fraction(value: Any) -> Fraction:
    if isinstance(value, float):
        # The shortest repr is the JSON text, hence what jsonb stores as numeric.
        return Fraction(Decimal(repr(value)))
    return Fraction(value)


def _classify(value: Any) -> tuple[str, Any] | None:
    """(type, comparable) of a value; None for missing or null."""
    if value is MISSING or value is None:
        return None
    if isinstance(value, bool):
        return ("boolean", value)
    if _is_number(value):
        return ("number", _to_fraction(value))
    if isinstance(value, str):
        return ("string", value)
    if isinstance(value, timedelta):
        return ("duration", value)
    # Arrays, objects, NaN: present, but of no type an operand can have.
    return ("other", value)


def _operand(value: Any, durations: bool) -> tuple[str, Any]:
    if durations:
        return ("duration", parse_duration(value))
    kind = _classify(value)
    if kind is None or kind[0] in ("other", "duration"):
        raise DefinitionError(f"comparison operand must be a number, string or boolean: {value!r}")
    return kind


def _comparison_spec(comparison: Any) -> dict[str, Any]:
    """A comparison mapping, or a bare scalar meaning ``eq``."""
    if isinstance(comparison, Mapping):
        spec = dict(comparison)
        unknown = set(spec) - COMPARISON_KEYS
        if unknown:
            raise DefinitionError(f"unknown comparison operators {sorted(unknown)}")
        if not spec:
            raise DefinitionError("empty comparison")
        return spec
    if isinstance(comparison, list | tuple | set | dict) or comparison is None:
        raise DefinitionError(f"not a comparison: {comparison!r}")
    return {"eq": comparison}


def _apply(op: str, operand: Any, value: Any, durations: bool) -> bool:
    kind = _classify(value)
    if op == "exists":
        if not isinstance(operand, bool):
            raise DefinitionError("exists takes true or false")
        return (kind is not None) == operand
    if op in ("in", "not_in"):
        if not isinstance(operand, list | tuple):
            raise DefinitionError(f"{op} takes a list")
        options = [_operand(o, durations) for o in operand]
        if len({t for t, _ in options}) > 1:
            raise DefinitionError(f"{op} list mixes types: {operand!r}")
        if kind is None or kind[0] == "other":
            return False
        if not options:
            return op == "not_in"
        if options[0][0] != kind[0]:
            return False
        found = any(kind[1] == o for _, o in options)
        return found if op == "in" else not found
    target = _operand(operand, durations)
    if kind is None or kind[0] != target[0]:
        return False
    a, b = kind[1], target[1]
    if op == "eq":
        return bool(a == b)
    if op == "ne":
        return bool(a != b)
    if op == "gt":
        return bool(a > b)
    if op == "gte":
        return bool(a >= b)
    if op == "lt":
        return bool(a < b)
    if op == "lte":
        return bool(a <= b)
    raise DefinitionError(f"unknown comparison operator {op!r}")


def compare(value: Any, comparison: Any, *, durations: bool = False) -> bool:
    """Whether ``value`` satisfies ``comparison`` (all operators must hold).

    ``value`` may be ``MISSING``. With ``durations`` the operands are duration strings and the
    value a timedelta (for ``age``).
    """
    spec = _comparison_spec(comparison)
    return all(_apply(op, operand, value, durations) for op, operand in spec.items())


def _inline_comparison(condition: Mapping[str, Any], allowed: set[str], where: str) -> dict:
    """The comparison operators written inline in a condition, after checking its other keys."""
    unknown = set(condition) - allowed - COMPARISON_KEYS
    if unknown:
        raise DefinitionError(f"{where}: unknown keys {sorted(unknown)}")
    spec = {k: v for k, v in condition.items() if k in COMPARISON_KEYS}
    if not spec:
        raise DefinitionError(f"{where}: needs a comparison")
    return spec


# --- fields and filters ------------------------------------------------------------------


def _dig(document: Any, path: Sequence[str]) -> Any:
    current = document
    for key in path:
        if not isinstance(current, Mapping) or key not in current:
            return MISSING
        current = current[key]
    return current


def _split_path(path: str) -> list[str]:
    parts = path.split(".")
    if not all(parts):
        raise DefinitionError(f"malformed path {path!r}")
    return parts


def event_field(event: Event, path: str) -> Any:
    """An event's field: a column or ``properties.<key>[.<key>…]``; MISSING if absent."""
    if not isinstance(path, str):
        raise DefinitionError(f"field must be a string, got {path!r}")
    if path in EVENT_COLUMNS:
        return getattr(event, path)
    head, _, rest = path.partition(".")
    if head == "properties" and rest:
        return _dig(event.properties, _split_path(rest))
    raise DefinitionError(f"unknown event field {path!r}")


def _filter_types(types: Any) -> set[str]:
    if isinstance(types, str):
        return {types}
    if isinstance(types, list | tuple) and types and all(isinstance(t, str) for t in types):
        return set(types)
    raise DefinitionError(f"event types must be a type or a non-empty list of types: {types!r}")


def matches_filter(event_filter: Any, event: Event) -> bool:
    """Whether ``event`` matches the event filter F (type, list of types, or event/where)."""
    if isinstance(event_filter, Mapping):
        unknown = set(event_filter) - {"event", "where"}
        if unknown or "event" not in event_filter:
            raise DefinitionError(f"malformed event filter {event_filter!r}")
        if event.event_type not in _filter_types(event_filter["event"]):
            return False
        where = event_filter.get("where") or {}
        if not isinstance(where, Mapping):
            raise DefinitionError(f"where must be a mapping: {where!r}")
        return all(compare(event_field(event, f), c) for f, c in where.items())
    return event.event_type in _filter_types(event_filter)


# --- events of a profile -----------------------------------------------------------------


def _check_aware(at: datetime) -> None:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"instants must be timezone-aware: {at!r}")


def _history(world: World, profile_id: int, at: datetime) -> list[Event]:
    """The profile's events with occurred_at ≤ at, in "latest is last" order."""
    _check_aware(at)
    events = [e for e in world.events if e.profile_id == profile_id and e.occurred_at <= at]
    return sorted(events, key=lambda e: (e.occurred_at, e.event_id))


def _latest(history: Sequence[Event], event_filter: Any) -> Event | None:
    matching = [e for e in history if matches_filter(event_filter, e)]
    return matching[-1] if matching else None


def _session_start(history: Sequence[Event], at: datetime, timeout: timedelta) -> datetime | None:
    """Start of the current session at ``at``, or None when there is none."""
    if not history:
        return None
    start = history[-1].occurred_at
    if at - start >= timeout:
        return None
    for previous in reversed(history[:-1]):
        # Exactly the timeout apart does not split; more does.
        if start - previous.occurred_at > timeout:
            break
        start = previous.occurred_at
    return start


def window_events(
    world: World, condition: Mapping[str, Any], profile_id: int, at: datetime
) -> list[Event]:
    """Events matching ``condition['events']`` in its window (within / since_last / both)."""
    history = _history(world, profile_id, at)
    selected = list(history)
    if "within" in condition:
        within = condition["within"]
        if within == "session":
            start = _session_start(history, at, world.session_timeout)
            selected = [] if start is None else [e for e in selected if e.occurred_at >= start]
        else:
            width = parse_duration(within)
            selected = [e for e in selected if e.occurred_at > at - width]
    if "since_last" in condition:
        anchor = _latest(history, condition["since_last"])
        if anchor is None:
            return []
        selected = [e for e in selected if e.occurred_at > anchor.occurred_at]
    return [e for e in selected if matches_filter(condition["events"], e)]


# --- aggregates --------------------------------------------------------------------------


def _json_key(value: Any) -> Any:
    """A hashable key under which JSON-equal values coincide."""
    if value is None:
        return ("null",)
    if isinstance(value, bool):
        return ("boolean", value)
    if _is_number(value):
        return ("number", _to_fraction(value))
    if isinstance(value, str):
        return ("string", value)
    if isinstance(value, list | tuple):
        return ("array", tuple(_json_key(v) for v in value))
    if isinstance(value, Mapping):
        return ("object", frozenset((k, _json_key(v)) for k, v in value.items()))
    return ("other", repr(value))


def _aggregate(name: str, events: Sequence[Event], path: str | None) -> Any:
    """count/sum/min/max/avg/distinct over the events; None stands for SQL null."""
    if name == "count":
        return len(events)
    if path is None:
        raise DefinitionError(f"{name} needs a field")
    values = [event_field(e, path) for e in events]
    if name == "distinct":
        return len({_json_key(v) for v in values if v is not MISSING and v is not None})
    numbers = [_to_fraction(v) for v in values if _is_number(v)]
    if name == "sum":
        return sum(numbers, Fraction(0))
    if not numbers:
        return None
    if name == "min":
        return min(numbers)
    if name == "max":
        return max(numbers)
    if name == "avg":
        return sum(numbers, Fraction(0)) / len(numbers)
    raise DefinitionError(f"unknown aggregate {name!r}")


def _aggregate_name(condition: Mapping[str, Any]) -> str | None:
    names = [a for a in AGGREGATES if a in condition]
    if len(names) > 1:
        raise DefinitionError(f"more than one aggregate: {names}")
    return names[0] if names else None


# --- scores ------------------------------------------------------------------------------


def score_value(world: World, score_name: str, profile_id: int, at: datetime) -> float:
    """Σ weight(e)·2^(−(at − occurred_at)/half_life) over the profile's events ≤ at (floats)."""
    definition = world.scores[score_name]
    half_life = parse_duration(definition["half_life"]).total_seconds()
    weights = definition["weights"]
    total = 0.0
    for event in _history(world, profile_id, at):
        weight = weights.get(event.event_type)
        if weight is None:
            continue
        if not _is_number(weight):
            raise DefinitionError(f"score {score_name}: weight must be a number: {weight!r}")
        age = (at - event.occurred_at).total_seconds()
        # DECIDED: an event stops counting 1000 half-lives after it occurred.
        if age / half_life >= 1000:
            continue
        total += float(weight) * 2.0 ** (-age / half_life)
    return total


# --- conditions --------------------------------------------------------------------------

_KINDS = ("all", "any", "not", "trait", "events", "last", "in_segment", "score")


def _evaluate(
    world: World, rule: Any, profile_id: int, at: datetime, stack: tuple[str, ...]
) -> bool:
    if not isinstance(rule, Mapping):
        raise DefinitionError(f"a condition must be a mapping: {rule!r}")
    kinds = [k for k in _KINDS if k in rule]
    if len(kinds) != 1:
        raise DefinitionError(f"a condition needs exactly one of {_KINDS}: {dict(rule)!r}")
    kind = kinds[0]

    if kind in ("all", "any"):
        if set(rule) != {kind} or not isinstance(rule[kind], list):
            raise DefinitionError(f"{kind} takes a list of conditions")
        results = [_evaluate(world, c, profile_id, at, stack) for c in rule[kind]]
        return all(results) if kind == "all" else any(results)

    if kind == "not":
        if set(rule) != {"not"}:
            raise DefinitionError("not takes one condition")
        return not _evaluate(world, rule["not"], profile_id, at, stack)

    if kind == "trait":
        spec = _inline_comparison(rule, {"trait"}, "trait")
        path = rule["trait"]
        if not isinstance(path, str):
            raise DefinitionError(f"trait must be a path: {path!r}")
        traits = world.traits.get(profile_id, {})
        return compare(_dig(traits, _split_path(path)), spec)

    if kind == "events":
        name = _aggregate_name(rule)
        allowed = {"events", "within", "since_last"} | ({name} if name else set())
        if set(rule) - allowed:
            raise DefinitionError(f"events: unknown keys {sorted(set(rule) - allowed)}")
        events = window_events(world, rule, profile_id, at)
        if name is None:
            return len(events) >= 1
        if name == "count":
            return compare(len(events), rule["count"])
        aggregate = rule[name]
        if not isinstance(aggregate, Mapping) or "field" not in aggregate:
            raise DefinitionError(f"{name} takes {{field: f, <comparison>}}")
        spec = _inline_comparison(aggregate, {"field"}, name)
        return compare(_aggregate(name, events, aggregate["field"]), spec)

    if kind == "last":
        latest = _latest(_history(world, profile_id, at), rule["last"])
        if "age" in rule:
            if set(rule) != {"last", "age"}:
                raise DefinitionError("last with age takes no other keys")
            if latest is None:
                return False
            return compare(at - latest.occurred_at, rule["age"], durations=True)
        spec = _inline_comparison(rule, {"last", "field", "max_age"}, "last")
        if "field" not in rule:
            raise DefinitionError("last needs field or age")
        if latest is None:
            return False
        if "max_age" in rule and not at - latest.occurred_at < parse_duration(rule["max_age"]):
            return False
        return compare(event_field(latest, rule["field"]), spec)

    if kind == "in_segment":
        if set(rule) != {"in_segment"}:
            raise DefinitionError("in_segment takes only a segment name")
        return _is_member(world, rule["in_segment"], profile_id, at, stack)

    # score
    spec = _inline_comparison(rule, {"score"}, "score")
    return compare(score_value(world, rule["score"], profile_id, at), spec)


def evaluate_rule(world: World, rule: Mapping[str, Any], profile_id: int, at: datetime) -> bool:
    """A bare rule (condition) for one profile at ``at``."""
    return _evaluate(world, rule, profile_id, at, ())


# --- segments ----------------------------------------------------------------------------


def _mode(definition: Mapping[str, Any]) -> str:
    mode = definition.get("mode", "realtime")
    if mode not in ("realtime", "scheduled"):
        raise DefinitionError(f"unknown mode {mode!r}")
    return str(mode)


def _disqualified(definition: Mapping[str, Any], history: Sequence[Event]) -> bool:
    if "disqualify" not in definition:
        return False
    if "goal" not in definition:
        raise DefinitionError("disqualify requires goal")
    goal = _latest(history, definition["goal"])
    if goal is None:
        return False
    return any(
        e.occurred_at > goal.occurred_at and matches_filter(definition["disqualify"], e)
        for e in history
    )


def _segment_holds(
    world: World, name: str, profile_id: int, at: datetime, stack: tuple[str, ...]
) -> bool:
    if name in stack:
        raise DefinitionError(f"in_segment cycle: {' -> '.join((*stack, name))}")
    definition = world.segments[name]
    if "rule" not in definition:
        raise DefinitionError(f"segment {name} has no rule")
    if not _evaluate(world, definition["rule"], profile_id, at, (*stack, name)):
        return False
    return not _disqualified(definition, _history(world, profile_id, at))


def _is_member(
    world: World, name: str, profile_id: int, at: datetime, stack: tuple[str, ...]
) -> bool:
    if _mode(world.segments[name]) == "scheduled":
        # Scheduled membership only changes at refreshes, which the harness tracks.
        return profile_id in world.scheduled_members.get(name, set())
    return _segment_holds(world, name, profile_id, at, stack)


def evaluate_segment(world: World, segment_name: str, profile_id: int, at: datetime) -> bool:
    """Rule plus goal/disqualify at ``at``, whatever the mode (what a refresh at ``at`` sees).

    Referenced scheduled segments still come from ``world.scheduled_members``.
    """
    _mode(world.segments[segment_name])
    return _segment_holds(world, segment_name, profile_id, at, ())


def is_member(world: World, segment_name: str, profile_id: int, at: datetime) -> bool:
    """Membership at ``at``: the contract's meaning for realtime segments, and
    ``world.scheduled_members`` for scheduled ones."""
    return _is_member(world, segment_name, profile_id, at, ())


def _profiles(world: World) -> set[int]:
    return {e.profile_id for e in world.events} | set(world.traits)


def members(world: World, segment_name: str, at: datetime) -> set[int]:
    """Members at ``at`` among every profile that appears in events or traits."""
    return {p for p in _profiles(world) if is_member(world, segment_name, p, at)}


def refresh_members(world: World, segment_name: str, at: datetime) -> set[int]:
    """What a refresh at ``at`` computes (for a scheduled segment's bookkeeping)."""
    return {p for p in _profiles(world) if evaluate_segment(world, segment_name, p, at)}


# --- context -----------------------------------------------------------------------------


def _to_json(value: Any) -> Any:
    if value is MISSING:
        return None
    if isinstance(value, Decimal | Fraction):
        return float(value)
    return value


def _context_value(world: World, spec: Mapping[str, Any], profile_id: int, at: datetime) -> Any:
    if not isinstance(spec, Mapping):
        raise DefinitionError(f"a context entry must be a mapping: {spec!r}")
    if "last" in spec:
        if set(spec) != {"last", "field"}:
            raise DefinitionError("context last takes {last: F, field: f}")
        latest = _latest(_history(world, profile_id, at), spec["last"])
        return None if latest is None else _to_json(event_field(latest, spec["field"]))
    if "trait" in spec:
        if set(spec) != {"trait"}:
            raise DefinitionError("context trait takes {trait: t}")
        return _to_json(_dig(world.traits.get(profile_id, {}), _split_path(spec["trait"])))
    if "score" in spec:
        if set(spec) != {"score"}:
            raise DefinitionError("context score takes {score: s}")
        return score_value(world, spec["score"], profile_id, at)
    if "events" in spec:
        name = _aggregate_name(spec) or "count"
        allowed = {"events", "within", "since_last", name}
        if set(spec) - allowed:
            raise DefinitionError(f"context events: unknown keys {sorted(set(spec) - allowed)}")
        events = window_events(world, spec, profile_id, at)
        if name == "count":
            return len(events)
        aggregate = spec[name]
        if not isinstance(aggregate, Mapping) or set(aggregate) != {"field"}:
            raise DefinitionError(f"context {name} takes {{field: f}}")
        value = _aggregate(name, events, aggregate["field"])
        if name == "distinct":
            return value
        return None if value is None else float(value)
    raise DefinitionError(f"unknown context entry {dict(spec)!r}")


def context_at(world: World, segment_name: str, profile_id: int, at: datetime) -> dict[str, Any]:
    """The segment's ``context`` values for the profile at ``at`` (JSON-compatible)."""
    context = world.segments[segment_name].get("context") or {}
    return {key: _context_value(world, spec, profile_id, at) for key, spec in context.items()}
