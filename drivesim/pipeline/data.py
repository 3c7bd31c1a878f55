"""Datasets in the clip format: what `drivesim data ...` and `drivesim export` run.

The work lives in `drivesim.datasets`; this module is the entry a notebook user and the CLI share: the readers,
the MetaDrive renderer `simulate`, the nuScenes exporter `from_nuscenes`, previews, the perception export
`export_dataset`, and the option parsing they have in common.
"""

from __future__ import annotations

from pathlib import Path

from drivesim.datasets.clips import read_annotation, read_manifest
from drivesim.datasets.export import export_dataset
from drivesim.datasets.nuscenes import export_clips as from_nuscenes
from drivesim.datasets.preview import filmstrip, preview
from drivesim.datasets.simulate import simulate
from drivesim.datasets.validate import dataset_summary, validate_dataset
from drivesim.errors import ConfigError, DataError

__all__ = ["dataset_summary", "export_dataset", "filmstrip_clip", "from_nuscenes", "parse_size", "preview",
           "simulate", "validate_dataset"]


def parse_size(text: str | None) -> tuple[int, int] | None:
    """"HEIGHTxWIDTH" (e.g. "128x256") -> (h, w) in pixels; None -> None.

    Raises:
        ConfigError: not two positive multiples of 8 (the autoencoder's factor).
    """
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size: expected HEIGHTxWIDTH such as 128x256, got {text!r}") from None
    if h <= 0 or w <= 0 or h % 8 or w % 8:
        raise ConfigError(f"--size: height and width must be positive multiples of 8, got {text!r}")
    return h, w


def filmstrip_clip(path: Path, out: Path, at: list[float], clip: str | None = None, frames: int = 4, step: int = 2,
                   scale: int = 2) -> Path:
    """One row of frames (boxes drawn) per start time in `at` (seconds) of clip `clip` (default: the first) of
    the clip-format folder `path`, written to the PNG `out`.

    Raises:
        DataError: no manifest, or an unknown clip id (named).
    """
    manifest = read_manifest(path)
    entries = [c for c in manifest.clips if clip is None or c.clip_id == clip]
    if not entries:
        raise DataError(f"{manifest.root / 'manifest.json'}: --clip: unknown clip id {clip!r}")
    filmstrip(entries[0].video, read_annotation(entries[0].annotation), at, out, frames, step, scale)
    return Path(out)
