"""Typed, validated definitions: what the parser produces and the renderer consumes.

Everything here is immutable and already validated: the renderer can trust every name,
event type, key and operand it finds (they still go into SQL as literals, never as
identifiers, except names and context keys which match ``NAME_RE``).

Location strings (``loc``) say where a node came from in its file (``rule.all[2]``); they
are for messages and comments only and take no part in equality.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any, Literal, TypeAlias

# -- vocabulary ------------------------------------------------------------------------

NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,62}")
"""Segment, score, destination and context key names (``fullmatch``); 63 = PostgreSQL's limit."""

EVENT_TYPE_RE = re.compile(r"[a-z][a-z0-9_]*")
"""Event types (``fullmatch``), as ingest accepts them."""

KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
"""One step of a ``properties.<key>`` or trait path (``fullmatch``)."""

COMPARISON_OPS: tuple[str, ...] = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "exists")
ORDER_OPS: tuple[str, ...] = ("gt", "gte", "lt", "lte")
AGGREGATE_FUNCS: tuple[str, ...] = ("count", "sum", "min", "max", "avg", "distinct")
NUMERIC_COLUMNS: tuple[str, ...] = ("amount", "amount_usd")
TEXT_COLUMNS: tuple[str, ...] = ("currency", "source")
EVENT_COLUMNS: tuple[str, ...] = NUMERIC_COLUMNS + TEXT_COLUMNS
CHANNELS: tuple[str, ...] = ("email", "sms", "push", "ads", "webhook")
MODES: tuple[str, ...] = ("realtime", "scheduled")
ACTION_KINDS: tuple[str, ...] = ("enter", "exit")
RESERVED_CONTEXT_KEYS: frozenset[str] = frozenset({"profile_id", "entered_at"})

TRAIT_EVENT_TYPES: frozenset[str] = frozenset({"identify", "consent_updated"})
"""Event types whose arrival changes traits (contract §3)."""

Mode: TypeAlias = Literal["realtime", "scheduled"]
ActionKind: TypeAlias = Literal["enter", "exit"]

# -- durations -------------------------------------------------------------------------

_UNIT_MICROSECONDS: dict[str, int] = {
    "s": 1_000_000,
    "m": 60 * 1_000_000,
    "h": 3600 * 1_000_000,
    "d": 86400 * 1_000_000,
    "w": 7 * 86400 * 1_000_000,
}
_DURATION_RE = re.compile(r"([0-9]+)([smhdw])")
MIN_DURATION_US = _UNIT_MICROSECONDS["s"]
MAX_DURATION_US = 400 * _UNIT_MICROSECONDS["d"]


@dataclass(frozen=True, order=True)
class Duration:
    """A length of time; ``text`` keeps the spelling (``4h``) but ``60m == 1h``."""

    microseconds: int
    text: str = dc_field(default="", compare=False)

    @classmethod
    def parse(cls, text: str) -> Duration:
        """``90s``, ``30m``, ``4h``, ``7d``, ``2w``: 1s up to 400d. Raises ``ValueError``."""
        match = _DURATION_RE.fullmatch(text)
        if match is None:
            raise ValueError(
                f"invalid duration {text!r}: write an integer and a unit s, m, h, d or w "
                "(e.g. 90s, 30m, 4h, 7d, 2w)"
            )
        microseconds = int(match.group(1)) * _UNIT_MICROSECONDS[match.group(2)]
        if microseconds < MIN_DURATION_US:
            raise ValueError(f"duration {text!r} is shorter than 1s")
        if microseconds > MAX_DURATION_US:
            raise ValueError(f"duration {text!r} is longer than 400d")
        return cls(microseconds, text)

    @property
    def seconds(self) -> float:
        return self.microseconds / 1_000_000

    def __str__(self) -> str:
        return self.text or f"{self.microseconds // 1_000_000}s"


# -- comparisons, fields, filters --------------------------------------------------------

JsonScalar: TypeAlias = str | int | float | bool
"""A comparison operand. ``null`` is never an operand: ``exists: false`` says "missing"."""

Operand: TypeAlias = JsonScalar | tuple[JsonScalar, ...] | Duration


@dataclass(frozen=True)
class Comparison:
    """Ordered ``(op, operand)`` pairs that must all hold.

    ``in``/``not_in`` operands are non-empty tuples of one kind (all strings, all numbers or
    all booleans); ``exists`` takes a bool; ``gt``/``gte``/``lt``/``lte`` take numbers, or
    ``Duration`` in an ``age`` comparison.
    """

    ops: tuple[tuple[str, Operand], ...]

    def get(self, op: str) -> Operand | None:
        for name, operand in self.ops:
            if name == op:
                return operand
        return None

    def __iter__(self) -> Iterator[tuple[str, Operand]]:
        return iter(self.ops)


