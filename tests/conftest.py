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


@pytest.fixture(scope="module")
def random_teachers(tmp_path_factory):
    """Two random teacher LoRAs for tasks "a" (a PEFT folder) and "b" (a diffusers folder) of the tiny SD3 pipeline."""
    from diffusion_opd_trainer.testing import save_random_lora, tiny_sd3_pipeline

    root = tmp_path_factory.mktemp("random_teachers")
    pipe = tiny_sd3_pipeline()
    return {
        "a": save_random_lora(pipe, root / "a", "peft", seed=1, std=0.3),
        "b": save_random_lora(pipe, root / "b", "diffusers", seed=2, std=0.3),
    }


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """
    A local cache laid out as the Hub's, offline: `local_hub(folder, "user/repo", "sub")` publishes a copy of `folder`
    as the subfolder `sub` of `user/repo` at `main` and returns its snapshot path, so that the id
    `"user/repo/sub@main"` resolves to it.
    """
    import shutil

    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def publish(folder, repo_id: str, subfolder: str, commit: str = "a" * 40):
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / commit / subfolder
        shutil.copytree(folder, snapshot)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        return snapshot

    return publish
