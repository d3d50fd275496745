"""Simulated trader feed: a deterministic stream of trading-CRM events.

The feed is used by ``segflow demo``, the tests and the benchmarks. It produces events in the
ingest column shape of ``segflow.events`` (see CONTRACT §2) covering every source category:
behavioural, transactional, support, identity, consent and marketing.

How the stream is built:

* Event times follow a Poisson process at ``rate`` events per simulated second, so the
  stream is ordered by ``occurred_at``.
* Each event belongs to a *session* (a short script such as "log in, look at assets, trade").
  About ``rate * session_gap`` sessions are open at once and every event advances a random
  open one, so events inside a session are ``session_gap`` seconds apart on average. Sessions
  open gradually at the start, so the stream does not begin with a burst of first events.
* A trader gets a new session only after ``session_break`` seconds without events (when
  possible: with few traders and a high rate the break is shortened rather than stalling).
* A few sessions (``scenario_share``) are scripted after the desk's example segments: a gold
  or platinum client's margin use jumping past 95% with no recent deposit, deposit-page
  visits with failing payments, a gold client returning to one asset within a session, a
  newcomer's large first deposit. They are taken in turn by traders they fit, so each shows
  up within a minute or two at the demo's rate.
* :meth:`TraderFeed.history` backdates the existing clients' past (a CRM import, deposits,
  logins, trades) for a demo that starts from a live-looking book.
* Trader attributes (name, country, tier, identifiers, margin stress) are derived from the
  trader's number alone, so they are the same for every seed; behaviour depends on the seed.
  Per-trader state is a few flat arrays, so a million traders cost a few megabytes.
"""

from __future__ import annotations

import json
import math
import random
from array import array
from collections.abc import Callable, Generator, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import islice
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "EVENT_COLUMNS",
    "FX_USD_PER_UNIT",
    "TraderFeed",
    "copy_rows",
    "event_json",
    "insert_rows",
    "load_fx_rates",
]

# Columns a service writes (CONTRACT §2); profile_id is added only when an event carries one.
EVENT_COLUMNS: tuple[str, ...] = (
    "event_type",
    "occurred_at",
    "identifiers",
    "amount",
    "currency",
    "properties",
    "source",
    "event_key",
)

# USD per unit, roughly late-2020s levels; USD itself needs no rate.
FX_USD_PER_UNIT: dict[str, Decimal] = {
    "EUR": Decimal("1.0850"),
    "GBP": Decimal("1.2700"),
    "JPY": Decimal("0.006700"),
    "AUD": Decimal("0.6600"),
}
_FX_FLOAT = {"USD": 1.0, **{c: float(r) for c, r in FX_USD_PER_UNIT.items()}}

# (country, account currency, phone prefix, weight)
_COUNTRIES: tuple[tuple[str, str, str, int], ...] = (
    ("GB", "GBP", "+447", 18),
    ("DE", "EUR", "+4915", 12),
    ("FR", "EUR", "+336", 8),
    ("ES", "EUR", "+346", 7),
    ("IT", "EUR", "+393", 7),
    ("CY", "EUR", "+3579", 3),
    ("AE", "USD", "+9715", 10),
    ("SG", "USD", "+658", 6),
    ("ZA", "USD", "+277", 6),
    ("US", "USD", "+1", 3),
    ("JP", "JPY", "+8190", 10),
    ("AU", "AUD", "+614", 10),
)
_COUNTRY_TABLE: tuple[int, ...] = tuple(k for k, c in enumerate(_COUNTRIES) for _ in range(c[3]))
_TIERS = ("bronze", "silver", "gold", "platinum")
_TIER_TABLE = (0,) * 50 + (1,) * 30 + (2,) * 15 + (3,) * 5
_FIRST = (
    "Alex",
    "Maria",
    "James",
    "Sofia",
    "Liam",
    "Emma",
    "Noah",
    "Olivia",
    "Lucas",
    "Mia",
    "Hiro",
    "Yuki",
    "Omar",
    "Layla",
    "Chen",
    "Priya",
    "Jack",
    "Chloe",
    "Marco",
    "Anna",
)
_LAST = (
    "Smith",
    "Garcia",
    "Müller",
    "Rossi",
    "Dubois",
    "Tanaka",
    "Khan",
    "Brown",
    "Silva",
    "Novak",
    "Lee",
    "Cohen",
    "Walker",
    "Ivanova",
    "Kowalski",
    "Nakamura",
    "Haddad",
    "Moreau",
    "Fischer",
    "Papadopoulos",
)
# (symbol, asset class, typical price)
_ASSETS: tuple[tuple[str, str, float], ...] = (
    ("EURUSD", "fx", 1.085),
    ("GBPUSD", "fx", 1.27),
    ("USDJPY", "fx", 149.0),
    ("AUDUSD", "fx", 0.66),
    ("BTCUSD", "crypto", 64000.0),
    ("ETHUSD", "crypto", 3200.0),
    ("XAUUSD", "metal", 2350.0),
    ("TSLA", "stock", 240.0),
    ("AAPL", "stock", 190.0),
    ("NVDA", "stock", 120.0),
    ("US500", "index", 5400.0),
)
# Round deposit amounts per currency, and the "large first deposit" ones.
_DEPOSITS: dict[str, tuple[int, ...]] = {
    "USD": (100, 250, 250, 500, 500, 1000, 1000, 2000, 5000),
    "EUR": (100, 250, 250, 500, 500, 1000, 1000, 2000, 5000),
    "GBP": (100, 200, 250, 500, 500, 1000, 1000, 2000, 4000),
    "AUD": (150, 300, 500, 750, 1000, 1500, 2500, 5000, 7500),
    "JPY": (10_000, 30_000, 50_000, 50_000, 100_000, 100_000, 200_000, 300_000, 700_000),
}
_LARGE_DEPOSITS: dict[str, tuple[int, ...]] = {
    "USD": (25_000, 50_000, 100_000),
    "EUR": (25_000, 50_000, 100_000),
    "GBP": (20_000, 40_000, 80_000),
    "AUD": (40_000, 75_000, 150_000),
    "JPY": (3_000_000, 5_000_000, 10_000_000),
}
_PAGES = ("home", "deposit", "markets", "asset")
_PLATFORMS = ("web", "ios", "android")
_APP_ACTIONS = (
    "open_chart",
    "set_price_alert",
    "add_watchlist",
    "change_leverage",
    "open_tutorial",
    "share_trade",
)
_DEPOSIT_METHODS = ("card", "card", "bank_transfer", "ewallet", "crypto")
_DEPOSIT_FAILURES = ("card_declined", "insufficient_funds", "3ds_failed", "limit_exceeded")
_TICKET_CATEGORIES = ("withdrawal", "verification", "platform", "deposit", "trading")
_CAMPAIGNS = ("welcome_series", "weekly_markets", "gold_rally", "crypto_update", "reactivation")
_WEBINARS = ("Intro to forex", "Risk management 101", "Trading gold", "Crypto volatility")
_AD_NETWORKS = ("google", "meta", "x", "tiktok")
# Scripted sessions the example segments are about, taken in turn (see TraderFeed._scenario).
_SCENARIOS = ("margin_stress", "deposit_abandon", "hot_lead", "large_first_deposit")

