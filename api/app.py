"""The segflow HTTP API: event ingest, the transition stream and health.

``POST /v1/events`` takes a JSON array of events in the ``segflow.events`` ingest shape
(CONTRACT §2). A batch is handled in three steps, in one transaction:

1. **Shape**: every element is validated with :class:`EventIn` (types, ``occurred_at``
   parsing, unknown fields).
2. **Rules**: ``segflow.check_events`` applies the insert trigger's own rules (event type,
   currency and FX rate, identifiers, ``occurred_at`` not more than 5 minutes ahead, ...) to
   the well-shaped elements.
3. **Store**: the rest go into ``segflow.events`` with ``segflow.ingest_json``, one statement.

Every rejected element is reported by its 0-based index with the field and the reason, and its
raw payload is kept in ``segflow.dead_letters`` (origin ``http``): nothing is lost. The answer
is ``200`` whenever the batch was processed, even if every element was rejected; only a body
that is not a non-empty JSON array gets ``422``.

``GET /v1/stream`` sends the transition ledger as Server-Sent Events (see :mod:`api.stream`).

The API has no authentication yet: run it on a private network. API keys would be a FastAPI
dependency on the routes.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

import psycopg
from fastapi import FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
)
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from api.stream import Feed, Position, StreamSettings, Wakeups, event_stream

__all__ = ["EventIn", "IngestResult", "Rejection", "create_app", "parse_occurred_at"]

# Epoch numbers below this are seconds, at or above it milliseconds. 1e11 seconds is the year
# 5138 and 1e11 milliseconds is March 1973, so neither reading is plausible on the other side.
EPOCH_MILLIS_THRESHOLD = 100_000_000_000
MAX_BATCH = 10_000


def parse_occurred_at(value: Any) -> Any:
    """``occurred_at`` as ISO 8601 text, Unix epoch seconds or Unix epoch milliseconds.

    Numbers (JSON int or float) with ``|value| < 1e11`` are seconds, larger ones milliseconds.
    ISO 8601 text without an offset is taken as UTC. Returns a timezone-aware datetime.
    """
    if value is None or isinstance(value, datetime):
        return value
    if isinstance(value, bool):
        raise ValueError("must be an ISO 8601 timestamp or a Unix epoch number, not a boolean")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError("must be a finite Unix epoch number")
        seconds = value / 1000 if abs(value) >= EPOCH_MILLIS_THRESHOLD else value
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            raise ValueError(f"Unix epoch {value} is out of range") from None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(
                f"{value!r} is not an ISO 8601 timestamp (e.g. 2026-12-03T10:00:00Z)"
            ) from None
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    raise ValueError("must be an ISO 8601 timestamp or a Unix epoch number")


def _key_to_str(value: Any) -> Any:
    # Integer idempotency keys are common (database ids); store them as text.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class EventIn(BaseModel):
    """One event of ``POST /v1/events``. Business rules are checked by the database."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "event_type": "deposit",
                "occurred_at": "2026-12-03T10:00:00Z",
                "identifiers": {"crm_id": "C-1001", "device_id": "d-9"},
                "amount": 500,
                "currency": "EUR",
                "properties": {"method": "card"},
                "source": "payments",
                "event_key": "pay-889",
            }
        },
    )

    event_type: StrictStr = Field(description="lower-case identifier, e.g. login, deposit, trade")
    occurred_at: Annotated[datetime | None, BeforeValidator(parse_occurred_at)] = Field(
        default=None,
        description=(
            "ISO 8601 text (no offset means UTC), or Unix epoch seconds, or Unix epoch "
            "milliseconds: numbers below 1e11 are seconds, larger ones milliseconds. "
            "Defaults to segflow.now()."
        ),
        json_schema_extra={
            "anyOf": [{"type": "string", "format": "date-time"}, {"type": "number"}]
        },
    )
    identifiers: dict[str, Any] | None = Field(
        default=None, description="identifier kind → value (crm_id, email, device_id, ...)"
    )
    profile_id: StrictInt | None = Field(
        default=None, description="known profile, instead of identifiers"
    )
    amount: Decimal | None = Field(default=None, description="money in its own currency")
    currency: StrictStr | None = Field(default=None, description="ISO 4217 code")
    properties: dict[str, Any] | None = None
    source: StrictStr | None = Field(default=None, description="idempotency scope")
    event_key: Annotated[StrictStr | None, BeforeValidator(_key_to_str)] = Field(
        default=None, description="idempotency key: (source, event_key) is stored once"
    )

    def ingest_json(self) -> dict[str, Any]:
        """The element as ``segflow.check_events`` / ``segflow.ingest_json`` expect it."""
        out: dict[str, Any] = self.model_dump(exclude_none=True)
        if self.occurred_at is not None:
            out["occurred_at"] = self.occurred_at.isoformat()
        if self.amount is not None:
            # Text keeps every digit; the database parses it into numeric.
            out["amount"] = str(self.amount)
        return out


