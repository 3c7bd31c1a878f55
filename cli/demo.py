"""`drivesim demo`: the whole stack end to end on a clip-format dataset, resumable stage by stage.

The stages and their outputs are described in `drivesim.pipeline.demo`; this module parses options and prints.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from drivesim.pipeline.demo_state import STEPS, TRAIN_STEPS

EPILOG = """\
Examples:

  drivesim demo                                  the cpu-small demo on data/sample (< 30 min on 2 CPU cores)
  drivesim demo --preset tiny --out runs/tiny    the whole chain in a couple of minutes (CI smoke test)
  drivesim demo --budget-minutes image_ldm=10 --budget-minutes prediction=8
  drivesim demo --from-stage rollout --rollout-minutes 5    reuse the trained models, roll out again

Run the same command again to continue after an interruption: finished stages are skipped, an interrupted
training stage resumes from its last checkpoint and an interrupted rollout with --resume.
"""


def demo_cmd(
    data: Path = typer.Option(Path("data/sample"), "--data", help="Clip-format dataset (train + val splits)."),
    preset: str = typer.Option("cpu-small", "--preset", "-p", help="Preset: tiny (CI smoke test, minutes), "
                                                                   "cpu-small (< 30 min on 2 CPU cores)."),
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Run folder (resumable)."),
    from_stage: str = typer.Option(None, "--from-stage", help=f"Re-run from this stage: {', '.join(STEPS)}."),
    budget_steps: list[str] = typer.Option([], "--budget-steps", help="STAGE=STEPS optimizer steps of a training "
                                           f"stage, repeatable (the default budget; {', '.join(TRAIN_STEPS)})."),
    budgets: list[str] = typer.Option([], "--budget-minutes", help="STAGE=MINUTES wall-clock limit, repeatable "
                                      f"({', '.join(TRAIN_STEPS)})."),
    rollout_minutes: float = typer.Option(None, "--rollout-minutes", help="Length of each rollout (default: 2 "
                                          "for cpu-small, 0.06 for tiny)."),
    rollout_sets: list[str] = typer.Option(None, "--rollout-set", help="RolloutConfig override key=value, "
                                           "repeatable (default for cpu-small: steps=4, context_guidance=1.0; "
                                           "see drivesim rollout)."),
    eval_n: int = typer.Option(None, "--eval-n", min=2, help="16-frame windows per side for FVD/FID/KVD "
                               "(default: 16 for cpu-small, 2 for tiny)."),
    threads: str = typer.Option("auto", "--threads", help="torch threads: a number, or auto (the cores not busy "
                                "with other processes at each stage's start, at least 1)."),
    seed: int = typer.Option(0, "--seed", help="Added to every training seed; rollout seeds are seed, seed + 1."),
    train_autoencoder: bool = typer.Option(False, "--train-autoencoder", help="Train the autoencoder from scratch "
                                           "instead of using the one drivesim ships for the preset."),
    from_scratch: bool = typer.Option(False, "--from-scratch", help="Train every stage (no shipped checkpoint)."),
    detector: Path = typer.Option(None, "--detector", help="Reference box detector (`drivesim eval train-detector`) "
                                  "for the box-fidelity rows; default: the shipped one when DATA is the data it was "
                                  "trained on."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary (stage logs go to stderr)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output; only where the report is."),
) -> None:
    """Train the whole stack on DATA, roll out a day and a night video, evaluate them and write report.html."""
    from drivesim.pipeline.demo import demo_settings, run_demo

    settings = demo_settings(data, preset, out, from_stage=from_stage, budget_steps=budget_steps, budgets=budgets,
                             rollout_minutes=rollout_minutes, rollout_sets=rollout_sets, eval_n=eval_n,
                             threads=threads, seed=seed, train_autoencoder=train_autoencoder,
                             from_scratch=from_scratch, detector=detector, as_json=as_json, quiet=quiet)
    summary = run_demo(settings)
    if as_json:
        typer.echo(json.dumps(summary, indent=1, default=str))
        return
    m = summary["metrics"]
    if m and not quiet:
        typer.echo(f"FVD_16 {m['fvd']:.2f}  FID {m['fid']:.2f}  KVD_16 {m['kvd']:.4f}  (N = {m['n']} windows of 16 "
                   "frames per side; preset " + f"{preset})")
    typer.echo(f"report: {summary['report']}  (data: {summary['report_json']})")
