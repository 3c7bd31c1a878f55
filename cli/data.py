"""`drivesim data ...`: inspect, validate, simulate and preview datasets in the drivesim clip format."""

from __future__ import annotations

import typer

app = typer.Typer(help="Inspect, validate, simulate and preview datasets in the drivesim clip format.",
                  no_args_is_help=True)
