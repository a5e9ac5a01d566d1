"""The model card: written from the template by `save_model` beside the LoRA, with what a reader of the Hub needs."""

import re

import torch
from datasets import Dataset
from peft import LoraConfig

from diffusion_opd_trainer import DiffusionGRPOConfig, DiffusionGRPOTrainer
from diffusion_opd_trainer.hub import write_model_card
from diffusion_opd_trainer.testing import tiny_sd3_pipeline


def mean_pixel(prompts, images, **kwargs):
    return images.mean(dim=(1, 2, 3)).tolist()


def train_and_save(tmp_path, pipe):
    torch.set_num_threads(1)
    args = DiffusionGRPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=2,
        num_inference_steps=2,
        guidance_scale=3.5,
        eval_num_inference_steps=12,
        max_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = DiffusionGRPOTrainer(
        pipe,
        reward_funcs=mean_pixel,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["a cat", "a dog"]}),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k"]),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "lora"))
    return (tmp_path / "lora" / "README.md").read_text()


def test_save_model_writes_the_card_beside_the_lora(tmp_path):
    card = train_and_save(tmp_path, tiny_sd3_pipeline())
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    # Built in memory, the pipeline has no model id: the card says so instead of "None".
    assert "A LoRA for `unknown`" in card and "None" not in card
    assert len(re.findall(r"trained with", card, flags=re.IGNORECASE)) == 1  # one method sentence
    assert "Flow-GRPO" in card and "library_name: diffusers" in card
    # The usage snippet samples with the training CFG (and the evaluation's steps), not a hard-coded 4.5.
    assert "guidance_scale=3.5" in card and "num_inference_steps=12" in card and "guidance_scale=4.5" not in card
    # Metrics, not the trainer's bookkeeping.
    rows = dict(re.findall(r"^\| (\S+) \| (\S+) \|$", card, flags=re.MULTILINE))
    assert "reward" in rows and "rewards/mean_pixel/mean" in rows
    assert not {"total_flos", "epoch", "learning_rate", "train_runtime", "grad_norm", "step"} & set(rows)
    # Citations, and no Markdown link without a URL.
    assert "@article{liu2025flowgrpo" in card and "2505.05470" in card
    assert not re.search(r"\[[^\]]+\](?!\()", card.split("## Usage")[0].split("---", 2)[2])


def test_the_base_model_id_comes_from_the_pipeline(tmp_path):
    pipe = tiny_sd3_pipeline()
    pipe.register_to_config(_name_or_path="someone/tiny-sd3")
    card = train_and_save(tmp_path, pipe)
    assert "A LoRA for `someone/tiny-sd3`" in card and "base_model: someone/tiny-sd3" in card
    assert 'DiffusionPipeline.from_pretrained("someone/tiny-sd3"' in card


def test_opd_card_cites_both_papers(tmp_path):
    from diffusion_opd_trainer.opd_trainer import DiffusionOPDTrainer

    card = write_model_card(
        tmp_path,
        base_model=None,
        method=DiffusionOPDTrainer._method_name,
        tags=list(DiffusionOPDTrainer._tag_names),
        metrics={"kl": 0.5, "epoch": 1.0, "total_flos": 3.0},
        extra_sections=["## Teachers", "| task | teacher |"],
        citations=list(DiffusionOPDTrainer._citations),
    ).content
    assert "2605.15055" in card and "2505.05470" in card and "## Teachers" in card
    assert "| kl | 0.5 |" in card and "epoch" not in card.split("## Final metrics")[1].split("## Usage")[0]
