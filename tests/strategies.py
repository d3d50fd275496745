"""Hypothesis strategies for differential tests: random event streams with the engine clock at
which each event arrives, traits, definitions drawn from the whole segment language, and
checkpoint instants.

Everything lives on a coarse grid around ``BASE_TIME`` (whole seconds, mostly multiples of
30 s) and every duration is a small multiple of the grid, so window edges, ``max_age``/``age``
thresholds, session gaps of exactly the timeout and equal ``occurred_at`` ties are hit exactly
and often. Definitions are always valid per the contract; invalid ones are the compiler's tests.

Random definitions over random events are nearly always constant (a filter on a type that
never occurs, a ``where`` nothing satisfies, a deep ``all``), and a constant world tests
nothing. So a stream uses a small palette of event types and definitions draw their filters
mostly from it, thresholds come from values that occur, and rules are mostly "lively" leaves
that hold often and flip as time passes (recent events, ages, ``max_age``, sessions, decaying
scores, segment chains). Deep random trees still come up, so the whole language stays
reachable. The simplest option comes first in every choice, so failures shrink towards it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import strategies as st
from reference import Event, World

BASE_TIME = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
EVENT_HORIZON = timedelta(hours=4)  # events occur in [BASE_TIME, BASE_TIME + 4h]
CHECK_HORIZON = timedelta(hours=6)  # checkpoints reach past the events so windows slide off
GRID = timedelta(seconds=30)
# The engine refuses an occurred_at further ahead of its clock than this (inclusive edge).
FUTURE_TOLERANCE = timedelta(minutes=5)

PROFILE_IDS = (1, 2, 3, 4)
EVENT_TYPES = ("login", "page_view", "deposit", "trade", "margin_update", "positions_closed")
# Every stream has one of these, as every trader's does: windows over them are rarely empty.
COMMON_TYPES = ("login", "page_view")
MONEY_TYPES = frozenset({"deposit", "trade", "positions_closed"})
# Filters may also name a type that never occurs: they must cope with no events at all.
FILTER_TYPES = (*EVENT_TYPES, "withdrawal")
ASSETS = ("XAUUSD", "EURUSD", "BTCUSD")
SOURCES = (None, "web", "app")
AMOUNTS = tuple(Decimal(a) for a in ("0.95", "1", "1.00", "100", "250.50", "1000", "-50.25"))

DURATIONS = ("1s", "30s", "5m", "30m", "1h", "2h")
# Durations of lively leaves: long enough to catch a few events, short enough to run out.
LIVELY_DURATIONS = ("5m", "30m", "1h", "30s", "2h")
REFRESHES = ("30s", "1m", "5m", "30m", "1h")
# Gaps between consecutive instants: ties, short bursts, exactly the session timeout, ±1 s.
GAP_SECONDS = (0, 1, 30, 30, 60, 60, 120, 300, 300, 600, 1799, 1800, 1800, 1801, 3600)
# How an event arrives relative to its occurred_at; mostly on time.
ARRIVALS = ("on_time", "on_time", "on_time", "on_time", "on_time", "on_time",
            "late", "late", "early", "early")
LATE_SECONDS = (1, 30, 300, 1800, 3600, 7200)
EARLY_SECONDS = (1, 30, 60, 299, 300)

OPERATORS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "exists")
ORDER_OPERATORS = ("eq", "ne", "gt", "gte", "lt", "lte")
# Age and score thresholds that hold for a while and then stop (or the other way round).
RANGE_OPERATORS = ("gte", "lt", "gt", "lte")

# Field and trait paths with the operands worth comparing them with (values that occur, so
# comparisons are sometimes true and sometimes false); the operands' type is the field's.
EVENT_FIELDS: dict[str, tuple[Any, ...]] = {
    "amount": (0, 1, 0.95, 100, 250.5, 1000),
    "amount_usd": (0, 1, 100, 250.5, 1000),
    "currency": ("USD", "EUR"),
    "source": ("web", "app"),
    "properties.utilization": (0.5, 0.9, 0.95, 1, 1.25),
    "properties.exposure_usd": (0, 1000, 2500.5, 10000),
    "properties.asset": ASSETS,
    "properties.risk.level": ("high", "low"),
    "properties.nowhere": (0, 1),
}
NUMERIC_EVENT_FIELDS = tuple(f for f, v in EVENT_FIELDS.items() if isinstance(v[0], int | float))
TRAIT_PATHS: dict[str, tuple[Any, ...]] = {
    "tier": ("gold", "silver", "platinum"),
    "country": ("DE", "GB", "CY"),
    "balance": (0, 100, 1000, 2500.5),
    "vip": (True, False),
    "consent.email": (True, False),
    "consent.sms": (True, False),
    "nowhere.deep": ("x",),
}
COUNTS: tuple[int, ...] = (0, 1, 2, 3, 5)
SCORE_LEVELS: tuple[int | float, ...] = (0, 0.5, 1, 2.5, 5, 10)
SCORE_WEIGHTS: tuple[int | float, ...] = (1, 2, 0.5, 10, -1, 0)
# Near the weights: a fresh event's weight crosses them and decay brings it back below.
SCORE_THRESHOLDS: tuple[int | float, ...] = (0.5, 1, 0.25, 1.5, 2, 2.5, 5, 10, 0, -0.5)
# Operands of the wrong type, whose comparisons must be false (never an error).
MISMATCHED: tuple[tuple[Any, ...], ...] = ((0, 1, 0.95), ("USD", "gold", "0.97"), (True, False))

NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,62}", fullmatch=True)
# Readable names first; NAMES now and then so odd (long, underscored) names stay covered.
SEGMENT_NAMES = ("seg_a", "seg_b", "seg_c", "seg_d")
SCORE_NAMES = ("score_a", "score_b", "score_c")
CONTEXT_KEYS = ("ctx_a", "ctx_b", "ctx_c", "exposure_usd", "tier")

# (engine clock at ingestion, ingest row)
Delivery = tuple[datetime, dict[str, Any]]


# --- events ------------------------------------------------------------------------------

_utilization = st.one_of(
    st.sampled_from((0.5, 0.9, 0.95, 0.96, 1.0, 1.25)),
    st.sampled_from((0, 1, 2)),
    st.sampled_from(("0.97", "high")),  # strings never compare with numbers
    st.none(),
)
_OPTIONAL_PROPERTIES: dict[str, st.SearchStrategy[Any]] = {
    "utilization": _utilization,
    "asset": st.sampled_from(ASSETS),
    "exposure_usd": st.one_of(st.sampled_from((0, 1000, 2500.5, 10000)), st.none()),
    "risk": st.fixed_dictionaries({}, optional={"level": st.sampled_from(("high", "low", 1))}),
}


def _properties(event_type: str) -> st.SearchStrategy[dict[str, Any]]:
    if event_type == "margin_update":
        # What margin conditions look at is usually there.
        rest = {k: v for k, v in _OPTIONAL_PROPERTIES.items() if k != "utilization"}
        return st.fixed_dictionaries({"utilization": _utilization}, optional=rest)
    return st.fixed_dictionaries({}, optional=_OPTIONAL_PROPERTIES)


@st.composite
def event_palettes(draw: st.DrawFn) -> tuple[str, ...]:
    """The few event types one stream uses, a common one among them."""
    first = draw(st.sampled_from(COMMON_TYPES))
    others = draw(st.lists(st.sampled_from(EVENT_TYPES), max_size=3, unique=True))
    return tuple(dict.fromkeys((first, *others)))


@st.composite
def _one_type(draw: st.DrawFn, types: Sequence[str] = ()) -> str:
    """Mostly a type of ``types`` (those that occur); now and then any type, including one
    that never occurs."""
    if types and draw(st.integers(0, 5)) < 5:
        return draw(st.sampled_from(tuple(types)))
    return draw(st.sampled_from(FILTER_TYPES))


@st.composite
def _instants(draw: st.DrawFn) -> list[int]:
    """Offsets in seconds from BASE_TIME, built from gaps so edges coincide exactly."""
    offset = draw(st.sampled_from((0, 30, 600, 3600)))
    instants = [offset]
    for gap in draw(st.lists(st.sampled_from(GAP_SECONDS), min_size=1, max_size=30)):
        offset += gap
        if offset > EVENT_HORIZON.total_seconds():
            break
        instants.append(offset)
    return instants


@st.composite
def _event_row(
    draw: st.DrawFn, profiles: Sequence[int], instants: Sequence[int], types: Sequence[str]
) -> dict[str, Any]:
    # The palette's first type (a common one) is the most frequent.
    event_type = draw(st.sampled_from((types[0], *types)))
    amount = (
        draw(st.one_of(st.sampled_from(AMOUNTS), st.none())) if event_type in MONEY_TYPES else None
    )
    return {
        "event_type": event_type,
        "occurred_at": BASE_TIME + timedelta(seconds=draw(st.sampled_from(instants))),
        "profile_id": draw(st.sampled_from(profiles)),
        "amount": amount,
        "currency": None if amount is None else "USD",
        "source": draw(st.sampled_from(SOURCES)),
        "properties": draw(_properties(event_type)),
    }


@st.composite
def timed_event_streams(
    draw: st.DrawFn, types: Sequence[str] = (), min_size: int = 5, max_size: int = 40
) -> list[Delivery]:
    """Events in ingest shape ``{event_type, occurred_at, profile_id, amount, currency,
    source, properties}`` with the engine clock at which each is ingested, in ingestion order
    (clocks never decrease). Most arrive on time, some late (up to 2 h after occurred_at) and
    some early (occurred_at up to the future tolerance ahead of the clock).

    ``types`` is the stream's palette of event types (drawn when empty)."""
    palette = tuple(types) or draw(event_palettes())
    # Few profiles, so each has enough events for windows, sessions and scores to fill.
    profiles = PROFILE_IDS[: draw(st.sampled_from((1, 2, 2, 3, 4)))]
    instants = draw(_instants())
    # Sizes uniform over the range: hypothesis' own list sizes favour very short streams.
    size = draw(st.integers(min_size, max_size))
    rows = draw(
        st.lists(_event_row(profiles, instants, palette), min_size=size, max_size=size)
    )
    arrivals: list[tuple[datetime, int]] = []
    for index, row in enumerate(rows):
        arrival = draw(st.sampled_from(ARRIVALS))
        clock = row["occurred_at"]
        if arrival == "late":
            clock += timedelta(seconds=draw(st.sampled_from(LATE_SECONDS)))
        elif arrival == "early":
            clock -= timedelta(seconds=draw(st.sampled_from(EARLY_SECONDS)))
        arrivals.append((clock, index))
    # Stable: rows arriving at the same clock keep their drawn order (their ingestion order).
    return [(clock, rows[index]) for clock, index in sorted(arrivals)]


