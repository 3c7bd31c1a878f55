"""A training plan for a preset, computed without a GPU: parameters, FLOPs, memory per GPU and GPU-hours per stage.

`drivesim config plan PRESET` prints it. Everything that depends on the network is counted, not estimated: each
stage's model is built as its training stage builds it, and one training step (`model.loss(batch)` under bf16
autocast, then `backward`) runs on fake tensors at the per-GPU batch the preset trains with
(`drivesim.pipeline.step_cost`: FLOPs by `FlopCounterMode`, activations as the peak of the live bytes, gradients
excluded), with gradient checkpointing off and on.

The static memory follows what `drivesim.training.loop.train` keeps: fp32 parameters (accelerate's bf16 is autocast;
there is no separate master copy), fp32 gradients of the trainable parameters, AdamW's two fp32 moments, the EMA's
fp32 shadow of the trainable parameters (kept on the device: a full copy on every process under DDP, built from the
sharded parameters under FSDP), and under DDP the reducer's gradient buckets (accelerate leaves
`gradient_as_bucket_view` off: a second copy of the gradients). FSDP full-shard divides parameters, gradients,
optimizer state and the EMA by the number of GPUs; activations and the batch are per GPU.

Training scale (steps, per-GPU batch) is the preset's `train` block; the GPU counts are the paper's where it states
them (`STAGE_GPUS`). GPU-hours = steps x global batch x FLOPs per sample / (MFU x peak FLOP/s).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from drivesim.configs import Preset, get_preset, to_dict
from drivesim.errors import ConfigError
from drivesim.pipeline.stages import STAGE_NAMES
from drivesim.pipeline.step_cost import count_step

__all__ = ["AUTOENCODER_STAGES", "NOTES", "STAGE_GPUS", "STAGE_NAMES", "Plan", "StagePlan", "build_stage", "make_plan",
           "plan_stage", "write_plan_json"]

STAGE_GPUS: dict[str, tuple[int, str]] = {
    "autoencoder": (8, "not stated by the paper; 8 GPUs (one node) chosen"),
    "video_decoder": (8, "not stated by the paper; 8 GPUs (one node) chosen"),
    "image_ldm": (16, "SPEC.md section 1, training scale: key-frame LDM 73k steps, lr 1e-4, 40/GPU on 16 A100s"),
    "prediction": (16, "SPEC.md section 1, training scale: key-frame LDM 73k steps, 40/GPU on 16 A100s (the preset "
                       "trains the prediction model at that scale)"),
    "interpolation": (16, "not stated separately; the preset trains it at the key-frame LDM's scale (SPEC.md "
                          "section 1: 40/GPU on 16 A100s)"),
    "upsampler": (8, "SPEC.md section 1, training scale: upsampler 84k steps, lr 1e-5, 4/GPU on 8 A100s"),
}
"""GPUs each stage trains on (the global batch is the preset's per-GPU batch times this), with the source."""


# ---- stages ----------------------------------------------------------------------------------------------------


def _boxes(b: int, t: int, n: int) -> dict[str, torch.Tensor]:
    xy = torch.rand(b, t, n, 2) * 0.6
    wh = 0.05 + torch.rand(b, t, n, 2) * 0.3
    return {"boxes": torch.cat([xy, xy + wh], dim=-1), "classes": torch.randint(0, 10, (b, t, n)),
            "box_mask": torch.rand(b, t, n) < 0.5, "night": torch.randint(0, 2, (b,)),
            "crowdedness": torch.randint(0, 20, (b,))}


def _latent_batch(preset: Preset, b: int, t: int, unet) -> dict[str, torch.Tensor]:
    h, w = (r // 8 for r in preset.resolution)
    return {"latents": torch.randn(b, t, unet.in_channels, h, w), **_boxes(b, t, unet.boxes.max_boxes)}


def _with_checkpointing(cfg, checkpointing: bool | None):
    if checkpointing is None:
        return cfg
    return dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, gradient_checkpointing=checkpointing))


