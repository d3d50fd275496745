"""The compiler front end: parsing, validation, references and the dependency graph.

Pure Python, no database.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from compiler import (
    Action,
    Aggregate,
    AllCond,
    AnyCond,
    Comparison,
    ContextEvents,
    ContextLast,
    ContextScore,
    ContextTrait,
    CycleError,
    DefinitionError,
    DefinitionErrors,
    Destination,
    Duration,
    EventFilter,
    EventsCond,
    Field,
    InSegmentCond,
    LastAgeCond,
    LastFieldCond,
    NotCond,
    Project,
    Score,
    ScoreCond,
    Segment,
    TraitCond,
    Window,
    build_project,
    dependency_order,
    dependents,
    load_file,
    load_paths,
    parse_document,
)
from compiler.model import DEFAULT_AGGREGATE

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "segments"

CONTRACT_EXAMPLE = """
name: margin_call_risk            # [a-z][a-z0-9_]{0,62}, unique
description: Gold traders above 95% margin use with no deposit for 4 hours
mode: realtime                    # realtime (default) | scheduled
# refresh: 1h                     # scheduled only: how often it is recomputed
rule:
  all:
    - trait: tier
      in: [gold, platinum]
    - last: margin_update
      field: properties.utilization
      gt: 0.95
      max_age: 4h
    - not:
        events: deposit
        within: 4h
goal: {event: margin_update, where: {properties.utilization: {gt: 0.95}}}
disqualify: {event: positions_closed}
context:
  exposure_usd: {last: margin_update, field: properties.exposure_usd}
  tier: {trait: tier}
actions:
  - on: enter
    destination: account_review