def event_streams(min_size: int = 5, max_size: int = 40) -> st.SearchStrategy[list[dict[str, Any]]]:
    """The rows of ``timed_event_streams``, in ingestion order (which is not occurred_at
    order)."""
    return timed_event_streams(min_size=min_size, max_size=max_size).map(
        lambda deliveries: [row for _, row in deliveries]
    )


def _decimal(value: Any) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, float):
        return Decimal(repr(value))
    return Decimal(value)


def to_events(
    rows: Sequence[Mapping[str, Any]], event_ids: Sequence[int] | None = None
) -> list[Event]:
    """Reference events from ingest rows; ``event_ids`` default to 1, 2, … in list order.

    Amounts must be in USD (or absent): the reference knows no FX rates.
    """
    ids = list(range(1, len(rows) + 1)) if event_ids is None else list(event_ids)
    if len(ids) != len(rows):
        raise ValueError("one event_id per row")
    events = []
    for event_id, row in zip(ids, rows, strict=True):
        amount = _decimal(row.get("amount"))
        currency = row.get("currency")
        if amount is not None and currency != "USD":
            raise ValueError(f"only USD amounts are supported, got {currency!r}")
        events.append(
            Event(
                event_id=event_id,
                profile_id=row["profile_id"],
                event_type=row["event_type"],
                occurred_at=row["occurred_at"],
                amount=amount,
                amount_usd=amount,
                currency=currency,
                source=row.get("source"),
                properties=copy.deepcopy(dict(row.get("properties") or {})),
            )
        )
    return events


