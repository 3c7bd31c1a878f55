"""Guards for command outputs: never write over a command's own input, never replace a file without being asked."""

from __future__ import annotations

from pathlib import Path

from drivesim.errors import ConfigError


def check_output(out: Path, inputs: dict[str, Path], overwrite: bool = False, flag: str = "--out") -> None:
    """Refuse an output path that is one of the inputs or lies inside an input folder, and an existing output unless
    `overwrite`.

    Args:
        out: the output file or folder.
        inputs: option name -> input path (a file, or a folder whose contents are inputs).
        overwrite: allow replacing an existing `out` (never an input).

    Raises:
        ConfigError: one line naming `out`, the flag and the input it would destroy.
    """
    target = Path(out).resolve()
    for name, path in inputs.items():
        src = Path(path).resolve()
        if target == src or (src.is_dir() and src in target.parents):
            raise ConfigError(f"{out}: {flag}: would write over the input given as {name} ({path}); choose an "
                              "output outside the inputs")
    if target.exists() and not overwrite:
        raise ConfigError(f"{out}: {flag}: already exists; pass --overwrite to replace it")
