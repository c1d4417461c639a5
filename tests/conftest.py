"""Every test starts from the same random state, so the suite draws the same inputs on every
machine and run (a test that needs other draws seeds its own generator)."""

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
