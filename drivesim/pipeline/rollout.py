"""Rolling out scenarios (`drivesim rollout`): a multi-minute video per scenario, streamed to disk, resumable,
sharded over processes.

Glue around `drivesim.rollout` (the core, which never reads scenario files): reads and resamples the scenario,
builds the per-frame conditioning, writes segment mp4s as they are produced and, at the end, the clip-format
output folder:

    OUT/
      manifest.json            clip format (one clip "rollout", split "val": generated, evaluated against val)
      rollout.mp4              H.264 yuv420p (browser-playable), assembled from segments/ at the end
      rollout.json             per-frame boxes (clip-format annotation): the scenario at the output rate; a box
                               beyond the model's max_boxes (not conditioned on) has "conditioned": false
      scenario.json            the scenario actually used (resampled to the output fps, extended, N frames)
      rollout_config.json      RolloutConfig, seed, plan (strides, stages, chunking), checkpoints, timings,
                               unconditioned_boxes (how many boxes in how many frames did not condition them)
      latents/keys_<u>.npy     key-frame latents of unit u (scaled, (k, 4, h/8, w/8) float32)
      latents/frames_<u>.npy   output-rate latents of unit u
      segments/seg_<u>.mp4     frames made final by unit u (each a closed, playable mp4; removed at the end
                               unless keep_segments: an mp4 still being written has no index and cannot play)
      state.json / state-<n>.safetensors   resume state (committed atomically after every unit)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from drivesim.errors import ConfigError, DataError
from drivesim.pipeline.outputs import undo_unless_resumable
from drivesim.pipeline.video_io import concat_segments, write_segment

CLIP_ID = "rollout"


def resolve_config(config: Path | None, sets: list[str], upsample: bool):
    """RolloutConfig from defaults or a YAML file, then the `key=value` overrides in `sets`, then `upsample`.

    Raises:
        ConfigError: unreadable YAML, an unknown key or an invalid value (named).
    """
    import dataclasses

    from drivesim.configs import load_yaml, override
    from drivesim.rollout import RolloutConfig, check_rollout_config

    cfg = load_yaml(RolloutConfig, config) if config is not None else RolloutConfig()
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set: {item!r}: expected key=value")
        cfg = override(cfg, key, raw)
    if upsample:
        cfg = dataclasses.replace(cfg, upsample=True)
    check_rollout_config(cfg, str(config) if config else "rollout config")
    return cfg


def prepare_scenario(path: Path, fps: float, total_frames: int):
    """Load `path`, resample to `fps`, loop it to `total_frames` frames when shorter (cut when longer)."""
    from drivesim.datasets import scenario as sc

    s = sc.load_scenario(path)
    if s.fps != fps:
        s = sc.resample(s, fps)
    if s.num_frames < total_frames:
        s = sc.extend(s, total_frames, "loop")
    elif s.num_frames > total_frames:
        s = sc.window(s, 0, total_frames)
    return s


def pack_conditioning(scenario, max_boxes: int, frames_per_latent: int = 1, box_reduction: str = "union"):
    """The scenario's boxes packed once per latent frame of the stack.

    Per-frame latents (`frames_per_latent` 1): every frame's boxes (`drivesim.datasets.scenario.pack`). On 3D latents
    (f > 1; LVDM, He et al. 2022 Sec. 3): latent frame j gets the boxes of video frames f j .. f j + f - 1 reduced
    with `box_reduction` by the very function the latent cache reduces them with
    (`drivesim.datasets.latent_cache.pack_latent_boxes`), so the model is conditioned as it was trained.

    Args:
        scenario: a `Scenario` of T frames (T a multiple of f; a rest is dropped, as the cache drops it).
        max_boxes: box slots per (latent) frame; frames_per_latent: f; box_reduction: "union" or "middle".

    Returns:
        PackedBoxes with T // f frames: boxes (T // f, max_boxes, 4) float32 normalised xyxy (image frame),
        classes / box_mask / track_ids (T // f, max_boxes) (track ids of `track_id_map(scenario)`).

    Raises:
        ValueError: an unknown box_reduction, max_boxes < 1.
    """
    from drivesim.datasets.latent_cache import pack_latent_boxes
    from drivesim.datasets.scenario import pack

    if frames_per_latent == 1:
        return pack(scenario, 0, scenario.num_frames, max_boxes)
    return pack_latent_boxes(scenario, frames_per_latent, max_boxes, box_reduction)


def make_cond_fn(scenario, max_boxes: int, frames_per_latent: int = 1, box_reduction: str = "union"):
    """Latent-frame indices (output frames for per-frame latents) -> Conditioning (b = 1) from the scenario's boxes,
    packed once (`pack_conditioning`)."""
    from drivesim.types import Conditioning

    packed = pack_conditioning(scenario, max_boxes, frames_per_latent, box_reduction).as_batch()
    labels = {"night": [scenario.night], "crowdedness": [scenario.crowdedness]}

    def cond_fn(indices: list[int]) -> Conditioning:
        idx = torch.tensor(indices, dtype=torch.int64)
        return Conditioning.from_batch({k: v[:, idx] for k, v in packed.items()} | labels, "scenario")

    return cond_fn


def conditioned_track_ids(scenario, num_frames: int, max_boxes: int, frames_per_latent: int = 1,
                          box_reduction: str = "union") -> list[set[str]]:
    """The track ids of the boxes that condition each of video frames [0, num_frames): the slots of the same
    `pack_conditioning` that `make_cond_fn` builds the conditioning from (a frame with more than `max_boxes` boxes
    keeps the largest); on 3D latents frame k is conditioned by latent frame k // f's boxes. `scenario` must cover
    ceil(num_frames / f) * f frames."""
    from drivesim.datasets.scenario import track_id_map, window

    f = frames_per_latent
    names = {v: k for k, v in track_id_map(scenario).items()}
    packed = pack_conditioning(window(scenario, 0, -(-num_frames // f) * f), max_boxes, f, box_reduction)
    return [{names[int(t)] for t in packed.track_ids[k // f][packed.box_mask[k // f]]} for k in range(num_frames)]


def unconditioned_record(frames, kept: list[set[str]], max_boxes: int) -> dict:
    """How many labelled boxes did not condition their frame (rollout_config.json, the CLI's note)."""
    extra = [sum(b.track_id not in ids for b in boxes) for boxes, ids in zip(frames, kept, strict=True)]
    return {"boxes": sum(extra), "frames": sum(n > 0 for n in extra), "max_boxes": max_boxes,
            "labels": f'marked "conditioned": false in {CLIP_ID}.json (frames with more than max_boxes boxes are '
                      "conditioned on the largest); drivesim export makes them COCO ignore regions (iscrowd 1) and "
                      "leaves them out of YOLO labels"}


def rollout_scenario(scenario_path: Path, models, cfg, out: Path, seed: int, num_frames: int, resume: bool,
                     ckpt_dir: Path, progress: bool = True, max_units: int | None = None) -> dict:
    """One rollout of one scenario into `out` (layout in the module docstring).

    Args:
        scenario_path: scenario JSON; models: `drivesim.rollout.load_models(ckpt_dir)`; cfg: RolloutConfig.
        seed: rollout seed; num_frames: output frames; resume: continue the rollout in `out`.
        ckpt_dir: recorded in rollout_config.json; max_units: stop after this many units (tests, budgets).

    Returns:
        The runner's summary (frames_written, seconds, complete, resumed_from, ...), and when complete "video" and
        "unconditioned_boxes" ({"boxes", "frames", "max_boxes", "labels"}: labelled boxes that did not condition
        their frame, see `conditioned_track_ids`).

    Raises:
        ConfigError: `out` holds a finished rollout and `resume` is False; DataError: a bad scenario or a size
            that is not a multiple of 8.
    """
    import dataclasses

    from drivesim.configs import to_dict
    from drivesim.datasets.clips import Box, ClipAnnotation, write_json_atomic, write_manifest
    from drivesim.datasets.scenario import load_scenario, rescale, save_scenario, window
    from drivesim.rollout import Rollout, make_plan, resolve_fps

    cfg = resolve_fps(cfg, models)
    if (out / "manifest.json").is_file() and not resume:
        raise ConfigError(f"{out}: --out: holds a finished rollout; choose another --out")
    head = load_scenario(scenario_path)
    resolution = tuple(cfg.resolution) if cfg.resolution else (head.height, head.width)
    if any(v % 8 for v in resolution):
        raise DataError(f"{scenario_path}: width/height: {head.width}x{head.height} is not a multiple of 8; set "
                        "resolution in the rollout config")
    plan = make_plan(models, cfg, num_frames, resolution)
    scenario = prepare_scenario(scenario_path, cfg.fps, plan.cond_frames)
    max_boxes = models.prediction.config.unet.boxes.max_boxes
    # on 3D latents: boxes per latent frame, reduced as the prediction model's training cache reduced them
    f, reduction = plan.frames_per_latent, models.prediction.config.box_reduction or "union"
    cond_fn = make_cond_fn(scenario, max_boxes, f, reduction)
    # the labels of the output frames: the scenario's boxes in the pixel frame of the rolled-out video, those that
    # did not condition their frame (beyond max_boxes) marked: a detector trained on the labels must not learn an
    # object the model was never asked for, and must not be told the region is background either
    labels = rescale(window(scenario, 0, num_frames), resolution[1], resolution[0])
    kept = conditioned_track_ids(scenario, num_frames, max_boxes, f, reduction)
    record = {"config": to_dict(cfg), "seed": seed, "num_frames": num_frames, "scenario": str(scenario_path),
              "checkpoints": str(ckpt_dir), "checkpoint_fingerprint": models.fingerprint,
              "plan": {k: v for k, v in dataclasses.asdict(plan).items() if k != "decode_windows"}
              | {"decode_windows": len(plan.decode_windows), "num_units": plan.num_units},
              "frame_rates": {"output_fps": cfg.fps, "key_fps": cfg.fps / plan.key_spacing / f,
                              "stages": list(plan.stages)},
              "unconditioned_boxes": unconditioned_record(labels.frames, kept, max_boxes)}
    crf = cfg.segment_crf

    bar = None
    if progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        bar = Progress(TextColumn(f"rollout {out.name}"), BarColumn(), TextColumn("{task.completed}/{task.total} "
                       "units, {task.fields[frames]} frames"), TimeElapsedColumn(), TimeRemainingColumn())
        task = bar.add_task("rollout", total=plan.num_units, frames=0)
        bar.start()

    def report(done: int, total: int, frames: int) -> None:
        if bar is not None:
            bar.update(task, completed=done, frames=frames)

    rollout = Rollout(models, cfg, cond_fn, num_frames, out, seed,
                      lambda p, f, fps: write_segment(p, f, fps, crf), resolution, progress=report)
    # a rollout that fails (Ctrl-C, SIGTERM, an error) before its first unit is committed to state.json has nothing
    # to resume from: what it wrote goes, and `out` too when this call made it
    with undo_unless_resumable(out, lambda: (out / "state.json").is_file()):
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "state.json").is_file():
            save_scenario(labels, out / "scenario.json")
            write_json_atomic(out / "rollout_config.json", record)
        try:
            summary = rollout.run(resume=resume, max_units=max_units)
        finally:
            if bar is not None:
                bar.stop()
    if not summary["complete"]:
        return summary
    seg_dir = out / "segments"
    video = out / f"{CLIP_ID}.mp4"
    if not (out / "manifest.json").is_file():
        written = concat_segments([seg_dir / s for s in rollout.segments], video, cfg.fps, cfg.crf)
        if written != num_frames:
            raise DataError(f"{seg_dir}: segments: {written} frames, expected {num_frames}")
        k = models.upsampler.config.scale if cfg.upsample else 1
        frames = [[Box(b.track_id, b.cls, b.x1 * k, b.y1 * k, b.x2 * k, b.y2 * k, b.track_id in ids) for b in boxes]
                  for boxes, ids in zip(labels.frames, kept, strict=True)]
        h, w = resolution
        ann = ClipAnnotation(CLIP_ID, cfg.fps, w * k, h * k, labels.night, labels.crowdedness,
                             f"drivesim rollout of {scenario_path.name} (seed {seed})", frames)
        write_json_atomic(out / f"{CLIP_ID}.json", ann.to_json())
        record["summary"] = summary
        write_json_atomic(out / "rollout_config.json", record)
        write_manifest(out, [(CLIP_ID, "val")], source="drivesim rollout", command="drivesim rollout", seed=seed)
    if not cfg.keep_segments:
        shutil.rmtree(seg_dir, ignore_errors=True)
    summary["video"] = str(video)
    summary["unconditioned_boxes"] = record["unconditioned_boxes"]
    return summary




def rollout_scenarios(scenarios: Path | list[Path], ckpt_dir: Path, out: Path, cfg, *, minutes: float | None = None,
                      frames: int | None = None, seed: int = 0, resume: bool = False, device: str = "cpu",
                      progress: bool = True, on_done=None, config_source: str = "--set fps") -> list[dict]:
    """Roll out one scenario file, or every `*.json` of a folder sharded over processes, with the stack `ckpt_dir`.

    With a folder, process RANK of WORLD_SIZE (accelerate/torchrun environment) takes scenarios r, r + W, ... of
    the sorted files, each into `out/<stem>/` with seed `seed + index`, so every scenario is done exactly once and
    the outputs equal a one-process run's. With one file the rollout goes to `out` with `seed`.

    Args:
        scenarios: a scenario JSON or a folder of them.
        ckpt_dir: D/{autoencoder,image_ldm,prediction,interpolation[,upsampler]} exported model folders.
        cfg: RolloutConfig (`resolve_config`); its fps follows the models' training rate unless set.
        minutes / frames: the length, exactly one of them.
        device: "cpu", "cuda" (-> cuda:LOCAL_RANK under a launcher) or an explicit device.
        on_done: called with each result dict as it finishes.
        config_source: named in the error when cfg.fps contradicts the stack.

    Returns:
        One dict per rollout this process ran: {"scenario", "out", "seed", **summary}.

    Raises:
        ConfigError: both or neither of minutes/frames, a non-positive length, an fps contradicting the models;
            DataError: a missing folder or one without scenarios; CheckpointError from the stack.
    """
    from drivesim.rollout import check_rollout_length, load_models, process_device, resolve_fps, shard

    if (minutes is None) == (frames is None):
        raise ConfigError("rollout: give exactly one of --minutes or --frames")
    if minutes is not None and not minutes > 0:
        raise ConfigError(f"--minutes: must be positive, got {minutes}")
    if frames is not None and frames < 1:
        raise ConfigError(f"--frames: must be >= 1, got {frames}")
    check_rollout_length(minutes, frames)  # before the models load: 1e9 minutes is refused, not run out of memory
    scenarios, out = Path(scenarios), Path(out)
    folder = scenarios.is_dir()
    # inference only; a context (not set_grad_enabled) so in-process callers get their grad mode back
    with torch.no_grad():
        models = load_models(ckpt_dir, upsample=cfg.upsample, device=process_device(device))
        cfg = resolve_fps(cfg, models, config_source)
        num_frames = frames if frames is not None else max(1, round(minutes * 60 * cfg.fps))
        if not folder:
            jobs = [(scenarios, out, seed)]
        else:
            files = sorted(scenarios.glob("*.json"))
            if not files:
                raise DataError(f"{scenarios}: --scenarios: no *.json scenario files")
            rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
            jobs = [(f, out / f.stem, seed + i) for i, f in shard(list(enumerate(files)), rank, world)]
        results = []
        for path, job_out, job_seed in jobs:
            summary = rollout_scenario(path, models, cfg, job_out, job_seed, num_frames, resume, ckpt_dir,
                                       progress=progress)
            result = {"scenario": str(path), "out": str(job_out), "seed": job_seed, "num_frames": num_frames,
                      "fps": cfg.fps, **summary}
            results.append(result)
            if on_done is not None:
                on_done(result)
    return results
