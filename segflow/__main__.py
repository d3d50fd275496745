"""`python3 -m segflow` is the `segflow` command."""

from __future__ import annotations

from segflow.cli import main

main()
