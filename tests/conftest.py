"""Shared test settings: two cores, one thread per xdist worker."""
import os

import torch

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(1 if _workers > 1 else 2)
torch.manual_seed(0)
