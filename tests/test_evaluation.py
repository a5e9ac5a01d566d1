"""The evaluation harness on the tiny SD3 pipeline: seeds, batching, tables, LoRA loading, GenEval aggregation."""

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch


torch.set_num_threads(1)

from diffusion_opd_trainer.evaluation import EvaluationCallback, EvaluationResult, evaluate, format_table  # noqa: E402
from diffusion_opd_trainer.rewards import GenEvalReward, JpegCompressibility, PickScoreReward  # noqa: E402
from diffusion_opd_trainer.rewards.testing import tiny_clip, tiny_mask2former  # noqa: E402
from diffusion_opd_trainer.rollout import rollout  # noqa: E402
from diffusion_opd_trainer.testing import SD3_LORA_TARGET_MODULES, tiny_sd3_pipeline  # noqa: E402


PROMPTS = ["a red circle", "two blue squares", "a cat on the left of a dog"]
STEPS = 4


def mean_pixel(prompts, images, **kwargs):
    return images.mean(dim=(1, 2, 3)).tolist()


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd3_pipeline(seed=0)


def test_scores_seeds_and_batching(pipe, tmp_path):
    result = evaluate(
        pipe,
        {"shapes": PROMPTS},
        ["jpeg_incompressibility", mean_pixel],
        num_inference_steps=STEPS,
        batch_size=2,
        seed=7,
        model_name="base",
        output_dir=tmp_path,
        show_progress=False,
    )
    samples = result.samples["shapes"]
    assert [s["seed"] for s in samples] == [7, 8, 9]
    # Image i is the ODE sample from the noise of a CPU generator seeded seed + i, whatever the batch.
    for i, prompt in enumerate(PROMPTS):
        image = rollout(
            pipe,
            [prompt],
            num_inference_steps=STEPS,
            guidance_scale=4.5,
            noise_level=0.0,
            generator=[torch.Generator().manual_seed(7 + i)],
            decode=True,
        ).images
        assert samples[i]["mean_pixel"] == pytest.approx(image.mean().item(), abs=1e-6)
    metrics = result.metrics["shapes"]
    assert metrics["mean_pixel"] == pytest.approx(sum(s["mean_pixel"] for s in samples) / 3)
    assert metrics["jpeg_incompressibility"] == pytest.approx(sum(s["jpeg_incompressibility"] for s in samples) / 3)
    one_by_one = evaluate(
        pipe, {"shapes": PROMPTS}, [mean_pixel], num_inference_steps=STEPS, batch_size=1, seed=7, show_progress=False
    )
    assert [s["mean_pixel"] for s in one_by_one.samples["shapes"]] == pytest.approx(
        [s["mean_pixel"] for s in samples], abs=1e-6
    )
    # Files: JSON with everything, Markdown with the table.
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["metrics"] == result.metrics and saved["settings"]["num_inference_steps"] == STEPS
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0] == "| model | jpeg_incompressibility | mean_pixel |"
    assert table[2] == f"| base | {metrics['jpeg_incompressibility']:.4f} | {metrics['mean_pixel']:.4f} |"


def test_defaults_are_the_paper_sampler(pipe):
    result = evaluate(pipe, PROMPTS[:1], [mean_pixel], show_progress=False)
    assert result.settings["num_inference_steps"] == 40 and result.settings["guidance_scale"] == 4.5
    assert result.settings["sampler"] == "ode" and set(result.metrics) == {"eval"}


