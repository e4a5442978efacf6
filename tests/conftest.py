"""Test-wide settings: one torch thread per worker (`make test` runs `pytest -n 2` on 2 cores;
more threads than cores makes small CPU kernels orders of magnitude slower)."""

import torch

torch.set_num_threads(1)

# Hypothesis: `make test` (and CI) draw the same examples every run ("ci": derandomized), so a
# landed suite stays green; `make fuzz` draws fresh random examples to hunt for new failures.
import os  # noqa: E402

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("fuzz", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
