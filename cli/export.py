"""`drivesim export DIR --format coco|yolo --out OUT`: clips (real or generated) -> images + perception labels."""

from __future__ import annotations

from pathlib import Path

import typer


def export_cmd(
    source: Path = typer.Argument(..., help="Clip-format folder: a dataset (manifest.json) or a rollout folder "
                                            "(<id>.mp4 + <id>.json pairs)."),
    fmt: str = typer.Option(..., "--format", "-f", help="coco (one annotations.json) or yolo (one txt per image)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (must not exist; created atomically)."),
    every: int = typer.Option(1, "--every", help="Export every K-th frame of each clip (frames 0, K, 2K, ...)."),
    image_format: str = typer.Option("png", "--image-format", help="png (lossless) or jpg."),
) -> None:
    """Write every K-th frame of every clip as an image plus its boxes as COCO JSON or YOLO txt labels.

    Boxes come from the clips' annotations (for generated rollouts: the scenario they were conditioned on), so
    the export is labelled synthetic data. Layout and field meanings: the README, "Perception export", and
    docs/clip-format.md.
    """
    import shlex

    from drivesim.pipeline.data import export_dataset

    command = shlex.join(["drivesim", "export", str(source), "--format", fmt, "--out", str(out), "--every",
                          str(every), "--image-format", image_format])
    summary = export_dataset(source, out, fmt, every=every, image_format=image_format, command=command)
    typer.echo(f"wrote {out}: {summary['images']} images, {summary['boxes']} boxes from {summary['clips']} clip(s) "
               f"({fmt})")
    extra = summary["unconditioned_boxes"]
    if extra["boxes"]:
        typer.echo(f"note: {extra['boxes']} box(es) in {extra['frames']} frame(s) did not condition the generated "
                   f"frame (more boxes than the model's max_boxes): {extra['labels']}; counted in export.json",
                   err=True)
