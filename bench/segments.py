"""Realistic generated segment definitions for the 10/100/500-segment variants.

Each definition is drawn from one of the kinds the desk's examples use (examples/segments/):
windowed counts and sums, ``last`` with ``max_age``, inactivity (``age``), ``not`` events,
traits, sessions, a lifetime condition, a decaying score, goal/disqualify and a segment of
segments. Kinds are taken in turn, so every prefix of the list (the first 10, the first
100) holds a balanced mix; the parameters (event types, windows, thresholds) are drawn from
a seeded generator and so are the same in every run.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from segflow.install import Plan, apply

Doc = dict[str, Any]

# The feed's score, with the same weights as examples/segments/engagement.score.yaml.
ENGAGEMENT: Doc = {
    "score": "engagement",
    "half_life": "3d",
    "weights": {"login": 1, "page_view": 0.2, "trade": 5, "deposit": 10},
}

# Event types the simulated feed produces, with the properties conditions look at.
_BEHAVIOUR = ("login", "page_view", "asset_view", "trade", "app_interaction")
_MONEY = ("deposit", "trade", "withdrawal")
_RARE = ("ticket_opened", "chat", "email_open", "email_click", "limit_alert",
         "positions_closed", "webinar_attended", "deposit_attempt")
_TIERS = ("bronze", "silver", "gold", "platinum")
_COUNTRIES = ("GB", "DE", "FR", "AE", "JP", "AU", "SG")
_ASSET_CLASSES = ("fx", "crypto", "metal", "stock", "index")
_PAGES = ("home", "deposit", "markets", "asset")
_SHORT = ("10m", "30m", "1h", "4h")
_LONG = ("1d", "3d", "7d", "14d", "30d")


def _filter(rnd: random.Random, pool: tuple[str, ...]) -> Any:
    """An event filter on one of ``pool``; a where clause on the properties it carries."""
    event = rnd.choice(pool)
    where: dict[str, Any] | None = None
    if event == "page_view" and rnd.random() < 0.6:
        where = {"properties.page": rnd.choice(_PAGES)}
    elif event in ("asset_view", "trade") and rnd.random() < 0.5:
        where = {"properties.asset_class": {"in": rnd.sample(_ASSET_CLASSES, 2)}}
    elif event == "deposit_attempt":
        where = {"properties.status": "failed"}
    elif event == "login" and rnd.random() < 0.3:
        where = {"properties.platform": rnd.choice(("web", "ios", "android"))}
    return {"event": event, "where": where} if where else event


def _window_count(rnd: random.Random) -> Doc:
    return {"rule": {"events": _filter(rnd, _BEHAVIOUR + _RARE),
                     "within": rnd.choice(_SHORT + _LONG),
                     "count": {"gte": rnd.choice((1, 2, 3, 5, 10))}}}


def _window_sum(rnd: random.Random) -> Doc:
    # Deposit and trading volume are what desks segment on most; withdrawals less.
    event = rnd.choice(("deposit", "deposit", "trade", "trade", "withdrawal"))
    func = rnd.choice(("sum", "sum", "max", "avg"))
    threshold = rnd.choice((500, 1000, 5000, 10000, 50000))
    return {"rule": {"events": event, "within": rnd.choice(_LONG),
                     func: {"field": "amount_usd", "gte": threshold}},
            "context": {"total_usd": {"events": event, "within": "30d",
                                      "sum": {"field": "amount_usd"}}}}


def _last_fresh(rnd: random.Random) -> Doc:
    if rnd.random() < 0.5:
        cond = {"last": "margin_update", "field": "properties.utilization",
                "gt": rnd.choice((0.8, 0.9, 0.95, 0.98)), "max_age": rnd.choice(_SHORT)}
        context = {"exposure_usd": {"last": "margin_update", "field": "properties.exposure_usd"}}
    else:
        cond = {"last": "deposit", "field": "amount_usd",
                "gte": rnd.choice((1000, 5000, 10000)), "max_age": rnd.choice(_LONG)}
        context = {"amount_usd": {"last": "deposit", "field": "amount_usd"}}
    return {"rule": cond, "context": context}


def _inactive(rnd: random.Random) -> Doc:
    return {"rule": {"last": rnd.choice(("login", "trade", "deposit")),
                     "age": {"gte": rnd.choice(("2d", "3d", "7d", "14d", "30d"))}},
            "context": {"tier": {"trait": "tier"}}}


def _abandoned(rnd: random.Random) -> Doc:
    intent = rnd.choice(({"event": "page_view", "where": {"properties.page": "deposit"}},
                         {"event": "deposit_attempt", "where": {"properties.status": "failed"}},
                         "asset_view"))
    return {"rule": {"all": [
        {"events": intent, "within": rnd.choice(("10m", "30m", "1h")),
         "count": {"gte": rnd.choice((1, 2, 3))}},
        {"not": {"events": rnd.choice(("deposit", "trade")),
                 "within": rnd.choice(("30m", "1h", "4h"))}},
    ]}}


def _trait_behaviour(rnd: random.Random) -> Doc:
    trait = rnd.choice((
        {"trait": "tier", "in": rnd.sample(_TIERS, 2)},
        {"trait": "country", "in": rnd.sample(_COUNTRIES, 3)},
        {"trait": "consent.email", "eq": True},
    ))
    return {"rule": {"all": [trait, {"events": _filter(rnd, _BEHAVIOUR + _MONEY),
                                     "within": rnd.choice(_LONG)}]},
            "context": {"tier": {"trait": "tier"}}}


def _session(rnd: random.Random) -> Doc:
    event = rnd.choice(("asset_view", "page_view", "trade"))
    items: list[Doc] = [{"events": event, "within": "session",
                         "count": {"gte": rnd.choice((3, 5, 8))}}]
    if event == "asset_view" and rnd.random() < 0.5:
        items.append({"events": "asset_view", "within": "session",
                      "distinct": {"field": "properties.asset", "lte": 1}})
    if rnd.random() < 0.5:
        items.append({"trait": "tier", "in": ["gold", "platinum"]})
    return {"rule": {"all": items},
            "context": {"views": {"events": event, "within": "session", "count": {}}}}


def _lifetime(rnd: random.Random) -> Doc:
    if rnd.random() < 0.5:
        return {"rule": {"events": rnd.choice(("deposit", "trade", "webinar_attended"))}}
    return {"rule": {"all": [
        {"events": "deposit", "count": {"eq": 1}},
        {"last": "deposit", "field": "amount_usd", "gt": rnd.choice((2000, 10000))},
    ]}, "context": {"first_deposit_usd": {"last": "deposit", "field": "amount_usd"}}}


def _score(rnd: random.Random) -> Doc:
    return {"rule": {"score": "engagement", "gte": rnd.choice((5, 10, 20, 40))},
            "context": {"engagement": {"score": "engagement"}}}


def _margin_goal(rnd: random.Random) -> Doc:
    threshold = rnd.choice((0.9, 0.95))
    return {"rule": {"all": [
        {"trait": "tier", "in": ["gold", "platinum"]},
        {"last": "margin_update", "field": "properties.utilization", "gt": threshold,
         "max_age": rnd.choice(("1h", "4h"))},
        {"not": {"events": "deposit", "within": "4h"}},
    ]},
        "goal": {"event": "margin_update", "where": {"properties.utilization": {"gt": threshold}}},
        "disqualify": {"event": "positions_closed"},
        "context": {"exposure_usd": {"last": "margin_update", "field": "properties.exposure_usd"}}}


_Kind = Callable[[random.Random], Doc]
KINDS: tuple[tuple[str, _Kind], ...] = (
    ("window_count", _window_count),
    ("window_sum", _window_sum),
    ("last_fresh", _last_fresh),
    ("inactive", _inactive),
    ("abandoned", _abandoned),
    ("trait", _trait_behaviour),
    ("session", _session),
    ("lifetime", _lifetime),
    ("score", _score),
    ("margin_goal", _margin_goal),
)


def generate(n: int, seed: int = 7) -> list[Doc]:
    """``n`` segment definitions (plus the engagement score when one reads it)."""
    rnd = random.Random(seed)
    docs: list[Doc] = []
    names: list[str] = []
    for i in range(n):
        kind, make = KINDS[i % len(KINDS)]
        doc = make(rnd)
        # Every 20th segment combines two earlier ones, like gold_and_at_risk.
        if i % 20 == 19 and len(names) >= 2:
            kind = "of_segments"
            doc = {"rule": {"all": [{"in_segment": name} for name in rnd.sample(names, 2)]}}
        name = f"g{i:03d}_{kind}"
        names.append(name)
        docs.append({"name": name, "description": f"generated {kind} segment", **doc})
    if any(d["rule"].get("score") for d in docs):
        docs.append(dict(ENGAGEMENT))
    return docs


def kind_of(name: str) -> str:
    """The kind a generated segment name carries (``g012_window_sum`` → ``window_sum``)."""
    return name.split("_", 1)[1] if name.startswith("g") and "_" in name else name


def install(conn: psycopg.Connection[Any], docs: list[Doc]) -> Plan:
    """Applies ``docs`` as the complete set of definitions (new ones are backfilled)."""
    with tempfile.TemporaryDirectory(prefix="segflow-bench-") as folder:
        for i, doc in enumerate(docs):
            (Path(folder) / f"d{i:03d}.json").write_text(json.dumps(doc))
        return apply(conn, [folder])
