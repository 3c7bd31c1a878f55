"""drivesim: Video Latent Diffusion for driving scenes (Blattmann et al. 2023, with LVDM's long-video techniques)."""

from __future__ import annotations

__version__ = "0.1.0"


def load(path):
    """Load an exported inference checkpoint folder and return the model of the class named in its config.

    Args:
        path: folder holding `model.safetensors` and `config.json` (with `format_version` and `model_class`).

    Raises:
        CheckpointError: missing/corrupt files, unknown model class, or a newer format version.
    """
    from drivesim.training.checkpoint import load_model

    return load_model(path)
