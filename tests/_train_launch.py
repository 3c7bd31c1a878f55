"""`drivesim` CLI entry for multi-process launch tests: `accelerate launch tests/_train_launch.py train ...`.

With DRIVESIM_TEST_HANG_AT=N set, the N-th `ImageLDM.loss` call of each process writes
`$DRIVESIM_TEST_MARKER.rank<r>` and sleeps, so a test can SIGKILL the run at a known point (after a checkpoint,
inside a step). Not collected by pytest (no `test_` prefix).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from drivesim.cli.main import main

if __name__ == "__main__":
    hang_at = int(os.environ.get("DRIVESIM_TEST_HANG_AT", "0"))
    if hang_at:
        from drivesim.models.image_ldm import ImageLDM

        original, calls = ImageLDM.loss, [0]

        def loss(self, batch):
            calls[0] += 1
            if calls[0] == hang_at:
                Path(f"{os.environ['DRIVESIM_TEST_MARKER']}.rank{os.environ.get('RANK', '0')}").write_text("")
                time.sleep(600)
            return original(self, batch)

        ImageLDM.loss = loss
    sys.exit(main(sys.argv[1:]))
