"""`drivesim rollout`: a multi-minute video for a scenario, streamed to disk, resumable, shardable.

Glue around `drivesim.rollout` (the core, which never reads scenario files): reads and resamples the scenario,
builds the per-frame conditioning, writes segment mp4s as they are produced and, at the end, the clip-format
output folder:

    OUT/
      manifest.json            clip format (one clip "rollout", split "val": generated, evaluated against val)
      rollout.mp4              H.264 yuv420p (browser-playable), assembled from segments/ at the end
      rollout.json             per-frame boxes (clip-format annotation): the scenario at the output rate
      scenario.json            the scenario actually used (resampled to the output fps, extended, N frames)
      rollout_config.json      RolloutConfig, seed, plan (strides, stages, chunking), checkpoints, timings
      latents/keys_<u>.npy     key-frame latents of unit u (scaled, (k, 4, h/8, w/8) float32)
      latents/frames_<u>.npy   output-rate latents of unit u
      segments/seg_<u>.mp4     frames made final by unit u (each a closed, playable mp4; removed at the end
                               unless keep_segments: an mp4 still being written has no index and cannot play)
      state.json / state-<n>.safetensors   resume state (committed atomically after every unit)
"""

from __future__ import annotations

import json
import os
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import typer

from drivesim.errors import ConfigError, DataError

EPILOG = """\
Examples:

  drivesim rollout --scenario s.json --ckpt-dir runs/stack --minutes 2 \\
      --out runs/rollout --seed 0

  drivesim rollout ... --resume            continue a killed rollout (same frames)
  drivesim rollout ... --set context_guidance=1.0 --set context_noise_level=0
  drivesim rollout ... --upsample          x4 pixel upsampler (needs D/upsampler)

Checkpoint dir D: D/autoencoder D/image_ldm D/prediction D/interpolation
[D/upsampler], each an exported model folder (drivesim.load).

Many scenarios over processes (each scenario done exactly once, rank r takes
scenarios r, r + W, ... of the sorted *.json; seeds are seed + index):

  accelerate launch --num_processes 2 -m drivesim.cli.main rollout \\
      --scenarios scen/ --ckpt-dir runs/stack --minutes 1 --out runs/rollouts
"""

CLIP_ID = "rollout"


def resolve_config(config: Path | None, sets: list[str], upsample: bool):
    """RolloutConfig from defaults or `--config` YAML, then `--set key=value`, then `--upsample`."""
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


