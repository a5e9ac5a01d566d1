"""
The miniature Table 1 (`benchmarks/toy_stages.py`, `benchmarks/toy_report.py`, `benchmarks/toy_table.py`): quick mode
end to end (per-seed and aggregated files, rows, mean/SE columns, claims, compute accounting, cache, the world's
fingerprint in the keys, `--report_only` over two seeds), the parallel runner on a tiny configuration, the scheduler,
and the helpers.
"""

import importlib.util
import json
import math
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch


torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a package at the repository root, as the CLI imports it

from benchmarks import toy_report, toy_stages  # noqa: E402
from benchmarks.toy_report import compute_to_reach, stats  # noqa: E402
from benchmarks.toy_stages import ForwardCounter, TableConfig, run_stages  # noqa: E402
from diffusion_opd_trainer import toy  # noqa: E402


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
CLAIMS = [
    "teachers_beat_base",
    "student_matches_teachers",
    "opd_beats_baselines",
    "distillation_compute",
    "ode_vs_sde",
]


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _strict_json(path: Path) -> dict:
    """Strict JSON: an undefined value is null, never NaN."""
    return json.loads(Path(path).read_text(), parse_constant=lambda name: pytest.fail(f"{name} in {path}"))


def _expected_forwards(config: TableConfig) -> dict[str, tuple[int, int]]:
    """(image-forwards, those with gradients) of one optimizer step of GRPO and of OPD, from the configuration."""
    steps = config.num_inference_steps
    trained = list(range(max(1, int(config.grpo_timestep_fraction * steps))))
    if config.grpo_sde_window_size is None:
        grpo_k = len(trained)
    elif config.grpo_sde_window_start is None:
        grpo_k = config.grpo_sde_window_size
    else:
        window = range(config.grpo_sde_window_start, config.grpo_sde_window_start + config.grpo_sde_window_size)
        grpo_k = len(set(window) & set(trained))
    images = config.grpo_prompts_per_step * config.num_generations * config.grpo_gradient_accumulation_steps
    # GRPO step: the rollout (all steps), then the reference (only when beta > 0) and the policy at each trained step;
    # CFG doubles each.
    passes = 2 if config.grpo_beta > 0 else 1
    grpo = (2 * images * (steps + passes * grpo_k), 2 * images * grpo_k)
    # Fused OPD step: the student at every step, the teacher at each trained step.
    opd_k = max(1, int(config.opd_timestep_fraction * steps))
    prompts = config.opd_batch_size * config.opd_gradient_accumulation_steps
    return {"grpo": grpo, "opd": (2 * prompts * (steps + opd_k), 2 * prompts * opd_k)}


def _check_forwards(rows: dict[str, dict], config: TableConfig) -> None:
    """The hook saw every denoiser call of training and none of evaluation: counts match the formulas."""
    expected = _expected_forwards(config)
    (grpo, grpo_grad), (opd, opd_grad) = expected["grpo"], expected["opd"]
    # The formulas that size the baselines' compute (by default) agree with the hook.
    assert (config.grpo_step_forwards(), config.opd_step_forwards()) == (grpo, opd)
    for task in toy.TASKS:
        teacher = rows[f"teacher ({task})"]
        assert (teacher["forwards"], teacher["grad_forwards"]) == (
            config.teacher_steps * grpo,
            config.teacher_steps * grpo_grad,
        )
    assert rows["multi-task GRPO"]["forwards"] == config.multitask_steps * grpo
    assert rows["cascade GRPO"]["forwards"] == len(toy.TASKS) * config.cascade_steps_per_task * grpo
    teachers_total = sum(rows[f"teacher ({t})"]["forwards"] for t in toy.TASKS)
    for name in ("OPD-ODE", "OPD-SDE (noise 0.7)"):
        assert rows[name]["forwards"] == config.opd_steps * opd
        assert rows[name]["grad_forwards"] == config.opd_steps * opd_grad
        assert rows[name]["total_forwards"] == rows[name]["forwards"] + teachers_total