_MASK64 = (1 << 64) - 1

# One event before it gets its time and key:
# (event_type, identifiers, amount, currency, properties, source)
_Spec = tuple[str, dict[str, str], Decimal | None, str | None, dict[str, Any], str]
_Session = Generator[_Spec, None, None]


def _mix(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-spread hash of a trader index."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _money(value: float, currency: str) -> Decimal:
    # JPY has no minor unit; everything else has cents.
    if currency == "JPY":
        return Decimal(max(1, round(value)))
    return Decimal(f"{max(0.01, value):.2f}")


def _ev(
    event_type: str,
    identifiers: dict[str, str],
    source: str,
    properties: dict[str, Any],
    amount: Decimal | None = None,
    currency: str | None = None,
) -> _Spec:
    return (event_type, identifiers, amount, currency, properties, source)


class _Trader:
    """Stable attributes of trader ``index`` (independent of the feed's seed)."""

    __slots__ = (
        "index",
        "crm_id",
        "email",
        "phone",
        "device_id",
        "name",
        "country",
        "currency",
        "tier",
        "stressed",
        "existing",
        "whale",
        "consent",
    )

    def __init__(
        self, index: int, stress_share: float, existing_share: float, offset: int = 0
    ) -> None:
        # `index` addresses the feed's state arrays; identity comes from the global number.
        number = offset + index
        h = _mix(number)
        country, currency, phone_prefix, _ = _COUNTRIES[_COUNTRY_TABLE[h % len(_COUNTRY_TABLE)]]
        first = _FIRST[(h >> 8) % len(_FIRST)]
        last = _LAST[(h >> 16) % len(_LAST)]
        self.index = index
        self.crm_id = f"C-{number + 1:07d}"
        self.email = f"{first}.{last}.{number + 1}@example.com".lower().replace("ü", "u")
        self.phone = f"{phone_prefix}{(h >> 24) % 10**8:08d}"
        self.device_id = f"dev-{(h >> 12) & 0xFFFFFFFFFF:010x}"
        self.name = f"{first} {last}"
        self.country = country
        self.currency = currency
        self.tier = _TIERS[_TIER_TABLE[(h >> 32) % len(_TIER_TABLE)]]
        # Independent uniform draws in [0, 1) from other bits of the hash.
        h2 = _mix(h)
        self.stressed = (h2 & 0xFFFF) / 65536.0 < stress_share
        self.existing = ((h2 >> 16) & 0xFFFF) / 65536.0 < existing_share
        self.whale = ((h2 >> 32) & 0xFFFF) / 65536.0 < 0.05
        self.consent = {
            "email": (h2 >> 48) % 10 < 8,
            "sms": (h2 >> 52) % 10 < 4,
            "push": (h2 >> 56) % 10 < 6,
            "ads": (h2 >> 60) % 10 < 5,
        }


class TraderFeed:
    """Deterministic stream of simulated trading-CRM events.

    Args:
        seed: drives all behaviour; the same seed and arguments give the same events.
        profiles: number of distinct traders (known identities); anonymous visitors come on top.
        start: ``occurred_at`` of the stream's beginning (tz-aware; default 2026-11-02 UTC).
        rate: mean events per second of ``occurred_at`` time.
        session_gap: mean seconds between two events of one session.
        session_break: seconds a trader stays quiet between sessions (when traders allow).
        stress_share: share of traders whose margin use runs into the 0.95..1.2 zone.
        existing_share: share of traders already clients of the broker (first seen through a
            CRM sync ``identify``); the others arrive as anonymous visitors and sign up.
        scenario_share: share of new sessions that play one of the desk's scenarios (margin
            stress, abandoned deposit, hot lead, large first deposit), so the example segments
            see members within minutes instead of by chance.
        key_prefix: prefix of ``event_key`` (default ``f"s{seed}"``); keys are unique within
            one feed, so replaying the same feed into a database stores nothing twice.
        trader_offset: traders are numbered from ``trader_offset`` (``crm_id`` ``C-0000001``
            is number 0): a feed with another offset brings other people, e.g. a demo run
            into a database that already holds an earlier run's traders.
    """

    def __init__(
        self,
        seed: int = 0,
        profiles: int = 1000,
        start: datetime | None = None,
        *,
        rate: float = 20.0,
        session_gap: float = 30.0,
        session_break: float = 2 * 3600.0,
        stress_share: float = 0.03,
        existing_share: float = 0.7,
        scenario_share: float = 0.04,
        key_prefix: str | None = None,
        trader_offset: int = 0,
    ) -> None:
        if profiles < 1:
            raise ValueError("profiles must be at least 1")
        if rate <= 0 or session_gap <= 0:
            raise ValueError("rate and session_gap must be positive")
        if trader_offset < 0:
            raise ValueError("trader_offset must not be negative")
        start = start or datetime(2026, 11, 2, tzinfo=UTC)
        if start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        self.seed = seed
        self.profiles = profiles
        self.start = start
        self.rate = rate
        self.session_gap = session_gap
        self.session_break = session_break
        self.stress_share = stress_share
        self.existing_share = existing_share
        self.scenario_share = scenario_share
        self.key_prefix = key_prefix if key_prefix is not None else f"s{seed}"
        self.trader_offset = trader_offset
        # Another population also gets other anonymous ids and devices (a string seed is
        # hashed with SHA-512, so it is as deterministic as an integer one).
        self._rng = random.Random(seed if trader_offset == 0 else f"{seed}/{trader_offset}")
        # 0: never seen, 1: signed up, 2: funded or existing client.
        self._stage = bytearray(profiles)
        # Seconds (since start) of each trader's latest event, for session breaks, and of
        # their latest deposit, for scenarios that need "no deposit lately".
        self._last_seen = array("d", [-math.inf]) * profiles
        self._last_deposit = array("d", [-math.inf]) * profiles
        self._scenario_turn = 0
        self._regulars = max(1, profiles // 5)
        self._seq = 0
        self._t = 0.0
        self._stream: Iterator[dict[str, Any]] = self._run()
        self.counts: dict[str, int] = {}

    # -- public API -------------------------------------------------------------------------

    def events(self, n: int) -> Iterator[dict[str, Any]]:
        """The next ``n`` events of the stream (the stream continues across calls)."""
        return islice(self._stream, n)

    def stream(self) -> Iterator[dict[str, Any]]:
        """The endless event stream (shared with :meth:`events`)."""
        return self._stream

    def fx_rates(self) -> Iterator[tuple[str, datetime, Decimal]]:
        """``(currency, valid_from, usd_per_unit)`` rows the feed's amounts need.

        A base rate 30 days before ``start`` and a small revision one day before it, so
        ``amount_usd`` uses the revision and history queries see a change.
        """
        base = self.start - timedelta(days=30)
        revised = self.start - timedelta(days=1)
        for currency, rate in FX_USD_PER_UNIT.items():
            yield currency, base, rate
            yield currency, revised, (rate * Decimal("1.004")).quantize(rate)

    def trader(self, index: int) -> dict[str, Any]:
        """Stable attributes and identifiers of trader ``index`` (for tests and demos)."""
        t = self._trader(index)
        return {
            "crm_id": t.crm_id,
            "email": t.email,
            "phone": t.phone,
            "device_id": t.device_id,
            "name": t.name,
            "country": t.country,
            "currency": t.currency,
            "tier": t.tier,
            "margin_stress": t.stressed,
            "existing": t.existing,
        }

    def crm_import(
        self, at: datetime | None = None, *, consent: bool = True
    ) -> Iterator[dict[str, Any]]:
        """One ``identify`` (and ``consent_updated``) per trader: a CRM backfill.

        Loads every trader at once (benchmarks need many profiles fast); afterwards the stream
        treats them all as existing clients. ``at`` defaults to one day before ``start``.
        """
        at = at or self.start - timedelta(days=1)
        self._stage[:] = b"\x02" * self.profiles
        for i in range(self.profiles):
            t = self._trader(i)
            yield self._event(at, *self._identify(t, "crm"))
            if consent:
                yield self._event(at, *self._consent(t, "crm", dict(t.consent)))

    def history(self, days: float = 9.0) -> list[dict[str, Any]]:
        """The existing clients' past, backdated and ordered by ``occurred_at`` (for demos).

        A CRM import ``days`` before ``start`` (``identify`` and ``consent_updated`` of every
        existing client), then their past sessions: deposits, logins, trades, margin updates.
        All of it lies at least six hours before ``start``, so the stream begins with funded,
        tiered clients whose last deposit is older than the margin desk's four hours; about
        one in seven has not logged in for over a week. Take it before the stream's events;
        afterwards the stream treats the existing clients as known. It is built in memory
        (a few dozen events per existing client), so it suits demo-sized populations.
        """
        if days < 8:
            raise ValueError("history needs at least 8 days (some clients are a week quiet)")
        rnd = self._rng.random
        imported = -days * 86400.0
        latest = -6 * 3600.0
        quiet_since = -7.5 * 86400.0
        stream_t = self._t
        timed: list[tuple[float, int, _Spec]] = []
        for i in range(self.profiles):
            trader = self._trader(i)
            if not trader.existing:
                continue
            self._stage[i] = 2
            timed.append((imported, len(timed), self._identify(trader, "crm")))
            timed.append((imported, len(timed), self._consent(trader, "crm", dict(trader.consent))))
            end = quiet_since if rnd() < 0.15 else latest
            span = end - imported - 3600.0
            sessions = 1 + int(rnd() * (6 if i < self._regulars else 3))
            starts = sorted(imported + 3600.0 + span * rnd() for _ in range(sessions))
            for n, t in enumerate(starts):
                # Every client funded the account first; later visits are mostly trading.
                if n == 0:
                    session = self._funding(trader, first=False)
                else:
                    session = self._trading(trader) if rnd() < 0.7 else self._funding_again(trader)
                while True:
                    self._t = t  # deposits note their time from it
                    spec = next(session, None)
                    if spec is None:
                        break
                    timed.append((t, len(timed), spec))
                    self._last_seen[i] = t
                    t += 5.0 - 40.0 * math.log(1.0 - rnd())
        self._t = stream_t
        timed.sort(key=lambda item: item[:2])
        start = self.start
        return [self._event(start + timedelta(seconds=t), *spec) for t, _, spec in timed]

    # -- scheduling -------------------------------------------------------------------------

    def _trader(self, index: int) -> _Trader:
        return _Trader(index, self.stress_share, self.existing_share, self.trader_offset)

    def _event(
        self,
        at: datetime,
        event_type: str,
        identifiers: dict[str, str],
        amount: Decimal | None,
        currency: str | None,
        properties: dict[str, Any],
        source: str,
    ) -> dict[str, Any]:
        self._seq += 1
        self.counts[event_type] = self.counts.get(event_type, 0) + 1
        return {
            "event_type": event_type,
            "occurred_at": at,
            "identifiers": identifiers,
            "amount": amount,
            "currency": currency,
            "properties": properties,
            "source": source,
            "event_key": f"{self.key_prefix}-{self._seq}",
        }

    def _run(self) -> Iterator[dict[str, Any]]:
        rnd = self._rng.random
        log = math.log
        fromtimestamp = datetime.fromtimestamp
        counts = self.counts
        prefix = self.key_prefix + "-"
        rate = self.rate
        start_ts = self.start.timestamp()
        tz = self.start.tzinfo
        target = max(1, round(rate * self.session_gap))
        # Open sessions as (generator, trader index or -1 for anonymous visitors).
        active: list[tuple[_Session, int]] = []
        last_seen = self._last_seen
        t = 0.0
        while True:
            t -= log(1.0 - rnd()) / rate  # exponential inter-arrival: a Poisson stream
            self._t = t
            while True:
                # Open sessions gradually, so the stream does not begin with a burst of
                # first events; at steady state about `target` sessions are open.
                if not active or (len(active) < target and rnd() < 0.3):
                    active.append(self._new_session(t))
                    k = len(active) - 1
                else:
                    k = int(rnd() * len(active))
                gen, who = active[k]
                spec = next(gen, None)
                if spec is not None:
                    break
                active[k] = active[-1]
                active.pop()
            if who >= 0:
                last_seen[who] = t
            # Inlined _event: this loop is the hot path of every benchmark.
            self._seq += 1
            event_type = spec[0]
            counts[event_type] = counts.get(event_type, 0) + 1
            yield {
                "event_type": event_type,
                "occurred_at": fromtimestamp(start_ts + t, tz),
                "identifiers": spec[1],
                "amount": spec[2],
                "currency": spec[3],
                "properties": spec[4],
                "source": spec[5],
                "event_key": prefix + str(self._seq),
            }

    def _pick_trader(self, t: float) -> int:
        rnd = self._rng.random
        i = 0
        # Half the sessions come from the most active fifth of traders.
        for _ in range(8):
            span = self._regulars if rnd() < 0.5 else self.profiles
            i = int(rnd() * span)
            if t - self._last_seen[i] >= self.session_break:
                break
        return i

    def _new_session(self, t: float) -> tuple[_Session, int]:
        rnd = self._rng.random
        if rnd() < 0.04:
            return self._visitor(), -1
        if rnd() < self.scenario_share:
            scripted = self._scenario(t)
            if scripted is not None:
                return scripted
        i = self._pick_trader(t)
        self._last_seen[i] = t
        trader = self._trader(i)
        stage = self._stage[i]
        if stage == 0:
            if trader.existing:
                self._stage[i] = 2
                return self._crm_sync_then(trader), i
            self._stage[i] = 1
            return self._onboarding(trader), i
        if stage == 1:
            return (self._funding(trader, first=True) if rnd() < 0.6 else self._trading(trader)), i
        return self._choose(trader)(trader), i

    def _scenario(self, t: float) -> tuple[_Session, int] | None:
        """The desk's next scenario in turn, played by a trader it fits (None: nobody fits)."""
        for _ in _SCENARIOS:
            kind = _SCENARIOS[self._scenario_turn % len(_SCENARIOS)]
            self._scenario_turn += 1
            i = self._find_trader(t, kind)
            if i is None:
                continue
            self._last_seen[i] = t
            trader = self._trader(i)
            if kind == "large_first_deposit":
                self._stage[i] = 1
                return self._large_first_deposit(trader), i
            session = {
                "margin_stress": self._margin_stress,
                "deposit_abandon": self._deposit_abandon,
                "hot_lead": self._hot_lead,
            }[kind](trader)
            if self._stage[i] == 0:  # an existing client seen for the first time
                self._stage[i] = 2
                session = self._synced(trader, session)
            return session, i
        return None

    def _find_trader(self, t: float, kind: str) -> int | None:
        rnd = self._rng.random
        for _ in range(64):
            i = int(rnd() * self.profiles)
            if t - self._last_seen[i] < self.session_break:
                continue
            trader = self._trader(i)
            stage = self._stage[i]
            since_deposit = t - self._last_deposit[i]
            if kind == "large_first_deposit":
                fits = stage == 0 and not trader.existing
            elif kind == "deposit_abandon":
                fits = (stage > 0 or trader.existing) and since_deposit > 3600.0
            elif not trader.existing:
                fits = False  # only the CRM's identify carries the real tier
            elif kind == "hot_lead":
                fits = trader.tier == "gold"
            else:  # margin_stress: the margin desk wants four hours without a deposit
                fits = trader.tier in ("gold", "platinum") and since_deposit > 5 * 3600.0
            if fits:
                return i
        return None

    def _choose(self, trader: _Trader) -> Callable[[_Trader], _Session]:
        r = self._rng.random()
        if r < 0.36:
            return self._trading
        if r < 0.48:
            return self._anonymous_login
        if r < 0.58:
            return self._funding_again
        if r < 0.62:
            return self._withdrawal
        if r < 0.68:
            return self._support
        if r < 0.86:
            return self._marketing
        if r < 0.90:
            return self._profile_update
        return self._app_browse

    # -- small helpers ----------------------------------------------------------------------

    def _pick(self, seq: tuple[Any, ...]) -> Any:
        return seq[int(self._rng.random() * len(seq))]

    def _hex(self, bits: int = 48) -> str:
        return f"{int(self._rng.random() * (1 << bits)):0{bits // 4}x}"

    def _asset_view(
        self, ids: dict[str, str], platform: str, asset: tuple[str, str, float] | None = None
    ) -> _Spec:
        symbol, klass, _ = asset or self._pick(_ASSETS)
        props = {"asset": symbol, "asset_class": klass, "platform": platform}
        return _ev("asset_view", ids, "web" if platform == "web" else "app", props)

    def _page_view(self, ids: dict[str, str], page: str | None = None) -> _Spec:
        page = page or self._pick(_PAGES)
        props: dict[str, Any] = {"page": page, "path": f"/{page}"}
        if page == "asset":
            symbol = self._pick(_ASSETS)[0]
            props["asset"] = symbol
            props["path"] = f"/asset/{symbol}"
        return _ev("page_view", ids, "web", props)

    def _login(self, ids: dict[str, str], platform: str) -> _Spec:
        method = "biometric" if platform != "web" and self._rng.random() < 0.6 else "password"
        props = {"method": method, "platform": platform}
        return _ev("login", ids, "web" if platform == "web" else "app", props)

    def _identify(
        self, trader: _Trader, source: str, extra_ids: dict[str, str] | None = None
    ) -> _Spec:
        ids = {"crm_id": trader.crm_id, "email": trader.email, **(extra_ids or {})}
        props = {
            "name": trader.name,
            "email": trader.email,
            "country": trader.country,
            "tier": trader.tier,
            "account_currency": trader.currency,
        }
        if source == "crm":
            ids["phone"] = trader.phone
            props["phone"] = trader.phone
        return _ev("identify", ids, source, props)

    def _consent(self, trader: _Trader, source: str, consent: dict[str, bool]) -> _Spec:
        return _ev("consent_updated", {"crm_id": trader.crm_id}, source, consent)

    def _ad(self, ids: dict[str, str], campaign: str | None = None) -> _Spec:
        props = {
            "campaign": campaign or self._pick(_CAMPAIGNS),
            "network": self._pick(_AD_NETWORKS),
            "placement": self._pick(("search", "feed", "video")),
        }
        return _ev("ad_impression", ids, "marketing", props)

    def _margin_update(self, ids: dict[str, str], utilization: float, equity: float) -> _Spec:
        props = {
            "utilization": round(utilization, 4),
            "exposure_usd": round(equity * utilization * 10, 2),
            "equity_usd": round(equity, 2),
        }
        return _ev("margin_update", ids, "trading", props)

    def _deposit_amount(self, trader: _Trader, first: bool) -> tuple[Decimal, str]:
        # Most deposits are in the account currency, some in USD (cards abroad, crypto).
        currency = trader.currency if self._rng.random() < 0.85 else "USD"
        if first and trader.whale:
            return Decimal(self._pick(_LARGE_DEPOSITS[currency])), currency
        return Decimal(self._pick(_DEPOSITS[currency])), currency

    # -- sessions ---------------------------------------------------------------------------

    def _visitor(self) -> _Session:
        """Anonymous browsing that never logs in (bounces, ad clicks)."""
        rnd = self._rng.random
        ids = {"anonymous_id": f"anon-{self._hex()}", "device_id": f"dev-{self._hex(40)}"}
        if rnd() < 0.5:
            yield self._ad({"anonymous_id": ids["anonymous_id"]})
        yield self._page_view(ids, "home")
        for _ in range(int(rnd() * 4)):
            yield self._page_view(ids) if rnd() < 0.5 else self._asset_view(ids, "web")

    def _onboarding(self, trader: _Trader) -> _Session:
        """A new visitor browses anonymously, signs up (identify links the ids), deposits."""
        rnd = self._rng.random
        anon = {"anonymous_id": f"anon-{self._hex()}", "device_id": trader.device_id}
        if rnd() < 0.4:
            yield self._ad({"anonymous_id": anon["anonymous_id"]}, "welcome_series")
        yield self._page_view(anon, "home")
        for _ in range(1 + int(rnd() * 3)):
            yield self._asset_view(anon, "web") if rnd() < 0.6 else self._page_view(anon, "markets")
        # Sign-up: one event carrying both the anonymous ids and the new account's ids.
        event_type, ids, _, _, props, source = self._identify(trader, "web", anon)
        yield _ev(event_type, ids, source, {**props, "tier": "bronze", "signup": True})
        yield self._consent(trader, "web", dict(trader.consent))
        ids = {"crm_id": trader.crm_id, "device_id": trader.device_id}
        yield self._login(ids, "web")
        if rnd() < 0.7:
            yield from self._deposit_flow(trader, ids, first=True)

    def _crm_sync_then(self, trader: _Trader) -> _Session:
        """An existing client seen for the first time: CRM sync, then a normal session."""
        yield self._identify(trader, "crm")
        yield self._consent(trader, "crm", dict(trader.consent))
        yield from self._choose(trader)(trader)

    def _deposit_flow(self, trader: _Trader, ids: dict[str, str], first: bool) -> _Session:
        rnd = self._rng.random
        yield self._page_view(ids, "deposit")
        amount, currency = self._deposit_amount(trader, first)
        method = self._pick(_DEPOSIT_METHODS)
        for _attempt in range(3):
            if rnd() >= 0.25:
                yield from self._deposit(trader, ids, amount, currency, method, first)
                return
            yield self._failed_attempt(ids, amount, currency, method, first)
            if rnd() < 0.4:
                return  # gives up after a failure

    def _failed_attempt(
        self, ids: dict[str, str], amount: Decimal, currency: str, method: str, first: bool
    ) -> _Spec:
        props = {
            "status": "failed",
            "method": method,
            "first_deposit": first,
            "failure_reason": self._pick(_DEPOSIT_FAILURES),
        }
        return _ev("deposit_attempt", ids, "payments", props, amount, currency)

    def _deposit(
        self,
        trader: _Trader,
        ids: dict[str, str],
        amount: Decimal,
        currency: str,
        method: str,
        first: bool,
    ) -> _Session:
        """A successful attempt and its deposit."""
        props: dict[str, Any] = {"status": "success", "method": method, "first_deposit": first}
        yield _ev("deposit_attempt", ids, "payments", props, amount, currency)
        self._stage[trader.index] = 2
        self._last_deposit[trader.index] = self._t  # the time of the event being produced
        props = {"method": method, "first_deposit": first}
        yield _ev("deposit", ids, "payments", props, amount, currency)

    def _funding(self, trader: _Trader, first: bool) -> _Session:
        ids = {"crm_id": trader.crm_id, "device_id": trader.device_id}
        yield self._login(ids, self._pick(_PLATFORMS))
        yield from self._deposit_flow(trader, ids, first)

    def _funding_again(self, trader: _Trader) -> _Session:
        return self._funding(trader, first=False)

    def _trades(self, trader: _Trader, ids: dict[str, str], platform: str) -> _Session:
        rnd = self._rng.random
        for _ in range(1 + int(rnd() * 4)):
            yield self._trade(trader, ids, platform, self._pick(_ASSETS))
        yield from self._margin(trader, ids)

    def _trade(
        self, trader: _Trader, ids: dict[str, str], platform: str, asset: tuple[str, str, float]
    ) -> _Spec:
        rnd = self._rng.random
        currency = trader.currency
        symbol, klass, price = asset
        usd = math.exp(7.6 + 1.2 * self._rng.gauss(0.0, 1.0))  # median ≈ 2,000 USD
        notional = _money(usd / _FX_FLOAT[currency], currency)
        if klass == "fx":
            volume = round(max(0.01, usd / price / 100_000), 2)  # standard lots
        else:
            volume = round(max(0.001, usd / price), 3)
        props = {
            "asset": symbol,
            "asset_class": klass,
            "side": "buy" if rnd() < 0.55 else "sell",
            "volume": volume,
            "amount": float(notional),
            "price": round(price * (0.98 + 0.04 * rnd()), 5),
            "leverage": self._pick((1, 2, 5, 10, 20, 30)),
            "platform": platform,
        }
        return _ev("trade", ids, "trading", props, notional, currency)

    def _margin(self, trader: _Trader, ids: dict[str, str]) -> _Session:
        rnd = self._rng.random
        equity = 500.0 + 20_000.0 * rnd() ** 2
        if not trader.stressed:
            yield self._margin_update(ids, 0.05 + 0.65 * rnd(), equity)
            return
        # Margin stress: use climbs towards and past 95%, then a margin call and an outcome.
        u = 0.78 + 0.1 * rnd()
        while True:
            yield self._margin_update(ids, u, equity)
            if u > 0.95 or rnd() < 0.15:
                break
            u = min(1.2, u + 0.04 + 0.1 * rnd())
        if u <= 0.95:
            return
        props = {"kind": "margin_call", "utilization": round(u, 4), "threshold": 0.95}
        yield _ev("limit_alert", ids, "trading", props)
        outcome = rnd()
        if outcome < 0.35:
            yield from self._deposit_flow(trader, ids, first=False)
        elif outcome < 0.75:
            yield from self._close_positions(ids, u, equity)
        # else: stays exposed (the interesting case for margin-call segments)

    def _close_positions(self, ids: dict[str, str], utilization: float, equity: float) -> _Session:
        rnd = self._rng.random
        props = {
            "count": 1 + int(rnd() * 5),
            "reason": "stop_out" if utilization >= 1.0 else "user",
            "pnl_usd": round(-equity * (0.1 + 0.5 * rnd()), 2),
        }
        yield _ev("positions_closed", ids, "trading", props)
        yield self._margin_update(ids, 0.1 + 0.3 * rnd(), equity * 0.6)

    def _trading(self, trader: _Trader) -> _Session:
        rnd = self._rng.random
        platform = self._pick(_PLATFORMS)
        ids = {"crm_id": trader.crm_id, "device_id": trader.device_id}
        yield self._login(ids, platform)
        if platform == "web":
            yield self._page_view(ids, "markets")
        for _ in range(1 + int(rnd() * 3)):
            yield self._asset_view(ids, platform)
        if platform != "web" and rnd() < 0.5:
            props = {"action": self._pick(_APP_ACTIONS), "platform": platform}
            yield _ev("app_interaction", ids, "app", props)
        if rnd() < 0.15:
            kind = self._pick(("price_alert", "stop_loss_hit", "take_profit_hit"))
            props = {"kind": kind, "asset": self._pick(_ASSETS)[0]}
            yield _ev("limit_alert", ids, "trading", props)
        if rnd() < 0.8:
            yield from self._trades(trader, ids, platform)
        if rnd() < 0.1:
            props = {
                "count": 1 + int(rnd() * 3),
                "reason": "user",
                "pnl_usd": round(-300 + 800 * rnd(), 2),
            }
            yield _ev("positions_closed", ids, "trading", props)

    def _anonymous_login(self, trader: _Trader) -> _Session:
        """A known trader browses on a new device, then logs in: the anonymous profile merges."""
        rnd = self._rng.random
        device = f"dev-{self._hex(40)}"
        anon = {"anonymous_id": f"anon-{self._hex()}", "device_id": device}
        yield self._page_view(anon, "home")
        for _ in range(int(rnd() * 3)):
            yield self._asset_view(anon, "web") if rnd() < 0.6 else self._page_view(anon)
        login_ids = {**anon, "crm_id": trader.crm_id}
        if rnd() < 0.3:
            login_ids["email"] = trader.email
        yield self._login(login_ids, "web")
        if rnd() < 0.6:
            yield from self._trades(trader, {"crm_id": trader.crm_id, "device_id": device}, "web")

    def _withdrawal(self, trader: _Trader) -> _Session:
        rnd = self._rng.random
        ids = {"crm_id": trader.crm_id, "device_id": trader.device_id}
        yield self._login(ids, self._pick(_PLATFORMS))
        amount = _money((100.0 + 3000.0 * rnd() ** 2) / _FX_FLOAT[trader.currency], trader.currency)
        props = {"method": self._pick(("bank_transfer", "card", "ewallet")), "status": "requested"}
        yield _ev("withdrawal", ids, "payments", props, amount, trader.currency)
        if rnd() < 0.3:
            props = {
                "ticket_id": f"T-{self._hex(32)}",
                "category": "withdrawal",
                "priority": "normal",
                "channel": "web",
            }
            yield _ev("ticket_opened", {"crm_id": trader.crm_id}, "support", props)

    def _support(self, trader: _Trader) -> _Session:
        rnd = self._rng.random
        category = self._pick(_TICKET_CATEGORIES)
        props: dict[str, Any] = {
            "ticket_id": f"T-{self._hex(32)}",
            "category": category,
            "priority": "high" if rnd() < 0.2 else "normal",
            "channel": self._pick(("email", "web", "app")),
        }
        yield _ev(
            "ticket_opened", {"crm_id": trader.crm_id, "email": trader.email}, "support", props
        )
        if rnd() < 0.6:
            props = {
                "topic": category,
                "duration_s": int(60 + 900 * rnd()),
                "agent": f"agent-{int(rnd() * 40) + 1}",
            }
            yield _ev("chat", {"crm_id": trader.crm_id}, "support", props)
        if rnd() < 0.35:
            # Calls are matched by phone number, which links the phone to the profile.
            props = {
                "direction": "inbound" if rnd() < 0.6 else "outbound",
                "duration_s": int(30 + 1200 * rnd()),
                "outcome": self._pick(("resolved", "callback", "escalated")),
            }
            yield _ev("call", {"phone": trader.phone, "crm_id": trader.crm_id}, "support", props)

    def _marketing(self, trader: _Trader) -> _Session:
        rnd = self._rng.random
        email = {"email": trader.email}
        r = rnd()
        if r < 0.6:
            campaign = self._pick(_CAMPAIGNS)
            template = f"{campaign}_v{1 + int(rnd() * 3)}"
            yield _ev(
                "email_open", email, "marketing", {"campaign": campaign, "template": template}
            )
            if rnd() < 0.35:
                link = self._pick(("deposit", "markets", "webinar"))
                yield _ev("email_click", email, "marketing", {"campaign": campaign, "link": link})
        elif r < 0.85:
            yield self._ad({"device_id": trader.device_id})
        else:
            props = {"webinar": self._pick(_WEBINARS), "duration_min": int(10 + 50 * rnd())}
            yield _ev("webinar_attended", email, "marketing", props)

    def _profile_update(self, trader: _Trader) -> _Session:
        r = self._rng.random()
        if r < 0.4:
            # Tier review by the CRM (one step up).
            tier = _TIERS[min(len(_TIERS) - 1, _TIERS.index(trader.tier) + 1)]
            props: dict[str, Any] = {"tier": tier, "tier_reviewed": True}
            yield _ev("identify", {"crm_id": trader.crm_id}, "crm", props)
        elif r < 0.7:
            # Links the phone number to the account.
            ids = {"crm_id": trader.crm_id, "phone": trader.phone}
            yield _ev("identify", ids, "crm", {"phone": trader.phone})
        else:
            consent = dict(trader.consent)
            channel = self._pick(tuple(consent))
            consent[channel] = not consent[channel]
            yield self._consent(trader, "web", consent)

    def _app_browse(self, trader: _Trader) -> _Session:
        rnd = self._rng.random
        platform = self._pick(("ios", "android"))
        ids = {"crm_id": trader.crm_id, "device_id": trader.device_id}
        yield self._login(ids, platform)
        for _ in range(1 + int(rnd() * 4)):
            if rnd() < 0.5:
                yield self._asset_view(ids, platform)
            else:
                props = {"action": self._pick(_APP_ACTIONS), "platform": platform}
                yield _ev("app_interaction", ids, "app", props)

    # -- scenarios: what the example segments look for ------------------------------------------

    def _synced(self, trader: _Trader, session: _Session) -> _Session:
        """The CRM sync of an existing client seen for the first time, then ``session``."""
        yield self._identify(trader, "crm")
        yield self._consent(trader, "crm", dict(trader.consent))
        yield from session

    def _margin_stress(self, trader: _Trader) -> _Session:
        """Margin use jumps past 95% with no fresh deposit (margin_call_risk); the trader then
        often closes positions or deposits, and sometimes stays exposed."""
        rnd = self._rng.random
        ids = {"crm_id": trader.crm_id, "device_id": trader.device_id}
        equity = 2_000.0 + 40_000.0 * rnd() ** 2
        yield self._login(ids, self._pick(_PLATFORMS))
        yield self._margin_update(ids, 0.86 + 0.08 * rnd(), equity)
        u = 0.96 + 0.2 * rnd()
        yield self._margin_update(ids, u, equity)
        props = {"kind": "margin_call", "utilization": round(u, 4), "threshold": 0.95}
        yield _ev("limit_alert", ids, "trading", props)
        outcome = rnd()
        if outcome < 0.45:
            yield from self._close_positions(ids, u, equity)
        elif outcome < 0.65:
            yield from self._deposit_flow(trader, ids, first=False)
        else:
            # Stays exposed while the market moves further against the positions.
            yield self._margin_update(ids, min(1.2, u + 0.01 + 0.04 * rnd()), equity)

    def _deposit_abandon(self, trader: _Trader) -> _Session:
        """Back on the deposit page again and again, every attempt fails (deposit_abandoned);
        some open a ticket, a few get through with another method in the end."""
        rnd = self._rng.random
        ids = {"crm_id": trader.crm_id, "device_id": trader.device_id}
        first = self._stage[trader.index] < 2
        yield self._login(ids, "web")
        amount, currency = self._deposit_amount(trader, first)
        method = self._pick(_DEPOSIT_METHODS)
        for _ in range(2 + (rnd() < 0.3)):
            yield self._page_view(ids, "deposit")
            yield self._failed_attempt(ids, amount, currency, method, first)
        if rnd() < 0.3:
            props = {
                "ticket_id": f"T-{self._hex(32)}",
                "category": "deposit",
                "priority": "high",
                "channel": "web",
            }
            yield _ev("ticket_opened", {"crm_id": trader.crm_id}, "support", props)
        if rnd() < 0.2:
            method = self._pick(("bank_transfer", "ewallet", "crypto"))
            yield from self._deposit(trader, ids, amount, currency, method, first)

    def _hot_lead(self, trader: _Trader) -> _Session:
        """A gold client keeps coming back to one instrument in a session (hot_lead)."""
        rnd = self._rng.random
        platform = self._pick(_PLATFORMS)
        ids = {"crm_id": trader.crm_id, "device_id": trader.device_id}
        asset = self._pick(_ASSETS)
        yield self._login(ids, platform)
        for n in range(3 + int(rnd() * 3)):
            if n and platform == "web" and rnd() < 0.3:
                yield self._page_view(ids, "markets")
            yield self._asset_view(ids, platform, asset)
        if rnd() < 0.5:
            yield self._trade(trader, ids, platform, asset)

    def _large_first_deposit(self, trader: _Trader) -> _Session:
        """A newcomer signs up and funds the account with over 10,000 USD at once
        (high_value_onboarding), in the account currency or in USD."""
        rnd = self._rng.random
        anon = {"anonymous_id": f"anon-{self._hex()}", "device_id": trader.device_id}
        yield self._page_view(anon, "home")
        event_type, ids, _, _, props, source = self._identify(trader, "web", anon)
        yield _ev(event_type, ids, source, {**props, "tier": "bronze", "signup": True})
        ids = {"crm_id": trader.crm_id, "device_id": trader.device_id}
        yield self._login(ids, "web")
        yield self._page_view(ids, "deposit")
        currency = trader.currency if rnd() < 0.8 else "USD"
        amount = Decimal(self._pick(_LARGE_DEPOSITS[currency]))
        method = self._pick(("bank_transfer", "bank_transfer", "card", "crypto"))
        yield from self._deposit(trader, ids, amount, currency, method, True)
        yield self._consent(trader, "web", dict(trader.consent))


# -- writing events ---------------------------------------------------------------------------


def _json_number(value: Decimal) -> float | str:
    # Floats print their shortest round-trip form, so money amounts stay exact as JSON numbers.
    f = float(value)
    return f if math.isfinite(f) and Decimal(repr(f)) == value else str(value)


def event_json(event: dict[str, Any]) -> dict[str, Any]:
    """A JSON-ready copy of an event (ISO-8601 ``occurred_at``, numeric ``amount``)."""
    out = dict(event)
    at = out.get("occurred_at")
    if isinstance(at, datetime):
        out["occurred_at"] = at.isoformat()
    amount = out.get("amount")
    if isinstance(amount, Decimal):
        out["amount"] = _json_number(amount)
    return out


def _columns(first: dict[str, Any]) -> tuple[str, ...]:
    if first.get("profile_id") is not None:
        return (*EVENT_COLUMNS, "profile_id")
    return EVENT_COLUMNS


def _row(event: dict[str, Any], columns: tuple[str, ...]) -> tuple[Any, ...]:
    ids = event.get("identifiers")
    props = event.get("properties")
    row = (
        event["event_type"],
        event["occurred_at"],
        None if ids is None else json.dumps(ids),
        event.get("amount"),
        event.get("currency"),
        None if props is None else json.dumps(props),
        event.get("source"),
        event.get("event_key"),
    )
    return row if len(columns) == len(EVENT_COLUMNS) else (*row, event.get("profile_id"))


def _chunks(events: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    it = iter(events)
    while chunk := list(islice(it, size)):
        yield chunk


def copy_rows(
    conn: psycopg.Connection[Any],
    events: Iterable[dict[str, Any]],
    *,
    chunk_size: int = 100_000,
) -> int:
    """Write events into ``segflow.events`` with COPY (the fast path); returns rows sent.

    Every ``chunk_size`` events form one COPY statement, i.e. one run of the ingest trigger.
    The caller owns the transaction (with an autocommit connection each chunk commits).
    """
    sent = 0
    for chunk in _chunks(events, chunk_size):
        columns = _columns(chunk[0])
        sql = f"COPY segflow.events ({', '.join(columns)}) FROM STDIN"
        with conn.cursor() as cur, cur.copy(sql) as copy:
            for event in chunk:
                copy.write_row(_row(event, columns))
        sent += len(chunk)
    return sent


def insert_rows(
    conn: psycopg.Connection[Any],
    events: Iterable[dict[str, Any]],
    *,
    chunk_size: int = 1000,
) -> int:
    """Write events with multi-row ``INSERT`` statements; returns rows sent."""
    sent = 0
    with conn.cursor() as cur:
        for chunk in _chunks(events, chunk_size):
            columns = _columns(chunk[0])
            placeholders = "(" + ", ".join(["%s"] * len(columns)) + ")"
            sql = f"INSERT INTO segflow.events ({', '.join(columns)}) VALUES " + ", ".join(
                [placeholders] * len(chunk)
            )
            params = [value for event in chunk for value in _row(event, columns)]
            cur.execute(sql.encode(), params)
            sent += len(chunk)
    return sent


def load_fx_rates(conn: psycopg.Connection[Any], feed: TraderFeed) -> int:
    """Insert the feed's FX rates (existing rows are kept); returns rows inserted."""
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO segflow.fx_rates (currency, valid_from, usd_per_unit) VALUES (%s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            list(feed.fx_rates()),
        )
        return max(cur.rowcount, 0)
