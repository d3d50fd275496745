"""segflow HTTP API (``segflow api``) and, later, the delivery worker and dashboard."""

from __future__ import annotations

from api.app import create_app

__all__ = ["create_app"]