def _tiny(output_dir: Path, **overrides) -> TableConfig:
    """The smallest configuration that still runs every stage (a curve point each, one test prompt per task)."""
    settings = dict(
        teacher_steps=1,
        multitask_steps=1,
        cascade_steps_per_task=1,
        opd_steps=1,
        curve_points=1,
        curve_prompts_per_task=1,
        eval_prompts_per_task=1,
        eval_num_inference_steps=2,
        train_prompts_per_task=4,
        num_generations=2,
        grpo_prompts_per_step=1,
        opd_batch_size=2,
        num_inference_steps=2,
        grpo_sde_window_size=1,  # 2 steps train only the first: a window of 1
        lora_r=4,
        lora_alpha=8,
    )
    settings.update(overrides)
    return TableConfig.quick(output_dir=str(output_dir), **settings)


# ----- helpers -------------------------------------------------------------------------------------------------------
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
    assert compute_to_reach(curve, [0.0, 0.5, 1.0], 0.75) == pytest.approx(150.0)
    assert compute_to_reach(curve, [0.0, 0.5, 1.0], 0.5) == pytest.approx(100.0)
    assert compute_to_reach(curve, [0.0, 0.5, 1.0], 1.5) is None
    assert compute_to_reach(curve, [None, None, None], 0.5) is None
    assert compute_to_reach(curve, [0.0, 0.5, 1.0], None) is None


def test_stats_mean_and_standard_error():
    assert stats([0.5]) == {"mean": 0.5, "se": None, "n": 1}
    result = stats([0.1, 0.2, 0.6])
    assert result["mean"] == pytest.approx(0.3)
    assert result["se"] == pytest.approx(statistics.stdev([0.1, 0.2, 0.6]) / math.sqrt(3))
    # Undefined in one seed: no mean (the normalised average needs every teacher above the base model in every seed).
    assert stats([0.1, None]) == {"mean": None, "se": None, "n": 1}
    assert stats([0.1, float("nan")])["mean"] is None


def test_world_fingerprint_follows_the_source_and_enters_every_key(tmp_path, monkeypatch):
    copies = []
    for source in toy_stages.WORLD_SOURCES:
        copies.append(tmp_path / source.name)
        shutil.copy(source, copies[-1])
    assert toy_stages.fingerprint_files(copies) == toy_stages.world_fingerprint()
    copies[0].write_text(copies[0].read_text() + "\n# a changed reward\n")
    assert toy_stages.fingerprint_files(copies) != toy_stages.world_fingerprint()

    config = TableConfig.quick(output_dir=str(tmp_path))
    keys = toy_stages.stage_keys(config)
    assert len(keys) == 2 * (len(ROWS) - 1) + 2 and len(set(keys.values())) == len(keys)
    monkeypatch.setattr(toy_stages, "_WORLD_FINGERPRINT", "0" * 64)
    changed = toy_stages.stage_keys(config)
    assert changed.keys() == keys.keys() and not set(changed.values()) & set(keys.values())


def _sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_schedule_priority_and_dependencies():
    def job(name, seconds, deps=()):
        return toy_stages._Job(name, _sleep, lambda done, s=seconds: (s,), deps)

    # A finishes before D: C (waiting for A) then overtakes E, which was ready all along but is later in the list.
    jobs = [job("A", 0.6), job("B", 0.05), job("C", 0.05, ("A",)), job("D", 0.9), job("E", 0.05)]
    with ThreadPoolExecutor(2) as pool:
        results, records = toy_stages._schedule(jobs, pool, 2)
    assert results == {"A": 0.6, "B": 0.05, "C": 0.05, "D": 0.9, "E": 0.05}
    assert [record["name"] for record in records] == ["A", "B", "D", "C", "E"]
    by_name = {record["name"]: record for record in records}
    assert by_name["C"]["submitted"] >= by_name["A"]["finished"]

    # One worker, in this process: the list's order, dependencies permitting.
    jobs = [job("X", 0.0, ("Y",)), job("Y", 0.0), job("Z", 0.0)]
    results, records = toy_stages._schedule(jobs, toy_stages._InlineExecutor(), 1)
    assert [record["name"] for record in records] == ["Y", "X", "Z"]
    assert {record["pid"] for record in records} == {os.getpid()}
    with pytest.raises(ValueError, match="Unknown dependencies"):
        toy_stages._schedule([job("X", 0.0, ("missing",))], toy_stages._InlineExecutor(), 1)