@dataclass(frozen=True)
class Field:
    """An event field: a column (``path == ()``) or a path into ``properties``."""

    path: tuple[str, ...]
    column: str | None = None

    @property
    def is_property(self) -> bool:
        return self.column is None

    @property
    def is_numeric_column(self) -> bool:
        return self.column in NUMERIC_COLUMNS

    @property
    def text(self) -> str:
        return self.column if self.column is not None else "properties." + ".".join(self.path)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class EventFilter:
    """Events of any of ``event_types`` for which every ``where`` entry holds."""

    event_types: tuple[str, ...]
    where: tuple[tuple[Field, Comparison], ...] = ()


@dataclass(frozen=True)
class Window:
    """Which events an aggregate sees; all defaults mean "every event up to T"."""

    within: Duration | None = None
    session: bool = False
    since_last: EventFilter | None = None

    @property
    def is_unbounded(self) -> bool:
        return self.within is None and not self.session and self.since_last is None


@dataclass(frozen=True)
class Aggregate:
    func: str
    field: Field | None
    comparison: Comparison


DEFAULT_AGGREGATE = Aggregate("count", None, Comparison((("gte", 1),)))
"""``{events: F}`` with no aggregate means "at least one"."""


# -- conditions ------------------------------------------------------------------------


@dataclass(frozen=True)
class TraitCond:
    path: tuple[str, ...]
    comparison: Comparison
    loc: str = dc_field(default="", compare=False)


@dataclass(frozen=True)
class EventsCond:
    filter: EventFilter
    window: Window = Window()
    aggregate: Aggregate = DEFAULT_AGGREGATE
    loc: str = dc_field(default="", compare=False)


@dataclass(frozen=True)
class LastFieldCond:
    filter: EventFilter
    field: Field
    comparison: Comparison
    max_age: Duration | None = None
    loc: str = dc_field(default="", compare=False)


@dataclass(frozen=True)
class LastAgeCond:
    """Time since the latest matching event; operands are ``Duration``; false if none."""

    filter: EventFilter
    comparison: Comparison
    loc: str = dc_field(default="", compare=False)


@dataclass(frozen=True)
class InSegmentCond:
    name: str
    loc: str = dc_field(default="", compare=False)


@dataclass(frozen=True)
class ScoreCond:
    name: str
    comparison: Comparison
    loc: str = dc_field(default="", compare=False)


@dataclass(frozen=True)
class AllCond:
    items: tuple[Condition, ...]
    loc: str = dc_field(default="", compare=False)


@dataclass(frozen=True)
class AnyCond:
    items: tuple[Condition, ...]
    loc: str = dc_field(default="", compare=False)


@dataclass(frozen=True)
class NotCond:
    item: Condition
    loc: str = dc_field(default="", compare=False)


Condition: TypeAlias = (
    TraitCond
    | EventsCond
    | LastFieldCond
    | LastAgeCond
    | InSegmentCond
    | ScoreCond
    | AllCond
    | AnyCond
    | NotCond
)


def walk(condition: Condition) -> Iterator[Condition]:
    """Every node of a condition tree, parents before children, in file order."""
    yield condition
    if isinstance(condition, AllCond | AnyCond):
        for item in condition.items:
            yield from walk(item)
    elif isinstance(condition, NotCond):
        yield from walk(condition.item)


# -- context ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ContextLast:
    filter: EventFilter
    field: Field
    loc: str = dc_field(default="", compare=False)


@dataclass(frozen=True)
class ContextTrait:
    path: tuple[str, ...]
    loc: str = dc_field(default="", compare=False)


@dataclass(frozen=True)
class ContextEvents:
    filter: EventFilter
    window: Window
    func: str
    field: Field | None  # None only for count
    loc: str = dc_field(default="", compare=False)


@dataclass(frozen=True)
class ContextScore:
    name: str
    loc: str = dc_field(default="", compare=False)


ContextValue: TypeAlias = ContextLast | ContextTrait | ContextEvents | ContextScore


# -- definitions -----------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    on: ActionKind
    destination: str
    priority: int | None = None
    # JSON passed to the destination (a mapping or a string) whose strings are jinja2
    # templates rendered at send time; not part of the hash (dicts are unhashable).
    payload: dict[str, Any] | str | None = dc_field(default=None, hash=False)
    include_backfill: bool = False
    loc: str = dc_field(default="", compare=False)


@dataclass(frozen=True)
class Score:
    name: str
    half_life: Duration
    weights: tuple[tuple[str, float], ...]
    source_file: str | None = None
    description: str | None = None
    raw: dict[str, Any] = dc_field(default_factory=dict, compare=False)

    def event_types(self) -> frozenset[str]:
        return frozenset(event_type for event_type, _ in self.weights)


DEFAULT_TIMEOUT = Duration(10 * 1_000_000, "10s")
DEFAULT_MAX_ATTEMPTS = 8
DEFAULT_DEDUP_WINDOW = Duration(3600 * 1_000_000, "1h")


@dataclass(frozen=True)
class FrequencyCap:
    """At most ``max`` messages per profile on the destination's channel within ``per``."""

    max: int
    per: Duration


