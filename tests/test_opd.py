"""DiffusionOPDTrainer on the tiny SD3 pipeline: losses, teachers, schedules, estimators, errors, saving."""

import os
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from peft.utils import set_peft_model_state_dict

from diffusion_opd_trainer import DiffusionOPDConfig, DiffusionOPDTrainer, TeacherConfig
from diffusion_opd_trainer.lora import read_lora
from diffusion_opd_trainer.pipelines import get_family
from diffusion_opd_trainer.sde import sde_step
from diffusion_opd_trainer.testing import TINY_TRAINING_ARGS, save_random_lora, tiny_sd3_pipeline


PROMPTS = ["a red circle", "two blue squares", "a cat", "a dog"]
LORA = dict(
    r=8,
    lora_alpha=16,
    init_lora_weights="gaussian",
    target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
)


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
    """Two teachers of different formats: a PEFT folder (the paper's release format) and a diffusers LoRA file."""
    root = tmp_path_factory.mktemp("teachers")
    pipe = tiny_sd3_pipeline()
    peft_dir = save_random_lora(pipe, root / "peft_teacher", "peft", seed=1, std=0.3)
    diffusers_dir = save_random_lora(pipe, root / "diffusers_teacher", "diffusers", seed=2, std=0.3)
    return Path(peft_dir), Path(diffusers_dir) / "pytorch_lora_weights.safetensors"


def opd_args(tmp_path, **overrides):
    values = dict(
        TINY_TRAINING_ARGS, output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_inference_steps=4
    )
    values.update(overrides)
    return DiffusionOPDConfig(**values)


def two_task_dataset(repeat=2):
    return Dataset.from_dict({"prompt": PROMPTS * repeat, "task": ["a", "b"] * (2 * repeat)})


