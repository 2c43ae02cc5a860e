"""``python tests/ui_slow_server.py DELAY_S ARGS...``: ``python -m framepack.ui ARGS...`` with every
transformer call held back by at least DELAY_S seconds.

The browser tests watch jobs while they run (the progress bar moving, a cancel, a kill mid-job). On
the tiny random model a whole job can finish between two polls of the page when the machine is idle,
so the server gets a floor on the time per denoising call instead of depending on the machine's load.
"""

from __future__ import annotations

import sys
import time

from framepack.model.transformer import FramePackTransformer
from framepack.ui.__main__ import main


def hold_back(delay_s: float) -> None:
    forward = FramePackTransformer.forward

    def slow_forward(self, *args, **kwargs):
        time.sleep(delay_s)
        return forward(self, *args, **kwargs)

    FramePackTransformer.forward = slow_forward


if __name__ == "__main__":
    hold_back(float(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
