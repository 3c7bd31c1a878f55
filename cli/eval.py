"""`drivesim eval ...`: evaluator weights, the FVD reference self-test, and FVD/FID/KVD on videos."""

from __future__ import annotations

import typer

app = typer.Typer(help="Evaluator weights, the FVD reference self-test, and FVD/FID/KVD on videos.",
                  no_args_is_help=True)
