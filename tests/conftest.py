import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py helpers

torch.set_num_threads(1)  # tiny models: a second thread only adds overhead (and contention on shared machines)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
