"""Test-wide settings: one torch thread per worker (`make test` runs `pytest -n 2` on 2 cores;
more threads than cores makes small CPU kernels orders of magnitude slower)."""

import torch

torch.set_num_threads(1)
