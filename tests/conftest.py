"""Shared test settings: two cores, one thread per xdist worker; reproducible property tests.

Hypothesis runs derandomized by default, so ``make test`` (and CI) draws the same examples every
time; ``HYPOTHESIS_PROFILE=explore`` draws fresh random examples to hunt for new failures.
"""
import os

import torch
from hypothesis import settings

settings.register_profile("deterministic", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(1 if _workers > 1 else 2)
torch.manual_seed(0)