def test_stage_jobs_order_and_dependencies(tmp_path):
    config = TableConfig.quick(output_dir=str(tmp_path))
    jobs = toy_stages._jobs(config, force=False, show_progress=False)
    names = [job.name for job in jobs]
    assert names[: len(ROWS) - 1] == ROWS[1:]
    teachers = tuple(f"teacher ({task})" for task in toy.TASKS)
    deps = {job.name: job.deps for job in jobs}
    assert deps["OPD-ODE"] == deps["OPD-SDE (noise 0.7)"] == teachers
    assert all(deps[name] == () for name in ROWS[1:6])
    evaluations = names[len(ROWS) - 1 :]
    assert evaluations == ["eval: base", *(f"eval: {name}" for name in ROWS[1:]), "eval: base (validation)"]
    assert all(deps[f"eval: {name}"] == (name,) for name in ROWS[1:])


def _synthetic_seed(seed: int, shift: float) -> dict:
    """A seed table with known numbers: teachers +0.3 (+shift) on their task, the student 0.01 below them."""
    tasks = list(toy.TASKS)
    base = {task: 0.3 for task in tasks}
    teachers = {t: {u: 0.6 + shift if u == t else 0.3 for u in tasks} for t in tasks}
    rewards = {
        "base": base,
        **{f"teacher ({t})": teachers[t] for t in tasks},
        "multi-task GRPO": {task: 0.4 for task in tasks},
        "cascade GRPO": {task: 0.35 for task in tasks},
        "OPD-ODE": {task: 0.59 + shift for task in tasks},
        "OPD-SDE (noise 0.7)": {task: 0.58 + shift for task in tasks},
    }
    forwards = {"teacher": 300, "multi-task GRPO": 1000, "cascade GRPO": 900, "OPD": 100}
    rows = []
    for name in ROWS:
        kind = name.split(" ")[0].split("-")[0]
        own = forwards.get(name, forwards.get(kind, 0))
        total = own + (3 * forwards["teacher"] if kind == "OPD" else 0)
        rows.append(toy_report._row(name, kind, rewards[name], base, teachers, 1.0, own, own, 1.0, total, 1))
    # Validation curves (mean reward): multi-task GRPO ends at 0.4; OPD-ODE passes it early, OPD-SDE more slowly.
    levels = {
        "multi-task GRPO": ([0, 500, 1000], [0.3, 0.35, 0.4]),
        "OPD-ODE": ([0, 50, 100], [0.3, 0.45, 0.5]),
        "OPD-SDE (noise 0.7)": ([0, 50, 100], [0.3, 0.35, 0.48]),
    }
    curves = {}
    for name in ROWS[1:]:
        xs, ys = levels.get(name, ([0, 300], [0.3, 0.4]))
        curves[name] = {
            "points": [{"forwards": x, "seconds": 0.0, "rewards": {t: y for t in tasks}} for x, y in zip(xs, ys)],
            "mean_reward": ys,
            "normalised_average": [None] * len(ys),
            **{f"reward/{t}": ys for t in tasks},
        }
    config = TableConfig.quick(seed=seed).to_dict()
    return {
        "seed": seed,
        "tasks": tasks,
        "rows": rows,
        "curves": curves,
        "teachers_total": {"seconds": 3.0, "forwards": 3 * forwards["teacher"]},
        "config": config,
        "evaluation": {"num_inference_steps": 10, "guidance_scale": 3.0, "seed": 0, "test_prompts": {}},
        "environment": {"base_model_sha256": "b", "world_sha256": "w", "workers": 1, "threads_per_worker": 1},
    }


