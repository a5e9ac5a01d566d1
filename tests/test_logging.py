"""What a person looks at while training: captioned image grids in TensorBoard and W&B, the step phases beside the
progress bar, and no stray warnings from a plain run."""

import glob
import importlib.util
import logging
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig
from test_grpo import LORA, PROMPTS, grpo_args, make_pattern_reward
from transformers import TrainerCallback
from transformers.utils import logging as transformers_logging

from diffusion_opd_trainer import DiffusionGRPOTrainer, DiffusionOPDConfig, DiffusionOPDTrainer, toy
from diffusion_opd_trainer.image_logging import MAX_IMAGES, caption, image_grid
from diffusion_opd_trainer.progress import StepPhaseCallback
from diffusion_opd_trainer.testing import TINY_TRAINING_ARGS, save_random_lora, tiny_sd3_pipeline


# Python warnings a tiny GRPO or OPD run may emit (regular expressions on the message), each with its reason. Keep
# it empty unless a library's warning cannot be avoided: every new one should be silenced where it is meaningless
# (a filter on the exact message around the call that causes it) or said once with its meaning.
ALLOWED_WARNINGS: list[str] = []
# Log records at WARNING or above (this package, transformers, diffusers) a tiny run may emit, with their reasons.
ALLOWED_LOG_WARNINGS = [
    # Said once per run, naming the tokenizer and a prompt: the user's prompts lose their end.
    r"^Prompts longer than \d+ tokens are truncated by `\w+`'s text encoder .* Said once per run\.$",
]
# Longer than the tiny tokenizers' limit: the truncation notices must be said once, not per batch or per tokenizer.
LONG_PROMPT = "a black cat left of a white dog next to a red sign saying one two three four five six"


class PhaseRecorder(TrainerCallback):
    """A callback recording the phases the trainer announces (`on_step_phase` is the trainers' hook)."""

    def __init__(self):
        self.phases: list[tuple[int, str]] = []

    def on_step_phase(self, args, state, control, phase, **kwargs):
        self.phases.append((state.global_step, phase))


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    pipe = tiny_sd3_pipeline()
    a = save_random_lora(pipe, root / "a", "peft", seed=1, std=0.3)
    b = save_random_lora(pipe, root / "b", "peft", seed=2, std=0.3)
    return {"a": str(a), "b": str(b)}


def use_offline_wandb(monkeypatch, root):
    """W&B in offline mode writing under `root` (no network, no account); returns the `wandb` module."""
    import wandb

    monkeypatch.delenv("WANDB_DISABLED", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(root))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "diffusion-opd-tests")
    wandb.teardown()  # wandb reads its settings (the folder among them) once per process: start afresh
    return wandb