def profile_traits(
    profile_ids: Sequence[int] = PROFILE_IDS,
) -> st.SearchStrategy[dict[int, dict[str, Any]]]:
    """Traits per profile (some profiles have none), nested for ``consent.*``."""
    one = st.fixed_dictionaries(
        {},
        optional={
            "tier": st.sampled_from(("gold", "silver", "platinum")),
            "country": st.sampled_from(("DE", "GB", "CY")),
            "balance": st.sampled_from((0, 0.95, 100, 1000, 2500.5, "1000")),
            "vip": st.one_of(st.booleans(), st.just("yes")),
            "consent": st.fixed_dictionaries(
                {}, optional={"email": st.booleans(), "sms": st.booleans()}
            ),
        },
    )
    return st.fixed_dictionaries({}, optional={p: one for p in profile_ids})


# --- checkpoints -------------------------------------------------------------------------


@st.composite
def _checkpoint(draw: st.DrawFn, anchors: Sequence[datetime]) -> datetime:
    grid_steps = int(CHECK_HORIZON / GRID)
    offsets = [
        st.integers(0, grid_steps).map(lambda k: BASE_TIME + k * GRID),
        st.integers(0, int(CHECK_HORIZON.total_seconds())).map(
            lambda s: BASE_TIME + timedelta(seconds=s)
        ),
    ]
    if anchors:
        # An event's instant plus a duration of the language: exactly where edges lie.
        shifts = st.sampled_from((0, 1, 30, 60, 300, 1800, 3600, 7200))
        anchored = st.tuples(st.sampled_from(anchors), shifts).map(
            lambda pair: pair[0] + timedelta(seconds=pair[1])
        )
        offsets = [anchored, anchored, anchored, *offsets]
    instant = draw(st.one_of(offsets))
    return instant + timedelta(microseconds=draw(st.sampled_from((0, 0, 0, 1, -1))))


