"""GPU check of a preset's stack in one run: bf16 training steps of every stage with MFU and peak memory, diffusers'
SVD U-Net at matched size, and a 16-frame sample through the x4 upsampler, inside a time budget.

    python benchmarks/gpu_check.py --preset paper-512x1024 --device cuda --out gpu_check.json [--budget-minutes 8]
    python benchmarks/gpu_check.py --preset tiny --device cpu --out /tmp/gpu_check.json   # CPU smoke run (the test
                                                                                          # adds flags shortening it)

What it measures (the JSON is rewritten after every part, so a run cut short keeps what it has):

- `peak`: the device's dense bf16 matmul throughput, measured in this run: `--matmul-size`^3 GEMMs
  (`mfu.matmul_fn`), `--matmul-calls` back to back per timing, synchronised, best of `--matmul-repeats`; again at
  the end (`peak_end`: a GPU that clocks down shows it). MFU is against the better of the two.
- `stages`: each training stage of `drivesim.pipeline.stages.STAGE_NAMES`, model and batch built by
  `drivesim.pipeline.plan.build_stage` at a small batch (default min(the preset's per-GPU batch, 8); `--batch-size`),
  gradient checkpointing as the preset says, moved to the device; the step the training loop runs:
  `model.loss(batch)` under bf16 autocast, backward, gradient clipping at `train.grad_clip`, AdamW on the loop's
  parameter groups, EMA update, zero_grad. `--warmup-steps`, then up to `--steps` timed steps, each synchronised.
  The autoencoder stages run the phase before `disc_start` (pinned there, so warm-up steps do not cross it) and,
  where the preset's run reaches it, the GAN phase as another row (`autoencoder_gan`).
  FLOPs per step: `drivesim.pipeline.step_cost` on a FakeTensorMode step of the same model and batch (the numerator
  `drivesim config plan` uses): `count_step`, whose activation and step peaks are recorded next to the measured
  ones, or `count_flops` alone with `--no-memory-trace`; the first warm-up step is also counted on the device
  (`flops_device_step`, a cross-check). MFU = FLOPs per step / median step time / measured bf16 peak; the optimizer
  and EMA are in the step time, not in the FLOPs, as usual for MFU.
- `unets`: diffusers' `UNetSpatioTemporalConditionModel` matched to the prediction U-Net as
  `benchmarks/unet_vs_svd.py` matches it (`svd_config`, `build`), and our `VideoUNet` with every parameter trainable
  built the same way, at the prediction stage's batch, checkpointing as the preset's prediction U-Net (diffusers'
  `enable_gradient_checkpointing`), MSE loss, the same step; FLOPs counted on the first warm-up step on the device.
  Skipped (with the reason) where the widths are not multiples of 32: diffusers hard-codes GroupNorm(32) (tiny).
- `sample`: `Upsampler.upsample`, as the rollout calls it, of `--sample-frames` random frames at the preset's
  key-frame resolution (`--sample-lowres`; paper: 128x256 -> 512x1024), `--sample-steps` sampler steps, in chunks
  of `upsampler.chunk_frames`; fp32 (what a rollout runs) and under bf16 autocast. A one-step, one-chunk call first
  warms up and counts the FLOPs of one network evaluation.

- `model_samples`: `--model-sample-steps` (default 2) sampler steps of each latent model at batch 1, freshly
  initialised, in fp32 on the stage's training batch (`build_stage`): the image LDM samples its frames, the
  prediction model continues the clip from its first frame (`predict`), the interpolation model fills the frames
  between the clip's key frames (`interpolate`, stage 1); time, peak memory, output finite. It checks that every
  model of the preset can sample at its size (the paper preset on a CPU: issue 20, item 2), not how well.

Run order (what the budget drops first is last): peak, stages, the GAN rows, svd_unet, fp32 sample, video_unet,
bf16 sample, model samples, peak_end.

Peak memory: CUDA: `torch.cuda.max_memory_allocated` over the timed steps (after warm-up, so the AdamW state exists
and the counted warm-up step, whose counter keeps activations longer, is excluded), `resident` = allocated just
before them (weights, optimizer state, EMA, batch), `step_peak` = peak - resident (activations + gradients +
temporaries). CPU: the same from `VmHWM` / `VmRSS` of this process, `VmHWM` reset through `/proc/self/clear_refs`
(if the kernel refuses, VmHWM is the process's peak so far: recorded as the method). RSS keeps memory the
allocator has freed and includes the Python runtime, so CPU numbers are indicative only.

Budget (`--budget-minutes`, counted once the imports are done): a part is skipped, with the reason, when the time
left is less than the longest part of its kind took so far; a training part stops its timed steps at its share of
the time left (at least one timed step). Every part ends `ok`, `skipped` (reason) or `error` (the exception, e.g.
out of memory; the run goes on). Writes `--out` (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, not the repo root
import _common  # noqa: E402
import mfu  # noqa: E402
import unet_vs_svd  # noqa: E402

START = time.monotonic()
DEFAULT_BATCH_CAP = 8
MATMUL_DEFAULTS = {"cuda": (8192, 50, 5), "cpu": (1024, 4, 3)}  # size, calls per timing, repeats
GROUPS = ("stages", "unets", "sample", "model_samples")  # result groups of parts (the rest: top-level keys)
PART_ORDER_NOTE = ("peak, stages, GAN-phase rows, svd_unet, fp32 sample, video_unet, bf16 sample, model samples, "
                   "peak_end")


# ---- device helpers ------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(seconds, result) of `fn()`, the device synchronised before and after."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _clear_refs() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Memory:
    """Peak memory of a stretch of work on `device` (see the module docstring for the methods)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.method = ("torch.cuda.max_memory_allocated since a reset (tensors only; reserved by the caching "
                           "allocator also recorded)")
        elif _clear_refs():
            self.method = "VmHWM of this process after a reset through /proc/self/clear_refs (RSS, whole process)"
        else:
            self.method = "VmHWM of this process, not resettable here: the process's peak so far (an upper bound)"

    def cleanup(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def reset(self) -> int:
        """Start a new peak; returns the bytes resident now."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        _clear_refs()
        return _common.vm_rss_bytes()

    def peak(self) -> dict:
        if self.device.type == "cuda":
            return {"peak_bytes": torch.cuda.max_memory_allocated(self.device),
                    "peak_reserved_bytes": torch.cuda.max_memory_reserved(self.device)}
        return {"peak_bytes": _common.vm_hwm_bytes()}


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": p.name, "capability": f"{p.major}.{p.minor}", "total_memory_bytes":
                p.total_memory, "multiprocessors": p.multi_processor_count, "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(), "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "cudnn_benchmark": torch.backends.cudnn.benchmark}
    return {"type": device.type, "name": _common.machine()["cpu"], "torch_threads": torch.get_num_threads()}


# ---- budget ----------------------------------------------------------------------------------------------------


class Budget:
    """Seconds left of `--budget-minutes`, and what each kind of part has cost so far."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.longest: dict[str, float] = {}

    def left(self) -> float:
        return self.seconds - (time.monotonic() - START)

    def skip_reason(self, kind: str) -> str | None:
        need = self.longest.get(kind, 0.0)
        left = self.left()
        if left <= 0 or left < need:
            return (f"time budget: {max(left, 0):.0f} s of {self.seconds:.0f} s left, the longest {kind} part so far "
                    f"took {need:.0f} s")
        return None

    def done(self, kind: str, seconds: float) -> None:
        self.longest[kind] = max(self.longest.get(kind, 0.0), seconds)


# ---- parts -----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    device: torch.device
    precision: str
    warmup_steps: int
    steps: int
    budget: Budget
    memory_trace: bool  # also trace the step's live bytes on fake tensors (count_step), not only its FLOPs
    parts_left: int  # parts not run yet (this one included): a training part's share of the time left

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")


def _train(model: torch.nn.Module, groups: list[dict], loss_fn: Callable[[], torch.Tensor], train_cfg,
           ctx: Context) -> dict:
    """Warm-up + timed training steps (the loop's step; see the module docstring); times, memory, device FLOPs."""
    from drivesim.pipeline.step_cost import flop_counter
    from drivesim.training.ema import EMA

    trainable = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=train_cfg.lr, betas=train_cfg.betas, weight_decay=train_cfg.weight_decay)
    ema = EMA(model, train_cfg.ema_decay) if train_cfg.ema_decay > 0 else None
    clip = train_cfg.grad_clip if train_cfg.grad_clip > 0 else math.inf
    model.train()

    def step(count: bool = False):
        counter = flop_counter() if count else contextlib.nullcontext()
        with counter:
            with ctx.autocast():
                loss = loss_fn()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, clip)
        opt.step()
        if ema is not None:
            ema.update(model)
        opt.zero_grad(set_to_none=True)
        return loss.detach().float(), counter

    memory = Memory(ctx.device)
    share = max(ctx.budget.left(), 0.0) / max(ctx.parts_left, 1)
    t0 = time.monotonic()
    warm = []
    flops_device = None
    for i in range(max(ctx.warmup_steps, 1)):
        dt, (loss, counter) = _timed(lambda i=i: step(count=i == 0), ctx.device)
        warm.append(dt)
        if i == 0:
            flops_device = int(counter.get_total_flops())
    resident = memory.reset()
    times, losses = [], []
    while len(times) < ctx.steps:
        dt, (loss, _) = _timed(step, ctx.device)
        times.append(dt)
        losses.append(float(loss))
        if time.monotonic() - t0 > share or ctx.budget.left() <= 0:
            break
    mem = memory.peak()
    return {"trainable_params": sum(p.numel() for p in trainable),
            "frozen_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
            "optimizer": f"AdamW (lr {train_cfg.lr}, betas {list(train_cfg.betas)}, weight decay "
                         f"{train_cfg.weight_decay}), grad clip {train_cfg.grad_clip}, EMA decay {train_cfg.ema_decay}",
            "flops_device_step": flops_device, "warmup_times_s": warm, "step_times_s": times,
            "timed_steps": len(times), "timed_steps_requested": ctx.steps,
            **_common.summary(times), "losses": losses, "loss_finite": all(math.isfinite(v) for v in losses),
            "memory": {"method": memory.method, "resident_bytes": resident, **mem,
                       "step_peak_bytes": mem["peak_bytes"] - resident}}


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _stage_preset(preset, gan: bool | None):
    """The preset with the autoencoder's GAN phase pinned: off (disc_start never reached) or None (unchanged)."""
    if gan is False:
        return dataclasses.replace(preset, autoencoder=dataclasses.replace(preset.autoencoder, disc_start=10**12))
    return preset