def close_wandb(wandb):
    """Ends the run (its files are then complete) and wandb's process-wide state."""
    wandb.finish()
    wandb.teardown()


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B in offline mode writing under `tmp_path`; skipped without wandb."""
    pytest.importorskip("wandb")
    wandb = use_offline_wandb(monkeypatch, tmp_path)
    yield tmp_path
    close_wandb(wandb)


def grpo_trainer(tmp_path, callbacks=None, eval_prompts=None, prompts=PROMPTS, **overrides):
    pipe = tiny_sd3_pipeline()
    return DiffusionGRPOTrainer(
        pipe,
        reward_funcs=make_pattern_reward(pipe),
        args=grpo_args(tmp_path, **overrides),
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        eval_dataset=Dataset.from_dict({"prompt": eval_prompts}) if eval_prompts else None,
        peft_config=LoraConfig(**LORA),
        callbacks=callbacks,
    )


def opd_trainer(tmp_path, teachers, callbacks=None, prompts=PROMPTS, **overrides):
    values = dict(
        TINY_TRAINING_ARGS, output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_inference_steps=3
    )
    values.update(overrides)
    dataset = Dataset.from_dict({"prompt": prompts * 2, "task": ["a", "b"] * len(prompts)})
    return DiffusionOPDTrainer(
        tiny_sd3_pipeline(),
        teachers=teachers,
        args=DiffusionOPDConfig(**values),
        train_dataset=dataset,
        eval_dataset=dataset.select(range(2)),
        peft_config=LoraConfig(**LORA),
        eval_reward_funcs={task: (lambda prompts, images, **kw: images.mean(dim=(1, 2, 3)).tolist()) for task in "ab"},
        callbacks=callbacks,
    )


def tensorboard_events(output_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(Path(output_dir).rglob("events.out.tfevents*")).parent))
    events.Reload()
    return events


def tensorboard_text(events, tag):
    return [event.tensor_proto.string_val[0].decode() for event in events.Tensors(f"{tag}/text_summary")]


def wandb_run_dir(root):
    (run_dir,) = glob.glob(os.path.join(root, "wandb", "offline-run-*"))
    return Path(run_dir)


# ----- the grid ------------------------------------------------------------------------------------------------------
def test_grid_puts_each_caption_under_its_image():
    images = torch.rand(5, 3, 32, 32)
    long = "a very long prompt " * 20
    captions = [caption("a red circle", "reward 0.500"), long, "x", "日本語のプロンプト", ""]
    grid = image_grid(images, captions, columns=3)
    assert grid.mode == "RGB"
    # 3 columns, 2 rows; 32-pixel images enlarged to 256, with room for at most 4 caption lines under each.
    assert grid.width == 3 * (256 + 8)
    assert 2 * (256 + 12) < grid.height <= 2 * (256 + 12 + 4 * 20)
    with pytest.raises(ValueError, match="captions"):
        image_grid(images, captions[:2])


# ----- images to TensorBoard and W&B ---------------------------------------------------------------------------------
def test_grpo_rollout_and_evaluation_images_in_tensorboard(tmp_path):
    trainer = grpo_trainer(
        tmp_path,
        eval_prompts=PROMPTS[:2],
        max_steps=2,
        report_to=["tensorboard"],
        log_images_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        eval_num_inference_steps=2,
    )
    trainer.train()
    events = tensorboard_events(tmp_path / "out")
    assert {"rollout/images", "eval/images"} <= set(events.Tags()["images"])
    rollout_images = events.Images("rollout/images")
    assert [image.step for image in rollout_images] == [0, 1]  # once per step
    assert rollout_images[0].width > 256 and rollout_images[0].height > 256  # a grid of captioned tiles
    captions = tensorboard_text(events, "rollout/images/captions")
    assert len(captions) == 2
    assert "a red circle" in captions[0] and "reward" in captions[0] and "advantage" in captions[0]
    (eval_captions,) = tensorboard_text(events, "eval/images/captions")
    assert "1. a red circle" in eval_captions and "2. two blue squares" in eval_captions


def test_grpo_images_in_offline_wandb(tmp_path, offline_wandb):
    trainer = grpo_trainer(tmp_path, max_steps=1, report_to=["wandb"], log_images_steps=1)
    trainer.train()
    import wandb

    close_wandb(wandb)  # the run's record is complete once wandb's service has stopped
    run_dir = wandb_run_dir(offline_wandb)
    media = sorted((run_dir / "files" / "media" / "images" / "rollout").glob("*.png"))
    assert len(media) == min(8, MAX_IMAGES), media  # one file per image of the rollout
    record = next(run_dir.glob("run-*.wandb")).read_bytes()
    for text in (b"captions", b"a red circle", b"advantage"):
        assert text in record, (text, len(record))


def test_opd_images_in_tensorboard_and_wandb(tmp_path, teacher_dirs, monkeypatch):
    """TensorBoard always; W&B (offline) too when it is installed."""
    with_wandb = importlib.util.find_spec("wandb") is not None
    if with_wandb:
        wandb = use_offline_wandb(monkeypatch, tmp_path)
    report_to = ["tensorboard", "wandb"] if with_wandb else ["tensorboard"]
    trainer = opd_trainer(tmp_path, teacher_dirs, max_steps=1, report_to=report_to, log_images_steps=1)
    try:
        trainer.train()
        trainer.evaluate()  # after training: its images still reach both integrations
    finally:
        if with_wandb:
            close_wandb(wandb)
    events = tensorboard_events(tmp_path / "out")
    assert {"rollout/images", "eval/images"} <= set(events.Tags()["images"])
    (captions,) = tensorboard_text(events, "rollout/images/captions")
    assert "task a, step KL" in captions and "task b" in captions and "reward" in captions
    assert "a red circle" in captions
    if with_wandb:
        run_dir = wandb_run_dir(tmp_path)
        assert len(list((run_dir / "files" / "media" / "images" / "rollout").glob("*.png"))) == 4
        assert len(list((run_dir / "files" / "media" / "images" / "eval").glob("*.png"))) == 2


def test_images_without_an_image_integration_warn(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="diffusion_opd_trainer"):
        grpo_trainer(tmp_path, log_images_steps=1, report_to=[])
    assert "no image will be logged" in caplog.text


# ----- step phases ---------------------------------------------------------------------------------------------------
def test_step_phases_reach_callbacks_and_the_progress_bar(tmp_path, teacher_dirs, monkeypatch, capsys):
    monkeypatch.setattr(StepPhaseCallback, "min_step_seconds", 0.0)  # every step counts as long
    recorder = PhaseRecorder()
    trainer = grpo_trainer(tmp_path / "grpo", callbacks=[recorder], max_steps=1, disable_tqdm=False)
    trainer.train()
    # 4 rollout steps, the first 3 trained.
    assert recorder.phases == [(0, "rollout"), (0, "reward"), (0, "train 1/3"), (0, "train 2/3"), (0, "train 3/3")]
    shown = capsys.readouterr().err
    assert "rollout" in shown and "train 3/3" in shown

    recorder = PhaseRecorder()
    trainer = opd_trainer(
        tmp_path / "opd", teacher_dirs, callbacks=[recorder], max_steps=1, rollout_schedule="two_pass"
    )
    trainer.train()
    assert [phase for _, phase in recorder.phases] == ["rollout", "teachers", "train 1/2", "train 2/2", "reward"]
    assert "rollout" not in capsys.readouterr().err  # disable_tqdm: no bar, nothing shown


def test_quick_steps_show_no_phase(tmp_path, capsys):
    trainer = grpo_trainer(tmp_path, max_steps=1, disable_tqdm=False)
    trainer.train()
    assert "rollout" not in capsys.readouterr().err


# ----- reused rollouts across an evaluation --------------------------------------------------------------------------
def test_reused_rollouts_train_after_an_evaluation(tmp_path, teacher_dirs):
    """An evaluation (its own step count) between two iterations of a rollout used to break the second iteration."""
    settings = dict(num_iterations=2, max_steps=2, eval_strategy="steps", eval_steps=1, eval_num_inference_steps=2)
    grpo = grpo_trainer(tmp_path / "grpo", eval_prompts=PROMPTS[:2], **settings)
    grpo.train()
    opd = opd_trainer(tmp_path / "opd", teacher_dirs, rollout_schedule="two_pass", **settings)
    opd.train()
    for trainer in (grpo, opd):
        assert trainer.state.global_step == 2
        assert sum("eval_reward" in entry for entry in trainer.state.log_history) == 2


# ----- noise ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["grpo", "opd"])
def test_tiny_runs_emit_no_stray_warnings(tmp_path, teacher_dirs, method, caplog):
    """
    A plain tiny run (training, evaluation, checkpoints, images, the final save, a prompt longer than the tokenizers'
    limit) emits no Python warning outside `ALLOWED_WARNINGS`, and no log warning of this package, transformers or
    diffusers outside `ALLOWED_LOG_WARNINGS`.
    """
    settings = dict(
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        eval_num_inference_steps=2,
        report_to=["tensorboard"],
        log_images_steps=1,
    )
    prompts = [LONG_PROMPT, *PROMPTS[1:]]
    libraries = [logging.getLogger(name) for name in ("transformers", "diffusers")]  # they do not propagate
    for library in libraries:
        library.addHandler(caplog.handler)
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, "diffusion_opd_trainer"):
            warnings.simplefilter("always")
            if method == "grpo":
                trainer = grpo_trainer(tmp_path, eval_prompts=prompts[:2], prompts=prompts, **settings)
            else:
                trainer = opd_trainer(tmp_path, teacher_dirs, prompts=prompts, **settings)
            trainer.train()
            trainer.save_model()
    finally:
        for library in libraries:
            library.removeHandler(caplog.handler)
    stray = [w for w in caught if not any(re.search(allowed, str(w.message)) for allowed in ALLOWED_WARNINGS)]
    assert not stray, "\n".join(f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in stray)
    records = [record for record in caplog.records if record.levelno >= logging.WARNING]
    stray = [r for r in records if not any(re.search(allowed, r.getMessage()) for allowed in ALLOWED_LOG_WARNINGS)]
    assert not stray, "\n".join(f"{r.name}: {r.getMessage()}" for r in stray)
    assert len(records) == 1  # the truncation notice, once


def test_toy_model_loads_without_bars_and_restores_them(capfd):
    """The toy model loads in a second: no loading bars in the output, and each library's bar setting is restored."""
    libraries = (diffusers_logging, transformers_logging)
    saved = [library.is_progress_bar_enabled() for library in libraries]  # other tests may have changed them
    try:
        for library in libraries:
            library.enable_progress_bar()
        toy.load_pipeline()
        assert "Loading" not in capfd.readouterr().err
        assert all(library.is_progress_bar_enabled() for library in libraries)
        diffusers_logging.disable_progress_bar()
        toy.load_pipeline()
        assert not diffusers_logging.is_progress_bar_enabled()  # a caller's own setting is kept
    finally:
        for library, enabled in zip(libraries, saved):
            library.enable_progress_bar() if enabled else library.disable_progress_bar()
