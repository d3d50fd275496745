"""Connections and the named queries of sql/queries.sql."""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import psycopg
from psycopg.rows import dict_row

from segflow.paths import SQL_DIR

_HEADER = re.compile(r"^-- name: (\w+) --$", re.MULTILINE)


@cache
def queries() -> dict[str, str]:
    """Queries by name, split on `-- name: <name> --` header lines."""
    text = (SQL_DIR / "queries.sql").read_text()
    parts = _HEADER.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def query(name: str) -> str:
    try:
        return queries()[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in sql/queries.sql") from None


def connect(url: str | None = None, *, autocommit: bool = False) -> psycopg.Connection[Any]:
    """A connection to `url`, by default SEGFLOW_DATABASE_URL or the local cluster."""
    if url is None:
        from segflow.cluster import database_url

        url = database_url()
    return psycopg.connect(url, autocommit=autocommit, row_factory=dict_row)


def fetch_one(conn: psycopg.Connection[Any], query_name: str, /, **params: Any) -> dict[str, Any]:
    row = conn.execute(query(query_name), params).fetchone()
    assert row is not None, f"query {query_name} returned no row"
    return dict(row)


def fetch_all(
    conn: psycopg.Connection[Any], query_name: str, /, **params: Any
) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(query(query_name), params).fetchall()]