def stage_part(preset, stage: str, gan: bool | None, batch_size: int, ctx: Context) -> dict:
    """One training stage (see the module docstring, part 2)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from drivesim.pipeline.plan import build_stage
    from drivesim.pipeline.step_cost import count_flops, count_step
    from drivesim.training.loop import build_param_groups

    p = _stage_preset(preset, gan)
    t0 = time.perf_counter()
    with FakeTensorMode():
        fake_model, fake_batch = build_stage(p, stage, batch_size, discriminator=bool(gan))
        if ctx.memory_trace:
            trace = count_step(fake_model, fake_batch, ctx.precision, fake=True)
            flops, counted = trace.flops, {"counted_activation_bytes": trace.activation_bytes,
                                           "counted_step_peak_bytes": trace.step_peak_bytes}
        else:
            flops, counted = count_flops(fake_model, fake_batch, ctx.precision, fake=True), {}
        del fake_model, fake_batch
    count_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, batch = build_stage(p, stage, batch_size, discriminator=bool(gan))
    model.to(ctx.device)
    batch = _to(batch, ctx.device)
    build_s = time.perf_counter() - t0
    train_cfg = preset.train[stage]
    groups, _ = build_param_groups(model, train_cfg)
    unet = getattr(getattr(p, stage, None), "unet", None)
    out = {"stage": stage, "model_class": type(model).model_class_name, "batch_size": batch_size,
           "sample_unit": "images" if stage in ("autoencoder", "image_ldm") else "clips",
           "batch_shapes": {k: list(v.shape) for k, v in batch.items() if isinstance(v, torch.Tensor)},
           "gradient_checkpointing": None if unet is None else unet.gradient_checkpointing,
           "flops_per_step": flops, "flops_per_sample": flops / batch_size,
           "flops_source": "drivesim.pipeline.step_cost on a FakeTensorMode step (FlopCounterMode)",
           **counted, "count_s": count_s, "build_s": build_s}
    if stage in ("autoencoder", "video_decoder"):
        out["phase"] = "GAN on (disc_start reached)" if gan else "before disc_start (no discriminator)"
    out.update(_train(model, groups, lambda: model.loss(batch)[0], train_cfg, ctx))
    return out


def svd_unfit(preset) -> str | None:
    """Why diffusers' SVD U-Net cannot be matched to this preset's prediction U-Net, or None."""
    widths = unet_vs_svd.svd_config(preset)["block_out_channels"]
    if any(c % 32 for c in widths):
        return (f"diffusers' UNetSpatioTemporalConditionModel hard-codes GroupNorm(32 groups); the matched widths "
                f"{list(widths)} are not multiples of 32")
    return None


def unet_part(which: str, preset, batch_size: int, ctx: Context) -> dict:
    """diffusers' SVD U-Net ("svd") or our VideoUNet, all trainable ("ours"), as `unet_vs_svd` builds them."""
    import torch.nn.functional as F

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, forward, target = unet_vs_svd.build(which, preset, batch_size, device=ctx.device)
    ckpt = preset.prediction.unet.gradient_checkpointing
    if which == "svd" and ckpt:
        model.enable_gradient_checkpointing()
    build_s = time.perf_counter() - t0
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    out = {"model_class": type(model).__name__, "matched_to": "prediction U-Net (benchmarks/unet_vs_svd.py)",
           "batch_size": batch_size, "sample_unit": "clips", "num_frames": preset.prediction.num_frames,
           "gradient_checkpointing": ckpt, "build_s": build_s, "loss": "MSE of the network output"}
    if which == "svd":
        out["svd_config"] = {k: list(v) if isinstance(v, tuple) else v
                             for k, v in unet_vs_svd.svd_config(preset).items()}
    out.update(_train(model, groups, lambda: F.mse_loss(forward().float(), target), preset.train["prediction"], ctx))
    out["flops_per_step"] = out["flops_device_step"]
    out["flops_per_sample"] = out["flops_per_step"] / batch_size
    out["flops_source"] = "FlopCounterMode on the first warm-up step on the device (drivesim step_cost.flop_counter)"
    return out


