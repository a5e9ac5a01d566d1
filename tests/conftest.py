import os

import pytest
import torch


# Two cores are easily oversubscribed: keep every test at one intra-op thread.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")


@pytest.fixture
def sd3_pipe():
    from diffusion_opd_trainer.testing import tiny_sd3_pipeline

    return tiny_sd3_pipeline(seed=0)


@pytest.fixture
def sd_pipe():
    from diffusion_opd_trainer.testing import tiny_sd_pipeline

    return tiny_sd_pipeline(seed=0)