def test_tasks_columns_and_images_per_prompt(pipe, tmp_path):
    from datasets import Dataset

    seen = []

    def needs_column(prompts, images, difficulty, **kwargs):
        seen.extend(difficulty)
        return [float(d) for d in difficulty]

    data = Dataset.from_dict({"prompt": PROMPTS[:2], "difficulty": [1, 3]})
    result = evaluate(
        pipe,
        {"a": data, "b": [{"prompt": "a dog", "difficulty": 5}]},
        {"a": needs_column, "b": [needs_column, mean_pixel]},
        num_inference_steps=2,
        num_images_per_prompt=2,
        batch_size=3,
        output_dir=tmp_path,
        save_images=True,
        show_progress=False,
    )
    assert seen == [1, 1, 3, 3, 5, 5]
    assert result.metrics["a"]["needs_column"] == 2.0 and result.metrics["b"]["needs_column"] == 5.0
    assert [s["seed"] for s in result.samples["a"]] == [0, 1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "00000_00.png",
        "00000_01.png",
        "00001_00.png",
        "00001_01.png",
    ]
    # A metric shared by two tasks is labelled task/metric.
    assert result.to_markdown().splitlines()[0] == "| model | a/needs_column | b/needs_column | mean_pixel |"
    with pytest.raises(ValueError, match="report a metric named 'mean_pixel'"):
        evaluate(
            pipe,
            PROMPTS[:1],
            [mean_pixel, JpegCompressibility(name="mean_pixel")],
            num_inference_steps=1,
            show_progress=False,
        )
    with pytest.raises(ValueError, match="No reward for task"):
        evaluate(pipe, {"a": PROMPTS, "c": PROMPTS}, {"a": mean_pixel}, show_progress=False)


def test_format_table_rows():
    teacher = EvaluationResult("teacher", {"geneval": {"geneval": 0.9}, "ocr": {"ocr": 0.5}})
    student = EvaluationResult("student", {"geneval": {"geneval": 0.96}, "ocr": {"ocr": float("nan")}})
    assert format_table([teacher, student], precision=2).splitlines() == [
        "| model | geneval | ocr |",
        "|---|---:|---:|",
        "| teacher | 0.90 | 0.50 |",
        "| student | 0.96 | - |",
    ]


def test_lora_is_applied_then_removed(pipe, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    # A random (non-zero) LoRA made on a copy of the pipeline, saved in diffusers format.
    donor = tiny_sd3_pipeline(seed=0)
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=SD3_LORA_TARGET_MODULES)
    donor.transformer.add_adapter(config)
    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(donor.transformer)
    )

    kwargs = {"num_inference_steps": STEPS, "show_progress": False}
    base = evaluate(pipe, PROMPTS[:2], [mean_pixel], **kwargs).samples["eval"]
    tuned = evaluate(pipe, PROMPTS[:2], [mean_pixel], lora=tmp_path, **kwargs)
    assert tuned.model_name == str(tmp_path) and tuned.settings["lora"] == str(tmp_path)
    assert all(abs(a["mean_pixel"] - b["mean_pixel"]) > 1e-4 for a, b in zip(base, tuned.samples["eval"]))
    # The LoRA is gone afterwards: the pipeline samples as before.
    again = evaluate(pipe, PROMPTS[:2], [mean_pixel], **kwargs).samples["eval"]
    assert [s["mean_pixel"] for s in again] == pytest.approx([s["mean_pixel"] for s in base], abs=1e-6)
    assert not pipe.get_list_adapters().get("transformer")


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="Mask2Former needs scipy (extra `geneval`)")
def test_geneval_and_pickscore_through_the_harness(pipe):
    clip_model, clip_processor = tiny_clip()
    detector, detector_processor = tiny_mask2former()
    geneval = GenEvalReward(
        detector=detector,
        detector_processor=detector_processor,
        clip_model=clip_model,
        clip_processor=clip_processor,
        detector_size=None,
    )
    geneval.load()
    with torch.no_grad():  # every query a confident cat: single-object "cat" prompts pass, "dog" ones fail
        detector.class_predictor.bias.zero_()
        detector.class_predictor.bias[15] = 30.0
    rows = [
        {
            "prompt": "a photo of a cat",
            "metadata": {"tag": "single_object", "include": [{"class": "cat", "count": 1}]},
        },
        {
            "prompt": "a photo of a dog",
            "metadata": {"tag": "single_object", "include": [{"class": "dog", "count": 1}]},
        },
        {"prompt": "a cat and a dog", "metadata": {"tag": "two_object", "include": [{"class": "cat", "count": 1}]}},
    ]
    pickscore = PickScoreReward(model=clip_model, processor=clip_processor, scale=1 / 26)
    result = evaluate(
        pipe,
        {"geneval": rows, "pickscore": PROMPTS},
        {"geneval": geneval, "pickscore": pickscore},
        num_inference_steps=2,
        show_progress=False,
    )
    # Binary per image [1, 0, 1]; GenEval's overall is the mean of tag means: (1/2 + 1) / 2 = 0.75.
    assert [s["geneval"] for s in result.samples["geneval"]] == [1.0, 0.0, 1.0]
    assert result.metrics["geneval"]["geneval"] == 0.75
    assert result.metrics["geneval"]["geneval_reward"] == pytest.approx(2 / 3)
    # The table reports the raw PickScore, not the training scale.
    raw = [s["pickscore"] for s in result.samples["pickscore"]]
    images = torch.cat(
        [
            rollout(
                pipe,
                [p],
                num_inference_steps=2,
                noise_level=0.0,
                generator=[torch.Generator().manual_seed(i)],
                decode=True,
            ).images
            for i, p in enumerate(PROMPTS)
        ]
    )
    assert raw == pytest.approx([26 * s for s in pickscore(PROMPTS, images)], rel=1e-4)


