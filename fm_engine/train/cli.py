"""`fm-engine train` and `fm-engine convert-avit` subcommands (registered by fm_engine.cli)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this module's subcommands to the `fm-engine` parser."""
