"""Where segflow's non-Python files live (the project is installed editable)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SQL_DIR = ROOT / "sql"
SCHEMA_DIR = SQL_DIR / "schema"
TEMPLATES_DIR = SQL_DIR / "templates"
MIGRATIONS_DIR = ROOT / "migrations"
EXAMPLES_DIR = ROOT / "examples"