def test_claims_on_known_numbers():
    report = toy_report.aggregate([_synthetic_seed(0, 0.0), _synthetic_seed(1, 0.02)])
    claims = report["claims"]
    assert report["teacher_gains"] == pytest.approx(dict.fromkeys(toy.TASKS, 0.31))
    teachers = claims["teachers_beat_base"]
    assert teachers["holds"] is True and teachers["per_task"]["text"]["se"] == pytest.approx(0.01)
    student = claims["student_matches_teachers"]
    assert student["holds"] is True
    assert student["per_task"]["text"]["difference"]["mean"] == pytest.approx(-0.01)
    assert student["normalised_average"]["mean"] == pytest.approx(statistics.fmean([0.29 / 0.3, 0.31 / 0.32]))
    baselines = claims["opd_beats_baselines"]
    assert baselines["holds"] is True
    assert baselines["baselines"]["multi-task GRPO"]["equal_compute"] is True  # 1000 >= 100 + 3 x 300
    assert baselines["baselines"]["cascade GRPO"]["equal_compute"] is False  # 900 < 1000
    compute = claims["distillation_compute"]
    # OPD-ODE reaches 0.4 between (0, 0.3) and (50, 0.45): at 33.3 forwards, against multi-task GRPO's 1000.
    assert compute["opd_forwards"] == pytest.approx(100 / 3) and compute["fraction"] == pytest.approx(1 / 30)
    assert compute["holds"] is True
    kernels = claims["ode_vs_sde"]
    # The lower final level is the SDE's 0.48: the ODE reaches it at 80 forwards, the SDE at 100.
    assert kernels["target_mean_reward"] == pytest.approx(0.48) and kernels["ode_forwards"] == pytest.approx(80)
    assert kernels["ratio_sde_over_ode"] == pytest.approx(1.25) and kernels["holds"] is True

    # A student 0.05 below a teacher, with the standard error of one seed undecidable, fails with two.
    one = _synthetic_seed(0, 0.0)
    for row in one["rows"]:
        if row["model"] == "OPD-ODE":
            row["rewards"]["text"] = 0.55
    single = toy_report.aggregate([one])["claims"]
    assert single["student_matches_teachers"]["per_task"]["text"]["holds"] is None
    assert single["teachers_beat_base"]["holds"] is None  # gains >= 0.10, but no standard error
    other = _synthetic_seed(1, 0.0)
    for row in other["rows"]:
        if row["model"] == "OPD-ODE":
            row["rewards"]["text"] = 0.56
    double = toy_report.aggregate([one, other])["claims"]["student_matches_teachers"]["per_task"]["text"]
    assert double["tolerance"] == pytest.approx(0.02) and double["holds"] is False
    # Never reaching multi-task GRPO's level: undecided, and said so.
    never = _synthetic_seed(0, 0.0)
    never["curves"]["OPD-ODE"]["mean_reward"] = [0.3, 0.32, 0.35]
    compute = toy_report.aggregate([never])["claims"]["distillation_compute"]
    assert compute["holds"] is None and compute["fraction"] is None and "never reaches" in compute["note"]
    assert "## Claims" in toy_report.format_markdown(toy_report.aggregate([never]))


# ----- the parallel runner -------------------------------------------------------------------------------------------
def test_run_stages_two_workers(tmp_path):
    config = _tiny(tmp_path / "tiny")
    outputs = run_stages(config, workers=2, threads_per_worker=1, show_progress=False)
    jobs = {job["name"]: job for job in outputs.jobs}
    assert len(jobs) == 2 * (len(ROWS) - 1) + 2 and not any(job["cached"] for job in outputs.jobs)
    # Every job ran in a worker process, not here.
    pids = {job["pid"] for job in outputs.jobs}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    # Submitted in priority order: teachers, baselines, distillations once every teacher is done, then evaluations.
    assert [job["name"] for job in outputs.jobs][: len(ROWS) - 1] == ROWS[1:]
    teachers_done = max(jobs[f"teacher ({task})"]["finished"] for task in toy.TASKS)
    assert min(jobs["OPD-ODE"]["submitted"], jobs["OPD-SDE (noise 0.7)"]["submitted"]) >= teachers_done
    for name in ROWS[1:]:
        assert jobs[f"eval: {name}"]["submitted"] >= jobs[name]["finished"]

    # The compute was counted inside the workers, and matches the formulas.
    table = toy_report.assemble_seed(outputs)
    rows = {row["model"]: row for row in table["rows"]}
    assert list(rows) == ROWS
    _check_forwards(rows, outputs.config)
    assert table["environment"]["workers"] == 2