"""


def segment(rule: Any, **extra: Any) -> Segment:
    result = parse_document({"name": "s", "rule": rule, **extra}, "s.yaml")
    assert isinstance(result, Segment)
    return result


def rule_of(rule: Any) -> Any:
    return segment(rule).rule


def error(doc: Any, file: str | None = "s.yaml") -> DefinitionError:
    with pytest.raises(DefinitionError) as info:
        parse_document(doc, file)
    return info.value


def rule_error(rule: Any, **extra: Any) -> DefinitionError:
    return error({"name": "s", "rule": rule, **extra})


def cmp(*ops: tuple[str, Any]) -> Comparison:
    return Comparison(tuple(ops))


def prop(*path: str) -> Field:
    return Field(tuple(path))


def col(name: str) -> Field:
    return Field((), name)


def dur(text: str) -> Duration:
    return Duration.parse(text)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# --- errors ------------------------------------------------------------------------------


def test_error_message_names_file_path_and_reason() -> None:
    e = DefinitionError("a.yaml", "rule.all[2].within", "bad")
    assert (e.file, e.path, e.reason) == ("a.yaml", "rule.all[2].within", "bad")
    assert str(e) == "a.yaml: rule.all[2].within: bad"
    assert str(DefinitionError(None, "rule", "bad")) == "<input>: rule: bad"
    assert str(DefinitionError("a.yaml", "", "bad")) == "a.yaml: bad"


def test_cycle_error_is_a_definition_error() -> None:
    e = CycleError("a.yaml", "rule.in_segment", ["a", "b", "a"])
    assert isinstance(e, DefinitionError)
    assert e.cycle == ("a", "b", "a")
    assert e.reason == "in_segment cycle: a -> b -> a"
    assert str(e) == "a.yaml: rule.in_segment: in_segment cycle: a -> b -> a"


def test_definition_errors_aggregate_lists_every_error() -> None:
    errors = DefinitionErrors(
        [DefinitionError("a.yaml", "rule", "one"), DefinitionError("b.yaml", "name", "two")]
    )
    assert isinstance(errors, DefinitionError)
    assert len(errors) == 2
    assert (errors.file, errors.path, errors.reason) == ("a.yaml", "rule", "one")
    assert str(errors).splitlines() == [
        "2 errors in definitions:",
        "  a.yaml: rule: one",
        "  b.yaml: name: two",
    ]
    nested = DefinitionErrors([errors, DefinitionError("c.yaml", "", "three")])
    assert [e.reason for e in nested] == ["one", "two", "three"]


# --- durations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1), ("90s", 90), ("30m", 1800), ("4h", 14400), ("7d", 604800), ("2w", 1209600)],
)
def test_durations(text: str, seconds: int) -> None:
    d = Duration.parse(text)
    assert d.microseconds == seconds * 1_000_000
    assert d.text == text
    assert str(d) == text


def test_duration_bounds_and_equality() -> None:
    assert Duration.parse("400d").microseconds == 400 * 86400 * 1_000_000
    assert Duration.parse("60m") == Duration.parse("1h")
    assert Duration.parse("59m") < Duration.parse("1h")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("0s", "shorter than 1s"),
        ("401d", "longer than 400d"),
        ("58w", "longer than 400d"),
        ("4x", "invalid duration '4x'"),
        ("4 h", "invalid duration"),
        ("1.5h", "invalid duration"),
        ("h", "invalid duration"),
        ("", "invalid duration"),
        (10, "got the number 10; add a unit"),
        (None, "got null"),
    ],
)
def test_bad_durations(value: Any, reason: str) -> None:
    e = rule_error({"events": "deposit", "within": value})
    assert e.path == "rule.within"
    assert reason in e.reason


def test_within_error_mentions_session() -> None:
    assert "or session" in rule_error({"events": "deposit", "within": 5}).reason


# --- the contract's example --------------------------------------------------------------


def test_contract_example_parses_to_the_expected_model() -> None:
    doc = yaml.safe_load(CONTRACT_EXAMPLE)
    s = parse_document(doc, "margin_call_risk.yaml")
    assert isinstance(s, Segment)
    utilization = prop("utilization")
    assert s == Segment(
        name="margin_call_risk",
        description="Gold traders above 95% margin use with no deposit for 4 hours",
        mode="realtime",
        refresh=None,
        rule=AllCond(
            (
                TraitCond(("tier",), cmp(("in", ("gold", "platinum")))),
                LastFieldCond(
                    EventFilter(("margin_update",)), utilization, cmp(("gt", 0.95)), dur("4h")
                ),
                NotCond(EventsCond(EventFilter(("deposit",)), Window(within=dur("4h")))),
            )
        ),
        goal=EventFilter(("margin_update",), ((utilization, cmp(("gt", 0.95))),)),
        disqualify=EventFilter(("positions_closed",)),
        context=(
            ("exposure_usd", ContextLast(EventFilter(("margin_update",)), prop("exposure_usd"))),
            ("tier", ContextTrait(("tier",))),
        ),
        actions=(Action("enter", "account_review"),),
        source_file="margin_call_risk.yaml",
    )
    # Locations point into the document.
    assert isinstance(s.rule, AllCond)
    assert [c.loc for c in s.rule.items] == ["rule.all[0]", "rule.all[1]", "rule.all[2]"]
    not_cond = s.rule.items[2]
    assert isinstance(not_cond, NotCond)
    assert not_cond.item.loc == "rule.all[2].not"
    assert s.context[0][1].loc == "context.exposure_usd"
    assert s.actions[0].loc == "actions[0]"


def test_raw_is_the_document_as_json() -> None:
    doc = yaml.safe_load(CONTRACT_EXAMPLE)
    assert True in doc["actions"][0]  # YAML 1.1 reads `on:` as a boolean key
    s = parse_document(doc, "x.yaml")
    assert isinstance(s, Segment)
    assert s.raw["actions"] == [{"on": "enter", "destination": "account_review"}]
    assert json.loads(json.dumps(s.raw)) == s.raw
    assert {k: v for k, v in s.raw.items() if k != "actions"} == {
        k: v for k, v in doc.items() if k != "actions"
    }
    assert list(s.raw) == list(doc)  # key order kept for stable diffs
    assert True in doc["actions"][0]  # the caller's document is not modified


def test_equality_ignores_locations() -> None:
    a = rule_of({"all": [{"trait": "tier", "eq": "gold"}]})
    b = rule_of({"any": [{"all": [{"trait": "tier", "eq": "gold"}]}]})
    assert isinstance(b, AnyCond)
    assert a == b.items[0]
    assert a.loc != b.items[0].loc
    assert hash(a) == hash(b.items[0])


# --- event filters and fields ------------------------------------------------------------


def test_event_filter_forms() -> None:
    assert rule_of({"events": "deposit"}) == EventsCond(EventFilter(("deposit",)))
    assert rule_of({"events": ["deposit", "trade", "deposit"]}) == EventsCond(
        EventFilter(("deposit", "trade"))
    )
    assert rule_of({"events": {"event": ["login"]}}) == EventsCond(EventFilter(("login",)))
    where = {
        "properties.page": "deposit",
        "amount_usd": {"gte": 100, "lt": 1000},
        "currency": {"in": ["EUR", "USD"]},
        "source": {"exists": True},
        "properties.risk.level": {"ne": "low"},
    }
    cond = rule_of({"events": {"event": "page_view", "where": where}})
    assert cond == EventsCond(
        EventFilter(
            ("page_view",),
            (
                (prop("page"), cmp(("eq", "deposit"))),
                (col("amount_usd"), cmp(("gte", 100), ("lt", 1000))),
                (col("currency"), cmp(("in", ("EUR", "USD")))),
                (col("source"), cmp(("exists", True))),
                (prop("risk", "level"), cmp(("ne", "low"))),
            ),
        )
    )


def test_fields() -> None:
    assert col("amount").text == "amount" and not col("amount").is_property
    assert col("amount").is_numeric_column and not col("currency").is_numeric_column
    f = prop("a", "b-c", "0")
    assert f.text == "properties.a.b-c.0" and f.is_property
    cond = rule_of({"last": "trade", "field": "properties.a.b-c.0", "exists": True})
    assert isinstance(cond, LastFieldCond) and cond.field == f


@pytest.mark.parametrize(
    ("where", "path", "reason"),
    [
        (
            {"utilization": 1},
            "rule.events.where.utilization",
            "did you mean 'properties.utilization'",
        ),
        ({"amount_us": 1}, "rule.events.where.amount_us", "did you mean 'amount_usd'"),
        ({"properties": 1}, "rule.events.where.properties", "properties.<key>"),
        ({"properties.": 1}, "rule.events.where.properties.", "invalid property path"),
        ({"properties.a..b": 1}, "rule.events.where.properties.a..b", "invalid property path"),
        ({"properties.a b": 1}, "rule.events.where.properties.a b", "invalid property path"),
        ({"event_type": "x"}, "rule.events.where.event_type", "unknown field 'event_type'"),
    ],
)
def test_bad_fields(where: dict[str, Any], path: str, reason: str) -> None:
    e = rule_error({"events": {"event": "deposit", "where": where}})
    assert e.path == path
    assert reason in e.reason


@pytest.mark.parametrize(
    ("events", "path", "reason"),
    [
        ("Deposit", "rule.events", "invalid event type 'Deposit'"),
        ("page-view", "rule.events", "invalid event type"),
        ("1st", "rule.events", "invalid event type"),
        ([], "rule.events", "empty list of event types"),
        (["login", "Bad"], "rule.events[1]", "invalid event type 'Bad'"),
        (True, "rule.events", "quote it"),
        (None, "rule.events", "missing event filter"),
        (7, "rule.events", "must be a string"),
        ({"where": {}}, "rule.events", "missing required key 'event'"),
        ({"events": "x"}, "rule.events.events", "did you mean 'event'"),
        ({"event": "x", "where": ["a"]}, "rule.events.where", "where must be a mapping"),
    ],
)
def test_bad_event_filters(events: Any, path: str, reason: str) -> None:
    e = rule_error({"events": events})
    assert (e.path, e.file) == (path, "s.yaml")
    assert reason in e.reason


# --- comparisons -------------------------------------------------------------------------


def test_comparison_operators() -> None:
    cond = rule_of(
        {
            "trait": "balance",
            "gt": 1,
            "gte": 1.5,
            "lt": 10,
            "lte": 10.5,
            "ne": 3,
            "in": [1, 2.5],
            "not_in": [4],
            "exists": True,
            "eq": 2,
        }
    )
    assert isinstance(cond, TraitCond)
    assert cond.comparison.ops == (
        ("gt", 1),
        ("gte", 1.5),
        ("lt", 10),
        ("lte", 10.5),
        ("ne", 3),
        ("in", (1, 2.5)),
        ("not_in", (4,)),
        ("exists", True),
        ("eq", 2),
    )
    assert cond.comparison.get("lt") == 10 and cond.comparison.get("missing") is None


def test_operands_of_any_scalar_type_are_valid() -> None:
    # A value of another type makes the comparison false at run time, never an error.
    cond = rule_of({"trait": "signup_date", "gte": "2026-01-01", "lt": True})
    assert isinstance(cond, TraitCond)
    assert cond.comparison.ops == (("gte", "2026-01-01"), ("lt", True))
    cond = rule_of({"events": "deposit", "count": {"eq": "gold"}})
    assert isinstance(cond, EventsCond) and cond.aggregate.comparison == cmp(("eq", "gold"))


def test_bare_scalar_means_eq() -> None:
    cond = rule_of({"events": {"event": "x", "where": {"properties.flag": False}}, "count": 3})
    assert isinstance(cond, EventsCond)
    assert cond.filter.where == ((prop("flag"), cmp(("eq", False))),)
    assert cond.aggregate == Aggregate("count", None, cmp(("eq", 3)))


def test_exists_accepts_yes_no_words() -> None:
    cond = rule_of({"trait": "vip", "exists": "yes"})
    assert isinstance(cond, TraitCond) and cond.comparison == cmp(("exists", True))
    cond = rule_of({"trait": "vip", "exists": "No"})
    assert isinstance(cond, TraitCond) and cond.comparison == cmp(("exists", False))


@pytest.mark.parametrize(
    ("comparison", "path", "reason"),
    [
        ({"in": [1, "a"]}, "rule.in", "mixes numbers and strings"),
        ({"in": [1, True]}, "rule.in", "booleans are not numbers"),
        ({"not_in": []}, "rule.not_in", "non-empty list"),
        ({"in": "gold"}, "rule.in", "needs a list"),
        ({"in": [[1]]}, "rule.in[0]", "string, number or boolean"),
        ({"in": ["a", None]}, "rule.in[1]", "null is not an operand"),
        ({"eq": None}, "rule.eq", "use exists: false"),
        ({"eq": {"a": 1}}, "rule.eq", "got a mapping"),
        ({"gt": float("nan")}, "rule.gt", "finite"),
        ({"gt": "1e4"}, "rule.gt", "write it as a plain number, e.g. 10000"),
        ({"exists": "maybe"}, "rule.exists", "true or false"),
        ({"exists": 1}, "rule.exists", "true or false"),
        ({}, "rule", "needs a comparison"),
        ({"exist": True}, "rule.exist", "did you mean 'exists'"),
    ],
)
def test_bad_comparisons(comparison: dict[str, Any], path: str, reason: str) -> None:
    e = rule_error({"trait": "tier", **comparison})
    assert e.path == path
    assert reason in e.reason


def test_yaml_dates_must_be_quoted() -> None:
    doc = yaml.safe_load("{name: s, rule: {trait: signup, gte: 2026-01-01}}")
    e = error(doc)
    assert e.path == "rule.gte" and "quote it" in e.reason


@pytest.mark.parametrize(
    ("value", "path", "reason"),
    [
        ([1, 2], "rule.events.where.amount", "use in: [...]"),
        ({"gt": 1, "bigger": 2}, "rule.events.where.amount.bigger", "unknown key 'bigger'"),
        ({}, "rule.events.where.amount", "needs a comparison"),
    ],
)
def test_bad_standalone_comparisons(value: Any, path: str, reason: str) -> None:
    e = rule_error({"events": {"event": "deposit", "where": {"amount": value}}})
    assert e.path == path
    assert reason in e.reason


# --- conditions --------------------------------------------------------------------------


def test_trait_condition() -> None:
    assert rule_of({"trait": "consent.email", "eq": True}) == TraitCond(
        ("consent", "email"), cmp(("eq", True))
    )


def test_events_windows() -> None:
    deposit = EventFilter(("deposit",))
    assert rule_of({"events": "deposit"}) == EventsCond(deposit, Window(), DEFAULT_AGGREGATE)
    assert Window().is_unbounded
    assert rule_of({"events": "deposit", "within": "session"}) == EventsCond(
        deposit, Window(session=True)
    )
    both = rule_of({"events": "deposit", "within": "2h", "since_last": ["login", "identify"]})
    assert both == EventsCond(
        deposit, Window(within=dur("2h"), since_last=EventFilter(("login", "identify")))
    )
    session_since = rule_of({"events": "deposit", "within": "session", "since_last": "login"})
    assert isinstance(session_since, EventsCond)
    assert session_since.window == Window(session=True, since_last=EventFilter(("login",)))
    assert not session_since.window.is_unbounded


@pytest.mark.parametrize("func", ["sum", "min", "max", "avg", "distinct"])
def test_aggregates_with_fields(func: str) -> None:
    cond = rule_of({"events": "deposit", "within": "7d", func: {"field": "amount_usd", "gte": 5}})
    assert isinstance(cond, EventsCond)
    assert cond.aggregate == Aggregate(func, col("amount_usd"), cmp(("gte", 5)))


def test_count_aggregate() -> None:
    cond = rule_of({"events": "login", "count": {"gte": 2, "lt": 5}})
    assert isinstance(cond, EventsCond)
    assert cond.aggregate == Aggregate("count", None, cmp(("gte", 2), ("lt", 5)))


@pytest.mark.parametrize(
    ("cond", "path", "reason"),
    [
        ({"events": "d", "count": 1, "sum": {"field": "amount"}}, "rule", "one aggregate"),
        ({"events": "d", "count": {"field": "amount", "gte": 1}}, "rule.count.field", "no field"),
        ({"events": "d", "sum": {"gte": 1}}, "rule.sum", "missing required key 'field'"),
        ({"events": "d", "sum": {"field": "amount"}}, "rule.sum", "needs a comparison"),
        ({"events": "d", "sum": 5}, "rule.sum", "sum must be a mapping"),
        ({"events": "d", "avg": {"field": "amount", "gte": 1, "x": 1}}, "rule.avg.x", "unknown"),
        ({"events": "d", "gte": 3}, "rule.gte", "count: {gte: 3}"),
        ({"events": "d", "field": "amount"}, "rule.field", "field goes under the aggregate"),
        ({"events": "d", "max_age": "1h"}, "rule.max_age", "within: <duration>"),
        ({"events": "d", "wthin": "1h"}, "rule.wthin", "did you mean 'within'"),
        ({"events": "d", "since_last": None}, "rule.since_last", "missing event filter"),
    ],
)
def test_bad_events_conditions(cond: dict[str, Any], path: str, reason: str) -> None:
    e = rule_error(cond)
    assert e.path == path
    assert reason in e.reason


def test_last_conditions() -> None:
    assert rule_of(
        {"last": "margin_update", "field": "properties.utilization", "gt": 0.95}
    ) == LastFieldCond(EventFilter(("margin_update",)), prop("utilization"), cmp(("gt", 0.95)))
    assert rule_of({"last": "login", "age": {"gte": "7d", "lt": "30d"}}) == LastAgeCond(
        EventFilter(("login",)), cmp(("gte", dur("7d")), ("lt", dur("30d")))
    )
    # A bare duration means eq, like every comparison.
    assert rule_of({"last": "login", "age": "1h"}) == LastAgeCond(
        EventFilter(("login",)), cmp(("eq", dur("1h")))
    )


@pytest.mark.parametrize(
    ("cond", "path", "reason"),
    [
        ({"last": "login"}, "rule", "last needs either field"),
        ({"last": "login", "field": "amount"}, "rule", "needs a comparison"),
        ({"last": "login", "age": {"gte": "7d"}, "field": "amount"}, "rule.field", "age"),
        ({"last": "login", "age": {"gte": "7d"}, "max_age": "1h"}, "rule.max_age", "age"),
        ({"last": "login", "age": {"gte": "7d"}, "gt": 1}, "rule.gt", "cannot be combined"),
        ({"last": "login", "age": {"gte": 7}}, "rule.age.gte", "add a unit"),
        ({"last": "login", "age": {"in": ["1h"]}}, "rule.age.in", "not available for age"),
        ({"last": "login", "age": {"gte": "7x"}}, "rule.age.gte", "invalid duration"),
        ({"last": "login", "age": {"older": "7d"}}, "rule.age.older", "unknown key"),
        ({"last": "x", "field": "amount", "gt": 1, "max_age": "0s"}, "rule.max_age", "1s"),
        ({"last": "x", "field": "amount", "gt": 1, "within": "1h"}, "rule.within", "max_age"),
        ({"last": ["Bad"], "field": "amount", "gt": 1}, "rule.last[0]", "invalid event type"),
    ],
)
def test_bad_last_conditions(cond: dict[str, Any], path: str, reason: str) -> None:
    e = rule_error(cond)
    assert e.path == path
    assert reason in e.reason


def test_segment_and_score_conditions() -> None:
    assert rule_of({"in_segment": "gold_traders"}) == InSegmentCond("gold_traders")
    assert rule_of({"score": "engagement", "gte": 20}) == ScoreCond("engagement", cmp(("gte", 20)))


def test_boolean_conditions() -> None:
    assert rule_of({"all": []}) == AllCond(())
    assert rule_of({"any": []}) == AnyCond(())
    nested = rule_of({"any": [{"not": {"in_segment": "a"}}, {"all": [{"in_segment": "b"}]}]})
    assert nested == AnyCond((NotCond(InSegmentCond("a")), AllCond((InSegmentCond("b"),))))


@pytest.mark.parametrize(
    ("cond", "path", "reason"),
    [
        ({"all": {"trait": "t", "eq": 1}}, "rule.all", "takes a list"),
        ({"any": None}, "rule.any", "got null"),
        ({"not": [{"in_segment": "a"}]}, "rule.not", "wrap several in all"),
        ({"all": [], "extra": 1}, "rule.extra", "unknown key 'extra'"),
        ({"all": ["in_segment a"]}, "rule.all[0]", "condition must be a mapping"),
        ({"trait": "t", "events": "d"}, "rule", "got 'trait' and 'events'"),
        ({"trial": "t", "eq": 1}, "rule", "did you mean 'trait'"),
        ({}, "rule", "not a condition"),
        ({"in_segment": "Gold"}, "rule.in_segment", "invalid segment name"),
        ({"in_segment": "a", "eq": 1}, "rule.eq", "unknown key"),
        ({"score": "s"}, "rule", "needs a comparison"),
        ({"trait": "tier"}, "rule", "needs a comparison"),
        ({"trait": "tier.", "eq": 1}, "rule.trait", "invalid trait"),
        ({"trait": 5, "eq": 1}, "rule.trait", "must be a string"),
        ({"trait": "t", "eq": 1, "max_age": "1h"}, "rule.max_age", "unknown key"),
    ],
)
def test_bad_conditions(cond: Any, path: str, reason: str) -> None:
    e = rule_error(cond)
    assert e.path == path
    assert reason in e.reason


def test_deep_error_path() -> None:
    rule: dict[str, Any] = {
        "all": [
            {"trait": "tier", "eq": "gold"},
            {"any": [{"events": "login"}, {"not": {"events": "deposit", "within": "4x"}}]},
            {"events": "deposit", "within": "forever"},
        ]
    }
    e = rule_error(rule)
    assert e.path == "rule.all[1].any[1].not.within"
    rule["all"][1] = {"events": "login"}
    e = rule_error(rule)
    assert e.path == "rule.all[2].within"
    assert str(e).startswith("s.yaml: rule.all[2].within: invalid duration 'forever'")


# --- segments ----------------------------------------------------------------------------


def test_segment_defaults() -> None:
    s = segment({"events": "deposit"})
    assert (s.name, s.description, s.mode, s.refresh) == ("s", None, "realtime", None)
    assert (s.goal, s.disqualify, s.context, s.actions) == (None, None, (), ())
    assert s.source_file == "s.yaml"


def test_scheduled_segment() -> None:
    s = segment({"trait": "tier", "eq": "gold"}, mode="scheduled", refresh="1h")
    assert s.mode == "scheduled" and s.refresh == dur("1h")


@pytest.mark.parametrize(
    ("doc", "path", "reason"),
    [
        ({"rule": {"events": "d"}}, "", "missing required key 'name'"),
        ({"name": "s"}, "", "missing required key 'rule'"),
        ({"name": "Gold", "rule": {"events": "d"}}, "name", "invalid segment name 'Gold'"),
        ({"name": "1a", "rule": {"events": "d"}}, "name", "invalid segment name"),
        ({"name": "a" * 64, "rule": {"events": "d"}}, "name", "at most 63"),
        ({"name": 5, "rule": {"events": "d"}}, "name", "must be a string"),
        ({"name": "s", "rule": {"events": "d"}, "mode": "live"}, "mode", "realtime or scheduled"),
        ({"name": "s", "rule": {"events": "d"}, "mode": "scheduled"}, "refresh", "needs refresh"),
        ({"name": "s", "rule": {"events": "d"}, "refresh": "1h"}, "refresh", "only to mode"),
        (
            {"name": "s", "rule": {"events": "d"}, "mode": "scheduled", "refresh": "1y"},
            "refresh",
            "invalid duration",
        ),
        ({"name": "s", "rule": {"events": "d"}, "disqualify": "x"}, "disqualify", "requires goal"),
        ({"name": "s", "rule": {"events": "d"}, "goal": {"evnt": "x"}}, "goal.evnt", "'event'"),
        ({"name": "s", "rule": {"events": "d"}, "description": 5}, "description", "string"),
        ({"name": "s", "rule": {"events": "d"}, "rules": 1}, "rules", "did you mean 'rule'"),
        ({"name": "s", "rule": "deposit"}, "rule", "condition must be a mapping"),
        ({"name": "s", "rule": {"events": "d"}, "a": 1, "b": 2}, "", "unknown keys 'a'"),
    ],
)
def test_bad_segments(doc: dict[str, Any], path: str, reason: str) -> None:
    e = error(doc)
    assert e.path == path
    assert reason in e.reason


def test_max_length_name_is_fine() -> None:
    name = "a" + "b" * 62
    assert parse_document({"name": name, "rule": {"all": []}}).name == name


def test_goal_without_disqualify_is_allowed() -> None:
    s = segment({"events": "d"}, goal="deposit")
    assert s.goal == EventFilter(("deposit",)) and s.disqualify is None


# --- context -----------------------------------------------------------------------------


def test_context_values() -> None:
    s = segment(
        {"events": "deposit"},
        context={
            "exposure_usd": {"last": "margin_update", "field": "properties.exposure_usd"},
            "tier": {"trait": "tier"},
            "deposits_7d": {"events": "deposit", "within": "7d", "sum": {"field": "amount_usd"}},
            "deposit_count": {"events": "deposit", "count": {}},
            "logins": {"events": "login", "since_last": "deposit"},
            "engagement": {"score": "engagement"},
        },
    )
    assert s.context == (
        ("exposure_usd", ContextLast(EventFilter(("margin_update",)), prop("exposure_usd"))),
        ("tier", ContextTrait(("tier",))),
        (
            "deposits_7d",
            ContextEvents(
                EventFilter(("deposit",)), Window(within=dur("7d")), "sum", col("amount_usd")
            ),
        ),
        ("deposit_count", ContextEvents(EventFilter(("deposit",)), Window(), "count", None)),
        (
            "logins",
            ContextEvents(
                EventFilter(("login",)),
                Window(since_last=EventFilter(("deposit",))),
                "count",
                None,
            ),
        ),
        ("engagement", ContextScore("engagement")),
    )


@pytest.mark.parametrize(
    ("context", "path", "reason"),
    [
        ({"exposure_usd": {"lst": "x", "field": "amount"}}, "context.exposure_usd", "'last'"),
        (
            {"exposure_usd": {"last": "Margin", "field": "amount"}},
            "context.exposure_usd.last",
            "event type",
        ),
        ({"exposure_usd": {"last": "x"}}, "context.exposure_usd", "missing required key 'field'"),
        ({"x": {"last": "x", "field": "amount", "gt": 1}}, "context.x.gt", "no comparison"),
        ({"x": {"trait": "t", "eq": 1}}, "context.x.eq", "no comparison"),
        (
            {"x": {"events": "d", "sum": {"field": "amount", "gte": 1}}},
            "context.x.sum.gte",
            "no comparison",
        ),
        ({"x": {"events": "d", "sum": {}}}, "context.x.sum", "missing required key 'field'"),
        ({"x": {"events": "d", "count": {"gte": 1}}}, "context.x.count", "no arguments"),
        ({"x": {"events": "d", "count": 1}}, "context.x.count", "no arguments"),
        (
            {"x": {"events": "d", "count": {}, "max": {"field": "amount"}}},
            "context.x",
            "one aggregate",
        ),
        ({"x": {"score": "Bad"}}, "context.x.score", "invalid score name"),
        ({"x": {"last": "a", "trait": "b"}}, "context.x", "exactly one"),
        ({"x": "tier"}, "context.x", "must be a mapping"),
        ({"Exposure": {"trait": "t"}}, "context.Exposure", "invalid context key"),
        ({"profile_id": {"trait": "t"}}, "context.profile_id", "reserved"),
        ({"entered_at": {"trait": "t"}}, "context.entered_at", "reserved"),
        ([{"trait": "t"}], "context", "must be a mapping"),
    ],
)
def test_bad_context(context: Any, path: str, reason: str) -> None:
    e = rule_error({"events": "d"}, context=context)
    assert e.path == path
    assert reason in e.reason


# --- actions -----------------------------------------------------------------------------


def test_actions() -> None:
    doc = yaml.safe_load(
        """
        name: s
        rule: {events: deposit}
        actions:
          - on: enter
            destination: crm
            priority: 10
            payload: {template: welcome, tags: [a, b], n: 1.5, none: null}
            include_backfill: yes
          - "on": exit
            destination: crm
        """
    )
    s = parse_document(doc, "s.yaml")
    assert isinstance(s, Segment)
    assert s.actions == (
        Action(
            "enter",
            "crm",
            10,
            {"template": "welcome", "tags": ["a", "b"], "n": 1.5, "none": None},
            True,
        ),
        Action("exit", "crm"),
    )
    assert s.referenced_destinations() == frozenset({"crm"})
    assert hash(s.actions[0]) == hash(s.actions[0])  # the payload does not break hashing
    assert s.raw["actions"][0]["on"] == "enter"


def test_include_backfill_accepts_word_strings() -> None:
    s = segment(
        {"events": "d"}, actions=[{"on": "enter", "destination": "x", "include_backfill": "no"}]
    )
    assert s.actions[0].include_backfill is False


@pytest.mark.parametrize(
    ("action", "path", "reason"),
    [
        ({"on": "entry", "destination": "x"}, "actions[0].on", "enter or exit"),
        ({True: "enter", "on": "exit", "destination": "x"}, "actions[0]", "keep one"),
        ({"on": "enter"}, "actions[0]", "missing required key 'destination'"),
        ({"destination": "x"}, "actions[0]", "missing required key 'on'"),
        ({"on": "enter", "destination": "X"}, "actions[0].destination", "invalid destination"),
        ({"on": "enter", "destination": "x", "priority": True}, "actions[0].priority", "integer"),
        ({"on": "enter", "destination": "x", "priority": 1.5}, "actions[0].priority", "integer"),
        ({"on": "enter", "destination": "x", "payload": [1]}, "actions[0].payload", "mapping"),
        ({"on": "enter", "destination": "x", "prio": 1}, "actions[0].prio", "'priority'"),
        (
            {"on": "enter", "destination": "x", "include_backfill": 2},
            "actions[0].include_backfill",
            "true or false",
        ),
        ({False: "enter", "destination": "x"}, "actions[0]", "quote it"),
    ],
)
def test_bad_actions(action: dict[Any, Any], path: str, reason: str) -> None:
    e = rule_error({"events": "d"}, actions=[action])
    assert e.path == path
    assert reason in e.reason


def test_payload_must_be_plain_json() -> None:
    payload = yaml.safe_load("{sent: 2026-12-03}")
    e = rule_error(
        {"events": "d"}, actions=[{"on": "enter", "destination": "x", "payload": payload}]
    )
    assert e.path == "actions[0].payload.sent"
    assert "plain JSON" in e.reason


def test_one_action_per_destination_and_kind() -> None:
    e = rule_error({"events": "d"}, actions=[
        {"on": "enter", "destination": "x"}, {"on": "exit", "destination": "x"},
        {"on": "enter", "destination": "x", "payload": {"other": 1}}])
    assert e.path == "actions[2].destination"
    assert "actions[0] already sends on: enter to x" in e.reason


def test_actions_must_be_a_list() -> None:
    e = rule_error({"events": "d"}, actions={"on": "enter", "destination": "x"})
    assert (e.path, "must be a list" in e.reason) == ("actions", True)


# --- scores and destinations -------------------------------------------------------------


def test_score() -> None:
    s = parse_document(
        {
            "score": "engagement",
            "half_life": "3d",
            "weights": {"login": 1, "trade": 2.5, "withdrawal": -1},
        },
        "e.yaml",
    )
    assert isinstance(s, Score)
    assert s == Score(
        "engagement", dur("3d"), (("login", 1.0), ("trade", 2.5), ("withdrawal", -1.0)), "e.yaml"
    )
    assert s.event_types() == frozenset({"login", "trade", "withdrawal"})
    assert s.raw["weights"] == {"login": 1, "trade": 2.5, "withdrawal": -1}


@pytest.mark.parametrize(
    ("doc", "path", "reason"),
    [
        ({"score": "e", "half_life": "3d"}, "", "missing required key 'weights'"),
        ({"half_life": "3d", "weights": {"a": 1}}, "", "missing required key 'score'"),
        ({"score": "e", "half_life": "3d", "weights": {}}, "weights", "at least one"),
        ({"score": "e", "half_life": "3d", "weights": [1]}, "weights", "mapping"),
        ({"score": "e", "half_life": "3d", "weights": {"login": True}}, "weights.login", "number"),
        ({"score": "e", "half_life": "3d", "weights": {"login": "1e3"}}, "weights.login", "1000"),
        ({"score": "e", "half_life": "3d", "weights": {"Login": 1}}, "weights.Login", "event type"),
        (
            {"score": "e", "half_life": "3", "weights": {"login": 1}},
            "half_life",
            "invalid duration",
        ),
        ({"score": "E", "half_life": "3d", "weights": {"login": 1}}, "score", "invalid score name"),
        (
            {"score": "e", "half_life": "3d", "weights": {"a": 1}, "decay": 1},
            "decay",
            "unknown key",
        ),
    ],
)
def test_bad_scores(doc: dict[str, Any], path: str, reason: str) -> None:
    e = error(doc)
    assert e.path == path
    assert reason in e.reason


def test_destinations() -> None:
    d = parse_document(
        {
            "destination": "crm",
            "url": "https://crm.example.com/hooks/segflow",
            "secret": {"env": "CRM_SECRET"},
            "channel": "email",
        },
        "crm.yaml",
    )
    assert d == Destination(
        "crm",
        "https://crm.example.com/hooks/segflow",
        "CRM_SECRET",
        None,
        "email",
        dur("10s"),
        "crm.yaml",
    )
    d = parse_document(
        {
            "destination": "ads",
            "url": "http://localhost:9000/x",
            "secret": {"file": "secrets/ads.key"},
            "channel": "ads",
            "timeout": "30s",
        }
    )
    assert isinstance(d, Destination)
    assert (d.secret_env, d.secret_file, d.timeout, d.source_file) == (
        None,
        "secrets/ads.key",
        dur("30s"),
        None,
    )


@pytest.mark.parametrize(
    ("change", "path", "reason"),
    [
        ({"url": "ftp://x/y"}, "url", "http:// or https://"),
        ({"url": "crm.example.com"}, "url", "http:// or https://"),
        ({"channel": "mail"}, "channel", "did you mean 'email'"),
        ({"secret": {}}, "secret", "exactly one of"),
        ({"secret": {"env": "A", "file": "b"}}, "secret", "exactly one of"),
        ({"secret": {"env": "1A"}}, "secret.env", "environment variable"),
        ({"secret": {"vault": "x"}}, "secret.vault", "unknown key"),
        ({"secret": "hunter2"}, "secret", "must be a mapping"),
        ({"timeout": "10m"}, "timeout", "at most 5m"),
        ({"retries": 3}, "retries", "unknown key"),
    ],
)
def test_bad_destinations(change: dict[str, Any], path: str, reason: str) -> None:
    doc = {
        "destination": "crm",
        "url": "https://x.example/h",
        "secret": {"env": "S"},
        "channel": "webhook",
    }
    e = error({**doc, **change})
    assert e.path == path
    assert reason in e.reason


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ([1, 2], "must be a mapping"),
        ("name: x", "must be a mapping"),
        ({"description": "x"}, "cannot tell what this defines"),
        ({"name": "a", "score": "b"}, "not several"),
        ({"url": "https://x.example/h", "channel": "sms"}, "missing required key 'destination'"),
    ],
)
def test_document_kind(doc: Any, reason: str) -> None:
    e = error(doc)
    assert e.path == ""
    assert reason in e.reason


# --- segment properties ------------------------------------------------------------------


def test_event_types_collects_every_filter() -> None:
    s = segment(
        {
            "all": [
                {"events": {"event": ["deposit", "trade"]}, "since_last": "login"},
                {"not": {"last": "margin_update", "age": {"gt": "1h"}}},
                {"any": [{"last": "withdrawal", "field": "amount", "gt": 1}, {"in_segment": "x"}]},
            ]
        },
        goal="webinar_attended",
        disqualify="ticket_opened",
        context={
            "opens": {"events": "email_open", "count": {}},
            "v": {"last": "ad_impression", "field": "source"},
        },
    )
    assert s.event_types() == frozenset(
        {
            "deposit",
            "trade",
            "login",
            "margin_update",
            "withdrawal",
            "webinar_attended",
            "ticket_opened",
            "email_open",
            "ad_impression",
        }
    )
    assert not s.uses_traits() and not s.uses_sessions()
    assert s.referenced_segments() == frozenset({"x"})


def test_event_types_of_trait_segments_include_trait_changing_events() -> None:
    s = segment({"trait": "tier", "eq": "gold"})
    assert s.uses_traits()
    assert s.event_types() == frozenset({"identify", "consent_updated"})
    s = segment({"events": "deposit"}, context={"tier": {"trait": "tier"}})
    assert s.uses_traits()
    assert s.event_types() == frozenset({"deposit", "identify", "consent_updated"})


def test_sessions_depend_on_every_event_type() -> None:
    assert segment({"not": {"events": "asset_view", "within": "session"}}).event_types() is None
    s = segment({"events": "d"}, context={"n": {"events": "x", "within": "session", "count": {}}})
    assert s.uses_sessions() and s.event_types() is None


def test_event_types_of_scores() -> None:
    s = segment({"score": "eng", "gt": 1}, context={"other": {"score": "other"}})
    assert s.referenced_scores() == frozenset({"eng", "other"})
    scores = {
        "eng": Score("eng", dur("3d"), (("login", 1.0), ("trade", 2.0))),
        "other": Score("other", dur("1d"), (("deposit", 1.0),)),
    }
    assert s.event_types(scores) == frozenset({"login", "trade", "deposit"})
    # Unknown weights: any event may matter.
    assert s.event_types() is None
    assert s.event_types({"eng": scores["eng"]}) is None


def test_in_segment_only_segment_has_no_event_types() -> None:
    s = segment({"all": [{"in_segment": "a"}, {"not": {"in_segment": "b"}}]})
    assert s.event_types() == frozenset()
    assert s.referenced_segments() == frozenset({"a", "b"})


# --- graph -------------------------------------------------------------------------------


def graph(edges: dict[str, list[str]]) -> dict[str, Segment]:
    result = {}
    for name, deps in edges.items():
        doc = {"name": name, "rule": {"all": [{"in_segment": d} for d in deps]}}
        parsed = parse_document(doc, f"{name}.yaml")
        assert isinstance(parsed, Segment)
        result[name] = parsed
    return result


def test_dependency_order_is_topological_and_deterministic() -> None:
    segments = graph({"z": [], "d": ["b", "c"], "c": ["a"], "b": ["a"], "a": [], "e": ["z"]})
    assert dependency_order(segments) == ["a", "b", "c", "d", "z", "e"]
    assert dependency_order(dict(reversed(list(segments.items())))) == [
        "a",
        "b",
        "c",
        "d",
        "z",
        "e",
    ]


def test_dependents_are_transitive() -> None:
    segments = graph({"a": [], "b": ["a"], "c": ["b"], "d": ["a", "c"], "e": []})
    assert dependents(segments) == {
        "a": {"b", "c", "d"},
        "b": {"c", "d"},
        "c": {"d"},
        "d": set(),
        "e": set(),
    }


def test_unknown_references_are_ignored_by_the_graph() -> None:
    assert dependency_order(graph({"a": ["missing"]})) == ["a"]


@pytest.mark.parametrize(
    ("edges", "cycle"),
    [
        ({"a": ["b"], "b": ["a"]}, ("a", "b", "a")),
        ({"a": ["a"]}, ("a", "a")),
        ({"c": ["a"], "a": ["b"], "b": ["c"], "x": ["a"]}, ("a", "b", "c", "a")),
        ({"m": ["n"], "n": ["o"], "o": ["n"], "k": []}, ("n", "o", "n")),
    ],
)
def test_cycles_are_named(edges: dict[str, list[str]], cycle: tuple[str, ...]) -> None:
    with pytest.raises(CycleError) as info:
        dependency_order(graph(edges))
    e = info.value
    assert e.cycle == cycle
    assert e.reason == "in_segment cycle: " + " -> ".join(cycle)
    assert e.file == f"{cycle[0]}.yaml"
    index = edges[cycle[0]].index(cycle[1])
    assert e.path == f"rule.all[{index}].in_segment"


# --- files and projects ------------------------------------------------------------------


def test_load_yaml_file_with_on_key(tmp_path: Path) -> None:
    path = write(tmp_path, "m.yaml", CONTRACT_EXAMPLE)
    [s] = load_file(path)
    assert isinstance(s, Segment)
    assert s.actions == (Action("enter", "account_review"),)
    assert s.source_file == str(path)


def test_load_json_file(tmp_path: Path) -> None:
    doc = yaml.safe_load(CONTRACT_EXAMPLE)
    doc["actions"] = [{"on": "enter", "destination": "account_review"}]
    path = write(tmp_path, "m.json", json.dumps(doc))
    [s] = load_file(path)
    [t] = load_file(write(tmp_path, "m.yaml", CONTRACT_EXAMPLE))
    assert isinstance(s, Segment) and isinstance(t, Segment)
    assert s == dataclasses.replace(t, source_file=s.source_file)
    assert s.raw == t.raw


def test_json_list_and_yaml_documents(tmp_path: Path) -> None:
    docs = [
        {"name": "a", "rule": {"events": "x"}},
        {"score": "e", "half_life": "1d", "weights": {"x": 1}},
    ]
    assert [d.name for d in load_file(write(tmp_path, "l.json", json.dumps(docs)))] == ["a", "e"]
    text = """
    name: a
    rule: {events: x}
    ---
    # nothing but a comment
    ---
    destination: d
    url: https://x.example/h
    secret: {env: S}
    channel: sms
    """
    loaded = load_file(write(tmp_path, "multi.yaml", text))
    assert [type(d).__name__ for d in loaded] == ["Segment", "Destination"]
    assert all(d.source_file == str(tmp_path / "multi.yaml") for d in loaded)
    assert load_file(write(tmp_path, "empty.yaml", "# only a comment\n")) == []


def test_errors_in_several_documents_are_collected(tmp_path: Path) -> None:
    text = """
    name: Bad
    rule: {events: x}
    ---
    name: ok
    rule: {events: x}
    ---
    name: also_bad
    rule: {events: x, within: 1y}
    """
    path = write(tmp_path, "multi.yaml", text)
    with pytest.raises(DefinitionErrors) as info:
        load_file(path)
    assert [(e.file, e.path) for e in info.value] == [
        (f"{path} (document 1)", "name"),
        (f"{path} (document 3)", "rule.within"),
    ]


def test_yaml_duplicate_keys_are_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "d.yaml", "name: a\nrule: {events: x}\nrule: {events: y}\n")
    with pytest.raises(DefinitionError) as info:
        load_file(path)
    assert info.value.path == "line 3, column 1"
    assert "duplicate key 'rule'" in info.value.reason


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    text = """
    name: a
    rule:
      all:
        - &base {events: deposit, within: 1h}
        - {<<: *base, within: 2h}
    """
    [s] = load_file(write(tmp_path, "m.yaml", text))
    assert isinstance(s, Segment) and isinstance(s.rule, AllCond)
    assert [c.window.within for c in s.rule.items if isinstance(c, EventsCond)] == [
        dur("1h"),
        dur("2h"),
    ]


def test_syntax_errors_name_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", "name: a\nrule: {events: [x\n")
    with pytest.raises(DefinitionError) as info:
        load_file(path)
    assert info.value.file == str(path)
    assert info.value.path.startswith("line ")
    assert info.value.reason.startswith("invalid YAML")
    path = write(tmp_path, "bad.json", '{"name": "a",\n "rule": }')
    with pytest.raises(DefinitionError) as info:
        load_file(path)
    assert (info.value.path, info.value.reason) == (
        "line 2, column 10",
        "invalid JSON: Expecting value",
    )
    path = write(tmp_path, "dup.json", '{"name": "a", "name": "b"}')
    with pytest.raises(DefinitionError, match="duplicate key 'name'"):
        load_file(path)


def test_load_paths_reads_directories_recursively(tmp_path: Path) -> None:
    write(tmp_path, "defs/a.yaml", "name: a\nrule: {in_segment: b}\n")
    write(tmp_path, "defs/nested/b.yml", "name: b\nrule: {score: eng, gt: 1}\n")
    write(tmp_path, "defs/eng.json", '{"score": "eng", "half_life": "1d", "weights": {"login": 1}}')
    write(tmp_path, "defs/.hidden/broken.yaml", "name: [\n")
    write(tmp_path, "defs/notes.txt", "not a definition")
    project = load_paths([tmp_path / "defs", tmp_path / "defs" / "a.yaml"])
    assert isinstance(project, Project)
    assert list(project.segments) == ["b", "a"]  # dependency order
    assert list(project.scores) == ["eng"]
    assert project.event_types("a") == frozenset()
    assert project.event_types("b") == frozenset({"login"})
    assert [d.name for d in project.definitions()] == ["eng", "b", "a"]


def test_load_paths_collects_errors_of_every_file(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "name: a\nrule: {events: X}\n")
    write(tmp_path, "b.yaml", "name: b\nrule: {events: x, within: 5}\n")
    write(tmp_path, "c.yaml", "name: c\nrule: {events: x}\n")
    with pytest.raises(DefinitionErrors) as info:
        load_paths([tmp_path])
    assert [(Path(e.file or "").name, e.path) for e in info.value] == [
        ("a.yaml", "rule.events"),
        ("b.yaml", "rule.within"),
    ]


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DefinitionError, match="no such file or directory"):
        load_paths([tmp_path / "nope"])


def test_duplicate_names(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "name: same\nrule: {events: x}\n")
    write(tmp_path, "b.yaml", "name: same\nrule: {events: y}\n")
    with pytest.raises(DefinitionError) as info:
        load_paths([tmp_path])
    e = info.value
    assert (Path(e.file or "").name, e.path) == ("b.yaml", "name")
    assert "duplicate segment name 'same'" in e.reason and "a.yaml" in e.reason


def test_scores_and_segments_have_separate_namespaces() -> None:
    project = build_project(
        [
            parse_document({"name": "eng", "rule": {"score": "eng", "gt": 1}}),
            parse_document({"score": "eng", "half_life": "1d", "weights": {"login": 1}}),
        ]
    )
    assert list(project.segments) == ["eng"] and list(project.scores) == ["eng"]


def test_unknown_references() -> None:
    doc = {
        "name": "a",
        "rule": {"all": [{"in_segment": "gold_trader"}, {"score": "engagment", "gt": 1}]},
        "context": {"s": {"score": "missing"}},
        "actions": [{"on": "exit", "destination": "nowhere"}],
    }
    definitions = [
        parse_document(doc, "a.yaml"),
        parse_document({"name": "gold_traders", "rule": {"all": []}}, "g.yaml"),
        parse_document({"score": "engagement", "half_life": "1d", "weights": {"x": 1}}, "e.yaml"),
    ]
    with pytest.raises(DefinitionErrors) as info:
        build_project(definitions)
    assert [(e.file, e.path, e.reason) for e in info.value] == [
        (
            "a.yaml",
            "rule.all[0].in_segment",
            "unknown segment 'gold_trader' (did you mean 'gold_traders'?)",
        ),
        ("a.yaml", "rule.all[1].score", "unknown score 'engagment' (did you mean 'engagement'?)"),
        ("a.yaml", "context.s.score", "unknown score 'missing'"),
        ("a.yaml", "actions[0].destination", "unknown destination 'nowhere'"),
    ]


def test_cycles_fail_the_load(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "name: a\nrule: {any: [{events: x}, {in_segment: b}]}\n")
    write(tmp_path, "b.yaml", "name: b\nrule: {not: {in_segment: a}}\n")
    write(tmp_path, "c.yaml", "name: c\nrule: {in_segment: a}\n")
    with pytest.raises(CycleError) as info:
        load_paths([tmp_path])
    e = info.value
    assert str(e) == f"{tmp_path / 'a.yaml'}: rule.any[1].in_segment: in_segment cycle: a -> b -> a"


# --- the examples ------------------------------------------------------------------------


def test_all_examples_load() -> None:
    project = load_paths([EXAMPLES])
    assert set(project.segments) == {
        "hot_lead",
        "margin_call_risk",
        "deposit_abandoned",
        "inactive_7d",
        "high_value_onboarding",
        "engaged",
        "gold_traders",
        "gold_and_at_risk",
        "funded",
    }
    assert set(project.scores) == {"engagement"}
    assert set(project.destinations) == {"account_review", "acquisition_ads"}
    order = list(project.segments)
    assert order.index("gold_and_at_risk") > order.index("gold_traders")
    assert order.index("gold_and_at_risk") > order.index("margin_call_risk")
    for path in sorted(EXAMPLES.glob("*.yaml")):
        assert path.read_text(encoding="utf-8").startswith("# "), path


def test_examples_mean_what_they_say() -> None:
    project = load_paths([EXAMPLES])
    s = project.segments
    contract = parse_document(yaml.safe_load(CONTRACT_EXAMPLE))
    assert isinstance(contract, Segment)
    assert s["margin_call_risk"].rule == contract.rule
    assert s["margin_call_risk"].context == contract.context
    assert (s["margin_call_risk"].goal, s["margin_call_risk"].disqualify) == (
        contract.goal,
        contract.disqualify,
    )
    assert (s["gold_traders"].mode, s["gold_traders"].refresh) == ("scheduled", dur("1h"))
    assert project.event_types("hot_lead") is None  # session windows see every event
    assert project.event_types("funded") == frozenset({"deposit"})
    assert project.event_types("engaged") == frozenset({"login", "page_view", "trade", "deposit"})
    assert project.event_types("gold_and_at_risk") == frozenset()
    assert s["inactive_7d"].rule == LastAgeCond(EventFilter(("login",)), cmp(("gte", dur("7d"))))
    assert s["gold_and_at_risk"].referenced_segments() == frozenset(
        {"gold_traders", "margin_call_risk"}
    )
    assert project.scores["engagement"].half_life == dur("3d")


# --- everything the shared definition generator draws is accepted ------------------------


def test_generated_definitions_parse() -> None:
    strategies = pytest.importorskip("strategies")
    from hypothesis import HealthCheck, given, settings

    @settings(
        max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(strategies.definition_sets())
    def check(definitions: Any) -> None:
        parsed = [parse_document(doc) for doc in definitions.scores.values()]
        parsed += [parse_document(doc) for doc in definitions.segments.values()]
        project = build_project(parsed)
        assert set(project.segments) == set(definitions.segments)
        for name, segment_ in project.segments.items():
            assert segment_.raw == definitions.segments[name]

    check()


def test_destination_max_attempts() -> None:
    doc = {"destination": "crm", "url": "https://crm.example.com/h",
           "secret": {"env": "CRM_SECRET"}, "channel": "webhook"}
    d = parse_document(doc)
    assert isinstance(d, Destination) and d.max_attempts == 8
    d = parse_document({**doc, "max_attempts": 3})
    assert isinstance(d, Destination) and d.max_attempts == 3
    for bad in (0, 101, True, "3"):
        e = error({**doc, "max_attempts": bad})
        assert e.path == "max_attempts" and "1 to 100" in e.reason
