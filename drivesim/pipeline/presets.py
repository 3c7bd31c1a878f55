"""Presets as a user sees them: what `drivesim config show` prints and `drivesim train --config` reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from drivesim.configs import PRESETS, Preset, get_preset, load_yaml, to_dict

__all__ = ["PRESETS", "preset_dict"]


def preset_dict(name: str | None = None, file: Path | None = None) -> dict[str, Any]:
    """The preset `name`, or the preset YAML `file`, as a plain dict (every model block and training config).

    Raises:
        ConfigError: unknown preset, unreadable YAML or an unknown key (named).
    """
    return to_dict(load_yaml(Preset, file) if file is not None else get_preset(name))