class Rejection(BaseModel):
    index: int = Field(description="0-based position in the posted array")
    field: str | None = Field(description="the offending field (null: the element itself)")
    reason: str


class IngestResult(BaseModel):
    accepted: int = Field(description="elements that passed validation")
    stored: int = Field(description="events stored (re-sent (source, event_key) pairs are not)")
    rejected: list[Rejection]


class Health(BaseModel):
    status: str


_EVENTS_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_BATCH,
                "items": EventIn.model_json_schema(),
            }
        }
    },
}


# Pydantic's wording for common cases, rephrased like the database's own reasons.
_REASONS = {
    "extra_forbidden": "unknown field (not an ingest column)",
    "missing": "is required",
    "dict_type": "must be a JSON object",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "decimal_parsing": "must be a number",
    "decimal_type": "must be a number",
    "finite_number": "must be a finite number",
}


def _shape_problems(exc: ValidationError) -> list[tuple[str | None, str]]:
    problems: list[tuple[str | None, str]] = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        field = loc[0] if loc else None
        reason = _REASONS.get(err["type"]) or err["msg"].removeprefix("Value error, ")
        if len(loc) > 1:
            reason = f"{'.'.join(loc[1:])}: {reason}"
        problems.append((field, reason))
    return problems


class _Ingestor:
    """Runs one batch against the database (in a worker thread)."""

    def __init__(self, pool: ConnectionPool[Any]) -> None:
        self.pool = pool

    def __call__(self, items: list[Any]) -> IngestResult:
        problems: dict[int, list[tuple[str | None, str]]] = {}
        good: list[tuple[int, dict[str, Any]]] = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                problems[i] = [(None, "each event must be a JSON object")]
                continue
            try:
                event = EventIn.model_validate(item)
            except ValidationError as exc:
                problems[i] = _shape_problems(exc)
                continue
            good.append((i, event.ingest_json()))

        stored = 0
        with self.pool.connection() as conn, conn.transaction():
            if good:
                rows = conn.execute(
                    "SELECT idx, field, reason FROM segflow.check_events(%s)",
                    [Jsonb([e for _, e in good])],
                ).fetchall()
                bad = set()
                for idx, field, reason in rows:
                    problems.setdefault(good[idx][0], []).append((field, reason))
                    bad.add(idx)
                good = [g for k, g in enumerate(good) if k not in bad]
            if good:
                stored = self._store(conn, good, problems)
            if problems:
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO segflow.dead_letters (origin, payload, error)"
                        " VALUES ('http', %s, %s)",
                        [
                            (
                                Jsonb(items[i]),
                                "; ".join(f"{f}: {r}" if f else r for f, r in problems[i]),
                            )
                            for i in sorted(problems)
                        ],
                    )
        rejected = [
            Rejection(index=i, field=problems[i][0][0], reason=problems[i][0][1])
            for i in sorted(problems)
        ]
        return IngestResult(accepted=len(good), stored=stored, rejected=rejected)

    @staticmethod
    def _store(
        conn: psycopg.Connection[Any],
        good: list[tuple[int, dict[str, Any]]],
        problems: dict[int, list[tuple[str | None, str]]],
    ) -> int:
        try:
            with conn.transaction():
                return _ingest(conn, [e for _, e in good])
        except (psycopg.errors.DataError, psycopg.errors.IntegrityError):
            # Something changed since the check (an FX rate, a profile): fall back to one
            # statement per event so the others still get in and the culprits are reported.
            pass
        stored = 0
        for i, event in list(good):
            try:
                with conn.transaction():
                    stored += _ingest(conn, [event])
            except (psycopg.errors.DataError, psycopg.errors.IntegrityError) as exc:
                message = (exc.diag.message_primary or str(exc)).removeprefix("segflow.events: ")
                field, _, reason = message.partition(": ")
                problems.setdefault(i, []).append(
                    (exc.diag.column_name or field, reason or message)
                )
                good.remove((i, event))
        return stored


def _ingest(conn: psycopg.Connection[Any], events: list[dict[str, Any]]) -> int:
    row = conn.execute("SELECT segflow.ingest_json(%s)", [Jsonb(events)]).fetchone()
    return int(row[0]) if row else 0


