"""`drivesim report RESULTS... --out report.html`: one self-contained HTML page and `report.json`."""

from __future__ import annotations

from pathlib import Path

import typer


def report_cmd(
    results: list[Path] = typer.Argument(
        None, help="JSON files: results of `drivesim eval videos` / `eval fvd-over-time` (which may carry a "
                   "\"samples\" list), or samples files "
                   "{\"schema\": \"drivesim-report-samples\", \"samples\": [...]}."),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="HTML file to write; report.json goes next "
                                                                       "to it."),
    samples: list[Path] = typer.Option(None, "--samples", help="A clip-format folder whose clips to show "
                                                                 "(repeatable)."),
    split: str | None = typer.Option(None, "--split", help="With --samples: only clips of this split."),
    max_clips: int = typer.Option(2, "--max-clips", min=1, help="With --samples: clips shown per folder."),
    title: str = typer.Option("drivesim evaluation report", "--title"),
) -> None:
    """Write one self-contained HTML report (metric tables, FVD-over-time plot, sample videos with their
    conditioning boxes, protocol) that needs no network to view, and report.json next to it."""
    from drivesim.eval.report import build_report, load_inputs
    from rich.console import Console

    result_records, specs = load_inputs(list(results or []))
    for folder in samples or []:
        specs.append({"label": folder.name, "dataset": str(folder), "split": split, "clips": None,
                      "max_clips": max_clips})
    report = build_report(result_records, specs, out, title=title)
    Console().print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB: {len(report['results'])} result(s), "
                    f"{len(report['samples'])} sample clip(s)) and {out.parent / 'report.json'}")