def sample_part(preset, precision: str, frames: int, steps: int, ctx: Context,
                lowres: tuple[int, int] | None = None) -> dict:
    """`Upsampler.upsample` of a `frames`-frame random video of `lowres` (default: the key-frame resolution)."""
    from drivesim.models.upsampler import Upsampler
    from drivesim.pipeline.step_cost import flop_counter

    cfg = preset.upsampler
    h, w = lowres or preset.resolution
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = Upsampler(cfg).to(ctx.device).eval()
    build_s = time.perf_counter() - t0
    low = torch.rand(1, frames, 3, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1
    chunk = cfg.chunk_frames
    memory = Memory(ctx.device)
    amp = precision == "bf16"
    autocast = lambda: torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp)
    with autocast(), flop_counter() as counter:  # one network evaluation of one full chunk
        warm_s, _ = _timed(lambda: model.upsample(low[:, :chunk], steps=1, generator=torch.Generator().manual_seed(1)),
                           ctx.device)
    flops_per_eval = int(counter.get_total_flops())
    resident = memory.reset()
    with autocast():
        seconds, video = _timed(lambda: model.upsample(low, steps=steps, generator=torch.Generator().manual_seed(0)),
                                ctx.device)
    mem = memory.peak()
    chunks = math.ceil(frames / chunk)
    evals = chunks * steps
    full = frames % chunk == 0
    out = {"precision": "bf16 autocast" if amp else "fp32 (as a rollout runs it)",
           "input_shape": list(low.shape), "output_shape": list(video.shape), "scale": cfg.scale,
           "frames": frames, "steps": steps, "sampler": cfg.diffusion.sampler, "chunk_frames": chunk,
           "network_evaluations": evals, "trainable_params": sum(p.numel() for p in model.parameters()),
           "build_s": build_s, "warmup_s": warm_s, "seconds": seconds, "s_per_frame": seconds / frames,
           "s_per_network_evaluation": seconds / evals, "output_finite": bool(torch.isfinite(video).all()),
           "flops_per_network_evaluation": flops_per_eval,
           "flops_total": flops_per_eval * evals if full else None,
           "flops_source": "FlopCounterMode on the warm-up call (one step of one full chunk) on the device",
           "memory": {"method": memory.method, "resident_bytes": resident, **mem,
                      "step_peak_bytes": mem["peak_bytes"] - resident}}
    if out["flops_total"]:
        out["achieved_flops_per_s"] = out["flops_total"] / seconds
        out["mfu_applies"] = amp  # against the bf16 peak: meaningful for the bf16 sample only
    return out


