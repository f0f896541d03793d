import os
import random

import numpy as np
import pytest
import torch

# Triton kernels run on the host under the interpreter where there is no GPU. This must be
# set before triton is first imported (when the kernels are decorated).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
