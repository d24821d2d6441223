import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


# One thread: on a small shared CPU it is faster and steadier than torch's default.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def trainer_kwargs(tmp_path, **overrides):
    """The quiet, CPU-only Trainer arguments every test uses."""
    kwargs = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def tkw(tmp_path):
    return lambda **overrides: trainer_kwargs(tmp_path, **overrides)
