"""The one training loop every drivesim model trains through (accelerate; 1 CPU to multi-node GPU).

The model supplies `loss(batch) -> (loss, logs)` and optionally `param_groups(train_cfg)`; the loop owns
optimisation (AdamW, warmup + constant/cosine lr, gradient accumulation, clipping, mixed precision), EMA,
checkpoints (exact resume), the time budget, non-finite-loss handling, the progress bar and trackers, and the
run's history (`out_dir/history.jsonl`, see `drivesim.training.history`: a resume refuses a changed optimisation
unless allowed).

Launch: `python ...` / `drivesim train ...` (one process) or `accelerate launch [--num_processes N] ...` /
`torchrun ...` (DDP; gloo on CPU, NCCL on GPU; FSDP through `accelerate config`). `cfg.batch_size` is per process
and per micro-batch: one optimizer step sees `batch_size * num_processes * grad_accum_steps` samples.

The learning-rate scheduler is stepped once per real optimizer update (not through `accelerator.prepare`, which
would step it once per process), so the schedule does not depend on the process count.

One module because it is the one training loop, meant to be read in one sitting (k-diffusion's train.py, nanoGPT).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from drivesim.configs import TrainConfig, to_dict
from drivesim.errors import ConfigError, DrivesimError
from drivesim.training import checkpoint as ckpt
from drivesim.training.data import DataStream
from drivesim.training.ema import EMA
from drivesim.training.history import OPTIMISATION_FIELDS, append_history, check_resume_config
from drivesim.training.sharding import drop_lifted, full_optimizer_state, gather_full, is_sharded, lift_scalars

SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine"}
MIXED_PRECISION = ("no", "bf16", "fp16")


class NonFiniteLossError(DrivesimError):
    """Training stopped after `max_bad_steps` consecutive steps with a NaN/inf loss or gradient."""


@dataclass
class TrainResult:
    """What one call of `train` did.

    Attributes:
        step: optimizer steps completed (including skipped bad steps), as stored in the last checkpoint.
        start_step: the step this call resumed from (0 for a fresh run).
        stop_reason: "max_steps" or "max_minutes".
        last_checkpoint: the newest complete checkpoint folder.
        export_dir / ema_export_dir: inference checkpoints (`drivesim.load`) with the live / EMA weights.
        bad_steps: steps skipped for a non-finite loss or gradient during this call.
        elapsed_s: wall-clock seconds of this call's training steps; steps_per_s over the same span.
        final_loss: mean loss of the last step (None if no step ran).
    """

    step: int
    start_step: int
    stop_reason: str
    last_checkpoint: Path | None
    export_dir: Path | None
    ema_export_dir: Path | None
    bad_steps: int
    elapsed_s: float
    steps_per_s: float
    final_loss: float | None


class _LossModule(nn.Module):
    """Routes `model.loss(batch)` through `forward`, so DDP's gradient hooks and accelerate's autocast apply."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        return self.model.loss(batch)


def validate_train_config(cfg: TrainConfig) -> None:
    """Raises ConfigError naming the first invalid `train.<field>`."""
    checks = [
        ("max_steps", cfg.max_steps >= 0, "must be >= 0"),
        ("batch_size", cfg.batch_size >= 1, "must be >= 1"),
        ("grad_accum_steps", cfg.grad_accum_steps >= 1, "must be >= 1"),
        ("lr", cfg.lr > 0, "must be > 0"),
        ("warmup_steps", cfg.warmup_steps >= 0, "must be >= 0"),
        ("lr_schedule", cfg.lr_schedule in SCHEDULES, f"must be one of {', '.join(SCHEDULES)}"),
        ("mixed_precision", cfg.mixed_precision in MIXED_PRECISION, f"must be one of {', '.join(MIXED_PRECISION)}"),
        ("ema_decay", 0.0 <= cfg.ema_decay < 1.0, "must be in [0, 1)"),
        ("checkpoint_every", cfg.checkpoint_every >= 1, "must be >= 1"),
        ("log_every", cfg.log_every >= 1, "must be >= 1"),
        ("max_bad_steps", cfg.max_bad_steps >= 1, "must be >= 1"),
        ("max_minutes", cfg.max_minutes is None or cfg.max_minutes > 0, "must be > 0 or null"),
        ("tracker", cfg.tracker in (None, "tensorboard"), "must be 'tensorboard' or null"),
    ]
    for name, ok, why in checks:
        if not ok:
            raise ConfigError(f"train.{name}: {getattr(cfg, name)!r} {why}")