def check_times(
    anchors: Sequence[datetime] = (), min_size: int = 5, max_size: int = 25
) -> st.SearchStrategy[list[datetime]]:
    """Increasing checkpoint instants over the event range and beyond; some on the grid, some
    a microsecond off. With ``anchors`` (e.g. the events' occurred_at) many fall on an
    anchor plus one of the language's durations."""
    # Duplicates are dropped rather than redrawn: a unique list often gives up on them.
    points = st.lists(_checkpoint(tuple(anchors)), min_size=min_size, max_size=max_size)
    return points.map(lambda instants: sorted(set(instants)))


# --- comparisons -------------------------------------------------------------------------


def _same_type(a: Any, b: Any) -> bool:
    def kind(v: Any) -> str:
        return "boolean" if isinstance(v, bool) else "string" if isinstance(v, str) else "number"

    return kind(a) == kind(b)


@st.composite
def _operand_pool(draw: st.DrawFn, values: Sequence[Any]) -> tuple[Any, ...]:
    """Mostly ``values``; one time in ten, values of another type."""
    if draw(st.integers(0, 9)) == 9:
        others = [pool for pool in MISMATCHED if not _same_type(pool[0], values[0])]
        return tuple(draw(st.sampled_from(others)))
    return tuple(values)


@st.composite
def comparisons(draw: st.DrawFn, values: Sequence[Any]) -> dict[str, Any]:
    """One operator (sometimes two, which must both hold) with operands drawn from
    ``values``, or now and then of another type."""
    ops = draw(st.lists(st.sampled_from(OPERATORS), min_size=1, max_size=2, unique=True))
    if draw(st.integers(0, 3)) > 0:
        ops = ops[:1]
    result: dict[str, Any] = {}
    for op in ops:
        pool = draw(_operand_pool(values))
        if op == "exists":
            result[op] = draw(st.booleans())
        elif op in ("in", "not_in"):
            result[op] = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3, unique=True))
        else:
            result[op] = draw(st.sampled_from(pool))
    return result


@st.composite
def _where_value(draw: st.DrawFn, values: Sequence[Any]) -> Any:
    if draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from(tuple(values)))  # a bare scalar means eq
    return draw(comparisons(values))


@st.composite
def _age_comparisons(draw: st.DrawFn) -> dict[str, str]:
    ops = draw(st.lists(st.sampled_from(ORDER_OPERATORS), min_size=1, max_size=2, unique=True))
    return {op: draw(st.sampled_from(DURATIONS)) for op in ops}