SAMPLED_STAGES = ("image_ldm", "prediction", "interpolation")


def model_sample_part(preset, stage: str, steps: int, ctx: Context) -> dict:
    """`steps` sampler steps of a freshly initialised latent model at batch 1 (see the module docstring)."""
    from drivesim.models.image_ldm import ImageLDM
    from drivesim.pipeline.plan import build_stage

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, batch = build_stage(preset, stage, 1)
    model.to(ctx.device).eval()
    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    memory = Memory(ctx.device)
    resident = memory.reset()
    if stage == "image_ldm":
        x0, cond = ImageLDM.images_from_batch(batch)
        call = lambda: model.sample(cond, tuple(x0.shape[-2:]), steps=steps, generator=gen)  # noqa: E731
        what = "frames of the batch as independent images"
    else:
        x0, cond = model.clip_from_batch(batch)
        if stage == "prediction":
            call = lambda: model.predict(cond, x0[:, :1], steps=steps, generator=gen)  # noqa: E731
            what = "the clip continued from its first latent frame"
        else:
            keys = x0[:, model.key_frame_mask(x0.shape[1])]
            call = lambda: model.interpolate(cond, keys, 1, steps=steps, generator=gen)  # noqa: E731
            what = "frames between the clip's key frames filled (stage 1)"
    seconds, out = _timed(call, ctx.device)
    mem = memory.peak()
    return {"stage": stage, "model_class": type(model).model_class_name, "what": what, "steps": steps,
            "sampler": model.config.diffusion.sampler, "precision": "fp32", "batch_size": 1,
            "output_shape": list(out.shape), "params": sum(p.numel() for p in model.parameters()),
            "build_s": build_s, "seconds": seconds, "output_finite": bool(torch.isfinite(out).all()),
            "memory": {"method": memory.method, "resident_bytes": resident, **mem,
                       "step_peak_bytes": mem["peak_bytes"] - resident}}


