"""YAML/JSON documents -> validated definitions (contract §4 and §7).

Validation is strict: unknown keys, wrong types and impossible combinations are errors
naming the file, the path inside the document and the reason. The first problem in a
document stops that document; problems in different documents are reported together.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import yaml

from compiler import payload as payload_templates
from compiler.errors import DefinitionError, DefinitionErrors, raise_collected
from compiler.graph import dependency_order
from compiler.model import (
    ACTION_KINDS,
    AGGREGATE_FUNCS,
    CHANNELS,
    COMPARISON_OPS,
    DEFAULT_AGGREGATE,
    DEFAULT_DEDUP_WINDOW,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_TIMEOUT,
    EVENT_COLUMNS,
    EVENT_TYPE_RE,
    KEY_RE,
    MODES,
    NAME_RE,
    RESERVED_CONTEXT_KEYS,
    Action,
    ActionKind,
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
    Definition,
    Destination,
    Duration,
    EventFilter,
    EventsCond,
    Field,
    FrequencyCap,
    InSegmentCond,
    JsonScalar,
    LastAgeCond,
    LastFieldCond,
    Mode,
    NotCond,
    Operand,
    Project,
    Score,
    ScoreCond,
    Segment,
    TraitCond,
    Window,
)

__all__ = [
    "DEFINITION_SUFFIXES",
    "build_project",
    "discover",
    "load_file",
    "load_paths",
    "parse_document",
]

DEFINITION_SUFFIXES: tuple[str, ...] = (".yaml", ".yml", ".json")

SEGMENT_KEYS = (
    "name",
    "description",
    "mode",
    "refresh",
    "rule",
    "goal",
    "disqualify",
    "context",
    "actions",
)
SCORE_KEYS = ("score", "description", "half_life", "weights")
DESTINATION_KEYS = (
    "destination", "description", "url", "secret", "channel", "timeout", "max_attempts",
    "frequency_cap", "dedup_window",
)
ACTION_KEYS = ("on", "destination", "priority", "payload", "include_backfill")
CONDITION_HEADS = ("trait", "events", "last", "in_segment", "score", "all", "any", "not")
CONTEXT_HEADS = ("last", "trait", "events", "score")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_TIMEOUT_US = 300 * 1_000_000

# Where a bool is expected, accept the YAML 1.1 words too (JSON documents spell them).
_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}

_EVENTS_HINTS = {
    **{op: "a comparison goes under an aggregate, e.g. count: {gte: 3}" for op in COMPARISON_OPS},
    "field": "field goes under the aggregate, e.g. sum: {field: amount_usd, gte: 100}",
    "max_age": "an events condition takes a window: within: <duration>",
    "where": "where belongs to the event filter: events: {event: <type>, where: {...}}",
}
_LAST_HINTS = {
    "within": "last takes max_age: <duration> (or age: {...}) instead of a window",
    "where": "where belongs to the event filter: last: {event: <type>, where: {...}}",
}


# -- small helpers -------------------------------------------------------------------


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _index(path: str, i: int) -> str:
    return f"{path}[{i}]"


def _is_number(value: object) -> bool:
    # bool is an int subclass in Python, but never a number in a definition.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if _is_number(value):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, _dt.date | _dt.datetime):
        return f"the date {value} (quote it to make it a string)"
    return f"a {type(value).__name__}"


def _key_text(key: object) -> str:
    if isinstance(key, bool):
        return (
            f"{str(key).lower()} (YAML reads an unquoted on/off/yes/no key as a boolean; quote it)"
        )
    return repr(key)


def _suggest(word: object, known: Iterable[str]) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _numeric_hint(value: object) -> str:
    # YAML 1.1 reads 1e4 (no dot, no sign in the exponent) as a string.
    if isinstance(value, str):
        try:
            number = float(value.replace("_", ""))
        except ValueError:
            return ""
        if math.isfinite(number):
            plain = int(number) if number.is_integer() else number
            return f"; write it as a plain number, e.g. {plain}"
    return ""


# Numbers YAML 1.1 reads as strings: an exponent without a dot or without a sign.
_YAML_EXPONENT_RE = re.compile(r"[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+")


def _scalar_kind(value: JsonScalar) -> str:
    if isinstance(value, bool):
        return "booleans"
    if isinstance(value, str):
        return "strings"
    return "numbers"


def _rename_on_key(action: dict[Any, Any]) -> dict[Any, Any]:
    """YAML 1.1 reads an unquoted ``on:`` key as ``True``; give it its name back."""
    if True in action and "on" not in action:
        return {("on" if key is True else key): value for key, value in action.items()}
    return action


def _json_raw(doc: dict[Any, Any]) -> dict[str, Any]:
    """A JSON-safe copy of a validated document, for storing as jsonb."""
    actions = doc.get("actions")
    if isinstance(actions, list):
        doc = {**doc, "actions": [_rename_on_key(a) if isinstance(a, dict) else a for a in actions]}
    result: dict[str, Any] = json.loads(json.dumps(doc, allow_nan=False))
    return result


# -- the parser ----------------------------------------------------------------------


class _Parser:
    def __init__(self, file: str | None) -> None:
        self.file = file

    def fail(self, path: str, reason: str) -> NoReturn:
        raise DefinitionError(self.file, path, reason)

    # structure

    def mapping(self, value: object, path: str, what: str) -> dict[Any, Any]:
        if not isinstance(value, dict):
            self.fail(path, f"{what} must be a mapping, got {_describe(value)}")
        return value

    def check_keys(
        self,
        d: Mapping[Any, Any],
        path: str,
        allowed: Sequence[str],
        required: Sequence[str] = (),
        hints: Mapping[str, str] | None = None,
    ) -> None:
        unknown = [key for key in d if not (isinstance(key, str) and key in allowed)]
        if unknown:
            notes = []
            for key in unknown:
                hint = hints.get(key) if hints is not None and isinstance(key, str) else None
                notes.append(
                    f"{_key_text(key)}: {hint}" if hint else _key_text(key) + _suggest(key, allowed)
                )
            expected = "expected one of: " + ", ".join(allowed)
            if len(unknown) == 1:
                key = unknown[0]
                where = _join(path, key) if isinstance(key, str) else path
                self.fail(where, f"unknown key {notes[0]}; {expected}")
            self.fail(path, f"unknown keys {'; '.join(notes)}; {expected}")
        for key in required:
            if key not in d:
                self.fail(path, f"missing required key {key!r}")

    def heads(self, d: Mapping[Any, Any], path: str, heads: Sequence[str], what: str) -> str:
        found = [head for head in heads if head in d]
        if len(found) > 1:
            self.fail(
                path,
                f"a {what} has exactly one of {', '.join(heads)}; got "
                + " and ".join(repr(head) for head in found)
                + (" (combine conditions with all/any)" if what == "condition" else ""),
            )
        if not found:
            keys = ", ".join(_key_text(key) + _suggest(key, heads) for key in d) or "no keys"
            self.fail(path, f"not a {what}: expected one of {', '.join(heads)}; got {keys}")
        return found[0]

    # scalars

    def string(self, value: object, path: str, what: str) -> str:
        if not isinstance(value, str):
            self.fail(path, f"{what} must be a string, got {_describe(value)}")
        if not value:
            self.fail(path, f"{what} must not be empty")
        return value

    def name(self, value: object, path: str, what: str) -> str:
        text = self.string(value, path, f"{what} name")
        if not NAME_RE.fullmatch(text):
            self.fail(
                path,
                f"invalid {what} name {text!r}: use lower-case letters, digits and _, "
                "starting with a letter, at most 63 characters",
            )
        return text

    def boolean(self, value: object, path: str) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        self.fail(path, f"must be true or false, got {_describe(value)}")

    def number(self, value: object, path: str, what: str = "value") -> int | float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            self.fail(
                path, f"{what} must be a number, got {_describe(value)}{_numeric_hint(value)}"
            )
        if not math.isfinite(value):
            self.fail(path, f"{what} must be a finite number")
        return value

    def duration(self, value: object, path: str, extra: str = "") -> Duration:
        if not isinstance(value, str):
            unit_hint = "; add a unit" if _is_number(value) else ""
            self.fail(
                path,
                f"expected a duration like 30m, 4h or 7d{extra}, got {_describe(value)}{unit_hint}",
            )
        try:
            return Duration.parse(value)
        except ValueError as exc:
            self.fail(path, str(exc))

    def event_type(self, value: object, path: str) -> str:
        if isinstance(value, bool):
            self.fail(
                path,
                "event type must be a string, got a boolean "
                "(YAML reads unquoted yes/no/on/off as booleans; quote it)",
            )
        text = self.string(value, path, "event type")
        if not EVENT_TYPE_RE.fullmatch(text):
            self.fail(
                path,
                f"invalid event type {text!r}: use a lower-case identifier such as page_view",
            )
        return text

    def key_path(self, text: str, path: str, what: str) -> tuple[str, ...]:
        parts = tuple(text.split("."))
        for part in parts:
            if not KEY_RE.fullmatch(part):
                self.fail(
                    path,
                    f"invalid {what} {text!r}: each dotted step must be letters, digits, _ or -",
                )
        return parts

    # fields and comparisons

    def field(self, value: object, path: str) -> Field:
        text = self.string(value, path, "field")
        if text in EVENT_COLUMNS:
            return Field((), text)
        if text.startswith("properties."):
            return Field(self.key_path(text[len("properties.") :], path, "property path"))
        if text == "properties":
            self.fail(path, "name a key inside properties: properties.<key>")
        suggestion = _suggest(text, EVENT_COLUMNS)
        if not suggestion and KEY_RE.fullmatch(text.split(".")[0]):
            suggestion = f" (did you mean 'properties.{text}'?)"
        self.fail(
            path,
            f"unknown field {text!r}{suggestion}; expected one of "
            f"{', '.join(EVENT_COLUMNS)} or properties.<key>",
        )

    def scalar(self, value: object, path: str) -> JsonScalar:
        if value is None:
            self.fail(path, "null is not an operand; use exists: false to match a missing value")
        if not isinstance(value, str | int | float | bool):
            self.fail(path, f"operand must be a string, number or boolean, got {_describe(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            self.fail(path, "operand must be a finite number")
        if isinstance(value, str) and _YAML_EXPONENT_RE.fullmatch(value):
            # Compared as text, this would be silently false against every number.
            self.fail(path, f"YAML reads {value} as a string{_numeric_hint(value)}")
        return value

    def operand(self, op: str, value: object, path: str, durations: bool) -> Operand:
        """One operand. Its type is not checked against the compared value: a value of
        another type makes the comparison false at run time, never an error (contract §4).
        """
        if op == "exists":
            return self.boolean(value, path)
        if op not in ("in", "not_in"):
            return self.duration(value, path) if durations else self.scalar(value, path)
        if durations:
            self.fail(path, f"{op} is not available for age; compare with gt, gte, lt or lte")
        if not isinstance(value, list):
            self.fail(path, f"{op} needs a list, got {_describe(value)}")
        if not value:
            self.fail(path, f"{op} needs a non-empty list")
        items = tuple(self.scalar(v, _index(path, i)) for i, v in enumerate(value))
        kinds = sorted({_scalar_kind(item) for item in items})
        if len(kinds) > 1:
            self.fail(
                path,
                f"{op} list mixes {' and '.join(kinds)}; use one type (booleans are not numbers)",
            )
        return items

    def ops(
        self, d: Mapping[Any, Any], path: str, what: str, durations: bool = False
    ) -> Comparison:
        """The comparison made of the op keys of ``d`` (other keys must be checked already)."""
        pairs = tuple(
            (op, self.operand(op, value, _join(path, op), durations))
            for op, value in d.items()
            if op in COMPARISON_OPS
        )
        if not pairs:
            self.fail(path, f"{what} needs a comparison: one of {', '.join(COMPARISON_OPS)}")
        return Comparison(pairs)

    def comparison(
        self, value: object, path: str, what: str, durations: bool = False
    ) -> Comparison:
        """A standalone comparison: a mapping of ops, or a bare scalar meaning ``eq``."""
        if isinstance(value, dict):
            self.check_keys(value, path, COMPARISON_OPS)
            return self.ops(value, path, what, durations)
        if isinstance(value, list):
            self.fail(
                path, "a list is not a comparison; to match any of several values use in: [...]"
            )
        return Comparison((("eq", self.operand("eq", value, path, durations)),))

    # event filters and windows

    def event_types(self, value: object, path: str) -> tuple[str, ...]:
        if isinstance(value, list):
            if not value:
                self.fail(path, "empty list of event types")
            types = [self.event_type(v, _index(path, i)) for i, v in enumerate(value)]
            return tuple(dict.fromkeys(types))
        return (self.event_type(value, path),)

    def event_filter(self, value: object, path: str) -> EventFilter:
        if isinstance(value, dict):
            self.check_keys(value, path, ("event", "where"), required=("event",))
            types = self.event_types(value["event"], _join(path, "event"))
            where = self.where(value["where"], _join(path, "where")) if "where" in value else ()
            return EventFilter(types, where)
        if value is None:
            self.fail(
                path, "missing event filter: an event type, a list, or {event: ..., where: ...}"
            )
        return EventFilter(self.event_types(value, path))

    def where(self, value: object, path: str) -> tuple[tuple[Field, Comparison], ...]:
        d = self.mapping(value, path, "where")
        entries = []
        for key, comparison in d.items():
            key_path = _join(path, key)
            field = self.field(key, key_path)
            entries.append((field, self.comparison(comparison, key_path, field.text)))
        return tuple(entries)

    def window(self, d: Mapping[str, Any], path: str) -> Window:
        within: Duration | None = None
        session = False
        if "within" in d:
            if d["within"] == "session":
                session = True
            else:
                within = self.duration(d["within"], _join(path, "within"), " or session")
        since_last = None
        if "since_last" in d:
            since_last = self.event_filter(d["since_last"], _join(path, "since_last"))
        return Window(within, session, since_last)

    # conditions

    def condition(self, value: object, path: str) -> Condition:
        d = self.mapping(value, path, "condition")
        head = self.heads(d, path, CONDITION_HEADS, "condition")
        if head == "trait":
            self.check_keys(d, path, ("trait", *COMPARISON_OPS))
            trait_path = self.key_path(
                self.string(d["trait"], _join(path, "trait"), "trait"),
                _join(path, "trait"),
                "trait",
            )
            return TraitCond(trait_path, self.ops(d, path, "a trait condition"), path)
        if head == "events":
            return self.events_cond(d, path)
        if head == "last":
            return self.last_cond(d, path)
        if head == "in_segment":
            self.check_keys(d, path, ("in_segment",))
            return InSegmentCond(
                self.name(d["in_segment"], _join(path, "in_segment"), "segment"), path
            )
        if head == "score":
            self.check_keys(d, path, ("score", *COMPARISON_OPS))
            name = self.name(d["score"], _join(path, "score"), "score")
            return ScoreCond(name, self.ops(d, path, "a score condition"), path)
        if head in ("all", "any"):
            self.check_keys(d, path, (head,))
            items_path = _join(path, head)
            items = d[head]
            if not isinstance(items, list):
                self.fail(items_path, f"{head} takes a list of conditions, got {_describe(items)}")
            conditions = tuple(
                self.condition(item, _index(items_path, i)) for i, item in enumerate(items)
            )
            return AllCond(conditions, path) if head == "all" else AnyCond(conditions, path)
        # not
        self.check_keys(d, path, ("not",))
        if isinstance(d["not"], list):
            self.fail(_join(path, "not"), "not takes one condition; wrap several in all: or any:")
        return NotCond(self.condition(d["not"], _join(path, "not")), path)

    def events_cond(self, d: Mapping[Any, Any], path: str) -> EventsCond:
        self.check_keys(
            d, path, ("events", "within", "since_last", *AGGREGATE_FUNCS), hints=_EVENTS_HINTS
        )
        event_filter = self.event_filter(d["events"], _join(path, "events"))
        window = self.window(d, path)
        funcs = [func for func in AGGREGATE_FUNCS if func in d]
        if len(funcs) > 1:
            self.fail(
                path,
                f"one aggregate per condition, got {' and '.join(funcs)}; "
                "combine several conditions with all",
            )
        aggregate = DEFAULT_AGGREGATE
        if funcs:
            aggregate = self.aggregate(funcs[0], d[funcs[0]], _join(path, funcs[0]))
        return EventsCond(event_filter, window, aggregate, path)

    def aggregate(self, func: str, value: object, path: str) -> Aggregate:
        if func == "count":
            if isinstance(value, dict) and "field" in value:
                self.fail(
                    _join(path, "field"),
                    "count takes no field; to count events that have it use "
                    "where: {<field>: {exists: true}}",
                )
            return Aggregate("count", None, self.comparison(value, path, "count"))
        d = self.mapping(value, path, func)
        self.check_keys(d, path, ("field", *COMPARISON_OPS), required=("field",))
        field = self.field(d["field"], _join(path, "field"))
        return Aggregate(func, field, self.ops(d, path, func))

    def last_cond(self, d: Mapping[Any, Any], path: str) -> LastFieldCond | LastAgeCond:
        self.check_keys(
            d, path, ("last", "field", "max_age", "age", *COMPARISON_OPS), hints=_LAST_HINTS
        )
        event_filter = self.event_filter(d["last"], _join(path, "last"))
        ops = [key for key in d if key in COMPARISON_OPS]
        if "age" in d:
            for other in ("field", "max_age", *ops):
                if other in d:
                    self.fail(
                        _join(path, other),
                        f"{other} cannot be combined with age: use either "
                        "{last: F, age: {...}} or {last: F, field: f, <comparison>}",
                    )
            age_path = _join(path, "age")
            return LastAgeCond(
                event_filter, self.comparison(d["age"], age_path, "age", durations=True), path
            )
        if "field" not in d:
            self.fail(
                path,
                "last needs either field: with a comparison, or age: with a duration comparison",
            )
        field = self.field(d["field"], _join(path, "field"))
        comparison = self.ops(d, path, "last with field")
        max_age = self.duration(d["max_age"], _join(path, "max_age")) if "max_age" in d else None
        return LastFieldCond(event_filter, field, comparison, max_age, path)

    # context

    def context(self, value: object, path: str) -> tuple[tuple[str, ContextValue], ...]:
        if value is None:
            return ()
        d = self.mapping(value, path, "context")
        entries = []
        for key, item in d.items():
            key_path = _join(path, key)
            if not isinstance(key, str) or not NAME_RE.fullmatch(key):
                self.fail(
                    key_path,
                    f"invalid context key {_key_text(key)}: it becomes a column of "
                    "segments.<name>, so use lower-case letters, digits and _, "
                    "starting with a letter, at most 63 characters",
                )
            if key in RESERVED_CONTEXT_KEYS:
                self.fail(
                    key_path,
                    f"context key {key!r} is reserved: segments.<name> already has that column",
                )
            entries.append((key, self.context_value(item, key_path)))
        return tuple(entries)

    def context_value(self, value: object, path: str) -> ContextValue:
        d = self.mapping(value, path, "context value")
        ops = [key for key in d if key in COMPARISON_OPS]
        if ops:
            self.fail(
                _join(path, ops[0]),
                "context values capture a value when the profile enters; they take no comparison",
            )
        head = self.heads(d, path, CONTEXT_HEADS, "context value")
        if head == "last":
            self.check_keys(d, path, ("last", "field"), required=("field",))
            return ContextLast(
                self.event_filter(d["last"], _join(path, "last")),
                self.field(d["field"], _join(path, "field")),
                path,
            )
        if head == "trait":
            self.check_keys(d, path, ("trait",))
            trait_path = _join(path, "trait")
            text = self.string(d["trait"], trait_path, "trait")
            return ContextTrait(self.key_path(text, trait_path, "trait"), path)
        if head == "score":
            self.check_keys(d, path, ("score",))
            return ContextScore(self.name(d["score"], _join(path, "score"), "score"), path)
        # events
        self.check_keys(
            d, path, ("events", "within", "since_last", *AGGREGATE_FUNCS), hints=_EVENTS_HINTS
        )
        event_filter = self.event_filter(d["events"], _join(path, "events"))
        window = self.window(d, path)
        funcs = [func for func in AGGREGATE_FUNCS if func in d]
        if len(funcs) > 1:
            self.fail(path, f"one aggregate per context value, got {' and '.join(funcs)}")
        func = funcs[0] if funcs else "count"
        field = None
        if funcs:
            func_path = _join(path, func)
            spec = d[func]
            if func == "count":
                if not (spec is None or spec is True or spec == {}):
                    self.fail(func_path, "count in context takes no arguments: write count: {}")
            else:
                spec = self.mapping(spec, func_path, func)
                self.check_keys(
                    spec,
                    func_path,
                    ("field",),
                    required=("field",),
                    hints={op: "context values take no comparison" for op in COMPARISON_OPS},
                )
                field = self.field(spec["field"], _join(func_path, "field"))
        return ContextEvents(event_filter, window, func, field, path)

    # actions

    def actions(self, value: object, path: str) -> tuple[Action, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.fail(path, f"actions must be a list, got {_describe(value)}")
        actions = tuple(self.action(item, _index(path, i)) for i, item in enumerate(value))
        # A transition makes one delivery per destination: a second action to the same
        # destination on the same kind would be dropped without a word.
        seen: dict[tuple[str, str], int] = {}
        for i, action in enumerate(actions):
            first = seen.setdefault((action.on, action.destination), i)
            if first != i:
                self.fail(_join(_index(path, i), "destination"),
                          f"actions[{first}] already sends on: {action.on} to "
                          f"{action.destination}; one action per destination and kind")
        return actions

    def action(self, value: object, path: str) -> Action:
        d = self.mapping(value, path, "action")
        if True in d and "on" in d:
            self.fail(path, "both 'on' and an unquoted on key (read as true); keep one")
        d = _rename_on_key(d)
        self.check_keys(d, path, ACTION_KEYS, required=("on", "destination"))
        on = d["on"]
        if on not in ACTION_KINDS:
            self.fail(_join(path, "on"), f"on must be enter or exit, got {_describe(on)}")
        kind: ActionKind = "enter" if on == "enter" else "exit"
        destination = self.name(d["destination"], _join(path, "destination"), "destination")
        priority = None
        if d.get("priority") is not None:
            priority_value = d["priority"]
            if not isinstance(priority_value, int) or isinstance(priority_value, bool):
                self.fail(
                    _join(path, "priority"),
                    f"priority must be an integer, got {_describe(priority_value)}",
                )
            priority = priority_value
        payload: dict[str, Any] | str | None = None
        if d.get("payload") is not None:
            payload_path = _join(path, "payload")
            if isinstance(d["payload"], str):
                payload = d["payload"]
            else:
                payload = self.mapping(d["payload"], payload_path, "payload (or a string)")
                self.check_json(payload, payload_path)
            try:
                payload_templates.check(payload)
            except payload_templates.PayloadError as error:
                self.fail(_join(payload_path, error.path) if error.path else payload_path,
                          error.reason)
        include_backfill = False
        if "include_backfill" in d:
            include_backfill = self.boolean(d["include_backfill"], _join(path, "include_backfill"))
        return Action(kind, destination, priority, payload, include_backfill, path)

    def check_json(self, value: object, path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    self.fail(path, f"payload keys must be strings, got {_key_text(key)}")
                self.check_json(item, _join(path, key))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                self.check_json(item, _index(path, i))
        elif isinstance(value, float) and not math.isfinite(value):
            self.fail(path, "payload numbers must be finite")
        elif value is not None and not isinstance(value, str | int | float | bool):
            self.fail(path, f"payload must be plain JSON, got {_describe(value)}")

    # documents

    def optional_text(self, d: Mapping[str, Any], key: str) -> str | None:
        if d.get(key) is None:
            return None
        if not isinstance(d[key], str):
            self.fail(key, f"{key} must be a string, got {_describe(d[key])}")
        text: str = d[key]
        return text

    def segment(self, doc: dict[Any, Any], source_file: str | None) -> Segment:
        self.check_keys(doc, "", SEGMENT_KEYS, required=("name", "rule"))
        name = self.name(doc["name"], "name", "segment")
        description = self.optional_text(doc, "description")
        mode_text = doc.get("mode", "realtime")
        if mode_text not in MODES:
            self.fail("mode", f"mode must be realtime or scheduled, got {_describe(mode_text)}")
        mode: Mode = "scheduled" if mode_text == "scheduled" else "realtime"
        refresh = None
        if mode == "scheduled":
            if doc.get("refresh") is None:
                self.fail("refresh", "a scheduled segment needs refresh: <duration> (e.g. 1h)")
            refresh = self.duration(doc["refresh"], "refresh")
        elif "refresh" in doc:
            self.fail("refresh", "refresh applies only to mode: scheduled")
        rule = self.condition(doc["rule"], "rule")
        goal = self.event_filter(doc["goal"], "goal") if "goal" in doc else None
        disqualify = None
        if "disqualify" in doc:
            if goal is None:
                self.fail("disqualify", "disqualify requires goal")
            disqualify = self.event_filter(doc["disqualify"], "disqualify")
        context = self.context(doc.get("context"), "context")
        actions = self.actions(doc.get("actions"), "actions")
        return Segment(
            name,
            description,
            mode,
            refresh,
            rule,
            goal,
            disqualify,
            context,
            actions,
            source_file,
            self.raw(doc),
        )

    def score(self, doc: dict[Any, Any], source_file: str | None) -> Score:
        self.check_keys(doc, "", SCORE_KEYS, required=("score", "half_life", "weights"))
        name = self.name(doc["score"], "score", "score")
        half_life = self.duration(doc["half_life"], "half_life")
        weights_doc = self.mapping(doc["weights"], "weights", "weights")
        if not weights_doc:
            self.fail("weights", "weights must name at least one event type")
        weights = []
        for event_type, weight in weights_doc.items():
            path = _join("weights", event_type)
            self.event_type(event_type, path)
            weights.append((event_type, float(self.number(weight, path, "weight"))))
        description = self.optional_text(doc, "description")
        return Score(name, half_life, tuple(weights), source_file, description, self.raw(doc))

    def destination(self, doc: dict[Any, Any], source_file: str | None) -> Destination:
        self.check_keys(
            doc, "", DESTINATION_KEYS, required=("destination", "url", "secret", "channel")
        )
        name = self.name(doc["destination"], "destination", "destination")
        url = self.string(doc["url"], "url", "url")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            self.fail("url", f"url must be an http:// or https:// address, got {url!r}")
        secret = self.mapping(doc["secret"], "secret", "secret")
        self.check_keys(secret, "secret", ("env", "file"))
        if len(secret) != 1:
            self.fail("secret", "secret needs exactly one of env: <VARIABLE> or file: <path>")
        secret_env = secret_file = None
        if "env" in secret:
            secret_env = self.string(secret["env"], "secret.env", "secret.env")
            if not ENV_NAME_RE.fullmatch(secret_env):
                self.fail("secret.env", f"invalid environment variable name {secret_env!r}")
        else:
            secret_file = self.string(secret["file"], "secret.file", "secret.file")
        channel = doc["channel"]
        if channel not in CHANNELS:
            self.fail(
                "channel",
                f"channel must be one of {', '.join(CHANNELS)}, got {_describe(channel)}"
                + _suggest(channel, CHANNELS),
            )
        timeout = DEFAULT_TIMEOUT
        if doc.get("timeout") is not None:
            timeout = self.duration(doc["timeout"], "timeout")
            if timeout.microseconds > MAX_TIMEOUT_US:
                self.fail("timeout", "timeout must be at most 5m")
        max_attempts = DEFAULT_MAX_ATTEMPTS
        if doc.get("max_attempts") is not None:
            value = doc["max_attempts"]
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 100:
                self.fail("max_attempts",
                          f"max_attempts must be an integer from 1 to 100, got {_describe(value)}")
            max_attempts = value
        frequency_cap = None
        if doc.get("frequency_cap") is not None:
            if channel == "ads":
                self.fail("frequency_cap", "an ads destination is an audience, not messages: "
                                           "it takes no frequency_cap")
            frequency_cap = self.frequency_cap(doc["frequency_cap"], "frequency_cap")
        dedup_window: Duration | None = DEFAULT_DEDUP_WINDOW
        if "dedup_window" in doc:
            value = doc["dedup_window"]
            if value is False or (isinstance(value, str) and value.lower() in ("off", "false")):
                dedup_window = None
            else:
                dedup_window = self.duration(value, "dedup_window", " (or false)")
        description = self.optional_text(doc, "description")
        return Destination(
            name,
            url,
            secret_env,
            secret_file,
            channel,
            timeout,
            source_file,
            description,
            self.raw(doc),
            max_attempts,
            frequency_cap,
            dedup_window,
        )

    def frequency_cap(self, value: object, path: str) -> FrequencyCap:
        d = self.mapping(value, path, "frequency_cap")
        self.check_keys(d, path, ("max", "per"), required=("max", "per"))
        count = d["max"]
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 10_000:
            self.fail(_join(path, "max"),
                      f"max must be an integer from 1 to 10000, got {_describe(count)}")
        return FrequencyCap(count, self.duration(d["per"], _join(path, "per")))

    def raw(self, doc: dict[Any, Any]) -> dict[str, Any]:
        try:
            return _json_raw(doc)
        except (TypeError, ValueError) as exc:  # pragma: no cover - every leaf is validated
            self.fail("", f"document is not JSON-compatible: {exc}")

    def document(self, doc: object, source_file: str | None) -> Definition:
        d = self.mapping(doc, "", "a definition")
        kinds = [key for key in ("name", "score", "destination") if key in d]
        if not kinds:
            # Missing the naming key but clearly one kind: report the missing key.
            if d.keys() & {"rule", "mode", "refresh", "goal", "context", "actions"}:
                kinds = ["name"]
            elif d.keys() & {"half_life", "weights"}:
                kinds = ["score"]
            elif d.keys() & {"url", "secret", "channel"}:
                kinds = ["destination"]
        if len(kinds) > 1:
            self.fail(
                "",
                "a definition is a segment (name:), a score (score:) or a destination "
                f"(destination:), not several; got {' and '.join(kinds)}",
            )
        if not kinds:
            self.fail(
                "",
                "cannot tell what this defines: expected a top-level name: (segment), "
                "score: or destination: key",
            )
        if kinds[0] == "name":
            return self.segment(d, source_file)
        if kinds[0] == "score":
            return self.score(d, source_file)
        return self.destination(d, source_file)


def parse_document(doc: object, file: str | None = None) -> Segment | Score | Destination:
    """One parsed YAML/JSON document -> a validated definition.

    The kind follows the top-level key: ``name`` (segment), ``score`` or ``destination``.
    """
    return _Parser(file).document(doc, file)


# -- files ---------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects duplicate keys instead of keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<:` merges may be overridden on purpose
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable key; the base constructor reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _DuplicateJsonKey(ValueError):
    pass


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateJsonKey(key)
        result[key] = value
    return result


def _read_documents(text: str, label: str, as_json: bool) -> list[object]:
    if as_json:
        try:
            data = json.loads(text, object_pairs_hook=_json_object)
        except _DuplicateJsonKey as exc:
            raise DefinitionError(
                label, "", f"invalid JSON: duplicate key {exc.args[0]!r}"
            ) from None
        except json.JSONDecodeError as exc:
            where = f"line {exc.lineno}, column {exc.colno}"
            raise DefinitionError(label, where, f"invalid JSON: {exc.msg}") from None
        return [data]
    try:
        return list(yaml.load_all(text, Loader=_StrictLoader))  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise DefinitionError(label, where, f"invalid YAML: {problem}") from None


def load_file(path: str | Path) -> list[Segment | Score | Destination]:
    """Every definition in one YAML or JSON file.

    A file may hold several YAML documents (``---``) or a top-level list of definitions;
    empty documents are skipped. Errors in several documents are raised together.
    """
    label = str(path)
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise DefinitionError(label, "", f"cannot read file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise DefinitionError(label, "", "file is not UTF-8 text") from None
    documents = _read_documents(text, label, file.suffix.lower() == ".json")

    items: list[tuple[str, object]] = []
    for d_index, document in enumerate(documents):
        doc_label = label if len(documents) == 1 else f"{label} (document {d_index + 1})"
        if isinstance(document, list):
            items.extend(
                (f"{doc_label} (item {i + 1})", item)
                for i, item in enumerate(document)
                if item is not None
            )
        elif document is not None:
            items.append((doc_label, document))

    definitions: list[Segment | Score | Destination] = []
    errors: list[DefinitionError] = []
    for item_label, item in items:
        try:
            definitions.append(_Parser(item_label).document(item, label))
        except DefinitionError as exc:
            errors.append(exc)
    raise_collected(errors)
    return definitions


def discover(paths: Iterable[str | Path]) -> list[Path]:
    """The definition files named by ``paths``: files as given, directories searched
    recursively for ``*.yaml``, ``*.yml`` and ``*.json`` (hidden entries skipped), sorted.
    """
    found: list[Path] = []
    errors: list[DefinitionError] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            found.extend(
                sorted(
                    child
                    for child in path.rglob("*")
                    if child.is_file()
                    and child.suffix.lower() in DEFINITION_SUFFIXES
                    and not any(part.startswith(".") for part in child.relative_to(path).parts)
                )
            )
        elif path.is_file():
            found.append(path)
        else:
            errors.append(DefinitionError(str(entry), "", "no such file or directory"))
    raise_collected(errors)
    # The same file named twice (directly and through its directory) is read once.
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def build_project(definitions: Iterable[Segment | Score | Destination]) -> Project:
    """Check a set of definitions as a whole: unique names, every reference known, no
    ``in_segment`` cycle. Segments come back in dependency order.
    """
    segments: dict[str, Segment] = {}
    scores: dict[str, Score] = {}
    destinations: dict[str, Destination] = {}
    errors: list[DefinitionError] = []

    def add(table: dict[str, Any], definition: Definition, kind: str, key: str) -> None:
        other = table.get(definition.name)
        if other is not None:
            errors.append(
                DefinitionError(
                    definition.source_file,
                    key,
                    f"duplicate {kind} name {definition.name!r}, "
                    f"also defined in {other.source_file or '<input>'}",
                )
            )
        else:
            table[definition.name] = definition

    for definition in definitions:
        if isinstance(definition, Segment):
            add(segments, definition, "segment", "name")
        elif isinstance(definition, Score):
            add(scores, definition, "score", "score")
        else:
            add(destinations, definition, "destination", "destination")

    for segment in segments.values():
        errors.extend(_reference_errors(segment, segments, scores, destinations))
    raise_collected(errors)

    order = dependency_order(segments)
    return Project({name: segments[name] for name in order}, scores, destinations)


def _reference_errors(
    segment: Segment,
    segments: Mapping[str, Segment],
    scores: Mapping[str, Score],
    destinations: Mapping[str, Destination],
) -> list[DefinitionError]:
    errors: list[DefinitionError] = []

    def check(name: str, known: Mapping[str, object], kind: str, path: str) -> None:
        if name not in known:
            errors.append(
                DefinitionError(
                    segment.source_file, path, f"unknown {kind} {name!r}{_suggest(name, known)}"
                )
            )

    for condition in segment.conditions():
        if isinstance(condition, InSegmentCond):
            check(condition.name, segments, "segment", _join(condition.loc, "in_segment"))
        elif isinstance(condition, ScoreCond):
            check(condition.name, scores, "score", _join(condition.loc, "score"))
    for _, value in segment.context:
        if isinstance(value, ContextScore):
            check(value.name, scores, "score", _join(value.loc, "score"))
    for action in segment.actions:
        check(action.destination, destinations, "destination", _join(action.loc, "destination"))
        target = destinations.get(action.destination)
        if target is None or target.channel != "ads":
            continue
        # An ads destination is an audience that mirrors membership: entering adds, exiting
        # removes, so only `on: enter` means something, and there is no message to rank.
        if action.on == "exit":
            errors.append(DefinitionError(
                segment.source_file, _join(action.loc, "on"),
                f"{action.destination} is an ads audience: use on: enter (members are "
                "removed from the audience when they exit)"))
        if action.priority is not None:
            errors.append(DefinitionError(
                segment.source_file, _join(action.loc, "priority"),
                f"{action.destination} is an ads audience: priority does not apply "
                "(audience membership is never suppressed by other segments)"))
    return errors


def load_paths(paths: Iterable[str | Path]) -> Project:
    """Load files and directories of definitions into a checked ``Project``.

    Errors of every file are collected and raised together (``DefinitionErrors`` when
    there are several); project checks run only once every file parsed.
    """
    definitions: list[Segment | Score | Destination] = []
    errors: list[DefinitionError] = []
    for file in discover(paths):
        try:
            definitions.extend(load_file(file))
        except DefinitionErrors as exc:
            errors.extend(exc.errors)
        except DefinitionError as exc:
            errors.append(exc)
    raise_collected(errors)
    return build_project(definitions)