def build_param_groups(model: nn.Module, cfg: TrainConfig) -> tuple[list[dict], list[list[str]]]:
    """Optimizer parameter groups without frozen parameters, and the parameter names of each group.

    `model.param_groups(cfg)` (optional) returns dicts with "params" plus per-group options (lr, weight_decay);
    frozen parameters in them are dropped. Every trainable parameter must be in exactly one group.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = model.param_groups(cfg) if hasattr(model, "param_groups") else [{"params": trainable}]
    seen: set[int] = set()
    out, out_names = [], []
    for g in groups:
        params = [p for p in g["params"] if p.requires_grad]
        for p in params:
            if id(p) in seen:
                raise ValueError(f"param_groups: {names.get(id(p))} is in two groups")
            seen.add(id(p))
        if params:
            out.append({**g, "params": params})
            out_names.append([names[id(p)] for p in params])
    left = [names[id(p)] for p in trainable if id(p) not in seen]
    if left:
        raise ValueError(f"param_groups: trainable parameter {left[0]} is in no group ({len(left)} missing)")
    return out, out_names


def _count(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def _fmt_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _flat_config(cfg: TrainConfig) -> dict[str, Any]:
    # tensorboard hparams accept scalars and strings only
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in to_dict(cfg).items()}


def _make_accelerator(cfg: TrainConfig, out_dir: Path, find_unused: bool):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    # accelerate keeps process-wide singletons; a second train() in one process (tests, notebooks) with another
    # precision or accumulation would otherwise be refused. The process group itself is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ConfigError("accelerate config: DeepSpeed is not supported by drivesim's training loop (its ZeRO "
                          "optimizer and engine bypass the loop's checkpoints, EMA and clipping); use FSDP "
                          "(docs/accelerate/fsdp.yaml) or DDP (docs/training.md)")
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with="tensorboard" if cfg.tracker else None,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
    )
    _fsdp_setup(accelerator)
    return accelerator


def _fsdp_setup(accelerator) -> None:
    """Refuse FSDP1, turn FSDP on for CPU processes, and set FSDP's mixed precision to the loop's.

    FSDP1 keeps flat parameters whose per-process views have lost their names' shapes; the loop's EMA, parameter
    groups and checkpoints need FSDP2's per-parameter `DTensor`s (`drivesim.training.sharding`).

    accelerate enters FSDP only on accelerator devices (its `AcceleratorState` switches MULTI_GPU, MULTI_XPU, ...
    to FSDP); on the CPU it would run DDP with an FSDP config, silently. FSDP2 runs over gloo, so the state is
    switched here: the config that shards a GPU run shards the CPU runs that test it.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if (wants_fsdp and accelerator.device.type == "cpu"
            and state.distributed_type in (DistributedType.MULTI_CPU, DistributedType.FSDP)):
        state.fsdp_plugin = FullyShardedDataParallelPlugin()
        state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if state.distributed_type != DistributedType.FSDP:
        return
    if state.fsdp_plugin.fsdp_version != 2:
        raise ConfigError(f"accelerate config: fsdp_version: {state.fsdp_plugin.fsdp_version} is not supported; "
                          "set fsdp_version: 2 (FSDP2, per-parameter sharding; docs/accelerate/fsdp.yaml)")
    if state.mixed_precision in ("bf16", "fp16"):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        # accelerate's FSDP2 policy computes in param_dtype without autocast and casts every forward input (box
        # coordinates too) to it, but the models make fp32 tensors inside (timestep embeddings) and expect autocast,
        # as under DDP. So: half-precision all-gathers (half the traffic and memory of a gathered block; torchtitan's
        # choice), inputs left as they are, the forward under autocast (`_gradients`), gradients reduce-scattered in
        # fp32 as DDP all-reduces them
        state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if state.mixed_precision == "bf16" else torch.float16,
            reduce_dtype=torch.float32, cast_forward_inputs=False)