# --- filters, windows, aggregates --------------------------------------------------------


@st.composite
def event_filters(draw: st.DrawFn, types: Sequence[str] = ()) -> Any:
    """A bare type, a list of types, or ``{event: …, where: {…}}``; types mostly from
    ``types`` when given."""
    one = _one_type(types)
    several = st.lists(one, min_size=1, max_size=3, unique=True)
    shape = draw(st.sampled_from(("type", "type", "type", "list", "event", "where")))
    if shape == "type":
        return draw(one)
    if shape == "list":
        return draw(several)
    result: dict[str, Any] = {"event": draw(st.one_of(one, several))}
    if shape == "where":
        size = draw(st.sampled_from((1, 1, 2)))
        fields = draw(
            st.lists(
                st.sampled_from(tuple(EVENT_FIELDS)), min_size=size, max_size=size, unique=True
            )
        )
        result["where"] = {f: draw(_where_value(EVENT_FIELDS[f])) for f in fields}
    return result


@st.composite
def _windows(draw: st.DrawFn, types: Sequence[str] = ()) -> dict[str, Any]:
    within = draw(st.sampled_from((None, "session", *DURATIONS)))
    window: dict[str, Any] = {} if within is None else {"within": within}
    if draw(st.integers(0, 2)) == 2:
        window["since_last"] = draw(event_filters(types))
    return window


@st.composite
def _aggregate(draw: st.DrawFn) -> dict[str, Any]:
    # No aggregate and count are the common cases, so they come up more often.
    names = (None, "count", None, "count", "sum", "min", "max", "avg", "distinct")
    name = draw(st.sampled_from(names))
    if name is None:
        return {}  # count: {gte: 1}
    if name == "count":
        if draw(st.booleans()):
            return {"count": draw(st.sampled_from(COUNTS))}
        return {"count": draw(comparisons(COUNTS))}
    if name == "distinct":
        path = draw(st.sampled_from(tuple(EVENT_FIELDS)))
        return {"distinct": {"field": path, **draw(comparisons(COUNTS))}}
    # Mostly numeric fields; a string field must be ignored (sum 0, min/max/avg null).
    path = draw(st.sampled_from(NUMERIC_EVENT_FIELDS * 3 + tuple(EVENT_FIELDS)))
    values = EVENT_FIELDS[path] if path in NUMERIC_EVENT_FIELDS else EVENT_FIELDS["amount"]
    return {name: {"field": path, **draw(comparisons(values))}}


# --- conditions and segments -------------------------------------------------------------


def _fresh_fields(event_type: str) -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    """A field of an event of this type with a comparison that usually holds for it."""
    if event_type in MONEY_TYPES:
        options: tuple[tuple[str, dict[str, Any]], ...] = (
            ("amount", {"exists": True}),
            ("amount", {"gte": 100}),
            ("amount_usd", {"gt": 0}),
        )
    elif event_type == "margin_update":
        options = (
            ("properties.utilization", {"gte": 0.9}),
            ("properties.utilization", {"exists": True}),
            ("properties.exposure_usd", {"gte": 1000}),
        )
    else:
        options = (
            ("source", {"in": ["web", "app"]}),
            ("source", {"exists": False}),
            ("properties.asset", {"exists": True}),
        )
    return st.sampled_from(options)


def _lively_aggregates(event_type: str) -> st.SearchStrategy[tuple[str, str, dict[str, Any]]]:
    """(aggregate, field, comparison) over events of this type that holds now and then."""
    if event_type in MONEY_TYPES:
        options: tuple[tuple[str, str, dict[str, Any]], ...] = (
            ("sum", "amount", {"gte": 100}),
            ("max", "amount", {"gte": 250.5}),
            ("avg", "amount_usd", {"gt": 1}),
            ("min", "amount", {"lt": 100}),
            ("distinct", "amount", {"gte": 2}),
        )
    elif event_type == "margin_update":
        options = (
            ("max", "properties.utilization", {"gt": 0.9}),
            ("avg", "properties.utilization", {"gte": 0.95}),
            ("min", "properties.utilization", {"lt": 1}),
            ("sum", "properties.exposure_usd", {"gte": 1000}),
            ("distinct", "properties.utilization", {"gte": 2}),
        )
    else:
        options = (
            ("distinct", "source", {"gte": 2}),
            ("distinct", "properties.asset", {"gte": 2}),
            ("max", "properties.utilization", {"gte": 0.95}),
            ("sum", "properties.exposure_usd", {"gt": 0}),
            ("avg", "properties.utilization", {"lt": 1}),
        )
    return st.sampled_from(options)


