from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    from signalrl.models import load_model

    model, tok = load_model("tiny", seed=0)
    model.eval()
    return model, tok
