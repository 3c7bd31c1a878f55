"""The `drivesim` command line (typer)."""