def peak_part(ctx: Context, n: int, calls: int, repeats: int) -> dict:
    """Dense bf16 matmul throughput of the device (part 1)."""
    mm, flops = mfu.matmul_fn(n, torch.bfloat16, ctx.device)

    def run():
        for _ in range(calls):
            mm()

    warm_s, _ = _timed(run, ctx.device)
    times = [_timed(run, ctx.device)[0] for _ in range(repeats)]
    return {"matmul_size": n, "calls_per_timing": calls, "flops_per_call": flops, "warmup_s": warm_s,
            "times_s": times, "peak_flops_per_s": calls * flops / min(times),
            "median_flops_per_s": calls * flops / _common.summary(times)["median_s"],
            "method": f"{calls} bf16 {n}x{n} @ {n}x{n} matmuls back to back, synchronised, best of {repeats}"}


# ---- driver ----------------------------------------------------------------------------------------------------


def _batch_sizes(preset, override: int | None) -> dict[str, int]:
    from drivesim.pipeline.stages import STAGE_NAMES

    return {s: override or min(preset.train[s].batch_size, DEFAULT_BATCH_CAP) for s in STAGE_NAMES}


def plan_parts(preset, args, ctx: Context) -> list[tuple[str, str, str, Callable[[], dict]]]:
    """(group, key, kind, run) of every part, in run order."""
    from drivesim.pipeline.stages import STAGE_NAMES

    b = _batch_sizes(preset, args.batch_size)
    parts, gan_parts = [], []
    for stage in STAGE_NAMES:
        if stage not in ("autoencoder", "video_decoder"):
            parts.append(("stages", stage, "train", lambda s=stage: stage_part(preset, s, None, b[s], ctx)))
            continue
        disc_start = preset.autoencoder.disc_start
        if disc_start > 0:
            parts.append(("stages", stage, "train", lambda s=stage: stage_part(preset, s, False, b[s], ctx)))
        if disc_start < preset.train[stage].max_steps:  # the preset's run reaches its GAN phase
            key = f"{stage}_gan" if disc_start > 0 else stage
            gan_parts.append(("stages", key, "train", lambda s=stage: stage_part(preset, s, True, b[s], ctx)))
    pb = b["prediction"]
    sf, ss, low = args.sample_frames, args.sample_steps, args.sample_lowres
    return [*parts, *gan_parts,
            ("unets", "svd_unet", "train", lambda: unet_part("svd", preset, pb, ctx)),
            ("sample", "fp32", "sample", lambda: sample_part(preset, "fp32", sf, ss, ctx, low)),
            ("unets", "video_unet", "train", lambda: unet_part("ours", preset, pb, ctx)),
            ("sample", "bf16", "sample", lambda: sample_part(preset, "bf16", sf, ss, ctx, low)),
            *[("model_samples", f"sample_{stage}", "model_sample",
               lambda s=stage: model_sample_part(preset, s, args.model_sample_steps, ctx)) for stage in SAMPLED_STAGES]]