@dataclass(frozen=True)
class Destination:
    """Where actions are delivered. Exactly one of ``secret_env`` / ``secret_file`` is set."""

    name: str
    url: str
    secret_env: str | None
    secret_file: str | None
    channel: str
    timeout: Duration = DEFAULT_TIMEOUT
    source_file: str | None = None
    description: str | None = None
    raw: dict[str, Any] = dc_field(default_factory=dict, compare=False)
    # Attempts before a delivery becomes a dead letter.
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    frequency_cap: FrequencyCap | None = None
    # A repeat of the message the destination last got for the profile and segment within
    # this window is dropped; None: never.
    dedup_window: Duration | None = DEFAULT_DEDUP_WINDOW


def _filters_of(condition: Condition) -> Iterator[EventFilter]:
    if isinstance(condition, EventsCond):
        yield condition.filter
        if condition.window.since_last is not None:
            yield condition.window.since_last
    elif isinstance(condition, LastFieldCond | LastAgeCond):
        yield condition.filter


def _context_filters(value: ContextValue) -> Iterator[EventFilter]:
    if isinstance(value, ContextLast):
        yield value.filter
    elif isinstance(value, ContextEvents):
        yield value.filter
        if value.window.since_last is not None:
            yield value.window.since_last


@dataclass(frozen=True)
class Segment:
    name: str
    description: str | None
    mode: Mode
    refresh: Duration | None  # set exactly when mode == "scheduled"
    rule: Condition
    goal: EventFilter | None = None
    disqualify: EventFilter | None = None  # only with goal
    context: tuple[tuple[str, ContextValue], ...] = ()
    actions: tuple[Action, ...] = ()
    source_file: str | None = None
    # The document as parsed (JSON-safe; a YAML `on:` key is stored as "on").
    raw: dict[str, Any] = dc_field(default_factory=dict, compare=False)

    def conditions(self) -> Iterator[Condition]:
        return walk(self.rule)

    def filters(self) -> Iterator[EventFilter]:
        """Every event filter the segment reads: rule, goal, disqualify and context."""
        for condition in self.conditions():
            yield from _filters_of(condition)
        if self.goal is not None:
            yield self.goal
        if self.disqualify is not None:
            yield self.disqualify
        for _, value in self.context:
            yield from _context_filters(value)

    def uses_sessions(self) -> bool:
        windows = [c.window for c in self.conditions() if isinstance(c, EventsCond)]
        windows += [v.window for _, v in self.context if isinstance(v, ContextEvents)]
        return any(window.session for window in windows)

    def uses_traits(self) -> bool:
        return any(isinstance(c, TraitCond) for c in self.conditions()) or any(
            isinstance(v, ContextTrait) for _, v in self.context
        )

    def referenced_segments(self) -> frozenset[str]:
        return frozenset(c.name for c in self.conditions() if isinstance(c, InSegmentCond))

    def referenced_scores(self) -> frozenset[str]:
        names = {c.name for c in self.conditions() if isinstance(c, ScoreCond)}
        names.update(v.name for _, v in self.context if isinstance(v, ContextScore))
        return frozenset(names)

    def referenced_destinations(self) -> frozenset[str]:
        return frozenset(action.destination for action in self.actions)

    def event_types(self, scores: Mapping[str, Score] | None = None) -> frozenset[str] | None:
        """Event types whose arrival can change this segment's result for a profile.

        ``None`` means any event type: a ``within: session`` window depends on every event
        (sessions are made of all types), and so does a score whose weights are unknown
        (``scores`` not given or lacking it). Trait conditions add the trait-changing
        types (``identify``, ``consent_updated``). Membership changes of segments named by
        ``in_segment`` are not events; they propagate along the dependency graph.
        """
        if self.uses_sessions():
            return None
        types: set[str] = set()
        for event_filter in self.filters():
            types.update(event_filter.event_types)
        for name in self.referenced_scores():
            score = scores.get(name) if scores is not None else None
            if score is None:
                return None
            types.update(score.event_types())
        if self.uses_traits():
            types.update(TRAIT_EVENT_TYPES)
        return frozenset(types)


Definition: TypeAlias = Segment | Score | Destination


@dataclass(frozen=True)
class Project:
    """A consistent set of definitions: names unique, references resolved, no cycles.

    ``segments`` is in dependency order (a segment after every segment it refers to,
    ties by name).
    """

    segments: dict[str, Segment] = dc_field(default_factory=dict)
    scores: dict[str, Score] = dc_field(default_factory=dict)
    destinations: dict[str, Destination] = dc_field(default_factory=dict)

    def event_types(self, segment: str) -> frozenset[str] | None:
        """``Segment.event_types`` with this project's scores."""
        return self.segments[segment].event_types(self.scores)

    def definitions(self) -> Iterator[Definition]:
        yield from self.scores.values()
        yield from self.destinations.values()
        yield from self.segments.values()