def train(
    model: nn.Module,
    dataset: Any,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    collate_fn: Any = None,
    resume: bool = True,
    progress: bool = True,
    export: bool = True,
    allow_config_change: bool = False,
) -> TrainResult:
    """Train `model` on `dataset` for `cfg.max_steps` optimizer steps (or `cfg.max_minutes`), checkpointing to
    `out_dir/checkpoints/step_XXXXXX/` and exporting `out_dir/model` (+ `out_dir/model-ema`) at the end.

    Args:
        model: a registered drivesim model (`drivesim.registry.register_model`) with `.config` and
            `loss(batch) -> (scalar loss tensor, dict[str, float])`; optional `param_groups(cfg)` and
            `find_unused_parameters = True` (DDP, for models with conditionally unused parameters).
            Weights are whatever the caller initialised (seed before building for reproducible runs), or, for
            a fresh run with `cfg.init_from`, those of that exported checkpoint (fine-tuning).
        dataset: map-style dataset; batches are `collate_fn(list of samples)` (torch default collate if None),
            moved to the device with `accelerate.utils.send_to_device`.
        cfg: the training config (per-process batch size, see module docstring).
        out_dir: run folder (checkpoints/, logs/, model/, model-ema/).
        resume: continue from the latest complete checkpoint under `out_dir/checkpoints` if there is one; with
            False, an `out_dir` that already holds checkpoints is refused (ConfigError).
        progress: show the rich progress bar (main process only).
        export: write the inference checkpoints at the end.
        allow_config_change: resume even though `cfg` changes a field that alters the optimisation (lr, betas,
            weight_decay, batch_size, grad_accum_steps, warmup_steps, lr_schedule, grad_clip, mixed_precision,
            ema_decay, seed; max_steps under a cosine schedule): the run continues from the checkpoint's weights,
            moments and schedule position with the new values. Every start and resume, with the config and what
            changed, is appended to `out_dir/history.jsonl`.

    Returns:
        TrainResult.

    Raises:
        ConfigError: invalid training config, resume=False on a folder with checkpoints, or a resume whose config
            changes the optimisation without `allow_config_change` (names the field, old and new value; nothing
            is written).
        CheckpointError: the checkpoint to resume from (or `cfg.init_from`) is unreadable or belongs to another
            model/config.
        DataError: the dataset is smaller than one global batch.
        NonFiniteLossError: `cfg.max_bad_steps` consecutive steps had a non-finite loss or gradient; the last
            good checkpoint is left as the latest.
    """
    from accelerate.utils import DistributedType
    from diffusers.optimization import get_scheduler

    validate_train_config(cfg)
    out_dir = Path(out_dir)
    ckpt_root = out_dir / ckpt.CHECKPOINTS_DIR
    ckpt.model_class_name(model)  # fail before any work if the model is not registered
    accelerator = _make_accelerator(cfg, out_dir, bool(getattr(model, "find_unused_parameters", False)))
    rank, world = accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    console = _console() if is_main else None

    # per-process RNG streams (dropout, diffusion noise); data order has its own seeded stream
    _seed_all(cfg.seed + rank)

    latest = ckpt.latest_checkpoint(ckpt_root)
    changed = check_resume_config(latest, cfg, allow_config_change) if latest is not None and resume else {}
    if latest is None and cfg.init_from:
        # before the EMA copies the weights; a resumed run already holds the fine-tuned weights
        ckpt.init_weights(model, cfg.init_from)
    # FSDP2 shards dim 0 and refuses 0-dim parameters: those become (1,) under their names (`lift_scalars`)
    lifted = lift_scalars(model) if accelerator.distributed_type == DistributedType.FSDP else set()
    groups, group_names = build_param_groups(model, cfg)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    del groups  # under FSDP, prepare() replaces the parameters: the old full ones must not stay referenced
    scheduler = get_scheduler(SCHEDULES[cfg.lr_schedule], optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=max(cfg.max_steps, 1))
    # the new config's hyperparameters, for a resume that was allowed to change them
    fresh_groups = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups]

    state = {"step": 0, "epoch": 0, "position": 0, "bad_steps_total": 0}
    rng_to_restore = None
    if latest is not None and not resume:
        # training from scratch here would interleave two runs' step_* folders and break `latest` resolution
        raise ConfigError(f"{out_dir}: resume=False but the folder already holds checkpoints ({latest.name}); "
                          "resume or use another output folder")
    wrapper = _LossModule(model)
    wrapper, optimizer = accelerator.prepare(wrapper, optimizer)
    # after prepare: on the device, and under FSDP the sharded parameters (the EMA's shadows are sharded alike)
    model = accelerator.unwrap_model(wrapper).model
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    sharded = any(is_sharded(p) for p in model.parameters())
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if latest is not None:
        rng_to_restore = _resume(latest, state, accelerator, model, optimizer, group_names, scheduler, ema, rank)
        if any(k in OPTIMISATION_FIELDS or k == "max_steps" for k in changed):
            _continue_with_new_hyperparameters(optimizer, scheduler, fresh_groups)
    start_step = int(state["step"])
    if is_main:
        append_history(out_dir, event="resume" if latest is not None else "start", step=start_step, cfg=cfg,
                       checkpoint=latest, changed=changed, num_processes=world)
        if changed and console:
            console.print(f"{out_dir}: resuming with a changed config: " + ", ".join(
                f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()), highlight=False)

    if console:
        console.print(
            f"[bold]{ckpt.model_class_name(model)}[/bold]: trainable {_fmt_count(_count(trainable))} params "
            f"({len(trainable)} tensors), frozen {_fmt_count(_count(frozen))} params ({len(frozen)} tensors); "
            f"{world} process(es){' (FSDP2, parameters sharded)' if sharded else ''} on {accelerator.device}, "
            f"mixed precision {cfg.mixed_precision}, global batch "
            f"{cfg.batch_size * world * cfg.grad_accum_steps}"
            + (f"; resuming from {latest} (step {start_step})" if latest is not None else ""),
            highlight=False)

    stream = DataStream(dataset, cfg.batch_size, cfg.seed, rank, world, collate_fn=collate_fn,
                        num_workers=cfg.num_workers, epoch=int(state["epoch"]), position=int(state["position"]),
                        pin_memory=accelerator.device.type == "cuda")
    if cfg.tracker:
        accelerator.init_trackers("drivesim", config=_flat_config(cfg))

    def save(step: int) -> Path:
        # full tensors in the model's shapes, gathered one by one under FSDP (collectives: every process takes part,
        # the main one keeps them)
        model_state, ema_state = _full_states(model, ema, is_main, lifted)
        return ckpt.save_training_checkpoint(
            ckpt_root, step, model=model, model_state=model_state, ema_state=ema_state, optimizer=optimizer,
            optimizer_state=full_optimizer_state(optimizer, is_main, [n for g in group_names for n in g], lifted),
            group_names=group_names, scheduler=scheduler, train_config=cfg,
            trainer_state={"step": step, **stream.state(), "bad_steps_total": int(state["bad_steps_total"]),
                           "ema_updates": ema.num_updates if ema is not None else 0, "num_processes": world,
                           "scaler": _scaler_state(accelerator)},
            rank=rank, is_main=is_main, barrier=accelerator.wait_for_everyone, keep=cfg.keep_checkpoints)

    # restored last: nothing between here and the first step may draw from these generators
    if rng_to_restore is not None:
        ckpt.restore_rng(*rng_to_restore)

    step, consecutive_bad, bad_this_call = start_step, 0, 0
    last_saved = latest if latest is not None else None
    last_saved_step = start_step if latest is not None else -1
    stop_reason, final_loss = "max_steps", None
    t0 = time.monotonic()
    bar = _Progress(console, start_step, cfg.max_steps, cfg.max_minutes) if (progress and console) else None
    wrapper.train()
    try:
        while step < cfg.max_steps:
            loss_sum, logs_sum, grad_norm, bad = _gradients(accelerator, wrapper, stream, trainable, cfg, world)
            if bad:
                optimizer.zero_grad(set_to_none=True)
                consecutive_bad += 1
                bad_this_call += 1
                state["bad_steps_total"] += 1
                if consecutive_bad >= cfg.max_bad_steps:
                    raise NonFiniteLossError(
                        f"{out_dir}: loss: non-finite (NaN/inf) loss or gradient for {consecutive_bad} consecutive "
                        f"steps ({step - consecutive_bad + 2}..{step + 1}); stopped, latest good checkpoint: "
                        f"{last_saved or 'none'}")
            else:
                optimizer.step()
                if not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                    if ema is not None:
                        ema.update(model)
                optimizer.zero_grad(set_to_none=True)
                consecutive_bad = 0
                final_loss = loss_sum
            step += 1

            shown = None  # the loss reaches the host only on log steps
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                loss_value = float(loss_sum)
                shown = None if bad else loss_value
                logs = {"loss": loss_value, **logs_sum, "lr": scheduler.get_last_lr()[0],
                        "bad_steps": float(state["bad_steps_total"])}
                if grad_norm is not None:
                    logs["grad_norm"] = float(grad_norm)
                if world > 1:
                    logs["loss"] = accelerator.reduce(loss_sum, "mean").item()
                if cfg.tracker:
                    accelerator.log(logs, step=step)
            elapsed = time.monotonic() - t0
            if bar is not None:
                bar.update(step, shown, (step - start_step) / max(elapsed, 1e-9), elapsed)

            out_of_time = cfg.max_minutes is not None and elapsed > cfg.max_minutes * 60
            if world > 1:  # processes must agree, or one would wait forever in the next collective
                out_of_time = accelerator.reduce(torch.tensor(float(out_of_time), device=accelerator.device),
                                                 "sum").item() > 0
            # a checkpoint is only written after a good step, so a diverging run never overwrites a good one
            if consecutive_bad == 0 and (step % cfg.checkpoint_every == 0 or step == cfg.max_steps or out_of_time):
                last_saved, last_saved_step = save(step), step
            if out_of_time and step < cfg.max_steps:
                stop_reason = "max_minutes"
                break
    finally:
        if bar is not None:
            bar.close()
        if cfg.tracker:
            accelerator.end_training()
    elapsed = time.monotonic() - t0
    if last_saved_step != step and consecutive_bad == 0:
        last_saved = save(step)

    export_dir = ema_export_dir = None
    if export:
        finished_before = latest is not None and start_step >= cfg.max_steps
        export_dir, ema_export_dir = _export(out_dir, accelerator, model, ema, lifted, finished_before, is_main,
                                             console, start_step)
    if console:
        console.print(f"done: step {step} ({stop_reason}), {step - start_step} steps in {elapsed:.1f} s, "
                      f"{bad_this_call} skipped; checkpoint {last_saved}", highlight=False)
    return TrainResult(step=step, start_step=start_step, stop_reason=stop_reason, last_checkpoint=last_saved,
                       export_dir=export_dir, ema_export_dir=ema_export_dir, bad_steps=bad_this_call,
                       elapsed_s=elapsed, steps_per_s=(step - start_step) / max(elapsed, 1e-9),
                       final_loss=None if final_loss is None else float(final_loss))


