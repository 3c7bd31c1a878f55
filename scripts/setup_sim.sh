#!/usr/bin/env bash
# Creates the MetaDrive simulator environment used by `drivesim data simulate`.
#
# The simulator lives in its own venv because metadrive-simulator 0.3.0.1 pins
# numpy==1.24.2 / gym==0.25.2 / protobuf==3.20.3, which clash with the main
# environment; 0.3.0.1 is the last release whose wheel ships its assets (0.4.x
# downloads them at first use, impossible offline). See shared/notes/metadrive.md.
#
# Idempotent: an existing venv that already imports the pinned versions is kept.
# Usage: scripts/setup_sim.sh            (venv at ${DRIVESIM_SIM_VENV:-.venv-sim})
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${DRIVESIM_SIM_VENV:-.venv-sim}"
PY="${PYTHON:-python3}"
PKGS=(metadrive-simulator==0.3.0.1 panda3d-simplepbr==0.10 panda3d-gltf==0.13)

check() {
    "$VENV/bin/python" - <<'PY' >/dev/null 2>&1
import importlib.metadata as md
want = {"metadrive-simulator": "0.3.0.1", "panda3d-simplepbr": "0.10", "panda3d-gltf": "0.13"}
for name, version in want.items():
    assert md.version(name) == version, (name, md.version(name))
import metadrive  # noqa: F401  (import check: assets and panda3d present)
PY
}

if [ -x "$VENV/bin/python" ] && check; then
    echo "setup_sim: $VENV already has ${PKGS[*]}"
    exit 0
fi

"$PY" - <<'PY'
import sys
if sys.version_info >= (3, 12):
    sys.exit("setup_sim: metadrive-simulator 0.3.0.1 needs Python < 3.12; set PYTHON=python3.11")
PY

echo "setup_sim: creating $VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check "${PKGS[@]}"
check || { echo "setup_sim: $VENV does not import metadrive after install" >&2; exit 1; }
echo "setup_sim: done ($VENV)"