def make_trainer(tmp_path, teachers, dataset=None, pipe=None, **overrides):
    return DiffusionOPDTrainer(
        pipe or tiny_sd3_pipeline(),
        teachers=teachers,
        args=opd_args(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else two_task_dataset(),
        peft_config=LoraConfig(**LORA),
    )


def student_grads(trainer):
    return {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def run_one_step(trainer, rows):
    """One training step on `rows` with fresh gradients; returns (loss, grads)."""
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.training_step(trainer.model, rows)
    return loss, student_grads(trainer)


@pytest.mark.parametrize("noise_level", [0.0, 0.7])
def test_student_equal_to_teacher_gives_zero_loss_and_gradient(tmp_path, teacher_dirs, noise_level):
    peft_dir, _ = teacher_dirs
    dataset = Dataset.from_dict({"prompt": PROMPTS})
    teacher_lora = dict(LORA, r=4, lora_alpha=8)
    trainer = DiffusionOPDTrainer(
        tiny_sd3_pipeline(),
        teachers={"t": str(peft_dir)},
        train_dataset=dataset,
        args=opd_args(tmp_path, noise_level=noise_level),
        peft_config=LoraConfig(**teacher_lora),
    )
    state, _, _ = read_lora(peft_dir)
    set_peft_model_state_dict(trainer.model, state, adapter_name="default")
    rows = [dataset[i] for i in range(4)]
    loss, grads = run_one_step(trainer, rows)
    assert loss.item() == 0.0
    assert grads and all(g.abs().max().item() == 0.0 for g in grads.values())


def test_two_teachers_two_formats_each_task_kl_falls(tmp_path, teacher_dirs):
    peft_dir, diffusers_file = teacher_dirs
    trainer = make_trainer(
        tmp_path, {"a": str(peft_dir), "b": str(diffusers_file)}, max_steps=40, per_device_train_batch_size=8
    )
    assert trainer.teachers["a"].format == "peft" and trainer.teachers["b"].format == "diffusers"
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "kl" in entry]
    for task in ("a", "b"):
        first = sum(entry[f"kl/{task}"] for entry in logs[:3]) / 3
        last = sum(entry[f"kl/{task}"] for entry in logs[-3:]) / 3
        assert last < 0.5 * first, (task, first, last)
    assert trainer.teachers_unchanged() == {"a": True, "b": True}
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    teacher_params = [p for name, p in trainer.model.named_parameters() if ".teacher_" in name]
    assert teacher_params and not any(id(p) in optimized for p in teacher_params)
    assert not any(p.requires_grad for p in teacher_params)
    assert {"kl", "kl/a", "kl/b", "step_time"} <= set(logs[0])


def test_the_right_teacher_is_used_for_each_prompt(tmp_path, teacher_dirs):
    peft_dir, diffusers_file = teacher_dirs
    trainer = make_trainer(tmp_path, {"a": str(peft_dir), "b": str(diffusers_file)})
    family = trainer.family
    embeds = trainer.encode(PROMPTS)
    family.set_timesteps(4, 32, 32)
    t = family.scheduler.timesteps[1]
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    means = trainer.teacher_means(x, t, embeds, ["a", "b", "b", "a"])
    from peft import PeftModel

    for task, rows in (("a", [0, 3]), ("b", [1, 2])):
        # Independent references: PEFT's own loader for the PEFT folder, diffusers' for the diffusers file.
        reference = tiny_sd3_pipeline()
        if task == "a":
            denoiser = PeftModel.from_pretrained(reference.transformer, str(peft_dir))
        else:
            reference.load_lora_weights(str(diffusers_file))
            denoiser = reference.transformer
        ref_family = get_family(reference)
        ref_family.set_timesteps(4, 32, 32)
        velocity = ref_family.predict(x, t, ref_family.encode_prompts(PROMPTS), 1.0, denoiser=denoiser)
        expected = sde_step(ref_family.scheduler, velocity, t, x, noise_level=0.0).mean
        torch.testing.assert_close(means[rows], expected[rows], rtol=1e-4, atol=1e-5)


def test_a_teacher_on_more_modules_than_the_student_does_not_leak_into_the_student(tmp_path, teacher_dirs):
    """
    The teachers' LoRAs cover modules the student's does not (`add_*_proj`, `to_add_out`): PEFT gives those modules
    new LoRA layers running the teacher. The student's forward must stay its own there (the base weights).
    """
    trainer = DiffusionOPDTrainer(
        tiny_sd3_pipeline(),
        teachers={"a": str(teacher_dirs[0]), "b": str(teacher_dirs[1])},
        args=opd_args(tmp_path),
        train_dataset=two_task_dataset(),
        peft_config=LoraConfig(**{**LORA, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}),
    )
    student_modules = {n.split(".lora_A")[0] for n, _ in trainer.model.named_parameters() if ".lora_A.default" in n}
    teacher_modules = {n.split(".lora_A")[0] for n, _ in trainer.model.named_parameters() if ".lora_A.teacher_a" in n}
    assert teacher_modules - student_modules  # the case under test
    family = trainer.family
    embeds = trainer.encode(PROMPTS)
    family.set_timesteps(4, 32, 32)
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = family.scheduler.timesteps[1]
    with torch.no_grad():
        student = family.predict(x, t, embeds, 1.0)
    base = get_family(tiny_sd3_pipeline())
    base.set_timesteps(4, 32, 32)
    with torch.no_grad():
        expected = base.predict(x, t, base.encode_prompts(PROMPTS), 1.0)
    torch.testing.assert_close(student, expected)  # a fresh student LoRA (B = 0) is the base model


@pytest.mark.parametrize("loss_type", ["analytic", "policy_gradient"])
def test_sde_trains(tmp_path, teacher_dirs, loss_type):
    peft_dir, _ = teacher_dirs
    dataset = Dataset.from_dict({"prompt": PROMPTS})
    trainer = make_trainer(
        tmp_path, {"a": str(peft_dir)}, dataset=dataset, noise_level=0.7, loss_type=loss_type, max_steps=20
    )
    trainer.train()
    kls = [entry["kl"] for entry in trainer.state.log_history if "kl" in entry]
    assert sum(kls[-3:]) / 3 < 0.6 * sum(kls[:3]) / 3


@pytest.mark.parametrize("noise_level, loss_type", [(0.0, "analytic"), (0.7, "analytic"), (0.7, "policy_gradient")])
def test_fused_and_two_pass_give_the_same_gradient(tmp_path, teacher_dirs, noise_level, loss_type):
    peft_dir, diffusers_file = teacher_dirs
    teachers = {"a": str(peft_dir), "b": str(diffusers_file)}
    rows = [two_task_dataset()[i] for i in range(4)]
    results = []
    for schedule in ("fused", "two_pass"):
        trainer = make_trainer(
            tmp_path / schedule, teachers, rollout_schedule=schedule, noise_level=noise_level, loss_type=loss_type
        )
        results.append(run_one_step(trainer, rows))
    (loss_fused, grads_fused), (loss_two, grads_two) = results
    torch.testing.assert_close(loss_fused, loss_two, rtol=1e-5, atol=1e-8)
    assert grads_fused.keys() == grads_two.keys()
    for name in grads_fused:
        torch.testing.assert_close(grads_fused[name], grads_two[name], rtol=1e-4, atol=1e-7)


def test_estimators_share_the_analytic_expected_gradient(tmp_path, teacher_dirs):
    """
    At a fixed state, the analytic loss's gradient is exact; the two policy-gradient estimators average to it.
    Tested on the gradient with respect to the student's velocity (the parameters' gradient is a linear map of it).
    """
    peft_dir, _ = teacher_dirs
    dataset = Dataset.from_dict({"prompt": PROMPTS[:1]})
    trainer = make_trainer(tmp_path, {"a": str(peft_dir)}, dataset=dataset, noise_level=0.7)
    scheduler = trainer.family.scheduler
    trainer.family.set_timesteps(4, 32, 32)
    t = scheduler.timesteps[1]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=generator)
    v_student = torch.randn(1, 4, 16, 16, generator=generator)
    v_teacher = v_student + 0.5 * torch.randn(1, 4, 16, 16, generator=generator)
    samples = 20000
    teacher_mean = sde_step(scheduler, v_teacher, t, x, noise_level=0.7, prev_sample=x).mean.expand(
        samples, -1, -1, -1
    )
    grads = {}
    for loss_type in ("analytic", "policy_gradient", "score_function"):
        trainer.args.loss_type = loss_type
        v = v_student.expand(samples, -1, -1, -1).clone().requires_grad_(True)
        step = sde_step(
            scheduler, v, t, x.expand(samples, -1, -1, -1), noise_level=0.7, generator=torch.Generator().manual_seed(1)
        )
        loss, _ = trainer.step_loss(step, teacher_mean)
        (loss * samples).backward()
        grads[loss_type] = v.grad.flatten(1).double()  # one gradient per sampled transition
    exact = grads["analytic"][0]
    assert torch.allclose(grads["analytic"], exact.expand_as(grads["analytic"]), rtol=1e-4, atol=1e-8)
    for loss_type in ("policy_gradient", "score_function"):
        estimate = grads[loss_type]
        mean, standard_error = estimate.mean(dim=0), estimate.std(dim=0) / samples**0.5
        # ||mean - exact||^2 / sum(SE^2) is about 1 for an unbiased estimator (a chi-square over the dimensions).
        z = ((mean - exact) ** 2).sum() / (standard_error**2).sum()
        assert z < 1.3, (loss_type, z.item())
        assert estimate.var(dim=0).sum() > 0  # a real estimator, not the analytic gradient in disguise


