"""The miniature Table 1: quick mode end to end (files, rows, columns, compute accounting, cache), helpers."""

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch


torch.set_num_threads(1)

from diffusion_opd_trainer import toy  # noqa: E402
from diffusion_opd_trainer.toy.table import (  # noqa: E402
    ForwardCounter,
    TableConfig,
    _compute_to_reach,
    run_table,
)


ROOT = Path(__file__).resolve().parents[1]
ROWS = [
    "base",
    "teacher (compositional)",
    "teacher (text)",
    "teacher (preference)",
    "multi-task GRPO",
    "cascade GRPO",
    "OPD-ODE",
    "OPD-SDE (noise 0.7)",
]


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_forward_counter_counts_batch_and_grad_and_pauses():
    layer = torch.nn.Linear(3, 3)

    class Denoiser(torch.nn.Module):
        def forward(self, hidden_states, timestep=None):
            return layer(hidden_states)

    denoiser, counter = Denoiser(), ForwardCounter()
    counter.attach(denoiser)
    with torch.no_grad():
        denoiser(hidden_states=torch.zeros(4, 3))
    denoiser(torch.zeros(6, 3))
    with counter.paused():
        denoiser(hidden_states=torch.zeros(100, 3))
    counter.detach()
    denoiser(hidden_states=torch.zeros(100, 3))
    assert (counter.forwards, counter.grad_forwards, counter.calls) == (10, 6, 2)


def test_compute_to_reach_interpolates():
    curve = [{"forwards": 0}, {"forwards": 100}, {"forwards": 200}]
    assert _compute_to_reach(curve, [0.0, 0.5, 1.0], 0.75) == pytest.approx(150.0)
    assert _compute_to_reach(curve, [0.0, 0.5, 1.0], 0.5) == pytest.approx(100.0)
    assert _compute_to_reach(curve, [0.0, 0.5, 1.0], 1.5) is None


def test_quick_table_end_to_end(tmp_path):
    main = _load_script(ROOT / "benchmarks" / "toy_table.py").main
    output_dir = tmp_path / "toy_table_quick"
    table = main(["--quick", "--output_dir", str(output_dir), "--threads", "1", "--no_progress"])
    config = TableConfig.quick(output_dir=str(output_dir))

    # Files: JSON, Markdown and the curves' PNG, next to the stage cache.
    paths = table["paths"]
    assert paths == {
        "json": f"{output_dir}.json",
        "markdown": f"{output_dir}.md",
        "curves": f"{output_dir}_curves.png",
    }
    # Strict JSON: an undefined value is null, never NaN.
    data = json.loads(Path(paths["json"]).read_text(), parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert Path(paths["curves"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Rows and columns, finite numbers.
    rows = {row["model"]: row for row in data["rows"]}
    assert [row["model"] for row in data["rows"]] == ROWS
    spans = [rows[f"teacher ({t})"]["rewards"][t] - rows["base"]["rewards"][t] for t in toy.TASKS]
    # The normalised average is defined exactly when every teacher beats the base model on its task.
    defined = all(span > 1e-9 for span in spans)
    for row in data["rows"]:
        assert set(row["rewards"]) == set(toy.TASKS)
        assert all(0.0 <= value <= 1.0 for value in row["rewards"].values())
        assert math.isfinite(row["mean_reward"]) and row["seconds"] >= 0 and row["forwards"] >= 0
        assert (row["normalised_average"] is not None and math.isfinite(row["normalised_average"])) == defined
    assert data["evaluation"]["test_prompts"] == {task: config.eval_prompts_per_task for task in toy.TASKS}
    assert data["evaluation"]["num_inference_steps"] == toy.DEFAULT_NUM_INFERENCE_STEPS

    # Compute accounting, from the configs: the hook sees every denoiser call of training and none of evaluation.
    steps, trained = config.num_inference_steps, int(0.99 * config.num_inference_steps)
    images = config.grpo_prompts_per_step * config.num_generations
    # GRPO step: the rollout (all steps), then the reference and the policy at each trained step; CFG doubles each.
    grpo_step = 2 * images * (steps + 2 * trained)
    # Fused OPD step: the student at the untrained last step, the teacher and the student at each trained step.
    opd_step = 2 * config.opd_batch_size * (steps + trained)
    for task in toy.TASKS:
        teacher = rows[f"teacher ({task})"]
        assert teacher["forwards"] == config.teacher_steps * grpo_step
        assert teacher["grad_forwards"] == config.teacher_steps * 2 * images * trained
    assert rows["multi-task GRPO"]["forwards"] == config.multitask_steps * grpo_step
    assert rows["cascade GRPO"]["forwards"] == len(toy.TASKS) * config.cascade_steps_per_task * grpo_step
    teachers_total = sum(rows[f"teacher ({t})"]["forwards"] for t in toy.TASKS)
    for name in ("OPD-ODE", "OPD-SDE (noise 0.7)"):
        assert rows[name]["forwards"] == config.opd_steps * opd_step
        assert rows[name]["grad_forwards"] == config.opd_steps * 2 * config.opd_batch_size * trained
        assert rows[name]["total_forwards"] == rows[name]["forwards"] + teachers_total
    assert rows["base"]["forwards"] == 0 and (rows["base"]["normalised_average"] == 0.0 or not defined)

    # Curves: the base at zero compute, then the periodic evaluations, ending at the stage's compute.
    for name in ROWS[1:]:
        curve = data["curves"][name]
        forwards = [point["forwards"] for point in curve["points"]]
        assert forwards[0] == 0 and forwards == sorted(forwards) and forwards[-1] == rows[name]["forwards"]
        assert len(curve["normalised_average"]) == len(curve["points"])
    metrics = {"normalised_average", "mean_reward", *(f"reward/{task}" for task in toy.TASKS)}
    assert set(data["compute_to_reach_multitask"]) == metrics
    for ratios in data["compute_to_reach_multitask"].values():
        assert set(ratios) == {"OPD-ODE", "OPD-SDE (noise 0.7)", "cascade GRPO"}
        assert all(r["ratio"] is None or (math.isfinite(r["ratio"]) and r["ratio"] >= 0) for r in ratios.values())
    assert data["teacher_gains"] == pytest.approx(dict(zip(toy.TASKS, spans)))

    # Markdown: a header, a separator and one line per model, with the same numbers.
    markdown = Path(paths["markdown"]).read_text().splitlines()
    start = next(i for i, line in enumerate(markdown) if line.startswith("| model |"))
    assert markdown[start].split("|")[2].strip() == toy.TASKS[0]
    body = markdown[start + 2 : start + 2 + len(ROWS)]
    assert [line.split("|")[1].strip() for line in body] == ROWS
    assert f"{rows['OPD-ODE']['rewards']['text']:.3f}" in body[ROWS.index("OPD-ODE")]

    # A second run reads every stage from the cache: nothing retrains, the table is the same.
    stage_files = sorted(output_dir.glob("*/stage.json"))
    assert len(stage_files) == len(ROWS) - 1
    mtimes = [os.path.getmtime(path) for path in stage_files]
    run_table(config, show_progress=False)
    assert [os.path.getmtime(path) for path in stage_files] == mtimes
    assert json.loads(Path(paths["json"]).read_text())["rows"] == data["rows"]
