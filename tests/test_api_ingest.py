"""POST /v1/events and /healthz against a real database."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from api.app import create_app, parse_occurred_at


@pytest.fixture
def client(db_url: str, conn: psycopg.Connection[Any]) -> Iterator[TestClient]:
    conn.execute(
        "INSERT INTO segflow.fx_rates (currency, valid_from, usd_per_unit)"
        " VALUES ('EUR', '2000-01-01Z', 1.10)"
    )
    with TestClient(create_app(db_url)) as test_client:
        yield test_client


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_mixed_batch(client: TestClient, conn: psycopg.Connection[Any]) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    epoch_s = int((now - timedelta(minutes=2)).timestamp())
    epoch_ms = int((now - timedelta(minutes=1)).timestamp() * 1000) + 250
    base = {"identifiers": {"crm_id": "C-1"}, "source": "test"}
    batch: list[Any] = [
        # 0: good, EUR amount
        {
            **base,
            "event_type": "deposit",
            "occurred_at": _iso(now - timedelta(minutes=3)),
            "amount": 500,
            "currency": "EUR",
            "properties": {"method": "card"},
            "event_key": "k0",
        },
        # 1: unknown currency
        {**base, "event_type": "deposit", "amount": 10, "currency": "XYZ", "event_key": "k1"},
        # 2: malformed identifiers value
        {"event_type": "login", "identifiers": {"crm_id": {"nested": True}}, "event_key": "k2"},
        # 3: far in the future
        {**base, "event_type": "login", "occurred_at": _iso(now + timedelta(days=1))},
        # 4: empty event_type
        {**base, "event_type": "", "event_key": "k4"},
        # 5: good, epoch seconds
        {**base, "event_type": "login", "occurred_at": epoch_s, "event_key": "k5"},
        # 6: good, epoch milliseconds, numeric event_key
        {**base, "event_type": "page_view", "occurred_at": epoch_ms, "event_key": 6},
        # 7: identifiers not an object
        {"event_type": "login", "identifiers": "C-1"},
        # 8: unreadable occurred_at
        {**base, "event_type": "login", "occurred_at": "yesterday"},
        # 9: not an object at all
        42,
        # 10: a column services may not set
        {**base, "event_type": "login", "amount_usd": 5},
    ]
    response = client.post("/v1/events", json=batch)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["accepted"] == 3
    assert body["stored"] == 3
    rejected = {r["index"]: r for r in body["rejected"]}
    assert sorted(rejected) == [1, 2, 3, 4, 7, 8, 9, 10]
    expected_fields = {
        1: "currency",
        2: "identifiers",
        3: "occurred_at",
        4: "event_type",
        7: "identifiers",
        8: "occurred_at",
        9: None,
        10: "amount_usd",
    }
    for index, field in expected_fields.items():
        assert rejected[index]["field"] == field, rejected[index]
        assert rejected[index]["reason"]
    assert "XYZ" in rejected[1]["reason"]
    assert "crm_id" in rejected[2]["reason"]
    assert "ahead" in rejected[3]["reason"]

    rows = conn.execute(
        "SELECT event_key, event_type, occurred_at, amount_usd, profile_id"
        " FROM segflow.events WHERE source = 'test' ORDER BY event_key"
    ).fetchall()
    assert [(r[0], r[1]) for r in rows] == [("6", "page_view"), ("k0", "deposit"), ("k5", "login")]
    stored = {r[0]: r for r in rows}
    assert stored["k0"][3] == Decimal("550.00")
    assert stored["k5"][2] == datetime.fromtimestamp(epoch_s, UTC)
    assert stored["6"][2] == datetime.fromtimestamp(epoch_ms / 1000, UTC)
    assert len({r[4] for r in rows}) == 1  # all resolved to C-1's profile

    letters = conn.execute(
        "SELECT payload, error FROM segflow.dead_letters WHERE origin = 'http'"
        " ORDER BY dead_letter_id"
    ).fetchall()
    assert [payload for payload, _ in letters] == [batch[i] for i in sorted(expected_fields)]
    for (_, error), index in zip(letters, sorted(expected_fields), strict=True):
        field = expected_fields[index]
        assert field is None or error.startswith(f"{field}: "), error

    # The same batch again: the keyed events are duplicates, the rejects are kept again.
    again = client.post("/v1/events", json=batch).json()
    assert again["accepted"] == 3 and again["stored"] == 0
    assert len(again["rejected"]) == 8
    count = conn.execute("SELECT count(*) FROM segflow.events WHERE source = 'test'").fetchone()
    assert count is not None and count[0] == 3


def test_defaults_and_profile_id(client: TestClient, conn: psycopg.Connection[Any]) -> None:
    first = client.post(
        "/v1/events", json=[{"event_type": "login", "identifiers": {"email": "a@x"}}]
    )
    assert first.json() == {"accepted": 1, "stored": 1, "rejected": []}
    row = conn.execute("SELECT profile_id, occurred_at FROM segflow.events").fetchone()
    assert row is not None
    profile_id, occurred_at = row
    assert abs(occurred_at - datetime.now(UTC)) < timedelta(minutes=1)  # defaults to now

    second = client.post(
        "/v1/events",
        json=[
            {"event_type": "trade", "profile_id": profile_id, "amount": "12.5", "currency": "USD"},
            {"event_type": "trade", "profile_id": 987654321},
        ],
    ).json()
    assert second["stored"] == 1
    assert second["rejected"][0]["index"] == 1
    assert second["rejected"][0]["field"] == "profile_id"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "JSON array"),
        (b"not json", "JSON array"),
        (b'{"event_type": "login"}', "got a JSON object"),
        (b"[]", "empty array"),
        (b"[NaN]", "NaN"),
    ],
)
def test_bad_bodies_get_422(client: TestClient, body: bytes, message: str) -> None:
    response = client.post("/v1/events", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert message in response.json()["detail"]


def test_openapi_documents_the_batch(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["type"] == "array"
    assert "occurred_at" in body["schema"]["items"]["properties"]


def test_occurred_at_forms() -> None:
    at = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
    assert parse_occurred_at("2026-12-03T10:00:00Z") == at
    assert parse_occurred_at("2026-12-03T11:00:00+01:00") == at
    assert parse_occurred_at("2026-12-03T10:00:00") == at  # no offset: UTC
    assert parse_occurred_at(at.timestamp()) == at
    assert parse_occurred_at(int(at.timestamp() * 1000)) == at
    assert parse_occurred_at(99_999_999_999) == datetime.fromtimestamp(99_999_999_999, UTC)
    assert parse_occurred_at(100_000_000_000) == datetime.fromtimestamp(100_000_000, UTC)
    for bad in (True, "soon", [1], float("inf")):
        with pytest.raises(ValueError):
            parse_occurred_at(bad)