def test_callback_logs_and_writes(pipe, tmp_path):
    state = SimpleNamespace(global_step=1, is_world_process_zero=True, log_history=[])
    # The callback logs through its trainer's `log`, which (like `Trainer.log`) adds the entry to the history.
    trainer = SimpleNamespace(log=lambda logs: state.log_history.append({**logs, "step": state.global_step}))
    callback = EvaluationCallback(
        pipe, {"shapes": PROMPTS[:1]}, [mean_pixel], eval_steps=2, trainer=trainer, num_inference_steps=2
    )
    args = SimpleNamespace(output_dir=str(tmp_path), eval_steps=None, logging_steps=1)
    callback.on_step_end(args, state, None)
    assert state.log_history == []
    state.global_step = 2
    callback.on_step_end(args, state, None)
    callback.on_train_end(args, state, None)  # same step: not evaluated twice
    assert len(state.log_history) == 1 and state.log_history[0]["step"] == 2
    assert state.log_history[0]["eval/mean_pixel"] == callback.results[0].metrics["shapes"]["mean_pixel"]
    assert (tmp_path / "evaluation" / "step-2" / "results.md").exists()


def test_one_seeded_sampler_for_the_harness_and_the_toy_world(pipe):
    from diffusion_opd_trainer import toy
    from diffusion_opd_trainer.evaluation import sample_images

    whole = sample_images(pipe, PROMPTS, [3, 4, 5], num_inference_steps=2, guidance_scale=1.0)
    batched = sample_images(pipe, PROMPTS, [3, 4, 5], num_inference_steps=2, guidance_scale=1.0, batch_size=2)
    torch.testing.assert_close(whole, batched)  # the same noise; batched matmuls may differ in the last bits
    toy_images = toy.model.sample(pipe, PROMPTS, num_inference_steps=2, guidance_scale=1.0, seed=3, batch_size=2)
    assert torch.equal(toy_images, batched.cpu())


def test_callback_in_training_keeps_each_steps_own_log(tmp_path):
    """
    An evaluation logged from `on_step_end` does not cancel the step's training log (`Trainer.log` clears
    `should_log`): under several processes the others would wait in that log's loss gather.
    """
    from test_grpo import make_trainer

    trainer = make_trainer(tmp_path, max_steps=2)
    callback = EvaluationCallback(trainer.pipeline, PROMPTS[:1], [mean_pixel], eval_steps=1, num_inference_steps=2)
    trainer.add_callback(callback)
    callback.trainer = trainer
    trainer.train()
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [1, 2]
    assert [entry["step"] for entry in trainer.state.log_history if "eval/mean_pixel" in entry] == [1, 2]
