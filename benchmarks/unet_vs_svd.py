"""Video U-Net training step (forward + backward): drivesim `VideoUNet` vs diffusers' SVD U-Net, on this CPU.

    python benchmarks/unet_vs_svd.py [--preset cpu-small] [--batch-size 2] [--repeats 9] [--profile]

Both models are built from the same preset's `prediction` block (cpu-small: latent 4x16x32, 6 frames), in the
same process, and timed alternately (round-robin, median of `--repeats`), in fp32 and under bf16 autocast.
Peak memory is the `VmHWM` (peak resident set) of a fresh subprocess per model and precision that builds the
model and runs `--memory-steps` training steps; the step's own peak is that minus the RSS measured right before
the first step (model, inputs and the Python/torch runtime already resident).

How diffusers' `UNetSpatioTemporalConditionModel` is matched to our `VideoUNet` (`svd_config`):
- channels: `block_out_channels = model_channels * channel_mult` (cpu-small: 64, 128, 128);
- depth: `layers_per_block = num_res_blocks` (diffusers' decoder levels get one more, as ours do);
- attention placement: a level with downsampling factor 2^i in `attention_resolutions` is a
  `CrossAttn{Down,Up}BlockSpatioTemporal`, other levels are plain `{Down,Up}BlockSpatioTemporal`; the middle
  block has attention in both; `transformer_layers_per_block = 1` (one spatial + one temporal transformer);
- heads: `num_attention_heads = channels // num_head_channels` per level (head width 32 in both);
- in/out channels 4 (SVD's default 8 concatenates the conditioning image's latents; we have none);
- `num_frames` = the preset's `prediction.num_frames`; both get the same (b, t, 4, h, w) latents;
- conditioning: our box tokens are `max_boxes` tokens of `token_dim` per frame, so SVD gets
  `encoder_hidden_states` (b, max_boxes, token_dim) (`cross_attention_dim = token_dim`; it repeats them per
  frame itself), i.e. the same number and width of conditioning tokens; `added_time_ids` (b, 3) (fps id, motion
  bucket, noise augmentation) with `addition_time_embed_dim = model_channels` and
  `projection_class_embeddings_input_dim = 3 * model_channels`; `image_only_indicator` is SVD's default zeros.
- Ours runs with every parameter trainable (`temporal.train_spatial = True`), as diffusers' model does; the row
  "ours (spatial frozen)" is the real prediction-stage setting.

The blocks are not identical: SVD's transformer blocks carry GEGLU feed-forwards (spatial and temporal, plus a
temporal `ff_in`) and cross-attention where ours has self-attention + GLIGEN gated box attention (with a GELU
feed-forward) + temporal self-attention. The table therefore also gives each model's parameter count and its
counted FLOPs per step (`torch.utils.flop_counter.FlopCounterMode`), and time per GFLOP.

Target: ours <= 0.67x their step time at equal (or lower) memory. Writes
benchmarks/results/unet_vs_svd.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling `_common` module, not the repo root
import _common  # noqa: E402

TARGET_RATIO = 0.67


def _preset(name: str):
    from drivesim.configs import get_preset

    return get_preset(name)


def svd_config(preset) -> dict:
    """diffusers `UNetSpatioTemporalConditionModel` kwargs matched to `preset.prediction` (see module docstring)."""
    ucfg = preset.prediction.unet
    channels = [ucfg.model_channels * m for m in ucfg.channel_mult]
    attn = [2**level in ucfg.attention_resolutions for level in range(len(channels))]
    return dict(
        in_channels=ucfg.in_channels,
        out_channels=ucfg.out_channels,
        down_block_types=tuple("CrossAttnDownBlockSpatioTemporal" if a else "DownBlockSpatioTemporal" for a in attn),
        up_block_types=tuple("CrossAttnUpBlockSpatioTemporal" if a else "UpBlockSpatioTemporal"
                             for a in reversed(attn)),
        block_out_channels=tuple(channels),
        layers_per_block=ucfg.num_res_blocks,
        transformer_layers_per_block=1,
        num_attention_heads=tuple(c // ucfg.num_head_channels for c in channels),
        cross_attention_dim=ucfg.boxes.token_dim,
        addition_time_embed_dim=ucfg.model_channels,
        projection_class_embeddings_input_dim=3 * ucfg.model_channels,
        num_frames=preset.prediction.num_frames,
    )


def build(which: str, preset, batch_size: int, seed: int = 0, device: str | torch.device = "cpu"):
    """(model, forward, target) for `which` in {"ours", "ours_frozen", "svd"}; inputs are fixed random tensors, drawn
    on the CPU (the same values on every device) and moved with the model to `device`."""
    from einops import repeat

    from drivesim.types import Conditioning

    pcfg = preset.prediction
    ucfg = pcfg.unet
    h, w = (r // 8 for r in preset.resolution)
    b, t = batch_size, pcfg.num_frames
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, ucfg.in_channels, h, w, generator=g)
    target = torch.randn(b, t, ucfg.out_channels, h, w, generator=g)
    timesteps = torch.randint(0, 1000, (b,), generator=g)
    torch.manual_seed(seed)
    if which in ("ours", "ours_frozen"):
        from drivesim.unet.video import VideoUNet

        temporal = dataclasses.replace(pcfg.temporal, train_spatial=which == "ours")
        model = VideoUNet(ucfg, temporal)
        n = ucfg.boxes.max_boxes
        xy = torch.rand(b, t, n, 2, generator=g) * 0.7
        wh = 0.05 + torch.rand(b, t, n, 2, generator=g) * 0.25
        cond = Conditioning(
            boxes=torch.cat([xy, xy + wh], dim=-1), classes=torch.randint(0, ucfg.boxes.num_classes, (b, t, n),
                                                                          generator=g),
            box_mask=repeat(torch.arange(n) < n // 2, "n -> b t n", b=b, t=t).clone(),
            night=torch.randint(0, 2, (b,), generator=g), crowdedness=torch.randint(0, 20, (b,), generator=g))
        # blocks start zero-initialised (identity): perturb every parameter so gradients flow everywhere, as in a
        # trained model (SVD's zero-init is overwritten the same way below)
        _randomise(model, g)
        x, timesteps, target, cond = x.to(device), timesteps.to(device), target.to(device), cond.to(device)
        return model.to(device), (lambda: model(x, timesteps, cond)), target
    from diffusers import UNetSpatioTemporalConditionModel

    model = UNetSpatioTemporalConditionModel(**svd_config(preset))
    _randomise(model, g)
    ehs = torch.randn(b, ucfg.boxes.max_boxes, ucfg.boxes.token_dim, generator=g)
    added = torch.tensor([[6.0, 127.0, 0.02]]).repeat(b, 1)  # fps id, motion bucket id, noise augmentation
    x, timesteps, target, ehs, added = (v.to(device) for v in (x, timesteps, target, ehs, added))
    return model.to(device), (lambda: model(x, timesteps, ehs, added, return_dict=False)[0]), target


def _randomise(model: torch.nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim and float(p.abs().max()) == 0.0:  # zero-initialised layers: small random weights
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def make_step(model, forward, target, precision: str):
    """A closure running one training step: forward, MSE loss, backward (grads reset to None first)."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def step():
        for p in params:
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = forward()
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        return loss

    return step