def build_stage(preset: Preset, stage: str, batch_size: int, checkpointing: bool | None = None,
                discriminator: bool = False) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model a stage trains (as `drivesim.pipeline.stages` builds it) and a batch of its training data.

    Call under `FakeTensorMode` for a plan (nothing is allocated) or without it for a real step. The video models
    are built from their config (`from_image_ldm` copies weights into the same modules and freezes the same ones);
    the video decoder likewise (`VideoAutoencoder.from_image`).

    Args:
        preset: the preset.
        stage: one of `STAGE_NAMES`.
        batch_size: samples per GPU (clips for the video stages).
        checkpointing: override the U-Net's `gradient_checkpointing` (None: the preset's; ignored by the
            autoencoders, which have none).
        discriminator: autoencoder stages: the step after `disc_start` (patch GAN on).

    Returns:
        (model, batch): the batch as the stage's dataset + collate deliver it (frames in [-1, 1]; latents; boxes
        normalised xyxy).
    """
    from drivesim.autoencoder import AutoencoderKL, VideoAutoencoder
    from drivesim.models.image_ldm import ImageLDM
    from drivesim.models.upsampler import Upsampler
    from drivesim.models.video_ldm import InterpolationLDM, PredictionLDM

    b = batch_size
    height, width = preset.resolution
    if stage in ("autoencoder", "video_decoder"):
        cfg = preset.autoencoder
        if discriminator:
            cfg = dataclasses.replace(cfg, disc_start=0)
        t = 1
        if stage == "video_decoder":
            cfg = dataclasses.replace(cfg, video_decoder=True)
            model, t = VideoAutoencoder(cfg), cfg.decode_chunk_frames
        else:
            model = AutoencoderKL(cfg)
        batch = {"frames": torch.rand(b, t, cfg.in_channels, height, width) * 2 - 1,
                 **_boxes(b, t, preset.image_ldm.unet.boxes.max_boxes)}
        return model, batch
    if stage == "image_ldm":
        cfg = _with_checkpointing(preset.image_ldm, checkpointing)
        return ImageLDM(cfg), _latent_batch(preset, b, 1, cfg.unet)
    if stage in ("prediction", "interpolation"):
        cfg = _with_checkpointing(getattr(preset, stage), checkpointing)
        model = (PredictionLDM if stage == "prediction" else InterpolationLDM)(cfg)
        batch = _latent_batch(preset, b, cfg.num_frames, cfg.unet)
        if stage == "interpolation":
            batch["interpolation_stage"] = torch.randint(0, 2, (b,))
        return model, batch
    if stage == "upsampler":
        cfg = _with_checkpointing(preset.upsampler, checkpointing)
        s = cfg.scale
        frames = torch.rand(b, cfg.chunk_frames, cfg.unet.out_channels, height * s, width * s) * 2 - 1
        return Upsampler(cfg), {"frames": frames}
    raise ConfigError(f"plan: unknown stage {stage!r} (stages: {', '.join(STAGE_NAMES)})")


AUTOENCODER_STAGES = ("autoencoder", "video_decoder")
"""Stages without a U-Net: no gradient checkpointing; a patch GAN from `autoencoder.disc_start` on."""


def _phases(preset: Preset, stage: str) -> list[tuple[str, bool, int]]:
    """(name, discriminator on, steps) of a stage's run: the autoencoders switch their GAN on at `disc_start`."""
    steps = preset.train[stage].max_steps
    if stage not in AUTOENCODER_STAGES:
        return [("all steps", False, steps)]
    before = min(preset.autoencoder.disc_start, steps)
    phases = [(f"first {before} steps (no discriminator)", False, before),
              (f"last {steps - before} steps (discriminator on)", True, steps - before)]
    return [p for p in phases if p[2] > 0] or phases[:1]


# ---- the plan --------------------------------------------------------------------------------------------------


@dataclass
class StagePlan:
    """One stage of the plan (bytes, FLOPs; memory per GPU). Keys of the per-variant dicts: "no_ckpt", "ckpt"
    (gradient checkpointing off / on; the autoencoders have none, so both are the same run)."""

    stage: str
    model_class: str
    trainable_params: int
    frozen_params: int
    buffer_bytes: int
    batch_per_gpu: int
    sample_unit: str
    gpus: int
    gpus_source: str
    steps: int
    phases: list[dict[str, Any]]
    flops_per_sample: dict[str, float]
    activation_bytes: dict[str, int]
    batch_bytes: int
    static_bytes: dict[str, int]
    per_gpu_bytes: dict[str, dict[str, int]]
    fits: dict[str, bool]
    gpu_hours: dict[str, float]
    wall_hours: dict[str, float]
    checkpointing_applies: bool
    preset_checkpointing: bool
    trace_seconds: float


