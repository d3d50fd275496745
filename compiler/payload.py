"""Payload templates of segment actions: every string in an action's `payload` is a jinja2
template, rendered in a sandbox by the delivery worker at send time.

`segflow apply` checks the syntax and the variable names (`check`), so a typo fails the apply
instead of every delivery; what only the data can reveal (a trait the profile lacks, a filter
given the wrong type) fails at send time and makes that delivery a dead letter (`render`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import cache, lru_cache
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateSyntaxError, meta
from jinja2.sandbox import SandboxedEnvironment

VARIABLES: tuple[str, ...] = (
    "transition", "segment", "kind", "profile_id", "context", "profile", "destination"
)
"""Names a payload template can use (see `variables`)."""

MAX_RENDERED_CHARS = 64_000


class PayloadError(Exception):
    """A payload template that cannot be compiled or rendered; `path` is where in the payload."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


@cache
def environment() -> SandboxedEnvironment:
    # Strict: a missing trait is an error the marketer sees (a dead letter), not a message
    # to a trader with a blank where the name should be; `| default(...)` makes it optional.
    return SandboxedEnvironment(undefined=StrictUndefined, autoescape=False,
                                keep_trailing_newline=True)


def strings(payload: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(path, text) of every string value in a JSON payload; keys are not templates."""
    if isinstance(payload, str):
        yield path, payload
    elif isinstance(payload, Mapping):
        for key, value in payload.items():
            yield from strings(value, f"{path}.{key}" if path else str(key))
    elif isinstance(payload, list):
        for i, value in enumerate(payload):
            yield from strings(value, f"{path}[{i}]")


def check(payload: Any) -> None:
    """Raises `PayloadError` for the first template with a syntax error or unknown variable."""
    env = environment()
    for path, text in strings(payload):
        try:
            names = meta.find_undeclared_variables(env.parse(text))
        except TemplateSyntaxError as error:
            raise PayloadError(path, f"template syntax error on line {error.lineno}: "
                                     f"{error.message}") from None
        unknown = sorted(names - set(VARIABLES))
        if unknown:
            raise PayloadError(path, f"unknown template variable {', '.join(unknown)}; "
                                     f"available: {', '.join(VARIABLES)}")


@lru_cache(maxsize=512)
def _compiled(text: str) -> Template:
    return environment().from_string(text)


def variables(body: Mapping[str, Any], destination: str) -> dict[str, Any]:
    """What a template sees, from the delivery body the worker sends."""
    transition = {k: body.get(k) for k in
                  ("transition_id", "segment", "profile_id", "kind", "effective_at", "reason")}
    return {"transition": transition, "segment": body.get("segment"), "kind": body.get("kind"),
            "profile_id": body.get("profile_id"), "context": body.get("context") or {},
            "profile": body.get("profile") or {}, "destination": destination}


def render(payload: Any, values: Mapping[str, Any]) -> Any:
    """The payload with every string rendered; raises `PayloadError` naming the failing path."""
    def walk(value: Any, path: str) -> Any:
        if isinstance(value, str):
            if "{" not in value:
                return value  # no template syntax: nothing to render
            try:
                text = _compiled(value).render(values)
            # Template errors, but also arithmetic and type errors inside expressions.
            except Exception as error:
                raise PayloadError(path, f"{type(error).__name__}: {error}") from None
            if len(text) > MAX_RENDERED_CHARS:
                raise PayloadError(path, f"rendered text longer than {MAX_RENDERED_CHARS}"
                                         " characters")
            return text
        if isinstance(value, Mapping):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value

    return walk(payload, "")
