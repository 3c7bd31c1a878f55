"""`drivesim train STAGE`: train one stage of the stack through the shared accelerate loop."""

from __future__ import annotations

from pathlib import Path

import typer

from drivesim.pipeline.stages import EXTRA_STAGES, STAGE_NAMES
from drivesim.pipeline.train import resolve_preset, train_stage, with_train_overrides

EPILOG = """\
Examples, one process (CPU or one GPU):

  drivesim train autoencoder --preset cpu-small --data data/sample \\
      --out runs/ae

  drivesim train image_ldm --preset tiny --data runs/latents --out runs/ldm \\
      --max-steps 20 --set train.lr=2e-4 --set image_ldm.unet.dropout=0.1

Resume is the default: the same command again continues from the newest
complete checkpoint in OUT/checkpoints (bit-exact on CPU). --no-resume
refuses an OUT that already holds checkpoints. A resume refuses a changed
lr, batch size, schedule, seed, ... unless --allow-config-change; every
start and resume is recorded in OUT/history.jsonl.

Fine-tune from another run's (or a shipped) weights, fresh optimizer:

  drivesim train image_ldm --preset cpu-small --data runs/latents.h5 \
      --out runs/ldm_ft --init-from drivesim/pretrained/image-ldm-cpu-small

Many GPUs / nodes (docs/training.md). --batch-size is per process; one
optimizer step sees batch_size x processes x grad_accum_steps samples:

  accelerate launch --config_file docs/accelerate/ddp.yaml \\
      -m drivesim.cli.main train image_ldm --preset paper-512x1024 ...

  accelerate launch --config_file docs/accelerate/fsdp.yaml \\
      -m drivesim.cli.main train prediction ...    (FSDP2 full shard)

  accelerate launch --config_file docs/accelerate/fsdp.yaml \\
      --num_machines 2 --num_processes 16 --machine_rank 0 \\
      --main_process_ip HOST --main_process_port 29500 \\
      -m drivesim.cli.main train prediction ...   (rank 1 on node 2)

  torchrun --nproc_per_node 2 -m drivesim.cli.main train ...  (CPU: gloo)

DDP and FSDP2 are supported and tested (2 CPU processes, kill and resume);
FSDP1 and DeepSpeed are refused. Checkpoints are the one-process format
whatever the launch, so a run resumes under another process count.
"""


def train_cmd(
    stage: str = typer.Argument(..., help=f"Stage to train: {', '.join(STAGE_NAMES + EXTRA_STAGES)}."),
    preset: str = typer.Option(None, "--preset", "-p", help="Preset: tiny, cpu-small, paper-512x1024."),
    data: Path = typer.Option(..., "--data", help="Training data: clip-format folder or latent cache."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: checkpoints/, logs/, model/, model-ema/."),
    max_steps: int = typer.Option(None, "--max-steps", help="Override train.max_steps (optimizer steps)."),
    max_minutes: float = typer.Option(None, "--max-minutes", help="Stop (with a checkpoint) after this many minutes."),
    batch_size: int = typer.Option(None, "--batch-size", help="Override train.batch_size (per process)."),
    mixed_precision: str = typer.Option(None, "--mixed-precision", help="no | bf16 | fp16 (fp16 needs a GPU)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from OUT's latest checkpoint."),
    allow_config_change: bool = typer.Option(False, "--allow-config-change", help="Resume even though the training "
                                             "config changes the optimisation (lr, batch size, schedule, ...); "
                                             "recorded in OUT/history.jsonl."),
    init_from: Path = typer.Option(None, "--init-from", help="Fine-tune: a fresh run starts from the weights of this "
                                   "exported checkpoint (model/, model-ema/ or a shipped one), fresh optimizer."),
    config: Path = typer.Option(None, "--config", help="Full preset YAML (from `drivesim config show P --yaml`)."),
    sets: list[str] = typer.Option([], "--set", help="key=value override, repeatable (train.lr=2e-4)."),
    opts: list[str] = typer.Option([], "--opt", help="Stage-specific option key=value, repeatable."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Train STAGE of the Video LDM stack; writes checkpoints to OUT/checkpoints and exports OUT/model(-ema)."""
    cfg = resolve_preset(stage, preset, config, sets)
    cfg = with_train_overrides(cfg, stage, max_steps=max_steps, max_minutes=max_minutes, batch_size=batch_size,
                               mixed_precision=mixed_precision,
                               init_from=str(init_from) if init_from is not None else None)
    result = train_stage(stage, cfg, data, out, opts=opts, resume=resume, progress=progress,
                         allow_config_change=allow_config_change)
    typer.echo(f"{stage}: step {result.step} ({result.stop_reason}), {result.steps_per_s:.2f} steps/s; "
               f"model: {result.export_dir}; EMA: {result.ema_export_dir}")

