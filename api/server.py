"""Runs the HTTP API with uvicorn (``segflow api``)."""

from __future__ import annotations

import uvicorn

from api.app import create_app

__all__ = ["serve"]


def serve(host: str = "127.0.0.1", port: int = 8000, database_url: str | None = None) -> None:
    """Serve the API until interrupted; ``database_url`` defaults to segflow's database."""
    uvicorn.run(create_app(database_url), host=host, port=port, log_level="info")