# Trait conditions that hold for some profiles: a gate in front of a lively condition.
TRAIT_GATES: tuple[dict[str, Any], ...] = (
    {"trait": "tier", "in": ["gold", "platinum"]},
    {"trait": "vip", "eq": True},
    {"trait": "country", "exists": True},
    {"trait": "consent.email", "ne": False},
    {"trait": "balance", "gte": 100},
    {"trait": "tier", "exists": False},
)


@st.composite
def lively_conditions(
    draw: st.DrawFn,
    names_available: Sequence[str] = (),
    score_names: Sequence[str] = (),
    types: Sequence[str] = (),
) -> dict[str, Any]:
    """A leaf that holds often and changes as time passes or events arrive: recent events,
    the age of the latest one, ``max_age``, sessions, counts, ``since_last``, decaying
    scores, other segments."""
    kinds = ["recent", "age", "fresh", "session", "count", "since_last", "aggregate",
             "fresh", "recent", "age", "aggregate", "session", "since_last"]
    if score_names:
        kinds += ["score"] * 4
    if names_available:
        kinds += ["in_segment"] * 4
    kind = draw(st.sampled_from(kinds))
    event_type = draw(_one_type(types))
    duration = draw(st.sampled_from(LIVELY_DURATIONS))
    if kind == "recent":
        return {"events": event_type, "within": duration}
    if kind == "age":
        return {"last": event_type, "age": {draw(st.sampled_from(RANGE_OPERATORS)): duration}}
    if kind == "fresh":
        path, comparison = draw(_fresh_fields(event_type))
        return {"last": event_type, "field": path, **comparison, "max_age": duration}
    if kind == "session":
        condition: dict[str, Any] = {"events": event_type, "within": "session"}
        if draw(st.booleans()):
            condition["count"] = {"gte": draw(st.sampled_from((2, 3)))}
        return condition
    if kind == "count":
        op = draw(st.sampled_from(("gte", "lt")))
        return {"events": event_type, "within": duration,
                "count": {op: draw(st.sampled_from((2, 3, 5)))}}
    if kind == "aggregate":
        name, path, comparison = draw(_lively_aggregates(event_type))
        return {"events": event_type, "within": duration, name: {"field": path, **comparison}}
    if kind == "since_last":
        condition = {"events": event_type, "since_last": draw(_one_type(types))}
        if draw(st.booleans()):
            condition["within"] = duration
        return condition
    if kind == "score":
        return {
            "score": draw(st.sampled_from(tuple(score_names))),
            draw(st.sampled_from(RANGE_OPERATORS)): draw(st.sampled_from(SCORE_THRESHOLDS)),
        }
    return {"in_segment": draw(st.sampled_from(tuple(names_available)))}