def _finish(result: dict) -> None:
    """MFU of every measured part against the best measured peak."""
    peaks = [p["peak_flops_per_s"] for p in (result.get("peak"), result.get("peak_end"))
             if p and p.get("status") == "ok"]
    peak = max(peaks) if peaks else None
    result["peak_flops_per_s"] = peak
    for group in ("stages", "unets"):
        for rec in result[group].values():
            if rec.get("status") != "ok":
                continue
            rec["achieved_flops_per_s"] = rec["flops_per_step"] / rec["median_s"]
            rec["samples_per_s"] = rec["batch_size"] / rec["median_s"]
            rec["mfu"] = rec["achieved_flops_per_s"] / peak if peak else None
    for rec in result["sample"].values():
        if rec.get("status") == "ok" and rec.get("mfu_applies"):
            rec["mfu"] = rec["achieved_flops_per_s"] / peak if peak else None


def _gib(n: float | None) -> str:
    return "" if n is None else f"{n / 2**30:.2f}"


def _si(v: float | None, unit: str) -> str:
    if v is None:
        return ""
    for prefix, div in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.2f} {prefix}{unit}"
    return f"{v:.2f} {unit}"


def print_table(result: dict) -> None:
    rows = []
    for group in ("stages", "unets"):
        for key, r in result[group].items():
            if r.get("status") != "ok":
                rows.append([key, "", "", "", "", "", "", "", f"{r['status']}: {r.get('reason', '')}"[:70]])
                continue
            rows.append([key, r["batch_size"], f"{(r['trainable_params'] + r['frozen_params']) / 1e6:.1f}M",
                         _si(r["flops_per_step"], "FLOP"), f"{r['median_s'] * 1e3:.1f} ({r['timed_steps']})",
                         _si(r["achieved_flops_per_s"], "FLOP/s"),
                         "" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%", _gib(r["memory"]["peak_bytes"]),
                         "ok" if r["loss_finite"] else "ok, loss not finite"])
    for key, r in result["sample"].items():
        name = f"upsample {key}"
        if r.get("status") != "ok":
            rows.append([name, "", "", "", "", "", "", "", f"{r['status']}: {r.get('reason', '')}"[:70]])
            continue
        shape = "x".join(map(str, r["output_shape"][1:2] + r["output_shape"][3:]))
        rows.append([name, f"{shape}, {r['steps']} steps", f"{r['trainable_params'] / 1e6:.1f}M",
                     _si(r["flops_total"], "FLOP"), f"{r['seconds'] * 1e3:.0f} (total)",
                     _si(r.get("achieved_flops_per_s"), "FLOP/s"),
                     "" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%", _gib(r["memory"]["peak_bytes"]),
                     "ok" if r["output_finite"] else "ok, output not finite"])
    for key, r in result["model_samples"].items():
        if r.get("status") != "ok":
            rows.append([key, "", "", "", "", "", "", "", f"{r['status']}: {r.get('reason', '')}"[:70]])
            continue
        shape = "x".join(map(str, r["output_shape"][1:2] + r["output_shape"][3:]))
        rows.append([key, f"1 ({shape}), {r['steps']} steps", f"{r['params'] / 1e6:.1f}M", "",
                     f"{r['seconds'] * 1e3:.0f} (total)", "", "", _gib(r["memory"]["peak_bytes"]),
                     "ok" if r["output_finite"] else "ok, output not finite"])
    d = result["device"]
    peak = result["peak_flops_per_s"]
    _common.table(f"GPU check, {result['preset']}, {d['name']} ({d['type']}), bf16 peak measured "
                  f"{_si(peak, 'FLOP/s')}; {result['elapsed_s']:.0f} s of a {result['budget_s']:.0f} s budget",
                  ["part", "batch", "params", "FLOPs/step", "median ms (steps)", "achieved", "MFU",
                   "peak GiB", "status"], rows)