def _encoder(container, fps: float, width: int, height: int, crf: int):
    # x264's threaded lookahead (mb-tree rate control) gave different bytes for the same frames from run to run on
    # this machine; a resumed rollout must re-create the same video, so: one thread, no mb-tree, no rc lookahead
    # (tested reproducible across concurrent processes; CRF rate control is otherwise unchanged)
    stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"crf": str(crf), "preset": "medium", "threads": "1", "x264-params": "mbtree=0:rc-lookahead=0"}
    return stream


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 RGB -> (3h/2, w) uint8 planar YUV 4:2:0, BT.601 limited range (what swscale does by default,
    and what decoders assume for untagged H.264), chroma averaged over 2x2 blocks.

    Done in numpy so the encoder input is exactly reproducible (see `_video_frame`).
    """
    rgb = frame.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    h, w = y.shape

    def sub(c: np.ndarray) -> np.ndarray:
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    planes = [np.clip(np.rint(p), 0, 255).astype(np.uint8) for p in (y, sub(u), sub(v))]
    return np.concatenate([planes[0], planes[1].reshape(h // 4, w), planes[2].reshape(h // 4, w)])


def _video_frame(rgb: np.ndarray | None = None, yuv: np.ndarray | None = None):
    """An av.VideoFrame (yuv420p) of (h, w, 3) RGB or (3h/2, w) planar YUV, whose plane buffers are written by us.

    Every byte of every plane buffer is set (edge pixels replicated into any line padding), so nothing but the
    frame reaches the encoder (part of making segment bytes reproducible, see `_encoder`).
    """
    import av

    if yuv is None:
        yuv = rgb_to_yuv420p(rgb)
    h, w = yuv.shape[0] * 2 // 3, yuv.shape[1]
    planes = [yuv[:h], yuv[h:h + h // 4].reshape(h // 2, w // 2), yuv[h + h // 4:].reshape(h // 2, w // 2)]
    frame = av.VideoFrame(w, h, "yuv420p")
    for plane, arr in zip(frame.planes, planes, strict=True):
        ls = plane.line_size
        buf = np.empty((plane.buffer_size // ls, ls), np.uint8)
        buf[:arr.shape[0], :arr.shape[1]] = arr
        buf[:arr.shape[0], arr.shape[1]:] = arr[:, -1:]
        buf[arr.shape[0]:] = buf[arr.shape[0] - 1]
        plane.update(buf.tobytes())
    return frame


def write_segment(path: Path, frames: np.ndarray, fps: float, crf: int) -> None:
    """Write (t, h, w, 3) uint8 RGB frames as a closed H.264 mp4 (temp file + rename), reproducibly."""
    import av

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.mp4")
    try:
        with av.open(str(tmp), mode="w") as container:
            stream = _encoder(container, fps, frames.shape[2], frames.shape[1], crf)
            for frame in frames:
                for packet in stream.encode(_video_frame(frame)):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def concat_segments(segments: list[Path], out: Path, fps: float, crf: int) -> int:
    """Decode the segment mp4s frame by frame and encode them into one mp4 (temp file + rename); the decoded YUV
    planes are re-encoded as they are (no colour conversion round trip).

    Memory holds one frame at a time. Returns the number of frames written.
    """
    import av

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.mp4")
    count = 0
    try:
        with av.open(str(tmp), mode="w") as container:
            stream = None
            for seg in segments:
                with av.open(str(seg)) as src:
                    for frame in src.decode(video=0):
                        if stream is None:
                            stream = _encoder(container, fps, frame.width, frame.height, crf)
                        for packet in stream.encode(_video_frame(yuv=frame.to_ndarray(format="yuv420p"))):
                            container.mux(packet)
                        count += 1
            if stream is not None:
                for packet in stream.encode():
                    container.mux(packet)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return count


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


def make_cond_fn(scenario, max_boxes: int):
    """Output-frame indices -> Conditioning (b = 1) from the scenario's boxes, packed once."""
    from drivesim.datasets.scenario import pack

    from drivesim.types import Conditioning

    p = pack(scenario, 0, scenario.num_frames, max_boxes)
    boxes, classes, mask = torch.from_numpy(p.boxes), torch.from_numpy(p.classes), torch.from_numpy(p.mask)
    night = torch.tensor([scenario.night], dtype=torch.int64)
    crowd = torch.tensor([scenario.crowdedness], dtype=torch.int64)

    def cond_fn(indices: list[int]) -> Conditioning:
        idx = torch.tensor(indices, dtype=torch.int64)
        return Conditioning(boxes=boxes[idx][None], classes=classes[idx][None], box_mask=mask[idx][None],
                            night=night, crowdedness=crowd)

    return cond_fn


def run_one(scenario_path: Path, models, cfg, out: Path, seed: int, num_frames: int, resume: bool,
            ckpt_dir: Path, progress: bool = True, max_units: int | None = None) -> dict:
    """One rollout of one scenario into `out` (see the module docstring). Returns its summary."""
    import dataclasses

    from drivesim.datasets.clips import Box, ClipAnnotation, write_json_atomic, write_manifest
    from drivesim.datasets.scenario import load_scenario, rescale, save_scenario, window

    from drivesim.configs import to_dict
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
    max_boxes = models.image_ldm.config.unet.boxes.max_boxes
    cond_fn = make_cond_fn(scenario, max_boxes)
    # the labels of the output frames: the scenario's boxes in the pixel frame of the rolled-out video
    labels = rescale(window(scenario, 0, num_frames), resolution[1], resolution[0])
    out.mkdir(parents=True, exist_ok=True)
    record = {"config": to_dict(cfg), "seed": seed, "num_frames": num_frames, "scenario": str(scenario_path),
              "checkpoints": str(ckpt_dir), "checkpoint_fingerprint": models.fingerprint,
              "plan": {k: v for k, v in dataclasses.asdict(plan).items() if k != "decode_windows"}
              | {"decode_windows": len(plan.decode_windows), "num_units": plan.num_units},
              "frame_rates": {"output_fps": cfg.fps, "key_fps": cfg.fps / plan.key_spacing,
                              "stages": list(plan.stages)}}
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
        frames = [[Box(b.track_id, b.cls, b.x1 * k, b.y1 * k, b.x2 * k, b.y2 * k) for b in boxes]
                  for boxes in labels.frames]
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
    return summary