def create_app(database_url: str | None = None,
               stream_settings: StreamSettings | None = None,
               stop: threading.Event | None = None) -> FastAPI:
    """The API bound to ``database_url`` (default: segflow's configured database). Setting
    ``stop`` ends open streams, so that a server run in a thread can shut down."""
    if database_url is None:
        from segflow.cluster import database_url as configured_url

        database_url = configured_url()
    pool: ConnectionPool[Any] = ConnectionPool(
        database_url,
        min_size=1,
        max_size=8,
        kwargs={"autocommit": True, "application_name": "segflow-api"},
        open=False,
    )
    ingestor = _Ingestor(pool)
    feed = Feed(pool)
    wakeups = Wakeups(database_url)
    stream_settings = stream_settings or StreamSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Don't wait for the database: /healthz reports it until it is reachable.
        pool.open(wait=False)
        try:
            yield
        finally:
            await wakeups.close()
            pool.close()

    app = FastAPI(
        title="segflow",
        summary="Real-time user segmentation for trading CRMs, inside PostgreSQL",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.pool = pool

    def check_database() -> None:
        with pool.connection(timeout=5.0) as conn:
            conn.execute("SELECT 1")

    @app.get(
        "/healthz",
        response_model=Health,
        tags=["ops"],
        responses={503: {"description": "the database is unreachable"}},
    )
    async def healthz() -> Health | JSONResponse:
        """Liveness and database reachability."""
        try:
            await run_in_threadpool(check_database)
        except Exception as exc:  # any failure means "not healthy", with the reason
            return JSONResponse(
                status_code=503, content={"status": "unavailable", "detail": str(exc)}
            )
        return Health(status="ok")

    @app.post(
        "/v1/events",
        response_model=IngestResult,
        tags=["ingest"],
        openapi_extra={"requestBody": _EVENTS_REQUEST_BODY},
        responses={422: {"description": "the body is not a non-empty JSON array"}},
    )
    async def post_events(request: Request) -> IngestResult:
        """Ingest a JSON array of events.

        Valid events are stored; each rejected one is listed by index with the field and the
        reason, and its payload is kept in ``segflow.dead_letters``. The status is 200 whenever
        the batch was processed (check ``rejected``); 422 only when the body is not a
        non-empty JSON array of at most 10,000 elements.
        """
        raw = await request.body()
        try:
            body = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HTTPException(422, f"the body must be a JSON array of events: {exc}") from None
        if b"\\u0000" in raw:
            # jsonb cannot hold NUL characters, so such a payload could not even be dead-lettered.
            raise HTTPException(422, "the body contains \\u0000, which PostgreSQL cannot store")
        if not isinstance(body, list):
            raise HTTPException(
                422, f"the body must be a JSON array of events, got a JSON {_json_kind(body)}"
            )
        if not body:
            raise HTTPException(422, "the body is an empty array: send at least one event")
        if len(body) > MAX_BATCH:
            raise HTTPException(422, f"at most {MAX_BATCH} events per request, got {len(body)}")
        return await run_in_threadpool(ingestor, body)

    @app.get(
        "/v1/stream",
        tags=["stream"],
        response_class=EventSourceResponse,
        responses={
            200: {
                "description": "Server-Sent Events: `event: transition`, `data:` one ledger "
                "row as JSON, `id:` the position to resume after it",
                "content": {"text/event-stream": {}},
            },
            400: {"description": "an unknown segment or an invalid position"},
            503: {"description": "the database is unreachable"},
        },
    )
    async def stream(
        segment: Annotated[list[str] | None, Query(
            description="only these segments: repeat the parameter or separate names with "
            "commas (default: all)")] = None,
        last_event_id: Annotated[str | None, Query(
            description="resume after this event id when the Last-Event-ID header cannot "
            "be set; 0 replays the whole ledger")] = None,
        last_event_id_header: Annotated[str | None, Header(
            alias="Last-Event-ID", description="resume after this event id")] = None,
    ) -> EventSourceResponse:
        """Transitions as they commit, as Server-Sent Events.

        Without a position the stream starts now. Every event's ``id`` is a position:
        reconnecting with it in ``Last-Event-ID`` (which ``EventSource`` does by itself) sends
        exactly the transitions after it, including ones that committed late with a smaller
        ``transition_id``. Heartbeat comments every 15 s may carry an ``id`` too.
        """
        names = sorted({n.strip() for s in segment or [] for n in s.split(",") if n.strip()})
        resume = last_event_id_header or last_event_id
        try:
            start = Position.parse(resume) if resume else None
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        try:
            unknown = await run_in_threadpool(feed.unknown_segments, names) if names else []
            horizon = await run_in_threadpool(feed.horizon)
        except Exception as exc:  # any failure to reach the database
            raise HTTPException(503, f"the database is unreachable: {exc}") from None
        if unknown:
            raise HTTPException(400, f"unknown segment: {', '.join(unknown)}")
        if start is None:
            start = Position.boundary(horizon)
        elif max(start.lo, start.hi) > horizon:
            raise HTTPException(400, f"position {resume!r} is ahead of this database's ledger")
        return EventSourceResponse(
            event_stream(feed, wakeups, start, names or None, stream_settings, stop),
            ping=0,  # the stream sends its own heartbeats, with positions
            # A client that stops reading is dropped instead of holding the stream open.
            send_timeout=30,
        )

    return app


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"