# ----- quick mode end to end -----------------------------------------------------------------------------------------
def test_quick_table_end_to_end(tmp_path):
    main = _load_script(ROOT / "benchmarks" / "toy_table.py").main
    output_dir = tmp_path / "toy_table_quick"
    args = ["--quick", "--output_dir", str(output_dir), "--workers", "2", "--threads", "1", "--no_progress"]
    report = main(args)
    config = TableConfig.quick(output_dir=str(output_dir))

    # Files: the seed's table and stage cache under the output folder; the report next to it.
    paths = report["paths"]
    assert paths == {
        "json": f"{output_dir}.json",
        "markdown": f"{output_dir}.md",
        "curves": f"{output_dir}_curves.png",
    }
    seed_table = _strict_json(output_dir / "seed-0.json")
    data = _strict_json(Path(paths["json"]))
    assert Path(paths["curves"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The seed's table: rows and columns, finite numbers.
    rows = {row["model"]: row for row in seed_table["rows"]}
    assert seed_table["seed"] == 0 and list(rows) == ROWS
    spans = [rows[f"teacher ({t})"]["rewards"][t] - rows["base"]["rewards"][t] for t in toy.TASKS]
    # What quick mode is for: every teacher beats the base model on its own task (measured for seeds 0-9).
    assert min(spans) > 0, dict(zip(toy.TASKS, spans))
    # The normalised average is defined exactly when every teacher beats the base model on its task.
    defined = all(span > 1e-9 for span in spans)
    for row in seed_table["rows"]:
        assert set(row["rewards"]) == set(toy.TASKS)
        assert all(0.0 <= value <= 1.0 for value in row["rewards"].values())
        assert math.isfinite(row["mean_reward"]) and row["seconds"] >= 0 and row["forwards"] >= 0
        assert (row["normalised_average"] is not None and math.isfinite(row["normalised_average"])) == defined
    assert seed_table["evaluation"]["test_prompts"] == {task: config.eval_prompts_per_task for task in toy.TASKS}
    assert seed_table["evaluation"]["num_inference_steps"] == config.eval_num_inference_steps
    assert seed_table["environment"]["world_sha256"] == toy_stages.world_fingerprint()[:12]
    assert seed_table["config"]["opd_timestep_fraction"] == config.opd_timestep_fraction
    _check_forwards(rows, config)
    # By default each baseline gets at least OPD-ODE's compute including its teachers.
    for baseline in ("multi-task GRPO", "cascade GRPO"):
        assert rows[baseline]["forwards"] >= rows["OPD-ODE"]["total_forwards"]
    assert rows["base"]["forwards"] == 0 and (rows["base"]["normalised_average"] == 0.0 or not defined)

    # Curves: the base at zero compute, then the periodic evaluations, ending at the stage's compute.
    for name in ROWS[1:]:
        curve = seed_table["curves"][name]
        forwards = [point["forwards"] for point in curve["points"]]
        assert forwards[0] == 0 and forwards == sorted(forwards) and forwards[-1] == rows[name]["forwards"]
        assert len(curve["normalised_average"]) == len(curve["points"])
    metrics = {"normalised_average", "mean_reward", *(f"reward/{task}" for task in toy.TASKS)}
    assert set(seed_table["compute_to_reach_multitask"]) == metrics
    for ratios in seed_table["compute_to_reach_multitask"].values():
        assert set(ratios) == {"OPD-ODE", "OPD-SDE (noise 0.7)", "cascade GRPO"}
        assert all(r["ratio"] is None or (math.isfinite(r["ratio"]) and r["ratio"] >= 0) for r in ratios.values())
    assert seed_table["teacher_gains"] == pytest.approx(dict(zip(toy.TASKS, spans)))

    # The report over one seed: every row and task as mean / SE (none with one seed) / n, the seed's own row beside.
    assert data["seeds"] == [0] and data["num_seeds"] == 1 and data["excluded_seed_files"] == []
    assert [row["model"] for row in data["rows"]] == ROWS
    for row in data["rows"]:
        seed_row = rows[row["model"]]
        assert row["per_seed"] == [{"seed": 0, **seed_row}]
        for task in toy.TASKS:
            assert row["rewards"][task] == {"mean": pytest.approx(seed_row["rewards"][task]), "se": None, "n": 1}
        for column in ("mean_reward", "seconds", "forwards", "total_seconds", "total_forwards"):
            assert row[column] == {"mean": pytest.approx(seed_row[column]), "se": None, "n": 1}
    assert data["teacher_gains"] == pytest.approx(dict(zip(toy.TASKS, spans)))
    _check_claims(data)
    for name in ROWS[1:]:
        curve = data["curves"][name]
        assert curve["forwards"] == [p["forwards"] for p in seed_table["curves"][name]["points"]]
        assert curve["mean_reward"]["mean"] == pytest.approx(seed_table["curves"][name]["mean_reward"])

    # Markdown: a header, a separator and one line per model, with the same numbers; then the five claims.
    markdown = Path(paths["markdown"]).read_text().splitlines()
    start = next(i for i, line in enumerate(markdown) if line.startswith("| model |"))
    assert markdown[start].split("|")[2].strip() == toy.TASKS[0]
    body = markdown[start + 2 : start + 2 + len(ROWS)]
    assert [line.split("|")[1].strip() for line in body] == ROWS
    assert f"{rows['OPD-ODE']['rewards']['text']:.3f}" in body[ROWS.index("OPD-ODE")]
    claims_at = markdown.index("## Claims")
    assert [line[:3] for line in markdown[claims_at + 2 : claims_at + 7]] == ["1. ", "2. ", "3. ", "4. ", "5. "]

    # The cache: one stage per trained row, keyed as `stage_keys` says; with another world, every key differs.
    seed_dir = output_dir / "seed-0"
    stage_files = sorted(seed_dir.glob("*/stage.json"))
    eval_files = sorted((seed_dir / "eval").glob("*.json"))
    assert len(stage_files) == len(ROWS) - 1 and len(eval_files) == len(ROWS) + 1
    keys = toy_stages.stage_keys(config)
    assert {json.loads(path.read_text())["key"] for path in stage_files} == {keys[name] for name in ROWS[1:]}
    eval_keys = {value for name, value in keys.items() if name.startswith("eval: ")}
    assert {path.stem.rsplit("-", 1)[1] for path in eval_files} == eval_keys

    # A second run reads every stage and evaluation from the cache: nothing retrains, the seed's rows are the same.
    cached = stage_files + eval_files
    mtimes = [os.path.getmtime(path) for path in cached]
    main(args)
    assert [os.path.getmtime(path) for path in cached] == mtimes
    rerun = _strict_json(output_dir / "seed-0.json")
    assert rerun["rows"] == seed_table["rows"] and all(job["cached"] for job in rerun["jobs"])

    # Two seeds, aggregated by --report_only: seed 1 is seed 0 with every reward moved by its own amount.
    seed1 = json.loads(json.dumps(seed_table))
    seed1["seed"] = 1
    for i, row in enumerate(seed1["rows"]):
        for j, task in enumerate(toy.TASKS):
            row["rewards"][task] = min(1.0, row["rewards"][task] + 0.01 * (i + 1) * (j + 1))
    base = seed1["rows"][0]["rewards"]
    teachers = {task: seed1["rows"][ROWS.index(f"teacher ({task})")]["rewards"] for task in toy.TASKS}
    for row in seed1["rows"]:
        row["mean_reward"] = sum(row["rewards"].values()) / len(toy.TASKS)
        row["normalised_average"] = toy_report.strict_json(toy_report.normalised(row["rewards"], base, teachers))
        row["seconds"] += 1.0
    for curve in seed1["curves"].values():
        curve["mean_reward"] = [value + 0.02 for value in curve["mean_reward"]]
    (output_dir / "seed-1.json").write_text(json.dumps(seed1))
    # A seed made with other settings is left out (and named), whichever seeds are present.
    other = json.loads(json.dumps(seed_table))
    other["seed"], other["config"]["opd_steps"] = 2, config.opd_steps + 1
    (output_dir / "seed-2.json").write_text(json.dumps(other))
    os.utime(output_dir / "seed-2.json", (time.time() - 3600, time.time() - 3600))

    report = main(["--quick", "--output_dir", str(output_dir), "--report_only", "--no_progress"])
    assert [os.path.getmtime(path) for path in cached] == mtimes
    data = _strict_json(Path(paths["json"]))
    assert data["seeds"] == [0, 1] and data["num_seeds"] == 2 and report["seeds"] == [0, 1]
    assert [Path(entry["path"]).name for entry in data["excluded_seed_files"]] == ["seed-2.json"]
    per_seed = [{row["model"]: row for row in table["rows"]} for table in (seed_table, seed1)]
    for row in data["rows"]:
        name = row["model"]
        assert [entry["seed"] for entry in row["per_seed"]] == [0, 1]
        for task in toy.TASKS:
            values = [rows_[name]["rewards"][task] for rows_ in per_seed]
            assert row["rewards"][task]["mean"] == pytest.approx(statistics.fmean(values))
            assert row["rewards"][task]["se"] == pytest.approx(statistics.stdev(values) / math.sqrt(2))
            assert row["rewards"][task]["n"] == 2
        values = [rows_[name]["mean_reward"] for rows_ in per_seed]
        assert row["mean_reward"]["mean"] == pytest.approx(statistics.fmean(values))
        assert row["mean_reward"]["se"] == pytest.approx(statistics.stdev(values) / math.sqrt(2))
        assert row["seconds"]["mean"] == pytest.approx(rows[name]["seconds"] + 0.5)
        assert row["forwards"] == {"mean": rows[name]["forwards"], "se": 0.0, "n": 2}
    for task in toy.TASKS:
        gains = [r[f"teacher ({task})"]["rewards"][task] - r["base"]["rewards"][task] for r in per_seed]
        assert data["teacher_gains"][task] == pytest.approx(statistics.fmean(gains))
        claim = data["claims"]["teachers_beat_base"]["per_task"][task]
        assert claim["se"] == pytest.approx(statistics.stdev(gains) / math.sqrt(2))
        assert claim["holds"] is (claim["mean"] >= 0.10 and claim["mean"] > 3 * claim["se"])
    _check_claims(data)
    curve = data["curves"]["OPD-ODE"]["mean_reward"]
    assert curve["mean"] == pytest.approx([value + 0.01 for value in seed_table["curves"]["OPD-ODE"]["mean_reward"]])
    assert curve["max"] == pytest.approx([value + 0.02 for value in seed_table["curves"]["OPD-ODE"]["mean_reward"]])
    markdown = Path(paths["markdown"]).read_text()
    assert "2 seeds (0, 1)" in markdown and " ± " in markdown and "seed-2.json" in markdown


def _check_claims(data: dict) -> None:
    """The claims' keys and types (their values depend on the run)."""
    claims, one_seed = data["claims"], data["num_seeds"] == 1
    assert list(claims) == CLAIMS
    for claim in claims.values():
        assert claim["holds"] in (True, False, None) and isinstance(claim["definition"], str)
        assert claim["note"] is None or isinstance(claim["note"], str)
    teachers = claims["teachers_beat_base"]
    for task in toy.TASKS:
        entry = teachers["per_task"][task]
        assert set(entry) == {"mean", "se", "n", "per_seed", "holds"}
        assert entry["mean"] == pytest.approx(data["teacher_gains"][task])
        assert list(entry["per_seed"]) == [str(seed) for seed in data["seeds"]]
        assert (entry["se"] is None) == one_seed
        if one_seed:
            assert entry["holds"] is (False if entry["mean"] < 0.10 else None)
    student = claims["student_matches_teachers"]
    for task in toy.TASKS:
        entry = student["per_task"][task]
        assert set(entry["difference"]) == {"mean", "se", "n"} and entry["holds"] in (True, False, None)
        assert entry["difference"]["mean"] == pytest.approx(entry["student"]["mean"] - entry["teacher"]["mean"])
    assert student["normalised_average"]["holds"] in (True, False, None)
    rows = {row["model"]: row for row in data["rows"]}
    baselines = claims["opd_beats_baselines"]["baselines"]
    assert set(baselines) == {"multi-task GRPO", "cascade GRPO"}
    for name, entry in baselines.items():
        assert isinstance(entry["equal_compute"], bool)
        assert entry["equal_compute"] == (
            rows[name]["total_forwards"]["mean"] >= rows["OPD-ODE"]["total_forwards"]["mean"]
        )
    compute = claims["distillation_compute"]
    assert compute["fraction"] is None or compute["fraction"] >= 0
    assert compute["multitask_forwards"] == rows["multi-task GRPO"]["forwards"]["mean"]
    if compute["holds"] is None:
        assert compute["note"]
    kernels = claims["ode_vs_sde"]
    assert kernels["ratio_sde_over_ode"] is None or kernels["ratio_sde_over_ode"] > 0
    assert kernels["holds"] is (None if kernels["ratio_sde_over_ode"] is None else kernels["ratio_sde_over_ode"] > 1)


def test_teacher_probe_parses_table_settings():
    probe = _load_script(ROOT / "benchmarks" / "toy_teacher_probe.py")
    settings = probe.parse_settings(["grpo_beta=0.04", "grpo_share_initial_noise=true", "grpo_kl_scaling=exact"])
    assert settings == {"grpo_beta": 0.04, "grpo_share_initial_noise": True, "grpo_kl_scaling": "exact"}
    with pytest.raises(SystemExit, match="TableConfig field"):
        probe.parse_settings(["grpo_betta=0.04"])