def count_flops(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step()
    return int(fc.get_total_flops())


def profile_table(step, rows: int = 15) -> tuple[str, list[dict]]:
    """torch.profiler over 2 steps: the top ops by self CPU time (table text, and as dicts)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    top = [{"op": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 2e3, "share": e.self_cpu_time_total / total,
            "calls_per_step": e.count / 2} for e in events[:rows]]
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows), top


def _memory_child(which: str, preset_name: str, batch_size: int, precision: str, steps: int) -> None:
    model, forward, target = build(which, _preset(preset_name), batch_size)
    step = make_step(model, forward, target, precision)
    before = _common.vm_rss_bytes()
    for _ in range(steps):
        step()
    print(json.dumps({"rss_before_step_bytes": before, "peak_rss_bytes": _common.vm_hwm_bytes()}))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9, help="timed steps per model and precision")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--memory-steps", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="torch.profiler top-op tables (fp32) in the output")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default="unet_vs_svd", help="result name under benchmarks/results/")
    ap.add_argument("--_memory-child", dest="memory_child", nargs=2, metavar=("WHICH", "PRECISION"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        _memory_child(args.memory_child[0], args.preset, args.batch_size, args.memory_child[1], args.memory_steps)
        return {}

    preset = _preset(args.preset)
    names = ("ours", "svd", "ours_frozen")
    built = {k: build(k, preset, args.batch_size) for k in names}
    precisions = args.precisions.split(",")
    result: dict = {
        "benchmark": "unet_vs_svd", "machine": _common.machine(), "preset": args.preset,
        "batch_size": args.batch_size, "num_frames": preset.prediction.num_frames,
        "latent": [preset.prediction.unet.in_channels, *(r // 8 for r in preset.resolution)],
        "svd_config": {k: list(v) if isinstance(v, tuple) else v for k, v in svd_config(preset).items()},
        "params": {k: sum(p.numel() for p in m.parameters()) for k, (m, _, _) in built.items()},
        "trainable_params": {k: sum(p.numel() for p in m.parameters() if p.requires_grad)
                             for k, (m, _, _) in built.items()},
        "timing_method": "same process, round-robin over models (order reversed every round), 1 warm-up step "
                         "each, median of repeats",
        "memory_method": "VmHWM of a fresh subprocess per (model, precision) after building the model and "
                         f"running {args.memory_steps} training steps; step_peak = VmHWM - VmRSS just before "
                         "the first step",
        "precisions": {},
    }
    for precision in precisions:
        steps = {k: make_step(m, f, tgt, precision) for k, (m, f, tgt) in built.items()}
        flops = {k: count_flops(s) for k, s in steps.items()}
        times = _common.alternate(steps, args.repeats)
        mem = {k: _common.run_json_subprocess([__file__, "--preset", args.preset, "--batch-size",
                                               str(args.batch_size), "--memory-steps", str(args.memory_steps),
                                               *(["--threads", str(args.threads)] if args.threads else []),
                                               "--_memory-child", k, precision]) for k in names}
        per: dict = {}
        for k in names:
            s = _common.summary(times[k])
            per[k] = {**s, "times_s": times[k], "flops_per_step": flops[k],
                      "gflop_per_s": flops[k] / s["median_s"] / 1e9,
                      "peak_rss_mib": mem[k]["peak_rss_bytes"] / 2**20,
                      "step_peak_mib": (mem[k]["peak_rss_bytes"] - mem[k]["rss_before_step_bytes"]) / 2**20}
        # per-round ratios (each round times both models back to back), their median: robust to load drift
        ratios = [a / b for a, b in zip(times["ours"], times["svd"], strict=True)]
        ratio = statistics.median(ratios)
        mem_ratio = per["ours"]["peak_rss_mib"] / per["svd"]["peak_rss_mib"]
        per["ratio_ours_over_svd"] = ratio
        per["ratio_of_medians"] = per["ours"]["median_s"] / per["svd"]["median_s"]
        per["ratio_frozen_over_svd"] = statistics.median(
            a / b for a, b in zip(times["ours_frozen"], times["svd"], strict=True))
        per["peak_rss_ratio_ours_over_svd"] = mem_ratio
        per["step_peak_ratio_ours_over_svd"] = per["ours"]["step_peak_mib"] / per["svd"]["step_peak_mib"]
        per["target"] = f"ours <= {TARGET_RATIO}x svd time at <= svd peak memory"
        per["target_met"] = bool(ratio <= TARGET_RATIO and mem_ratio <= 1.0)
        result["precisions"][precision] = per

    if args.profile:
        result["profile_fp32"] = {}
        for k in ("ours", "svd"):
            m, f, tgt = built[k]
            text, top = profile_table(make_step(m, f, tgt, "fp32"))
            result["profile_fp32"][k] = top
            print(f"\n== torch.profiler, {k}, fp32, 2 steps ==\n{text}")

    rows = []
    for precision, per in result["precisions"].items():
        for k in names:
            p = per[k]
            rows.append([precision, k, f"{result['params'][k] / 1e6:.2f}M", f"{p['flops_per_step'] / 1e9:.1f}",
                         f"{p['median_s'] * 1e3:.0f}", f"{p['q1_s'] * 1e3:.0f}-{p['q3_s'] * 1e3:.0f}",
                         f"{p['gflop_per_s']:.1f}", f"{p['peak_rss_mib']:.0f}", f"{p['step_peak_mib']:.0f}"])
        rows.append([precision, "ours / svd", "", "", f"{per['ratio_ours_over_svd']:.2f}x", "", "",
                     f"{per['peak_rss_ratio_ours_over_svd']:.2f}x",
                     f"{per['step_peak_ratio_ours_over_svd']:.2f}x"])
        rows.append([precision, "target <= 0.67x", "", "", _common.verdict(per["target_met"]), "", "", "", ""])
    m = result["machine"]
    _common.table(
        f"VideoUNet vs diffusers SVD U-Net, train step (fwd+bwd), {args.preset}, b={args.batch_size}, "
        f"t={result['num_frames']}, latent {'x'.join(map(str, result['latent']))}; {m['cpu']}, "
        f"{m['torch_threads']} threads (shared machine), {m['date_utc']} UTC",
        ["precision", "model", "params", "GFLOP/step", "median ms", "IQR ms", "GFLOP/s", "peak RSS MiB",
         "step peak MiB"], rows)
    path = _common.write_result(args.out, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