def _resume(latest: Path, state: dict, accelerator, model: nn.Module, optimizer, group_names, scheduler,
            ema: EMA | None, rank: int):
    """Load the training checkpoint `latest` into the model, optimizer, scheduler, EMA and grad scaler and `state`
    (step, data position, bad-step count). Returns this rank's RNG state, to restore right before the first step."""
    loaded, has_rng = ckpt.load_training_checkpoint(latest, model=model, optimizer=optimizer, group_names=group_names,
                                                    scheduler=scheduler, ema=ema, rank=rank)
    state.update({k: loaded[k] for k in state})
    if ema is not None:
        ema.num_updates = int(loaded.get("ema_updates", 0))
    if accelerator.scaler is not None and loaded.get("scaler"):
        accelerator.scaler.load_state_dict(loaded["scaler"])
    if not has_rng:  # every rank reports its own: only the ranks beyond the old process count lack one
        print(f"{latest}: no RNG state for rank {rank} (the process count changed); its RNG is seeded afresh, "
              "so this resume is not bit-exact", file=sys.stderr)
    return loaded.pop("_rng", None)


def _gradients(accelerator, wrapper: nn.Module, stream: DataStream, trainable: list, cfg: TrainConfig, world: int):
    """Forward and backward of the `cfg.grad_accum_steps` micro-batches of one optimizer step, then clipping.

    No host sync per micro-batch: the loss is summed on the device and checked once. A non-finite loss still goes
    backward (its gradients are discarded by the caller), so every process runs the same collectives and the data
    order stays fixed.

    Returns:
        (loss: () tensor on the device, mean over micro-batches; the models' logs averaged; the gradient norm;
        bad: the loss or the gradient was not finite on some process, the one host sync of the step).
    """
    from accelerate.utils import DistributedType, send_to_device

    loss_sum = torch.zeros((), device=accelerator.device)
    nonfinite = torch.zeros((), device=accelerator.device)
    logs_sum: dict[str, float] = {}
    # accelerate wraps the forward in autocast itself, except under FSDP2 (see `_fsdp_setup`)
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    for _ in range(cfg.grad_accum_steps):
        batch = send_to_device(stream.next(), accelerator.device)
        with accelerator.accumulate(wrapper), accelerator.autocast() if fsdp else contextlib.nullcontext():
            loss, logs = wrapper(batch)
            accelerator.backward(loss)
            loss = loss.detach().float()
            nonfinite = nonfinite + (~torch.isfinite(loss)).float()
            loss_sum = loss_sum + torch.nan_to_num(loss) / cfg.grad_accum_steps
            for k, v in logs.items():
                logs_sum[k] = logs_sum.get(k, 0.0) + float(v) / cfg.grad_accum_steps
    grad_norm = accelerator.clip_grad_norm_(trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    if world > 1:  # every process skips together, so none waits in a collective the others left
        nonfinite = accelerator.reduce(nonfinite, "sum")
    if grad_norm is not None and accelerator.scaler is None:  # (with a scaler, it skips inf steps itself)
        # the norm of the all-reduced gradients: the same on every process
        grad_norm = torch.as_tensor(grad_norm, device=accelerator.device)
        nonfinite = nonfinite + (~torch.isfinite(grad_norm)).float()
    return loss_sum, logs_sum, grad_norm, bool(nonfinite.item() > 0)


def _full_states(model: nn.Module, ema: EMA | None, is_main: bool, lifted: set[str]):
    """(model state, EMA state or None): full tensors in the model's own shapes on the main process (empty dicts
    elsewhere); collectives under FSDP."""
    model_state = drop_lifted(gather_full(model.state_dict(), is_main), lifted)
    ema_state = drop_lifted(gather_full(ema.ema_state_dict(model), is_main), lifted) if ema is not None else None
    return model_state, ema_state


def _export(out_dir: Path, accelerator, model: nn.Module, ema: EMA | None, lifted: set[str], finished_before: bool,
            is_main: bool, console, start_step: int) -> tuple[Path | None, Path | None]:
    """Write the inference checkpoints out_dir/model (live weights) and out_dir/model-ema. A finished run run again
    keeps the exports it has (a later step may have written into them: `drivesim encode` records the autoencoder's
    scale factor in model/config.json); one killed between its two exports gets the missing one."""
    model_dir, ema_dir = out_dir / "model", out_dir / "model-ema"
    keep_model = finished_before and (model_dir / ckpt.CONFIG_NAME).is_file()
    keep_ema = finished_before and (ema_dir / ckpt.CONFIG_NAME).is_file()
    full, ema_full = _full_states(model, ema, is_main, lifted)  # every process gathers, whatever it then writes
    export_dir = ema_export_dir = None
    if is_main:
        export_dir = model_dir if keep_model else ckpt.save_model(model, model_dir, state_dict=full)
        if ema is not None:
            ema_export_dir = ema_dir if keep_ema else ckpt.save_model(model, ema_dir, state_dict=ema_full)
    accelerator.wait_for_everyone()
    if console and keep_model and (ema is None or keep_ema):
        console.print(f"{out_dir}: already finished at step {start_step}; nothing to do (exports kept)",
                      highlight=False)
    return export_dir, ema_export_dir


def _continue_with_new_hyperparameters(optimizer, scheduler, fresh_groups: list[dict]) -> None:
    """After an allowed config change: moments, step counts and the schedule position stay the checkpoint's; the
    hyperparameters (initial lr, betas, weight decay) and the schedule's base rates are the new config's, and the
    current lr is the new schedule at the restored position (loading the checkpoint had put the old ones back)."""
    for group, fresh in zip(optimizer.param_groups, fresh_groups, strict=True):
        group.update(fresh)
    scheduler.base_lrs = [fresh["initial_lr"] for fresh in fresh_groups]
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _scaler_state(accelerator) -> dict | None:
    if accelerator.scaler is None:
        return None
    return {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in accelerator.scaler.state_dict().items()}


def _console():
    from rich.console import Console

    return Console(soft_wrap=True)  # no hard wraps: log lines stay greppable


class _Progress:
    """Rich progress bar: step, loss, steps/s, ETA (main process only).

    The ETA is the sooner of the steps left at the measured rate and what is left of a `max_minutes` budget.
    """

    def __init__(self, console, start: int, total: int, max_minutes: float | None = None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.total, self.budget_s = total, None if max_minutes is None else max_minutes * 60
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} steps/s"),
            TextColumn("ETA {task.fields[eta]}"), console=console, transient=False)
        self.task = self.progress.add_task("train", total=total, completed=start, loss="-", rate="-", eta="-")
        self.progress.start()

    def update(self, step: int, loss: float | None, rate: float, elapsed: float) -> None:
        fields = {"rate": f"{rate:.2f}", "eta": format_eta(eta_seconds(step, self.total, rate, elapsed,
                                                                        self.budget_s))}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        self.progress.update(self.task, completed=step, **fields)

    def close(self) -> None:
        self.progress.stop()


def eta_seconds(step: int, total: int, rate: float, elapsed: float, budget_s: float | None) -> float | None:
    """Seconds left: (total - step) / rate (steps/s), capped by `budget_s - elapsed` when a time budget is set;
    None while the rate is unknown and there is no budget."""
    by_steps = (total - step) / rate if rate > 0 else None
    if budget_s is None:
        return by_steps
    by_budget = max(budget_s - elapsed, 0.0)
    return by_budget if by_steps is None else min(by_steps, by_budget)


def format_eta(seconds: float | None) -> str:
    """h:mm:ss, or "-" when unknown."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


__all__ = ["train", "TrainResult", "NonFiniteLossError", "build_param_groups", "validate_train_config"]