@st.composite
def conditions(
    draw: st.DrawFn,
    names_available: Sequence[str] = (),
    score_names: Sequence[str] = (),
    depth: int = 2,
    types: Sequence[str] = (),
) -> dict[str, Any]:
    """A condition of any kind; all/any/not nest at most ``depth`` levels."""
    kinds = ["lively", "events", "last_field", "lively", "events", "trait", "last_age", "lively"]
    if names_available:
        kinds.append("in_segment")
    if score_names:
        kinds.append("score")
    if depth > 0:
        kinds += ["all", "any", "not"]
    kind = draw(st.sampled_from(kinds))

    if kind == "lively":
        return draw(lively_conditions(names_available, score_names, types))
    if kind in ("all", "any"):
        children = conditions(names_available, score_names, depth - 1, types)
        return {kind: draw(st.lists(children, min_size=0, max_size=3))}
    if kind == "not":
        return {"not": draw(conditions(names_available, score_names, depth - 1, types))}
    if kind == "trait":
        path = draw(st.sampled_from(tuple(TRAIT_PATHS)))
        return {"trait": path, **draw(comparisons(TRAIT_PATHS[path]))}
    if kind == "events":
        return {
            "events": draw(event_filters(types)),
            **draw(_windows(types)),
            **draw(_aggregate()),
        }
    if kind == "last_field":
        path = draw(st.sampled_from(tuple(EVENT_FIELDS)))
        condition = {"last": draw(event_filters(types)), "field": path}
        condition.update(draw(comparisons(EVENT_FIELDS[path])))
        if draw(st.booleans()):
            condition["max_age"] = draw(st.sampled_from(DURATIONS))
        return condition
    if kind == "last_age":
        return {"last": draw(event_filters(types)), "age": draw(_age_comparisons())}
    if kind == "in_segment":
        return {"in_segment": draw(st.sampled_from(tuple(names_available)))}
    return {
        "score": draw(st.sampled_from(tuple(score_names))),
        **draw(comparisons(SCORE_LEVELS)),
    }


@st.composite
def rules(
    draw: st.DrawFn,
    names_available: Sequence[str] = (),
    score_names: Sequence[str] = (),
    depth: int = 2,
    types: Sequence[str] = (),
) -> dict[str, Any]:
    """A segment's rule: mostly a lively leaf, a short all/any, a negation of one, one
    behind a trait gate or next to another segment, and sometimes a random tree of up to
    ``depth`` levels."""
    shapes = ["leaf", "pair", "leaf", "tree", "not", "pair", "tree", "leaf", "gated"]
    if names_available:
        shapes += ["chain", "chain"]
    shape = draw(st.sampled_from(shapes))
    lively = lively_conditions(names_available, score_names, types)
    if shape == "leaf":
        return draw(lively)
    if shape == "not":
        return {"not": draw(lively)}
    if shape == "gated":
        gate = draw(st.sampled_from(TRAIT_GATES))
        return {draw(st.sampled_from(("all", "any"))): [draw(lively), gate]}
    if shape == "chain":
        other: dict[str, Any] = {"in_segment": draw(st.sampled_from(tuple(names_available)))}
        if draw(st.booleans()):
            other = {"not": other}
        return {draw(st.sampled_from(("all", "any"))): [other, draw(lively)]}
    if shape == "pair":
        child = st.one_of(lively, conditions(names_available, score_names, 0, types))
        return {draw(st.sampled_from(("all", "any"))): draw(st.lists(child, min_size=2,
                                                                      max_size=3))}
    return draw(conditions(names_available, score_names, depth, types))


@st.composite
def context_entries(
    draw: st.DrawFn, score_names: Sequence[str] = (), types: Sequence[str] = ()
) -> dict[str, Any]:
    """A segment's ``context`` mapping (possibly empty)."""
    kinds = ["last", "trait", "events"] + (["score"] if score_names else [])
    context: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from(CONTEXT_KEYS), max_size=3, unique=True)):
        kind = draw(st.sampled_from(kinds))
        if kind == "last":
            path = draw(st.sampled_from(tuple(EVENT_FIELDS)))
            context[key] = {"last": draw(event_filters(types)), "field": path}
        elif kind == "trait":
            context[key] = {"trait": draw(st.sampled_from(tuple(TRAIT_PATHS)))}
        elif kind == "score":
            context[key] = {"score": draw(st.sampled_from(tuple(score_names)))}
        else:
            name = draw(st.sampled_from(("count", "sum", "min", "max", "avg", "distinct")))
            aggregate = (
                {} if name == "count" else {"field": draw(st.sampled_from(tuple(EVENT_FIELDS)))}
            )
            context[key] = {
                "events": draw(event_filters(types)),
                **draw(_windows(types)),
                name: aggregate,
            }
    return context


@st.composite
def score_definitions(
    draw: st.DrawFn, name: str | None = None, types: Sequence[str] = ()
) -> dict[str, Any]:
    """``{score, half_life, weights}``; weights mostly on ``types``, now and then on types
    that never occur."""
    weights = draw(
        st.dictionaries(
            _one_type(types), st.sampled_from(SCORE_WEIGHTS), min_size=1, max_size=3
        )
    )
    return {
        "score": name if name is not None else draw(NAMES),
        "half_life": draw(st.sampled_from(DURATIONS)),
        "weights": weights,
    }


