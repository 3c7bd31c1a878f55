"""Stage registry for `drivesim train STAGE`: each stage maps to a builder of (model, dataset, collate_fn).

A builder is `build(preset: Preset, data_path: Path, **opts) -> (model, dataset, collate_fn | None)`:
- `preset` is fully resolved (`--preset`/`--config`, then `--set`, then the flag overrides); the builder reads its
  model block (e.g. `preset.autoencoder`) and must build the model from it so the checkpoint's config matches;
- `data_path` is the `--data` argument (a clip-format folder or a latent cache, as the stage needs);
- `opts` are the `--opt key=value` strings, checked against `StageSpec.options` before the call.
The global torch RNG is seeded with the stage's `train.seed` before `build` runs, so initial weights reproduce.

Model owners register their stage here with `@register_stage("name", help=..., options={...})`; a stage named in
`STAGE_NAMES` but not registered yet fails with a clear error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from drivesim.errors import ConfigError

STAGE_NAMES = ("autoencoder", "video_decoder", "image_ldm", "prediction", "interpolation", "upsampler")
"""The paper's training stages, in training order (SPEC "Order of training")."""


@dataclass(frozen=True)
class StageSpec:
    """One trainable stage.

    Attributes:
        name: stage name; also the key of the stage's `TrainConfig` in `Preset.train`.
        build: `(preset, data_path, **opts) -> (model, dataset, collate_fn or None)`.
        help: one line shown by `drivesim train --help`.
        options: allowed `--opt` names -> their help (e.g. {"autoencoder": "exported autoencoder checkpoint"}).
    """

    name: str
    build: Callable[..., tuple[Any, Any, Callable | None]]
    help: str = ""
    options: dict[str, str] = field(default_factory=dict)


STAGES: dict[str, StageSpec] = {}


def register_stage(name: str, help: str = "", options: dict[str, str] | None = None) -> Callable:
    """Decorator registering a builder function as stage `name`."""

    def wrap(fn: Callable) -> Callable:
        if name in STAGES and STAGES[name].build is not fn:
            raise ValueError(f"stage {name!r} registered twice")
        STAGES[name] = StageSpec(name=name, build=fn, help=help, options=dict(options or {}))
        return fn

    return wrap


def get_stage(name: str) -> StageSpec:
    """The registered stage `name`.

    Raises:
        ConfigError: unknown stage, or a known stage whose model is not available in this build yet.
    """
    if name in STAGES:
        return STAGES[name]
    if name in STAGE_NAMES:
        ready = ", ".join(s for s in STAGE_NAMES if s in STAGES) or "none"
        raise ConfigError(f"stage: {name!r} has no training builder registered yet in drivesim.cli.stages "
                          f"(available: {ready})")
    raise ConfigError(f"stage: unknown stage {name!r} (stages: {', '.join(STAGE_NAMES)})")


def parse_opts(spec: StageSpec, pairs: list[str]) -> dict[str, str]:
    """`["key=value", ...]` -> dict, checked against `spec.options`.

    Raises:
        ConfigError: a pair without '=' or an option the stage does not take (named).
    """
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--opt: {pair!r}: expected key=value")
        if key not in spec.options:
            known = ", ".join(spec.options) or "none"
            raise ConfigError(f"--opt: {key}: unknown option for stage {spec.name} (options: {known})")
        out[key] = value
    return out


# ---- image_ldm (issue 5) --------------------------------------------------------------------------------------


def _tensor_collate(samples: list[dict]) -> dict:
    """Default collate of the tensor fields only (drops "clip_id" / "start", which the models do not read)."""
    import torch
    from torch.utils.data import default_collate

    return default_collate([{k: v for k, v in s.items() if isinstance(v, torch.Tensor)} for s in samples])


@register_stage("image_ldm", help="Box- and day/night-conditioned image LDM on single frames of a latent cache "
                "(--data CACHE.h5 from `drivesim encode`).",
                options={"frames": "frames per cached window folded into the batch as images (default 1)"})
def build_image_ldm(preset, data_path, frames: str = "1"):
    """Image LDM (`preset.image_ldm`) + `LatentClipDataset(data_path, "train")` windows of `frames` frames."""
    from drivesim.datasets.latent_cache import LatentClipDataset
    from drivesim.models.image_ldm import ImageLDM

    try:
        num_frames = int(frames)
        if num_frames < 1:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--opt: frames: expected a positive integer, got {frames!r}") from None
    dataset = LatentClipDataset(data_path, split="train", num_frames=num_frames, frame_stride=1)
    return ImageLDM(preset.image_ldm), dataset, _tensor_collate
