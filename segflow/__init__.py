"""segflow: real-time user segmentation for trading CRMs, inside PostgreSQL."""

from __future__ import annotations

__version__ = "0.1.0"