@st.composite
def _fresh_name(draw: st.DrawFn, pool: Sequence[str], taken: set[str]) -> str:
    free = [n for n in pool if n not in taken]
    if free and draw(st.integers(0, 7)) < 7:
        return draw(st.sampled_from(free))
    return draw(NAMES.filter(lambda n: n not in taken))


@st.composite
def segment_definitions(
    draw: st.DrawFn,
    names_available: Sequence[str] = (),
    score_names: Sequence[str] = (),
    name: str | None = None,
    modes: Sequence[str] = ("realtime", "scheduled"),
    max_depth: int = 2,
    types: Sequence[str] = (),
) -> dict[str, Any]:
    """A valid segment definition. ``in_segment`` only names ``names_available`` (earlier
    segments, so there are no cycles) and ``score`` only ``score_names``; event filters
    mostly name ``types`` (the types that occur) when given."""
    taken = set(names_available) | set(score_names)
    if name is None:
        name = draw(_fresh_name(SEGMENT_NAMES, taken))
    definition: dict[str, Any] = {"name": name}
    if draw(st.integers(0, 3)) == 3:
        definition["description"] = "generated"
    # Realtime three times out of four: scheduled ones only change at refreshes.
    weighted = sorted(modes, key=lambda m: m != "realtime")
    weighted = [m for m in weighted for _ in range(3 if m == "realtime" else 1)]
    mode = draw(st.sampled_from(weighted))
    if mode == "scheduled":
        definition["mode"] = "scheduled"
        definition["refresh"] = draw(st.sampled_from(REFRESHES))
    elif draw(st.integers(0, 3)) == 3:
        definition["mode"] = "realtime"  # the default, sometimes spelled out
    definition["rule"] = draw(rules(names_available, score_names, max_depth, types))
    lifecycle = draw(st.sampled_from(("none", "goal_disqualify", "none", "goal")))
    if lifecycle != "none":
        definition["goal"] = draw(event_filters(types))
    if lifecycle == "goal_disqualify":
        definition["disqualify"] = draw(event_filters(types))
    context = draw(context_entries(score_names, types))
    if context:
        definition["context"] = context
    return definition


@dataclass(frozen=True)
class DefinitionSet:
    scores: dict[str, dict[str, Any]]
    segments: dict[str, dict[str, Any]]  # in dependency order: each refers to earlier ones


@st.composite
def definition_sets(
    draw: st.DrawFn,
    max_scores: int = 2,
    max_segments: int = 3,
    modes: Sequence[str] = ("realtime", "scheduled"),
    types: Sequence[str] = (),
) -> DefinitionSet:
    """Scores and segments that refer to each other without cycles; event filters mostly
    name ``types`` (the types that occur) when given."""
    scores: dict[str, dict[str, Any]] = {}
    # Mostly one score or more, so score conditions come up.
    for _ in range(draw(st.sampled_from((0, *range(1, max_scores + 1), 1)))):
        name = draw(_fresh_name(SCORE_NAMES, set(scores)))
        scores[name] = draw(score_definitions(name, types))
    segments: dict[str, dict[str, Any]] = {}
    # Two or three segments more often than one, so in_segment chains come up.
    counts = (*range(1, max_segments + 1), *range(2, max_segments + 1))
    for _ in range(draw(st.sampled_from(counts))):
        definition = draw(
            segment_definitions(tuple(segments), tuple(scores), modes=modes, types=types)
        )
        segments[definition["name"]] = definition
    return DefinitionSet(scores=scores, segments=segments)


@st.composite
def worlds(draw: st.DrawFn, modes: Sequence[str] = ("realtime", "scheduled")) -> World:
    """A complete reference world (scheduled_members left empty for the caller to fill)."""
    types = draw(event_palettes())
    definitions = draw(definition_sets(modes=modes, types=types))
    rows = [row for _, row in draw(timed_event_streams(types))]
    return World(
        events=to_events(rows),
        traits=draw(profile_traits()),
        segments=dict(definitions.segments),
        scores=dict(definitions.scores),
    )