def rollout_cmd(
    scenario: Path = typer.Option(None, "--scenario", "-s", help="Scenario JSON (drivesim scenario from-clip)."),
    scenarios: Path = typer.Option(None, "--scenarios", help="Folder of scenario JSONs: one rollout each, "
                                                             "sharded over processes (accelerate launch)."),
    ckpt_dir: Path = typer.Option(..., "--ckpt-dir", help="D/{autoencoder,image_ldm,prediction,interpolation"
                                                          "[,upsampler]} exported model folders."),
    minutes: float = typer.Option(None, "--minutes", help="Length of the video in minutes."),
    frames: int = typer.Option(None, "--frames", help="Length in output frames (instead of --minutes)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (with --scenarios: one sub-folder each)."),
    seed: int = typer.Option(0, "--seed", help="Rollout seed (--scenarios: seed + index in sorted order)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed rollout in OUT (identical frames)."),
    upsample: bool = typer.Option(False, "--upsample", help="Run the x4 video upsampler (D/upsampler)."),
    config: Path = typer.Option(None, "--config", help="RolloutConfig YAML."),
    sets: list[str] = typer.Option([], "--set", help="RolloutConfig override key=value, repeatable."),
    device: str = typer.Option("cpu", "--device", help="torch device of the models, e.g. cuda (noise is drawn on "
                                                       "the CPU; resume on the same device for identical frames); "
                                                       "under accelerate/torchrun, cuda means cuda:LOCAL_RANK."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Generate a multi-minute driving video that follows a scenario's boxes (key frames -> x4 -> x4, video
    decoder, optional upsampler), streamed to disk and resumable."""
    from drivesim.rollout import load_models, process_device, resolve_fps, shard

    if (scenario is None) == (scenarios is None):
        raise ConfigError("rollout: give exactly one of --scenario FILE or --scenarios DIR")
    if (minutes is None) == (frames is None):
        raise ConfigError("rollout: give exactly one of --minutes or --frames")
    if minutes is not None and not minutes > 0:
        raise ConfigError(f"--minutes: must be positive, got {minutes}")
    if frames is not None and frames < 1:
        raise ConfigError(f"--frames: must be >= 1, got {frames}")
    cfg = resolve_config(config, sets, upsample)
    # inference only; a context (not set_grad_enabled) so in-process callers get their grad mode back
    with torch.no_grad():
        models = load_models(ckpt_dir, upsample=cfg.upsample, device=process_device(device))
        cfg = resolve_fps(cfg, models, str(config) if config else "--set fps")
        num_frames = frames if frames is not None else max(1, round(minutes * 60 * cfg.fps))
        if scenario is not None:
            jobs = [(scenario, out, seed)]
        else:
            if not scenarios.is_dir():
                raise DataError(f"{scenarios}: --scenarios: folder not found")
            files = sorted(scenarios.glob("*.json"))
            if not files:
                raise DataError(f"{scenarios}: --scenarios: no *.json scenario files")
            rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
            indexed = shard(list(enumerate(files)), rank, world)
            jobs = [(f, out / f.stem, seed + i) for i, f in indexed]
        results = []
        for path, job_out, job_seed in jobs:
            summary = run_one(path, models, cfg, job_out, job_seed, num_frames, resume, ckpt_dir, progress=not quiet)
            results.append({"scenario": str(path), "out": str(job_out), "seed": job_seed, **summary})
            if not as_json:
                typer.echo(f"{job_out}: {summary['frames_written']} frames ({num_frames / cfg.fps:.1f} s at "
                           f"{cfg.fps:g} fps) in {summary['seconds']:.1f} s"
                           + (f" (resumed at unit {summary['resumed_from']})" if summary["resumed_from"] else ""))
    if as_json:
        typer.echo(json.dumps(results if scenarios is not None else results[0]))