@dataclass
class Plan:
    """The whole plan; `to_dict()` is the JSON written by `--json`."""

    preset: str
    precision: str
    mfu: float
    peak_flops: float
    fsdp_gpus: int
    gpu_memory_gib: float
    stages: list[StagePlan]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _param_counts(model: torch.nn.Module) -> tuple[int, int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return trainable, frozen, buffers


def plan_stage(preset: Preset, stage: str, *, precision: str = "bf16", mfu: float = 0.4, peak_flops: float = 312e12,
               fsdp_gpus: int = 8, gpu_memory_gib: float = 80.0, batch_size: int | None = None) -> StagePlan:
    """The plan of one stage (see the module docstring). `batch_size` overrides the preset's per-GPU batch."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    train = preset.train[stage]
    b = batch_size or train.batch_size
    gpus, source = STAGE_GPUS[stage]
    variants = {"no_ckpt": None} if stage in AUTOENCODER_STAGES else {"no_ckpt": False, "ckpt": True}
    phases, traces = [], {}
    t0 = time.perf_counter()
    counts = model_class = batch_bytes = None
    for name, disc, steps in _phases(preset, stage):
        per = {}
        for key, ckpt in variants.items():
            with FakeTensorMode():
                model, batch = build_stage(preset, stage, b, checkpointing=ckpt, discriminator=disc)
                if counts is None:
                    counts = _param_counts(model)
                    model_class = type(model).model_class_name
                    batch_bytes = sum(v.numel() * v.element_size() for v in batch.values())
                per[key] = count_step(model, batch, precision, fake=True)
                del model, batch
        if "ckpt" not in per:
            per["ckpt"] = per["no_ckpt"]
        traces[name] = per
        phases.append({"name": name, "steps": steps, "discriminator": disc,
                       **{f"flops_per_sample_{k}": v.flops / b for k, v in per.items()},
                       **{f"activation_bytes_{k}": v.activation_bytes for k, v in per.items()},
                       **{f"trace_seconds_{k}": v.seconds for k, v in per.items()}})
    trainable, frozen, buffers = counts
    total_steps = sum(p["steps"] for p in phases) or 1
    keys = ("no_ckpt", "ckpt")
    # FLOPs per sample averaged over the run's steps (the GAN phase of the autoencoders costs more)
    flops = {k: sum(p["steps"] * p[f"flops_per_sample_{k}"] for p in phases) / total_steps for k in keys}
    act = {k: max(t[k].activation_bytes for t in traces.values()) for k in keys}
    static = {"weights": 4 * (trainable + frozen) + buffers, "gradients": 4 * trainable,
              "adamw_moments": 8 * trainable, "ema": 4 * trainable, "ddp_buckets": 4 * trainable}
    per_gpu = {}
    for k in keys:
        shared = act[k] + batch_bytes
        per_gpu[f"ddp_{k}"] = {**static, "activations": act[k], "batch": batch_bytes,
                               "total": sum(static.values()) + act[k] + batch_bytes}
        sharded = {n: -(-static[n] // fsdp_gpus) for n in ("weights", "gradients", "adamw_moments", "ema")}
        per_gpu[f"fsdp_{k}"] = {**sharded, "ddp_buckets": 0, "activations": act[k],
                                "batch": batch_bytes, "total": sum(sharded.values()) + shared}
    global_batch = b * gpus
    hours = {k: sum(p["steps"] * global_batch * p[f"flops_per_sample_{k}"] for p in phases)
             / (mfu * peak_flops) / 3600 for k in keys}
    unit = "images" if stage in ("autoencoder", "image_ldm") else "clips"
    return StagePlan(
        stage=stage, model_class=model_class, trainable_params=trainable, frozen_params=frozen, buffer_bytes=buffers,
        batch_per_gpu=b, sample_unit=unit, gpus=gpus, gpus_source=source, steps=total_steps, phases=phases,
        flops_per_sample=flops, activation_bytes=act, batch_bytes=batch_bytes, static_bytes=static,
        per_gpu_bytes=per_gpu, fits={k: v["total"] <= gpu_memory_gib * 2**30 for k, v in per_gpu.items()},
        gpu_hours=hours, wall_hours={k: v / gpus for k, v in hours.items()},
        checkpointing_applies=len(variants) == 2,
        preset_checkpointing=stage not in AUTOENCODER_STAGES and getattr(preset, stage).unet.gradient_checkpointing,
        trace_seconds=time.perf_counter() - t0)


NOTES = [
    "FLOPs: FlopCounterMode on one fake training step (matmul, convolution, attention; elementwise ops not counted). "
    "With gradient checkpointing the recomputed forward is included.",
    "Activations: peak live bytes of a FakeTensorMode trace of the step at the per-GPU batch (bf16 autocast on the "
    "CPU op lists; CUDA autocast casts the same matmul/conv/attention ops), gradients excluded. Not included: the "
    "CUDA context and allocator fragmentation (budget ~1-3 GiB), cuDNN/attention workspaces, and under FSDP the "
    "all-gathered parameters of the units in flight.",
    "Static memory is what the training loop keeps: fp32 parameters (bf16 is autocast, no separate master copy), "
    "fp32 gradients, AdamW exp_avg + exp_avg_sq in fp32, the EMA's fp32 shadow of the trainable parameters (a full "
    "copy on every process under DDP, sharded like the parameters under FSDP), and under DDP the gradient buckets (a "
    "second gradient copy).",
    "Totals add the full gradients to the activation peak: an upper bound, since gradients fill in while "
    "activations are freed during backward.",
    "GPU-hours = steps x per-GPU batch x GPUs x FLOPs per sample / (MFU x peak); the autoencoders' steps after "
    "disc_start cost their GAN step.",
]


def make_plan(preset_name: str = "paper-512x1024", *, precision: str = "bf16", mfu: float = 0.4,
              peak_tflops: float = 312.0, fsdp_gpus: int = 8, gpu_memory_gib: float = 80.0,
              stages: tuple[str, ...] = STAGE_NAMES,
              progress: Callable[[str, StagePlan], None] | None = None) -> Plan:
    """Plan every stage of `preset_name` (see the module docstring).

    Args:
        preset_name: a preset of `drivesim.configs.PRESETS`.
        precision: "bf16" (the paper's) or "no".
        mfu: model FLOP utilisation the GPU-hours assume, in (0, 1].
        peak_tflops: the GPU's dense bf16 peak in TFLOP/s (A100: 312).
        fsdp_gpus: GPUs FSDP shards over.
        gpu_memory_gib: the GPU's memory in GiB, for the `fits` verdicts (total per GPU <= it; the CUDA context and
            fragmentation are not in the total, see `NOTES`).
        stages: the stages to plan (default all, in training order).
        progress: called with (stage, its plan) after each stage.

    Raises:
        ConfigError: unknown preset or stage, or an MFU / peak / GPU count out of range (one line, field named).
    """
    preset = get_preset(preset_name)
    if not 0 < mfu <= 1:
        raise ConfigError(f"plan: --mfu: must be in (0, 1], got {mfu}")
    if not peak_tflops > 0:
        raise ConfigError(f"plan: --peak-tflops: must be > 0, got {peak_tflops}")
    if fsdp_gpus < 1:
        raise ConfigError(f"plan: --gpus: must be >= 1, got {fsdp_gpus}")
    for s in stages:
        if s not in STAGE_NAMES:
            raise ConfigError(f"plan: unknown stage {s!r} (stages: {', '.join(STAGE_NAMES)})")
    t0 = time.perf_counter()
    out = Plan(preset=preset_name, precision=precision, mfu=mfu, peak_flops=peak_tflops * 1e12, fsdp_gpus=fsdp_gpus,
               gpu_memory_gib=gpu_memory_gib, stages=[], notes=list(NOTES))
    for s in stages:
        sp = plan_stage(preset, s, precision=precision, mfu=mfu, peak_flops=peak_tflops * 1e12, fsdp_gpus=fsdp_gpus,
                        gpu_memory_gib=gpu_memory_gib)
        out.stages.append(sp)
        if progress is not None:
            progress(s, sp)
    out.seconds = time.perf_counter() - t0
    return out


def write_plan_json(plan: Plan, path, command: str | None = None) -> None:
    """Write `plan.to_dict()` as JSON, atomically, with the command that made it, the torch version, the machine's
    load average (trace times depend on it) and the preset's resolved config."""
    import os
    import platform

    from drivesim.atomic import write_json_atomic

    env = {"torch": torch.__version__, "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
           "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    write_json_atomic(path, {"kind": "training_plan", "command": command, **plan.to_dict(), "environment": env,
                             "preset_config": to_dict(get_preset(plan.preset))})