def _hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 128x256, got {text!r}") from None
    return h, w


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper-512x1024")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="gpu_check.json", help="JSON path (rewritten after every part)")
    ap.add_argument("--budget-minutes", type=float, default=8.0)
    ap.add_argument("--batch-size", type=int, default=None,
                    help=f"per stage (default: min(the preset's per-GPU batch, {DEFAULT_BATCH_CAP}))")
    ap.add_argument("--precision", choices=("bf16", "no"), default="bf16")
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per part (at most)")
    ap.add_argument("--sample-frames", type=int, default=16)
    ap.add_argument("--sample-steps", type=int, default=4)
    ap.add_argument("--model-sample-steps", type=int, default=2,
                    help="sampler steps of each latent model's batch-1 sample (model_samples)")
    ap.add_argument("--sample-lowres", type=_hw, default=None,
                    help="HxW of the low-resolution video (default: the preset's key-frame resolution)")
    ap.add_argument("--matmul-size", type=int, default=None, help="default 8192 on CUDA, 1024 on a CPU")
    ap.add_argument("--matmul-calls", type=int, default=None)
    ap.add_argument("--matmul-repeats", type=int, default=None)
    ap.add_argument("--no-memory-trace", dest="memory_trace", action="store_false",
                    help="count only the FLOPs on fake tensors, not the step's live bytes (halves the counting time)")
    ap.add_argument("--only", default=None, help="comma-separated part keys to run (e.g. prediction,svd_unet,fp32); "
                    "the others are recorded as skipped")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from drivesim.atomic import write_json_atomic
    from drivesim.configs import get_preset

    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    preset = get_preset(args.preset)
    budget = Budget(60 * args.budget_minutes)
    ctx = Context(device=device, precision=args.precision, warmup_steps=args.warmup_steps, steps=args.steps,
                  budget=budget, memory_trace=args.memory_trace, parts_left=1)
    n, calls, repeats = MATMUL_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    n, calls, repeats = args.matmul_size or n, args.matmul_calls or calls, args.matmul_repeats or repeats
    result: dict = {
        "benchmark": "gpu_check", "command": "python benchmarks/gpu_check.py " + " ".join(argv or sys.argv[1:]),
        "preset": args.preset, "device": device_info(device), "machine": _common.machine(),
        "precision": args.precision, "budget_s": budget.seconds, "batch_sizes": _batch_sizes(preset, args.batch_size),
        "warmup_steps": args.warmup_steps, "steps_requested": args.steps, "part_order": PART_ORDER_NOTE,
        "mfu_method": "FLOPs per step (FlopCounterMode: matmul, convolution, attention) / median step time / the "
                      "best bf16 matmul throughput measured in this run (peak, peak_end)",
        "peak": {}, "stages": {}, "unets": {}, "sample": {}, "model_samples": {}, "peak_end": {},
        "peak_flops_per_s": None, "elapsed_s": 0.0}

    def write():
        _finish(result)
        result["elapsed_s"] = time.monotonic() - START
        write_json_atomic(args.out, result)

    def run(group: str, key: str, kind: str, fn: Callable[[], dict], parts_left: int) -> None:
        target = result[group] if group in GROUPS else result
        reason = None
        if args.only and key not in args.only.split(",") and kind != "peak":
            reason = "not selected (--only)"
        elif key == "svd_unet":
            reason = svd_unfit(preset) or budget.skip_reason(kind)
        elif kind != "peak":
            reason = budget.skip_reason(kind)
        if reason:
            rec = {"status": "skipped", "reason": reason}
        else:
            ctx.parts_left = parts_left
            print(f"[{time.monotonic() - START:6.1f} s] {group}/{key} ...", flush=True)
            t0 = time.monotonic()
            try:
                rec = {"status": "ok", **fn()}
            except Exception as e:  # recorded; the other parts still run (e.g. one out of memory)
                rec = {"status": "error", "reason": f"{type(e).__name__}: {str(e)[:2000]}"}
            rec["seconds_total"] = time.monotonic() - t0
            budget.done(kind, rec["seconds_total"])
            Memory(device).cleanup()
        if group in GROUPS:
            target[key] = rec
        else:
            result[key] = rec
        write()

    run("top", "peak", "peak", lambda: peak_part(ctx, n, calls, repeats), 1)
    parts = plan_parts(preset, args, ctx)
    for i, (group, key, kind, fn) in enumerate(parts):
        run(group, key, kind, fn, len(parts) - i)
    run("top", "peak_end", "peak", lambda: peak_part(ctx, n, calls, repeats), 1)
    print_table(result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
