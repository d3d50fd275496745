"""Unit tests of the reference evaluator itself: one or more per rule of the contract, on tiny
worlds at exact instants. The differential tests trust the reference, so it is tested here."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import (
    DefinitionError,
    Event,
    World,
    compare,
    context_at,
    evaluate_rule,
    evaluate_segment,
    is_member,
    members,
    parse_duration,
    refresh_members,
    score_value,
)
from strategies import (
    BASE_TIME,
    check_times,
    event_streams,
    segment_definitions,
    to_events,
    worlds,
)

T0 = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
US = timedelta(microseconds=1)
H = timedelta(hours=1)
M = timedelta(minutes=1)


def ev(
    event_id: int,
    event_type: str,
    at: datetime,
    profile_id: int = 1,
    amount: Decimal | None = None,
    source: str | None = None,
    **properties: Any,
) -> Event:
    return Event(
        event_id=event_id,
        profile_id=profile_id,
        event_type=event_type,
        occurred_at=at,
        amount=amount,
        amount_usd=amount,
        currency=None if amount is None else "USD",
        source=source,
        properties=properties,
    )


def make_world(
    events: Iterable[Event] = (),
    traits: dict[int, dict[str, Any]] | None = None,
    segments: dict[str, dict[str, Any]] | None = None,
    scores: dict[str, dict[str, Any]] | None = None,
) -> World:
    return World(
        events=list(events),
        traits=traits or {},
        segments=segments or {},
        scores=scores or {},
    )


def holds(rule: dict[str, Any], at: datetime, events: Iterable[Event] = (), **kw: Any) -> bool:
    return evaluate_rule(make_world(events, **kw), rule, 1, at)


# --- durations ---------------------------------------------------------------------------


def test_durations_of_every_unit() -> None:
    assert parse_duration("90s") == timedelta(seconds=90)
    assert parse_duration("30m") == timedelta(minutes=30)
    assert parse_duration("4h") == timedelta(hours=4)
    assert parse_duration("7d") == timedelta(days=7)
    assert parse_duration("2w") == timedelta(weeks=2)
    assert parse_duration("400d") == timedelta(days=400)


@pytest.mark.parametrize("bad", ["0s", "5", "1y", "401d", "4 h", "-1h", "04h", 5, None])
def test_malformed_durations_are_refused(bad: object) -> None:
    with pytest.raises(DefinitionError):
        parse_duration(bad)


# --- windows -----------------------------------------------------------------------------


def test_within_is_half_open_and_drops_an_event_exactly_d_later() -> None:
    events = [ev(1, "deposit", T0)]
    rule = {"events": "deposit", "within": "4h"}
    assert holds(rule, T0, events)
    assert holds(rule, T0 + 4 * H - US, events)
    assert not holds(rule, T0 + 4 * H, events)


def test_events_after_t_do_not_count() -> None:
    events = [ev(1, "deposit", T0)]
    assert not holds({"events": "deposit"}, T0 - US, events)
    assert holds({"events": "deposit"}, T0, events)


def test_omitted_window_is_all_events_up_to_t() -> None:
    events = [ev(1, "deposit", T0), ev(2, "deposit", T0 + 300 * H)]
    assert holds({"events": "deposit", "count": 1}, T0 + 299 * H, events)
    assert holds({"events": "deposit", "count": 2}, T0 + 300 * H, events)


def test_session_is_not_split_at_exactly_the_timeout() -> None:
    events = [ev(1, "login", T0), ev(2, "page_view", T0 + 30 * M)]
    rule = {"events": "login", "within": "session"}
    assert holds(rule, T0 + 45 * M, events)


def test_session_is_split_one_microsecond_past_the_timeout() -> None:
    events = [ev(1, "login", T0), ev(2, "page_view", T0 + 30 * M + US)]
    rule = {"events": "login", "within": "session"}
    assert not holds(rule, T0 + 45 * M, events)
    assert holds({"events": "page_view", "within": "session"}, T0 + 45 * M, events)


def test_session_ends_exactly_timeout_after_the_latest_event() -> None:
    events = [ev(1, "login", T0)]
    rule = {"events": "login", "within": "session"}
    assert holds(rule, T0 + 30 * M - US, events)
    assert not holds(rule, T0 + 30 * M, events)
    assert holds({"events": "login", "within": "session", "count": 0}, T0 + 30 * M, events)


def test_session_splits_on_events_of_every_type() -> None:
    # The page_view bridges two logins that are 50 minutes apart.
    events = [ev(1, "login", T0), ev(2, "page_view", T0 + 25 * M), ev(3, "deposit", T0 + 50 * M)]
    assert holds({"events": "login", "within": "session"}, T0 + 55 * M, events)
    without_bridge = [events[0], events[2]]
    assert not holds({"events": "login", "within": "session"}, T0 + 55 * M, without_bridge)


def test_session_ignores_events_after_t() -> None:
    events = [ev(1, "login", T0), ev(2, "page_view", T0 + 40 * M)]
    rule = {"events": "login", "within": "session"}
    # The page_view is still in the future: the latest event is 35 minutes old.
    assert not holds(rule, T0 + 35 * M, events)
    assert holds(rule, T0 + 29 * M, events)
    assert not holds(rule, T0 + 40 * M, events)  # 40 minutes apart: a new session


def test_since_last_is_strictly_after_the_latest_anchor() -> None:
    events = [
        ev(1, "deposit", T0),
        ev(2, "login", T0 + H),
        ev(3, "deposit", T0 + H),  # same instant as the anchor: not after it
        ev(4, "deposit", T0 + 2 * H),
    ]
    rule = {"events": "deposit", "since_last": "login", "count": 1}
    assert holds(rule, T0 + 2 * H, events)
    assert holds({"events": "deposit", "since_last": "login", "count": 0}, T0 + H, events)


def test_since_last_without_an_anchor_is_empty() -> None:
    events = [ev(1, "deposit", T0)]
    assert not holds({"events": "deposit", "since_last": "login"}, T0 + H, events)


def test_since_last_uses_the_latest_anchor_at_or_before_t() -> None:
    events = [ev(1, "login", T0), ev(2, "deposit", T0 + H), ev(3, "login", T0 + 2 * H)]
    rule = {"events": "deposit", "since_last": "login"}
    assert holds(rule, T0 + 2 * H - US, events)
    assert not holds(rule, T0 + 2 * H, events)


def test_within_and_since_last_combine() -> None:
    events = [ev(1, "login", T0), ev(2, "deposit", T0 + H), ev(3, "deposit", T0 + 3 * H)]
    rule = {"events": "deposit", "within": "1h", "since_last": "login", "count": 1}
    assert holds(rule, T0 + 3 * H, events)
    assert holds({**rule, "count": 0}, T0 + 2 * H, events)


# --- filters -----------------------------------------------------------------------------


def test_filter_forms() -> None:
    events = [ev(1, "trade", T0, amount=Decimal("100"), asset="XAUUSD", risk={"level": "high"})]
    assert holds({"events": ["deposit", "trade"]}, T0, events)
    assert not holds({"events": ["deposit", "login"]}, T0, events)
    assert holds(
        {"events": {"event": "trade", "where": {"properties.asset": "XAUUSD"}}}, T0, events
    )
    assert holds({"events": {"event": ["trade"], "where": {"amount": {"gte": 100}}}}, T0, events)
    nested = {"event": "trade", "where": {"properties.risk.level": {"in": ["high"]}}}
    assert holds({"events": nested}, T0, events)
    both = {"event": "trade", "where": {"amount": {"gt": 100}, "properties.asset": "XAUUSD"}}
    assert not holds({"events": both}, T0, events)


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(DefinitionError):
        holds({"last": "trade", "field": "event_type", "eq": "trade"}, T0, [ev(1, "trade", T0)])


# --- comparisons -------------------------------------------------------------------------


def test_each_operator() -> None:
    assert compare(2, {"eq": 2}) and not compare(2, {"eq": 3})
    assert compare(2, {"ne": 3}) and not compare(2, {"ne": 2})
    assert compare(2, {"gt": 1}) and not compare(2, {"gt": 2})
    assert compare(2, {"gte": 2}) and not compare(2, {"gte": 3})
    assert compare(2, {"lt": 3}) and not compare(2, {"lt": 2})
    assert compare(2, {"lte": 2}) and not compare(2, {"lte": 1})
    assert compare("gold", {"in": ["gold", "platinum"]}) and not compare("x", {"in": ["gold"]})
    assert compare("x", {"not_in": ["gold"]}) and not compare("gold", {"not_in": ["gold"]})
    assert compare("b", {"gt": "a"}) and compare("B", {"lt": "a"})  # code point order
    assert compare(2, 2) and not compare(2, 3)  # a bare scalar is eq


def test_several_operators_must_all_hold() -> None:
    assert compare(0.96, {"gt": 0.95, "lte": 1})
    assert not compare(1.5, {"gt": 0.95, "lte": 1})


def test_missing_and_null_fail_every_operator_but_exists_false() -> None:
    null_and_missing: list[dict[str, Any]] = [{"utilization": None}, {}]
    for properties in null_and_missing:
        events = [ev(1, "margin_update", T0, **properties)]
        for comparison in (
            {"eq": 1},
            {"ne": 1},
            {"gt": 0},
            {"lt": 0},
            {"in": [1]},
            {"not_in": [1]},
            {"exists": True},
        ):
            rule = {"last": "margin_update", "field": "properties.utilization", **comparison}
            assert not holds(rule, T0, events), (properties, comparison)
        rule = {"last": "margin_update", "field": "properties.utilization", "exists": False}
        assert holds(rule, T0, events)


def test_type_mismatch_is_false_never_an_error() -> None:
    assert not compare("0.97", {"gt": 0.95})
    assert not compare("0.97", {"ne": 0.95})
    assert not compare("0.97", {"not_in": [0.95]})
    assert not compare(True, {"eq": 1})  # booleans are not numbers
    assert not compare(1, {"eq": True})
    assert not compare(True, {"gte": 0})
    assert not compare({"a": 1}, {"eq": 1})
    assert compare({"a": 1}, {"exists": True})


def test_numbers_compare_exactly_across_types() -> None:
    assert compare(1, {"eq": 1.0})
    assert compare(Decimal("0.95"), {"eq": 0.95})
    assert not compare(Decimal("0.95"), {"gt": 0.95})
    assert compare(Decimal("250.50"), {"in": [250.5]})
    assert compare(0.1 + 0.2, {"gt": 0.3})  # 0.30000000000000004 as stored in JSON


def test_in_lists_must_be_homogeneous() -> None:
    with pytest.raises(DefinitionError):
        compare(1, {"in": [1, "1"]})


def test_exists() -> None:
    assert compare(0, {"exists": True})
    assert compare(False, {"exists": True})
    assert not compare(None, {"exists": True})
    assert compare(None, {"exists": False})


# --- aggregates --------------------------------------------------------------------------


def test_default_aggregate_is_count_gte_1() -> None:
    assert not holds({"events": "deposit"}, T0, [ev(1, "login", T0)])
    assert holds({"events": "deposit"}, T0, [ev(1, "deposit", T0)])


def test_count_of_no_events_is_zero() -> None:
    assert holds({"events": "deposit", "count": {"eq": 0}}, T0, [])
    assert holds({"events": "deposit", "count": 0}, T0, [])
    assert not holds({"events": "deposit", "count": {"gte": 1}}, T0, [])


def test_sum_ignores_null_and_non_numbers_and_is_zero_over_nothing() -> None:
    events = [
        ev(1, "margin_update", T0, exposure_usd=1000),
        ev(2, "margin_update", T0, exposure_usd=None),
        ev(3, "margin_update", T0, exposure_usd="500"),
        ev(4, "margin_update", T0, exposure_usd=True),
        ev(5, "margin_update", T0, exposure_usd=2500.5),
        ev(6, "margin_update", T0),
    ]
    rule = {"events": "margin_update", "sum": {"field": "properties.exposure_usd", "eq": 3500.5}}
    assert holds(rule, T0, events)
    nothing = {"events": "deposit", "sum": {"field": "amount", "eq": 0}}
    assert holds(nothing, T0, events)


def test_min_max_avg_of_nothing_are_null() -> None:
    events = [ev(1, "deposit", T0, amount=None)]
    for name in ("min", "max", "avg"):
        assert not holds({"events": "deposit", name: {"field": "amount", "gte": 0}}, T0, events)
        assert not holds({"events": "deposit", name: {"field": "amount", "lt": 0}}, T0, events)
        assert holds({"events": "deposit", name: {"field": "amount", "exists": False}}, T0, events)


def test_min_max_avg() -> None:
    events = [ev(i, "deposit", T0, amount=Decimal(a)) for i, a in enumerate(["0.1", "0.2"], 1)]
    assert holds({"events": "deposit", "min": {"field": "amount", "eq": 0.1}}, T0, events)
    assert holds({"events": "deposit", "max": {"field": "amount", "eq": 0.2}}, T0, events)
    # Exact arithmetic: the average is 0.15, not a float neighbour.
    assert holds({"events": "deposit", "avg": {"field": "amount", "eq": 0.15}}, T0, events)
    thirds = [ev(i, "deposit", T0, amount=Decimal(a)) for i, a in enumerate(["1", "2", "2"], 1)]
    assert holds({"events": "deposit", "avg": {"field": "amount", "gt": 1.6666666}}, T0, thirds)
    assert holds({"events": "deposit", "avg": {"field": "amount", "lt": 1.6666667}}, T0, thirds)


def test_distinct_uses_json_equality_and_ignores_null() -> None:
    scalars = [
        ev(1, "trade", T0, asset=1),
        ev(2, "trade", T0, asset=1.0),
        ev(3, "trade", T0, asset=True),  # not the number 1
        ev(4, "trade", T0, asset="1"),
        ev(5, "trade", T0, asset=None),
        ev(6, "trade", T0),
    ]
    rule = {"events": "trade", "distinct": {"field": "properties.asset", "eq": 3}}
    assert holds(rule, T0, scalars)
    documents = [ev(1, "trade", T0, asset={"b": [1, 2]}), ev(2, "trade", T0, asset={"b": [1.0, 2]})]
    rule = {"events": "trade", "distinct": {"field": "properties.asset", "eq": 1}}
    assert holds(rule, T0, documents)
    assert holds({"events": "login", "distinct": {"field": "source", "eq": 0}}, T0, scalars)


def test_only_one_aggregate_per_condition() -> None:
    with pytest.raises(DefinitionError):
        holds({"events": "trade", "count": 1, "sum": {"field": "amount", "gt": 0}}, T0, [])


# --- last --------------------------------------------------------------------------------


def test_latest_tie_is_broken_by_event_id_not_list_order() -> None:
    rule = {"last": "margin_update", "field": "properties.utilization", "gt": 0.95}
    high_ingested_last = [
        ev(2, "margin_update", T0, utilization=0.99),
        ev(1, "margin_update", T0, utilization=0.5),
    ]
    assert holds(rule, T0, high_ingested_last)
    low_ingested_last = [
        ev(1, "margin_update", T0, utilization=0.99),
        ev(2, "margin_update", T0, utilization=0.5),
    ]
    assert not holds(rule, T0, low_ingested_last)


def test_latest_is_the_greatest_occurred_at_even_if_ingested_earlier() -> None:
    events = [
        ev(1, "margin_update", T0 + M, utilization=0.99),
        ev(2, "margin_update", T0, utilization=0.5),  # ingested later, occurred earlier
    ]
    rule = {"last": "margin_update", "field": "properties.utilization", "gt": 0.95}
    assert holds(rule, T0 + M, events)
    assert not holds(rule, T0 + M - US, events)


def test_last_filter_where_selects_among_matching_events_only() -> None:
    events = [
        ev(1, "trade", T0, asset="XAUUSD", exposure_usd=10),
        ev(2, "trade", T0 + M, asset="EURUSD"),
    ]
    rule = {
        "last": {"event": "trade", "where": {"properties.asset": "XAUUSD"}},
        "field": "properties.exposure_usd",
        "eq": 10,
    }
    assert holds(rule, T0 + M, events)


def test_max_age_is_strict() -> None:
    events = [ev(1, "margin_update", T0, utilization=0.99)]
    rule = {"last": "margin_update", "field": "properties.utilization", "gt": 0.95, "max_age": "4h"}
    assert holds(rule, T0 + 4 * H - US, events)
    assert not holds(rule, T0 + 4 * H, events)


def test_last_without_any_event_is_false_even_for_exists_false() -> None:
    rule = {"last": "margin_update", "field": "properties.utilization", "exists": False}
    assert not holds(rule, T0, [])


def test_age_gt_becomes_true_one_microsecond_after() -> None:
    events = [ev(1, "deposit", T0)]
    assert not holds({"last": "deposit", "age": {"gt": "7d"}}, T0 + timedelta(days=7), events)
    assert holds({"last": "deposit", "age": {"gt": "7d"}}, T0 + timedelta(days=7) + US, events)


def test_age_gte_is_true_exactly_at_the_duration() -> None:
    events = [ev(1, "deposit", T0)]
    assert not holds({"last": "deposit", "age": {"gte": "7d"}}, T0 + timedelta(days=7) - US, events)
    assert holds({"last": "deposit", "age": {"gte": "7d"}}, T0 + timedelta(days=7), events)
    assert holds({"last": "deposit", "age": {"lt": "1h"}}, T0, events)


def test_age_without_any_event_is_false() -> None:
    assert not holds({"last": "deposit", "age": {"gte": "1s"}}, T0, [])
    assert not holds({"last": "deposit", "age": {"lt": "400d"}}, T0, [])


# --- traits ------------------------------------------------------------------------------


def test_trait_dotted_path() -> None:
    traits = {1: {"tier": "gold", "consent": {"email": True}, "balance": 1000}}
    assert holds({"trait": "tier", "in": ["gold", "platinum"]}, T0, traits=traits)
    assert holds({"trait": "consent.email", "eq": True}, T0, traits=traits)
    assert not holds({"trait": "consent.sms", "eq": False}, T0, traits=traits)
    assert holds({"trait": "consent.sms", "exists": False}, T0, traits=traits)
    assert not holds({"trait": "tier.level", "exists": True}, T0, traits=traits)
    assert holds({"trait": "balance", "gt": 999.5}, T0, traits=traits)
    assert not holds({"trait": "tier", "exists": True}, T0)  # a profile without traits


# --- scores ------------------------------------------------------------------------------

SCORES = {"engagement": {"score": "engagement", "half_life": "1h", "weights": {"login": 10}}}


def test_score_halves_after_one_half_life() -> None:
    events = [ev(1, "login", T0)]
    world = make_world(events, scores=SCORES)
    assert score_value(world, "engagement", 1, T0) == 10.0
    assert score_value(world, "engagement", 1, T0 + H) == 5.0
    assert score_value(world, "engagement", 1, T0 + 2 * H) == 2.5
    assert holds({"score": "engagement", "gte": 5}, T0 + H, events, scores=SCORES)
    assert not holds({"score": "engagement", "gt": 5}, T0 + H, events, scores=SCORES)


def test_score_ignores_unweighted_types_and_future_events() -> None:
    events = [ev(1, "login", T0), ev(2, "page_view", T0), ev(3, "login", T0 + 2 * H)]
    world = make_world(events, scores=SCORES)
    assert score_value(world, "engagement", 1, T0 + H) == 5.0
    assert score_value(world, "engagement", 1, T0 + 2 * H) == 12.5
    assert score_value(world, "engagement", 2, T0 + 2 * H) == 0.0


# --- boolean structure -------------------------------------------------------------------


def test_empty_all_is_true_and_empty_any_is_false() -> None:
    assert holds({"all": []}, T0)
    assert not holds({"any": []}, T0)
    assert not holds({"not": {"all": []}}, T0)


def test_all_any_not() -> None:
    yes: dict[str, Any] = {"all": []}
    no: dict[str, Any] = {"any": []}
    assert holds({"all": [yes, yes]}, T0) and not holds({"all": [yes, no]}, T0)
    assert holds({"any": [no, yes]}, T0) and not holds({"any": [no, no]}, T0)
    assert holds({"not": {"events": "deposit"}}, T0)


def test_a_condition_needs_exactly_one_kind() -> None:
    with pytest.raises(DefinitionError):
        holds({"trait": "tier", "eq": "gold", "events": "deposit"}, T0)
    with pytest.raises(DefinitionError):
        holds({"trait": "tier"}, T0)  # no comparison


# --- goal / disqualify -------------------------------------------------------------------

GOAL_SEGMENT = {
    "name": "margin_call_risk",
    "rule": {"all": []},
    "goal": {"event": "margin_update", "where": {"properties.utilization": {"gt": 0.95}}},
    "disqualify": {"event": "positions_closed"},
}


def goal_member(events: list[Event], at: datetime) -> bool:
    world = make_world(events, segments={"margin_call_risk": GOAL_SEGMENT})
    return is_member(world, "margin_call_risk", 1, at)


def test_disqualify_after_the_latest_goal_excludes() -> None:
    events = [ev(1, "margin_update", T0, utilization=0.99), ev(2, "positions_closed", T0 + M)]
    assert goal_member(events, T0 + M - US)
    assert not goal_member(events, T0 + M)


def test_a_new_goal_requalifies() -> None:
    events = [
        ev(1, "margin_update", T0, utilization=0.99),
        ev(2, "positions_closed", T0 + M),
        ev(3, "margin_update", T0 + 2 * M, utilization=0.97),
    ]
    assert not goal_member(events, T0 + 2 * M - US)
    assert goal_member(events, T0 + 2 * M)


def test_disqualify_at_the_goals_instant_or_before_it_does_not_count() -> None:
    same = [ev(1, "margin_update", T0, utilization=0.99), ev(2, "positions_closed", T0)]
    assert goal_member(same, T0)
    before = [ev(1, "positions_closed", T0), ev(2, "margin_update", T0 + M, utilization=0.99)]
    assert goal_member(before, T0 + M)


def test_without_a_goal_event_nothing_disqualifies() -> None:
    events = [ev(1, "margin_update", T0, utilization=0.5), ev(2, "positions_closed", T0 + M)]
    assert goal_member(events, T0 + M)


def test_goal_disqualify_also_needs_the_rule() -> None:
    segment = {**GOAL_SEGMENT, "rule": {"events": "deposit"}}
    world = make_world([ev(1, "margin_update", T0, utilization=0.99)], segments={"s": segment})
    assert not is_member(world, "s", 1, T0)


# --- segments of segments ----------------------------------------------------------------


def test_in_segment_of_a_realtime_segment_is_evaluated_at_t() -> None:
    segments = {
        "depositors": {"name": "depositors", "rule": {"events": "deposit", "within": "1h"}},
        "outer": {"name": "outer", "rule": {"not": {"in_segment": "depositors"}}},
    }
    world = make_world([ev(1, "deposit", T0)], segments=segments)
    assert not is_member(world, "outer", 1, T0)
    assert is_member(world, "outer", 1, T0 + H)


def test_in_segment_of_a_scheduled_segment_uses_its_last_refresh() -> None:
    segments = {
        "depositors": {
            "name": "depositors",
            "mode": "scheduled",
            "refresh": "1h",
            "rule": {"events": "deposit"},
        },
        "outer": {"name": "outer", "rule": {"in_segment": "depositors"}},
    }
    world = make_world([ev(1, "deposit", T0)], segments=segments)
    assert not is_member(world, "outer", 1, T0)  # not refreshed yet
    assert evaluate_segment(world, "depositors", 1, T0)  # what a refresh would compute
    world.scheduled_members["depositors"] = refresh_members(world, "depositors", T0)
    assert is_member(world, "outer", 1, T0)
    assert is_member(world, "depositors", 1, T0)


def test_in_segment_cycles_are_refused() -> None:
    segments = {
        "a": {"name": "a", "rule": {"in_segment": "b"}},
        "b": {"name": "b", "rule": {"in_segment": "a"}},
    }
    with pytest.raises(DefinitionError, match="a -> b -> a"):
        is_member(make_world(segments=segments), "a", 1, T0)


def test_members_covers_profiles_from_events_and_traits() -> None:
    segments = {"quiet": {"name": "quiet", "rule": {"not": {"events": "login"}}}}
    world = make_world(
        [ev(1, "login", T0, profile_id=1), ev(2, "trade", T0, profile_id=2)],
        traits={3: {"tier": "gold"}},
        segments=segments,
    )
    assert members(world, "quiet", T0) == {2, 3}
    assert members(world, "quiet", T0 - US) == {1, 2, 3}


# --- context -----------------------------------------------------------------------------


def test_context_values() -> None:
    segment = {
        "name": "ctx",
        "rule": {"all": []},
        "context": {
            "exposure_usd": {"last": "margin_update", "field": "properties.exposure_usd"},
            "tier": {"trait": "tier"},
            "country": {"trait": "country"},
            "deposits": {"events": "deposit", "within": "1h", "sum": {"field": "amount"}},
            "deposit_count": {"events": "deposit", "within": "1h", "count": {}},
            "lowest": {"events": "deposit", "within": "1h", "min": {"field": "amount"}},
            "no_trade": {"events": "trade", "max": {"field": "amount"}},
            "trade_sum": {"events": "trade", "sum": {"field": "amount"}},
            "assets": {"events": "trade", "distinct": {"field": "properties.asset"}},
            "engagement": {"score": "engagement"},
            "nothing": {"last": "withdrawal", "field": "amount"},
            "last_deposit": {"last": "deposit", "field": "amount"},
        },
    }
    events = [
        ev(1, "margin_update", T0, exposure_usd=2500.5),
        ev(2, "deposit", T0, amount=Decimal("100.25")),
        ev(3, "deposit", T0 + M, amount=Decimal("50")),
        ev(4, "login", T0 + H),
    ]
    world = make_world(
        events, traits={1: {"tier": "gold"}}, segments={"ctx": segment}, scores=SCORES
    )
    assert context_at(world, "ctx", 1, T0 + H) == {
        "exposure_usd": 2500.5,
        "tier": "gold",
        "country": None,
        "deposits": 50.0,
        "deposit_count": 1,
        "lowest": 50.0,
        "no_trade": None,
        "trade_sum": 0.0,
        "assets": 0,
        "engagement": 10.0,
        "nothing": None,
        "last_deposit": 50.0,
    }
    values = context_at(world, "ctx", 1, T0 + H)
    assert isinstance(values["deposits"], float)
    assert isinstance(values["last_deposit"], float)  # Decimal columns become JSON numbers


# --- the strategies produce definitions the reference accepts ----------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=worlds(), data=st.data())
def test_generated_worlds_evaluate(world: World, data: st.DataObject) -> None:
    anchors = [e.occurred_at for e in world.events]
    times = data.draw(check_times(anchors))
    assert times == sorted(set(times))
    for at in times:
        for name, definition in world.segments.items():
            if definition.get("mode") == "scheduled":
                world.scheduled_members[name] = refresh_members(world, name, at)
            found = members(world, name, at)
            assert found <= {e.profile_id for e in world.events} | set(world.traits)
            for profile_id in found:
                context_at(world, name, profile_id, at)


@settings(max_examples=50, deadline=None)
@given(rows=event_streams(), definition=segment_definitions(names_available=()))
def test_generated_rows_are_in_ingest_shape(rows: list[dict[str, Any]], definition: dict) -> None:
    keys = {"event_type", "occurred_at", "profile_id", "amount", "currency", "source", "properties"}
    for row in rows:
        assert set(row) == keys
        assert BASE_TIME <= row["occurred_at"] <= BASE_TIME + timedelta(hours=4)
        assert (row["amount"] is None) == (row["currency"] is None)
    events = to_events(rows)
    assert [e.event_id for e in events] == list(range(1, len(rows) + 1))
    assert "in_segment" not in repr(definition["rule"])