def test_round_robin_batches_hold_one_task(tmp_path, teacher_dirs):
    peft_dir, diffusers_file = teacher_dirs
    trainer = make_trainer(tmp_path, {"a": str(peft_dir), "b": str(diffusers_file)}, task_mixing="round_robin")
    batches = list(trainer.get_train_dataloader())
    tasks = [{row["task"] for row in batch} for batch in batches]
    assert all(len(t) == 1 for t in tasks) and [t.pop() for t in tasks[:2]] == ["a", "b"]


def test_teacher_guidance_scale_and_hub_source(tmp_path, teacher_dirs, local_hub):
    """A Hub id resolves through a local cache laid out as the Hub's, with a subfolder and a revision."""
    peft_dir, _ = teacher_dirs
    snapshot = local_hub(peft_dir, "user/teachers", "geneval")
    dataset = Dataset.from_dict({"prompt": PROMPTS})
    trainer = make_trainer(
        tmp_path, {"geneval": TeacherConfig("user/teachers/geneval@main", guidance_scale=3.0)}, dataset=dataset
    )
    teacher = trainer.teachers["geneval"]
    assert teacher.path == snapshot and teacher.format == "peft"
    assert trainer.teacher_guidance_scale(teacher) == 3.0


def test_errors_name_the_culprit(tmp_path, teacher_dirs):
    peft_dir, diffusers_file = teacher_dirs
    with pytest.raises(ValueError, match=r"task\(s\) \['b'\] with no teacher"):
        make_trainer(tmp_path, {"a": str(peft_dir)})
    with pytest.raises(ValueError, match="needs a `task` column"):
        make_trainer(
            tmp_path, {"a": str(peft_dir), "b": str(diffusers_file)}, dataset=Dataset.from_dict({"prompt": PROMPTS})
        )
    with pytest.raises(FileNotFoundError, match="missing_teacher"):
        make_trainer(tmp_path, {"a": "./missing_teacher", "b": str(diffusers_file)})
    other = save_random_lora(tiny_sd3_pipeline(num_layers=3), tmp_path / "other", "peft")
    with pytest.raises(ValueError, match=r"task 'a'.*does not match the pipeline"):
        make_trainer(tmp_path, {"a": other, "b": str(diffusers_file)})
    wide = save_random_lora(tiny_sd3_pipeline(), tmp_path / "wide", "diffusers", target_modules=["ff.net.2"])
    with pytest.raises(ValueError, match="task 'b'"):
        # A LoRA on layers the pipeline has, but with the wrong shapes, is caught too.
        state = wide
        pipe = tiny_sd3_pipeline()
        pipe.transformer.transformer_blocks[0].ff.net[2] = torch.nn.Linear(7, 32)
        make_trainer(tmp_path, {"a": str(peft_dir), "b": state}, pipe=pipe)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(loss_type="policy_gradient", noise_level=0.0), "stochastic kernel"),
        (dict(loss_type="score_function"), "stochastic kernel"),
        (dict(loss_type="reinforce"), "loss_type"),
        (dict(rollout_schedule="fused", num_iterations=2), "fused"),
        (dict(task_mixing="random"), "task_mixing"),
        (dict(teacher_guidance_scales="{oops"), "JSON"),
    ],
)
def test_invalid_configs_raise_clear_errors(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        opd_args(tmp_path, **overrides)


def test_saved_student_loads_in_plain_diffusers_pipeline(tmp_path, teacher_dirs):
    peft_dir, _ = teacher_dirs
    dataset = Dataset.from_dict({"prompt": PROMPTS})
    trainer = make_trainer(tmp_path, {"a": str(peft_dir)}, dataset=dataset, max_steps=3)
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))
    files = set(os.listdir(tmp_path / "student"))
    assert {"pytorch_lora_weights.safetensors", "adapter_config.json", "adapter_model.safetensors"} <= files
    state, config, _ = read_lora(tmp_path / "student")
    assert all("teacher" not in key for key in state) and config.r == 8 and config.lora_alpha == 16
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    family = trainer.family
    expected = family.predict(x, 500.0, trainer.encode(PROMPTS[:2]), 1.0)
    fresh = tiny_sd3_pipeline()
    fresh.load_lora_weights(str(tmp_path / "student"))
    fresh_family = get_family(fresh)
    got = fresh_family.predict(x, 500.0, fresh_family.encode_prompts(PROMPTS[:2]), 1.0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Teachers" in card and str(peft_dir) in card


def test_evaluate_routes_monitoring_rewards_by_task(tmp_path, teacher_dirs):
    peft_dir, diffusers_file = teacher_dirs

    def bright(prompts, images, **kwargs):
        return images.mean(dim=(1, 2, 3)).tolist()

    def dark(prompts, images, **kwargs):
        return (1 - images.mean(dim=(1, 2, 3))).tolist()

    trainer = DiffusionOPDTrainer(
        tiny_sd3_pipeline(),
        teachers={"a": str(peft_dir), "b": str(diffusers_file)},
        args=opd_args(tmp_path, eval_num_inference_steps=2),
        train_dataset=two_task_dataset(),
        eval_dataset=two_task_dataset(repeat=1),
        peft_config=LoraConfig(**LORA),
        eval_reward_funcs={"a": bright, "b": dark},
    )
    trainer.train()
    assert {"rewards/a/mean", "rewards/b/mean"} <= set(trainer.state.log_history[0])  # proxy rewards of rollouts
    metrics = trainer.evaluate()
    a, b = metrics["eval_rewards/a/mean"], metrics["eval_rewards/b/mean"]
    assert a + b == pytest.approx(1.0, abs=0.05)  # near-identical tiny images, scored bright for a and dark for b
    assert metrics["eval_reward"] == pytest.approx((a + b) / 2)


def test_evaluation_harness_reads_peft_teachers(teacher_dirs):
    from diffusion_opd_trainer import evaluate

    peft_dir, _ = teacher_dirs

    def mean_pixel(prompts, images, **kwargs):
        return images.mean(dim=(1, 2, 3)).tolist()

    pipe = tiny_sd3_pipeline()
    kwargs = dict(num_inference_steps=2, guidance_scale=1.0, show_progress=False)
    base = evaluate(pipe, PROMPTS, [mean_pixel], **kwargs)
    with_lora = evaluate(pipe, PROMPTS, [mean_pixel], lora=str(peft_dir), **kwargs)
    again = evaluate(pipe, PROMPTS, [mean_pixel], **kwargs)
    assert with_lora.metrics["eval"]["mean_pixel"] != base.metrics["eval"]["mean_pixel"]
    assert again.metrics == base.metrics  # the LoRA is removed afterwards


def test_teacher_of_another_base_model_gets_a_warning(tmp_path, teacher_dirs, caplog):
    import json
    import shutil

    peft_dir, _ = teacher_dirs
    foreign = tmp_path / "foreign"
    shutil.copytree(peft_dir, foreign)
    config = json.loads((foreign / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "black-forest-labs/FLUX.1-dev"
    (foreign / "adapter_config.json").write_text(json.dumps(config))
    pipe = tiny_sd3_pipeline()
    pipe.register_to_config(_name_or_path="stabilityai/stable-diffusion-3.5-medium")
    with caplog.at_level("WARNING", logger="diffusion_opd_trainer.teachers"):
        make_trainer(tmp_path, {"a": str(foreign)}, dataset=Dataset.from_dict({"prompt": PROMPTS}), pipe=pipe)
    assert "FLUX.1-dev" in caplog.text and "task 'a'" in caplog.text


def test_loading_a_teacher_does_not_warn_about_multiple_adapters(teacher_dirs):
    # Student and teachers share one denoiser by design: PEFT's "multiple adapters" warning would only be noise.
    from diffusion_opd_trainer.lora import add_student_adapter, load_adapter

    pipe = tiny_sd3_pipeline()
    add_student_adapter(pipe.transformer, LoraConfig(**LORA))
    state_dict, config, _ = read_lora(teacher_dirs[0], denoiser=pipe.transformer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_adapter(pipe.transformer, state_dict, config, "teacher_a", "test teacher")
    assert not [w for w in caught if "peft_config" in str(w.message)]
