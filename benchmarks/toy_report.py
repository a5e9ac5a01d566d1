"""
The report of the miniature Table 1: one seed's table from what `toy_stages.run_stages` returned, and the aggregate
over every seed run so far (means and standard errors, the paper's claims checked, Markdown and the curves' plot).

```python
from benchmarks.toy_report import assemble_seed, write_report, write_seed_table

write_seed_table(assemble_seed(outputs), "results/toy_table")  # results/toy_table/seed-<seed>.json
report = write_report("results/toy_table")  # results/toy_table.json, .md and _curves.png, over every seed-*.json
```

Seeds may run in separate sessions: each writes its own `<output_dir>/seed-<seed>.json`, and the report aggregates the
files present. Only seed tables made with the same settings (the configuration apart from the seed, the base model's
and the toy world's fingerprints) are aggregated; the others are listed as excluded.
"""

import dataclasses
import json
import logging
import math
import os
import statistics
from pathlib import Path
from typing import Any, Optional, Union

from .toy_stages import (
    StageOutputs,
    TableConfig,
    base_model_fingerprint,
    device,
    eval_kwargs,
    opd_name,
    task_reward,
    teacher_name,
    world_fingerprint,
)


logger = logging.getLogger(__name__)

__all__ = [
    "aggregate",
    "assemble_seed",
    "compute_to_reach",
    "format_markdown",
    "load_seed_tables",
    "plot_curves",
    "seed_table_path",
    "write_report",
    "write_seed_table",
]

MULTITASK = "multi-task GRPO"
CASCADE = "cascade GRPO"
OPD_ODE = opd_name(0.0)
# Thresholds of the claims (see `claims`).
TEACHER_MIN_GAIN = 0.10
TEACHER_MIN_SE_MULTIPLE = 3.0
STUDENT_TOLERANCE = 0.02
STUDENT_MIN_NORMALISED = 0.9
MAX_DISTILLATION_FRACTION = 0.2

COLUMNS = {
    "rewards": "mean reward of each task's test prompts, each scored by its own task's reward",
    "normalised_average": (
        "mean over tasks of (reward - base) / (teacher - base): 0 = base, 1 = every teacher; undefined (null) "
        "unless every teacher beats the base model on its own task"
    ),
    "mean_reward": "plain mean of the task rewards",
    "seconds": "training wall-clock seconds of the stage (periodic curve evaluations excluded)",
    "forwards": "denoiser image-forwards of the stage (a CFG call on B latents counts 2B), training only",
    "grad_forwards": "the image-forwards computed with gradients (each followed by a backward pass)",
    "total_seconds": "seconds including the stages it depends on (OPD: plus the three teachers)",
    "total_forwards": "image-forwards including the stages it depends on (OPD: plus the three teachers)",
    "steps": "optimizer steps",
}
ROW_STATS = ("normalised_average", "mean_reward", *list(COLUMNS)[3:])


# ----- one seed ------------------------------------------------------------------------------------------------------
def normalised(rewards: dict[str, float], base: dict[str, float], teachers: dict[str, dict[str, float]]) -> float:
    """
    Mean over tasks of `(r - base) / (teacher - base)`: 0 is the base model, 1 each teacher on its own task. Undefined
    (NaN) unless every teacher beats the base model on its task: with a teacher at or below the base, the ratio would
    reward doing worse than the base.
    """
    gains = []
    for task in rewards:
        span = teachers[task][task] - base[task]
        gains.append((rewards[task] - base[task]) / span if span > 1e-9 else math.nan)
    return sum(gains) / len(gains)


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def compute_to_reach(curve: list[dict], values: list[Optional[float]], target: Optional[float]) -> Optional[float]:
    """
    Image-forwards at which a curve first reaches `target` (linear interpolation between its points); `None` if it
    never does. Undefined values (`None`, NaN) never reach it.
    """
    if not _finite(target):
        return None
    previous = None
    for point, value in zip(curve, values):
        if _finite(value) and value >= target:
            if previous is None:
                return float(point["forwards"])
            (x0, y0), x1 = previous, point["forwards"]
            return float(x0 + (x1 - x0) * (target - y0) / (value - y0)) if value > y0 else float(x1)
        previous = (point["forwards"], value) if _finite(value) else None
    return None


def _compute_ratios(curves: dict[str, dict], reference: str, methods: list[str], metric: str) -> dict[str, Any]:
    """
    For each method: the image-forwards it needs to reach the curve level (of `metric`) that both it and `reference`
    reach, the lower of their final levels, divided by what `reference` needs. `None` where the level is not above the
    base model's (nothing to reach) or undefined.
    """
    ratios = {}
    ref = curves[reference]
    for method in methods:
        own = curves[method]
        finals = [own[metric][-1], ref[metric][-1]]
        target = min(finals) if all(_finite(value) for value in finals) else None
        own_cost = compute_to_reach(own["points"], own[metric], target)
        ref_cost = compute_to_reach(ref["points"], ref[metric], target)
        ratios[method] = {
            "metric": metric,
            "target": target,
            "forwards": own_cost,
            "reference_forwards": ref_cost,
            "ratio": own_cost / ref_cost if own_cost is not None and ref_cost else None,
        }
    return ratios


def _row(name, kind, rewards, base, teachers, seconds, forwards, grad_forwards, total_seconds, total_forwards, steps):
    return {
        "model": name,
        "kind": kind,
        "rewards": rewards,
        "normalised_average": normalised(rewards, base, teachers),
        "mean_reward": sum(rewards.values()) / len(rewards),
        "seconds": round(seconds, 1),
        "forwards": forwards,
        "grad_forwards": grad_forwards,
        "total_seconds": round(total_seconds, 1),
        "total_forwards": total_forwards,
        "steps": steps,
    }


def _by_name(rows: list[dict], name: str) -> dict:
    return next(row for row in rows if row["model"] == name)


def assemble_seed(outputs: StageOutputs) -> dict[str, Any]:
    """
    One seed's table from its stages: a row per model (rewards on the test prompts, normalised average, compute), the
    validation curves, the compute comparisons, the settings and the environment. Strict-JSON-able after
    [`strict_json`] (undefined values are NaN here).
    """
    config, teachers, trained = outputs.config, outputs.teachers, outputs.trained
    tasks = list(teachers)
    rewards = {name: {t: task_reward(result, t) for t in tasks} for name, result in outputs.evaluations.items()}
    base = rewards["base"]
    teacher_rewards = {task: rewards[teachers[task].name] for task in tasks}
    teacher_cost = {
        "seconds": round(sum(stage.seconds for stage in teachers.values()), 2),
        "forwards": sum(stage.forwards for stage in teachers.values()),
    }
    rows = [_row("base", "base", base, base, teacher_rewards, 0.0, 0, 0, 0.0, 0, 0)]
    for stage in trained:
        kind = "opd" if stage.name.startswith("OPD") else "teacher" if stage.name.startswith("teacher") else "baseline"
        extra = teacher_cost if kind == "opd" else {"seconds": 0.0, "forwards": 0}
        rows.append(
            _row(
                stage.name,
                kind,
                rewards[stage.name],
                base,
                teacher_rewards,
                stage.seconds,
                stage.forwards,
                stage.grad_forwards,
                stage.seconds + extra["seconds"],
                stage.forwards + extra["forwards"],
                stage.steps,
            )
        )

    # Curves: the base model on the curve prompts at zero compute, then each run's periodic evaluations.
    curve_base_rewards = {task: task_reward(outputs.curve_base, task) for task in tasks}
    curve_teachers = {task: teachers[task].curve[-1]["rewards"] for task in tasks}
    curves = {}
    for stage in trained:
        points = [{"forwards": 0, "grad_forwards": 0, "seconds": 0.0, "rewards": curve_base_rewards}] + stage.curve
        curves[stage.name] = {
            "points": points,
            "normalised_average": [normalised(p["rewards"], curve_base_rewards, curve_teachers) for p in points],
            "mean_reward": [sum(p["rewards"].values()) / len(tasks) for p in points],
            **{f"reward/{task}": [p["rewards"][task] for p in points] for task in tasks},
        }
    opd_names = [stage.name for stage in trained if stage.name.startswith("OPD")]
    return {
        "description": (
            "Miniature Table 1 of DiffusionOPD on the toy world, one seed: single-task GRPO teachers, multi-task and "
            "cascade GRPO baselines, and on-policy distillation of the teachers (ODE and SDE). Rewards: mean over "
            "each task's test prompts, deterministic ODE sampler, fixed seeds."
        ),
        "seed": config.seed,
        "tasks": tasks,
        "columns": COLUMNS,
        "rows": rows,
        "teachers_total": teacher_cost,
        "teacher_gains": {task: teacher_rewards[task][task] - base[task] for task in tasks},
        "curves": curves,
        "curve_definition": _curve_definition(config.curve_prompts_per_task),
        "compute_to_reach_multitask": {
            metric: _compute_ratios(curves, MULTITASK, opd_names + [CASCADE], metric)
            for metric in ("normalised_average", "mean_reward", *(f"reward/{task}" for task in tasks))
        },
        "compute_fraction_of_baselines": {
            opd: {
                baseline: {
                    "forwards": _by_name(rows, opd)["forwards"] / max(1, _by_name(rows, baseline)["forwards"]),
                    "seconds": _by_name(rows, opd)["seconds"] / max(1e-9, _by_name(rows, baseline)["seconds"]),
                }
                for baseline in (MULTITASK, CASCADE)
            }
            for opd in opd_names
        },
        "config": config.to_dict(),
        "evaluation": {
            **eval_kwargs(config),
            "sampler": "ode",
            "test_prompts": {task: len(outputs.evaluations["base"].samples[task]) for task in tasks},
        },
        "environment": {
            "torch": _torch_version(),
            "device": device(),
            "workers": outputs.workers,
            "threads_per_worker": outputs.threads_per_worker,
            "base_model": config.base_model or "bundled toy base model",
            "base_model_sha256": base_model_fingerprint(config.base_model)[:12],
            "world_sha256": world_fingerprint()[:12],
        },
        "jobs": outputs.jobs,
        "wall_seconds_this_invocation": outputs.wall_seconds,
    }


def _torch_version() -> str:
    import torch

    return torch.__version__


def _curve_definition(prompts_per_task: int) -> str:
    return (
        f"rewards on {prompts_per_task} validation prompts of each task (held-out train-split prompts; same sampler "
        "and seeds as the table, but on the training pipeline); the normalised average divides by the base model and "
        "each teacher's final point on those prompts; x = the stage's training image-forwards (OPD: distillation only)"
    )


def strict_json(value):
    """NaN and infinities (undefined values) as `None`: standard JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def _write_atomic(path: Union[str, os.PathLike], text: str) -> None:
    # Seeds may run in other sessions and re-aggregate at any time: never let one read a half-written file.
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _dump(value) -> str:
    return json.dumps(strict_json(value), indent=1, default=str, allow_nan=False)


def seed_table_path(output_dir: Union[str, os.PathLike], seed: int) -> str:
    """Where seed `seed`'s table lives: `<output_dir>/seed-<seed>.json`."""
    return os.path.join(output_dir, f"seed-{seed}.json")


def write_seed_table(table: dict[str, Any], output_dir: Union[str, os.PathLike]) -> str:
    """Writes a seed's table (strict JSON) to `<output_dir>/seed-<seed>.json` and returns the path."""
    path = seed_table_path(output_dir, table["seed"])
    os.makedirs(output_dir, exist_ok=True)
    _write_atomic(path, _dump(table))
    return path


# ----- every seed ----------------------------------------------------------------------------------------------------
def _signature(table: dict[str, Any]) -> str:
    """
    What must agree for two seeds to be aggregated: the settings apart from the seed (and where things live). A setting
    that a seed file predates counts as its default, so adding a field to `TableConfig` keeps older seeds comparable.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(TableConfig) if f.default is not dataclasses.MISSING}
    config = {**defaults, **table["config"]}
    config = {k: v for k, v in config.items() if k not in ("seed", "output_dir", "base_model")}
    environment = table["environment"]
    fingerprints = {"base": environment["base_model_sha256"], "world": environment.get("world_sha256")}
    return json.dumps({"config": config, **fingerprints}, sort_keys=True, default=str)


def load_seed_tables(
    output_dir: Union[str, os.PathLike], reference_seed: Optional[int] = None
) -> tuple[list[dict], list[dict]]:
    """
    Reads every `<output_dir>/seed-*.json`. The reference is seed `reference_seed`'s table (the newest file when not
    given or not there); the tables whose settings differ from it are left out.

    Returns:
        `(tables, excluded)`: the aggregated tables sorted by seed, and `{"path", "seed", "reason"}` for the others.
    """
    paths = sorted(Path(output_dir).glob("seed-*.json"))
    loaded = [(path, json.loads(path.read_text())) for path in paths]
    if not loaded:
        return [], []
    reference = next((item for item in loaded if item[1].get("seed") == reference_seed), None)
    if reference is None:
        reference = max(loaded, key=lambda item: item[0].stat().st_mtime)
    signature = _signature(reference[1])
    tables, excluded = [], []
    for path, table in loaded:
        if _signature(table) == signature:
            tables.append(table)
        else:
            reason = f"other settings than seed {reference[1]['seed']}'s ({reference[0].name})"
            logger.warning("Leaving %s out of the report: %s.", path, reason)
            excluded.append({"path": str(path), "seed": table.get("seed"), "reason": reason})
    seeds = [table["seed"] for table in tables]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"Two seed tables in {output_dir} have the same seed: {seeds}")
    return sorted(tables, key=lambda table: table["seed"]), excluded


def stats(values: list[Optional[float]]) -> dict[str, Any]:
    """
    `{"mean", "se", "n"}` over seeds: the standard error is the sample standard deviation (ddof=1) over `sqrt(n)`,
    `None` with one seed. `mean` and `se` are `None` unless every value is defined; `n` counts the defined ones.
    """
    defined = [float(value) for value in values if _finite(value)]
    if not defined or len(defined) < len(values):
        return {"mean": None, "se": None, "n": len(defined)}
    n = len(defined)
    se = statistics.stdev(defined) / math.sqrt(n) if n > 1 else None
    return {"mean": statistics.fmean(defined), "se": se, "n": n}


def _band(series: list[list[Optional[float]]]) -> dict[str, list]:
    """Pointwise mean, SE, min and max over seeds of equally long series."""
    columns = list(zip(*series))
    point_stats = [stats(list(column)) for column in columns]
    full = [all(_finite(value) for value in column) for column in columns]
    return {
        "mean": [s["mean"] for s in point_stats],
        "se": [s["se"] for s in point_stats],
        "min": [min(column) if ok else None for column, ok in zip(columns, full)],
        "max": [max(column) if ok else None for column, ok in zip(columns, full)],
    }


def _aggregate_curves(tables: list[dict], tasks: list[str]) -> dict[str, dict]:
    metrics = ["mean_reward", "normalised_average", *(f"reward/{task}" for task in tasks)]
    curves = {}
    for name in tables[0]["curves"]:
        per_seed = [table["curves"][name] for table in tables]
        lengths = {len(curve["points"]) for curve in per_seed}
        if len(lengths) > 1:
            raise ValueError(f"The seeds' curves of {name} have different lengths {sorted(lengths)}.")
        points = list(zip(*(curve["points"] for curve in per_seed)))
        curves[name] = {
            # Forwards are set by the configuration (the same in every seed); seconds vary.
            "forwards": [statistics.fmean(p["forwards"] for p in column) for column in points],
            "seconds": [statistics.fmean(p["seconds"] for p in column) for column in points],
            **{metric: _band([curve[metric] for curve in per_seed]) for metric in metrics},
        }
    return curves


def _and(values) -> Optional[bool]:
    """Three-valued AND: `False` if any is `False`, else `None` if any is undecided, else `True`."""
    values = list(values)
    if any(value is False for value in values):
        return False
    if any(value is None for value in values):
        return None
    return True


def _reach_on_mean_curve(curve: dict, target: Optional[float]) -> Optional[float]:
    points = [{"forwards": forwards} for forwards in curve["forwards"]]
    return compute_to_reach(points, curve["mean_reward"]["mean"], target)


def claims(rows: dict[str, dict], curves: dict[str, dict], tasks: list[str], seeds: list[int]) -> dict[str, Any]:
    """
    The paper's claims, checked on the aggregated rows (test prompts) and the mean validation curves. Each has its
    figures, a `definition` and `holds`: `True`, `False`, or `None` when it cannot be decided (e.g. a standard error
    needs two seeds, or a normalised average is undefined), with a `note` saying why.
    """
    per_seed = {name: {seed_row["seed"]: seed_row for seed_row in row["per_seed"]} for name, row in rows.items()}

    # 1. Each teacher beats the base model on its own task, by a margin and beyond the seeds' noise.
    teachers = {}
    for task in tasks:
        gains = {
            s: per_seed[teacher_name(task)][s]["rewards"][task] - per_seed["base"][s]["rewards"][task] for s in seeds
        }
        gain = stats(list(gains.values()))
        if gain["mean"] < TEACHER_MIN_GAIN:
            holds = False
        elif gain["se"] is None:
            holds = None
        else:
            holds = gain["mean"] > TEACHER_MIN_SE_MULTIPLE * gain["se"]
        teachers[task] = {**gain, "per_seed": {str(s): g for s, g in gains.items()}, "holds": holds}
    teachers_holds = _and(t["holds"] for t in teachers.values())
    claim1 = {
        "definition": (
            f"every teacher's gain over the base model on its own task (test prompts) is >= {TEACHER_MIN_GAIN} and > "
            f"{TEACHER_MIN_SE_MULTIPLE:g} standard errors over seeds"
        ),
        "per_task": teachers,
        "holds": teachers_holds,
        "note": "the standard error needs 2+ seeds" if teachers_holds is None else None,
    }

    # 2. The OPD-ODE student reaches each teacher's level on the teacher's task.
    student = {}
    for task in tasks:
        teacher = teacher_name(task)
        diffs = [per_seed[OPD_ODE][s]["rewards"][task] - per_seed[teacher][s]["rewards"][task] for s in seeds]
        diff = stats(diffs)
        tolerance = None if diff["se"] is None else max(STUDENT_TOLERANCE, diff["se"])
        if diff["mean"] >= -STUDENT_TOLERANCE:
            holds = True  # within the smallest tolerance, whatever the standard error
        elif tolerance is None:
            holds = None
        else:
            holds = diff["mean"] >= -tolerance
        student[task] = {
            "student": rows[OPD_ODE]["rewards"][task],
            "teacher": rows[teacher]["rewards"][task],
            "difference": diff,
            "tolerance": tolerance,
            "holds": holds,
        }
    student_norm = rows[OPD_ODE]["normalised_average"]
    norm_holds = None if student_norm["mean"] is None else student_norm["mean"] >= STUDENT_MIN_NORMALISED
    claim2_holds = _and([*(s["holds"] for s in student.values()), norm_holds])
    notes = []
    if any(s["holds"] is None for s in student.values()):
        notes.append("a difference below -0.02 needs 2+ seeds for its standard error")
    if norm_holds is None:
        notes.append("the normalised average is undefined: in some seed a teacher does not beat the base model")
    claim2 = {
        "definition": (
            f"OPD-ODE's reward on each teacher's task is >= the teacher's - max({STUDENT_TOLERANCE}, SE of the "
            f"difference over seeds), and its normalised average (per seed, then averaged) is >= "
            f"{STUDENT_MIN_NORMALISED}"
        ),
        "per_task": student,
        "normalised_average": {**student_norm, "holds": norm_holds},
        "holds": claim2_holds,
        "note": "; ".join(notes) or None,
    }

    # 3. OPD-ODE beats both RL baselines on the normalised average, and at no more compute.
    baselines = {}
    for name in (MULTITASK, CASCADE):
        norm = rows[name]["normalised_average"]
        above = None if norm["mean"] is None or student_norm["mean"] is None else student_norm["mean"] > norm["mean"]
        baselines[name] = {
            "normalised_average": norm,
            "mean_reward": rows[name]["mean_reward"],
            "opd_above": above,
            "total_forwards": rows[name]["total_forwards"]["mean"],
            "opd_total_forwards": rows[OPD_ODE]["total_forwards"]["mean"],
            "equal_compute": rows[name]["total_forwards"]["mean"] >= rows[OPD_ODE]["total_forwards"]["mean"],
        }
    claim3_holds = _and(b["opd_above"] for b in baselines.values())
    claim3 = {
        "definition": (
            "OPD-ODE's mean normalised average is above multi-task GRPO's and cascade GRPO's; equal_compute: the "
            "baseline's total training image-forwards >= OPD-ODE's including its teachers"
        ),
        "opd": {"normalised_average": student_norm, "mean_reward": rows[OPD_ODE]["mean_reward"]},
        "baselines": baselines,
        "holds": claim3_holds,
        "note": "a normalised average is undefined: in some seed a teacher does not beat the base model"
        if claim3_holds is None
        else None,
    }

    # 4. Distillation alone reaches multi-task GRPO's final level at a fraction of its compute (validation curves).
    multitask, opd = curves[MULTITASK], curves[OPD_ODE]
    base_level = multitask["mean_reward"]["mean"][0]
    target = multitask["mean_reward"]["mean"][-1]
    reference_forwards = rows[MULTITASK]["forwards"]["mean"]
    forwards = _reach_on_mean_curve(opd, target)
    fraction = None if forwards is None else forwards / max(1.0, reference_forwards)
    if target <= base_level:
        # Any curve "reaches" that level at zero compute (the base model is its first point): no meaningful fraction.
        fraction = None
        holds4, note4 = None, "multi-task GRPO does not end above the base model's mean reward: nothing to reach"
    elif fraction is None:
        holds4, note4 = None, "OPD-ODE never reaches multi-task GRPO's final mean reward on the validation curves"
    else:
        holds4, note4 = fraction <= MAX_DISTILLATION_FRACTION, None
    claim4 = {
        "definition": (
            "on the validation curves (mean over seeds), the image-forwards the OPD-ODE distillation stage (teachers "
            "excluded) needs to reach multi-task GRPO's final mean reward, divided by multi-task GRPO's total "
            f"training image-forwards, is <= {MAX_DISTILLATION_FRACTION}"
        ),
        "target_mean_reward": target,
        "base_mean_reward": base_level,
        "opd_forwards": forwards,
        "multitask_forwards": reference_forwards,
        "fraction": fraction,
        "holds": holds4,
        "note": note4,
    }

    # 5. The ODE is the more efficient kernel: forwards of each to reach the lower of their two final levels.
    sde = next(name for name in curves if name.startswith("OPD-SDE"))
    finals = {name: curves[name]["mean_reward"]["mean"][-1] for name in (OPD_ODE, sde)}
    level = min(finals.values())
    ode_forwards = _reach_on_mean_curve(curves[OPD_ODE], level)
    sde_forwards = _reach_on_mean_curve(curves[sde], level)
    if level <= curves[OPD_ODE]["mean_reward"]["mean"][0] or not ode_forwards or sde_forwards is None:
        ratio, holds5 = None, None
        note5 = "the lower final mean reward is not above the base model's: nothing to reach"
    else:
        ratio = sde_forwards / ode_forwards
        holds5, note5 = ratio > 1, None
    claim5 = {
        "definition": (
            "on the validation curves (mean over seeds), the image-forwards OPD-SDE and OPD-ODE need to reach the "
            "lower of their two final mean rewards, and their ratio SDE / ODE (the paper: the ODE up to 5x more "
            "efficient); holds if > 1 (reported, not a pass/fail of the table)"
        ),
        "sde": sde,
        "target_mean_reward": level,
        "final_mean_reward": finals,
        "ode_forwards": ode_forwards,
        "sde_forwards": sde_forwards,
        "ratio_sde_over_ode": ratio,
        "holds": holds5,
        "note": note5,
    }
    return {
        "teachers_beat_base": claim1,
        "student_matches_teachers": claim2,
        "opd_beats_baselines": claim3,
        "distillation_compute": claim4,
        "ode_vs_sde": claim5,
    }


def aggregate(tables: list[dict], excluded: Optional[list[dict]] = None) -> dict[str, Any]:
    """
    The report over seeds: for every row, each task's reward and every column as `{"mean", "se", "n"}` over seeds
    (see [`stats`]) plus the seeds' own rows; the mean curves with their bands; `teacher_gains` (task -> mean gain
    over the base model on its own task) and the checked `claims`.
    """
    if not tables:
        raise ValueError("No seed table to aggregate.")
    reference = tables[-1]
    tasks, seeds = reference["tasks"], [table["seed"] for table in tables]
    rows = {}
    for row in reference["rows"]:
        name = row["model"]
        seed_rows = [_by_name(table["rows"], name) for table in tables]
        rows[name] = {
            "model": name,
            "kind": row["kind"],
            "rewards": {task: stats([r["rewards"][task] for r in seed_rows]) for task in tasks},
            **{column: stats([r[column] for r in seed_rows]) for column in ROW_STATS},
            "per_seed": [{"seed": table["seed"], **r} for table, r in zip(tables, seed_rows)],
        }
    curves = _aggregate_curves(tables, tasks)
    checked = claims(rows, curves, tasks, seeds)
    # The adapter of `_compute_ratios`: the mean curves as points and values.
    mean_curves = {
        name: {
            "points": [{"forwards": forwards} for forwards in curve["forwards"]],
            **{metric: band["mean"] for metric, band in curve.items() if isinstance(band, dict)},
        }
        for name, curve in curves.items()
    }
    opd_names = [name for name in curves if name.startswith("OPD")]
    config = {key: value for key, value in reference["config"].items() if key != "seed"}
    return {
        "description": (
            "Miniature Table 1 of DiffusionOPD on the toy world, over seeds: single-task GRPO teachers, multi-task "
            "and cascade GRPO baselines, and on-policy distillation of the teachers (ODE and SDE). Rewards: mean over "
            "each task's test prompts, deterministic ODE sampler with fixed noise seeds; the seeds are the training "
            "seeds. Every statistic is {mean, se, n} over seeds (se = sample std (ddof=1) / sqrt(n), null with one "
            "seed; mean null unless defined in every seed)."
        ),
        "seeds": seeds,
        "num_seeds": len(seeds),
        "tasks": tasks,
        "columns": COLUMNS,
        "rows": list(rows.values()),
        "teacher_gains": {task: checked["teachers_beat_base"]["per_task"][task]["mean"] for task in tasks},
        "claims": checked,
        "teachers_total": {
            key: stats([table["teachers_total"][key] for table in tables]) for key in ("seconds", "forwards")
        },
        "curves": curves,
        "curve_definition": _curve_definition(reference["config"]["curve_prompts_per_task"])
        + "; mean over seeds, with each point's SE, min and max",
        "compute_to_reach_multitask": {
            metric: _compute_ratios(mean_curves, MULTITASK, opd_names + [CASCADE], metric)
            for metric in ("normalised_average", "mean_reward", *(f"reward/{task}" for task in tasks))
        },
        "config": config,
        "evaluation": reference["evaluation"],
        "environment": {
            **{k: v for k, v in reference["environment"].items() if k not in ("workers", "threads_per_worker")},
            "per_seed": {
                str(table["seed"]): {
                    "workers": table["environment"].get("workers"),
                    "threads_per_worker": table["environment"].get("threads_per_worker"),
                }
                for table in tables
            },
        },
        "excluded_seed_files": excluded or [],
    }


# ----- Markdown and the plot -----------------------------------------------------------------------------------------
def _count(value: Optional[float]) -> str:
    """A forward count, short: 950, 12.3k, 4.56M."""
    if value is None:
        return "n/a"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def _cell(stat: dict, digits: int = 3, signed: bool = False) -> str:
    """`mean ± se` (the mean alone with one seed), `n/a` when undefined."""
    if stat["mean"] is None:
        return "n/a"
    sign = "+" if signed else ""
    text = f"{stat['mean']:{sign}.{digits}f}"
    return text if stat["se"] is None else f"{text} ± {stat['se']:.{digits}f}"


def _number(value: Optional[float], digits: int = 3) -> str:
    return "n/a" if not _finite(value) else f"{value:.{digits}f}"


def _times(value: Optional[float]) -> str:
    return "n/a" if not _finite(value) else f"{value:.2f}x"


def _verdict(claim: dict) -> str:
    holds, note = claim["holds"], claim.get("note")
    if holds is None:
        return "**undecided**" + (f" ({note})" if note else "")
    return ("**holds**" if holds else "**does not hold**") + (f"; note: {note}" if note else "")


def _claim_lines(report: dict[str, Any]) -> list[str]:
    claims_, tasks = report["claims"], report["tasks"]
    c1, c2, c3, c4, c5 = (claims_[key] for key in claims_)
    lines = ["## Claims", ""]
    gains = ", ".join(f"{task} {_cell(c1['per_task'][task], signed=True)}" for task in tasks)
    lines.append(
        f"1. **The teachers beat the base model** on their own task (gain >= {TEACHER_MIN_GAIN} and > "
        f"{TEACHER_MIN_SE_MULTIPLE:g} SE): {gains}. {_verdict(c1)}."
    )
    diffs = ", ".join(
        f"{task} {_cell(c2['per_task'][task]['student'])} vs {_cell(c2['per_task'][task]['teacher'])} "
        f"(difference {_cell(c2['per_task'][task]['difference'], signed=True)})"
        for task in tasks
    )
    lines.append(
        f"2. **The OPD-ODE student matches each teacher** on the teacher's task (within max({STUDENT_TOLERANCE}, "
        f"SE)) and its normalised average is >= {STUDENT_MIN_NORMALISED}: {diffs}; normalised average "
        f"{_cell(c2['normalised_average'])}. {_verdict(c2)}."
    )
    baselines = "; ".join(
        f"{name} {_cell(b['normalised_average'])} (mean reward {_cell(b['mean_reward'])}; total forwards "
        f"{_count(b['total_forwards'])} vs OPD's {_count(b['opd_total_forwards'])} with its teachers: "
        f"{'equal or more compute' if b['equal_compute'] else 'less compute than OPD'})"
        for name, b in c3["baselines"].items()
    )
    lines.append(
        f"3. **OPD-ODE beats the RL baselines** on the normalised average: OPD-ODE "
        f"{_cell(c3['opd']['normalised_average'])} (mean reward {_cell(c3['opd']['mean_reward'])}) vs {baselines}. "
        f"{_verdict(c3)}."
    )
    level = (
        f"multi-task GRPO's final mean reward {_number(c4['target_mean_reward'])} (base "
        f"{_number(c4['base_mean_reward'])})"
    )
    if c4["opd_forwards"] is None:
        reach = f"OPD-ODE does not reach {level}"
    else:
        reach = (
            f"OPD-ODE's distillation needs {_count(c4['opd_forwards'])} image-forwards to reach {level}, against "
            f"multi-task GRPO's {_count(c4['multitask_forwards'])} in total: {_times(c4['fraction'])}"
        )
    lines.append(
        f"4. **Distillation needs a fraction of multi-task GRPO's compute** (<= {MAX_DISTILLATION_FRACTION}x, "
        f"validation curves): {reach}. {_verdict(c4)}."
    )
    lines.append(
        f"5. **The ODE is the more efficient kernel** (SDE / ODE forwards > 1; the paper reports up to 5x): to reach "
        f"mean reward {_number(c5['target_mean_reward'])}, OPD-SDE needs {_count(c5['sde_forwards'])} and OPD-ODE "
        f"{_count(c5['ode_forwards'])} image-forwards, ratio {_times(c5['ratio_sde_over_ode'])}. {_verdict(c5)}."
    )
    return lines


def format_markdown(report: dict[str, Any]) -> str:
    """The aggregated table in Markdown (mean ± SE per cell), its definitions, the claims and the compute ratios."""
    tasks, seeds = report["tasks"], report["seeds"]
    header = ["model", *tasks, "norm. avg", "mean", "seconds", "forwards", "total seconds", "total forwards"]
    lines = [
        f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))}): each reward cell is the "
        "mean ± standard error over seeds (the mean alone with one seed); compute columns are means.",
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    for row in report["rows"]:
        cells = [row["model"], *(_cell(row["rewards"][t]) for t in tasks)]
        cells += [_cell(row["normalised_average"]), _cell(row["mean_reward"])]
        cells += [f"{row['seconds']['mean']:.0f}", _count(row["forwards"]["mean"])]
        cells += [f"{row['total_seconds']['mean']:.0f}", _count(row["total_forwards"]["mean"])]
        lines.append("| " + " | ".join(cells) + " |")
    evaluation, teachers = report["evaluation"], report["teachers_total"]
    counts = ", ".join(f"{task} {n}" for task, n in evaluation["test_prompts"].items())
    lines += [
        "",
        f"Rewards: mean over each task's test prompts ({counts}), deterministic ODE sampler with "
        f"{evaluation['num_inference_steps']} steps, CFG {evaluation['guidance_scale']}, noise seeds from "
        f"{evaluation['seed']} (the same in every training seed). Norm. avg: {COLUMNS['normalised_average']}. Mean: "
        f"the plain mean of the task rewards. Seconds: {COLUMNS['seconds']}. Forwards: {COLUMNS['forwards']}. Total: "
        f"OPD rows add the three teachers ({teachers['seconds']['mean']:.0f} s, "
        f"{_count(teachers['forwards']['mean'])} forwards).",
        "",
    ]
    if report["excluded_seed_files"]:
        left_out = ", ".join(f"{Path(e['path']).name} ({e['reason']})" for e in report["excluded_seed_files"])
        lines += [f"Left out of this report: {left_out}.", ""]
    lines += _claim_lines(report)
    lines += [
        "",
        "## Compute to reach multi-task GRPO",
        "",
        "Training image-forwards to reach the level that both a method and multi-task GRPO reach on the mean "
        "validation curves (the lower of their two final levels), relative to multi-task GRPO:",
        "",
    ]
    labels = {"normalised_average": "normalised average", "mean_reward": "mean reward"}
    for metric, ratios in report["compute_to_reach_multitask"].items():
        for method, ratio in ratios.items():
            level = f"{labels.get(metric, metric.replace('reward/', '') + ' reward')} {_number(ratio['target'])}"
            if ratio["ratio"] is None:
                lines.append(f"- {method}, {level}: undefined (not above the base model on both curves)")
            else:
                lines.append(
                    f"- {method}, {level}: {ratio['ratio']:.2f}x ({_count(ratio['forwards'])} vs "
                    f"{_count(ratio['reference_forwards'])})"
                )
    return "\n".join(lines)


def plot_curves(report: dict[str, Any], path: str) -> None:
    """
    Reward on the validation prompts versus training image-forwards, for the baselines and the OPD students, mean over
    seeds with a shaded band (± SE from three seeds, min-max with two, none with one): one panel per task (its
    teacher's final level dashed), the mean reward and, when defined, the normalised average. OPD is also drawn
    dotted, shifted by the teachers' compute.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, curves, n = report["tasks"], report["curves"], report["num_seeds"]
    shown = [name for name in curves if not name.startswith("teacher")]
    teachers_total = (report["teachers_total"]["forwards"]["mean"] or 0) / 1e6
    teacher_levels = {task: curves[teacher_name(task)][f"reward/{task}"]["mean"][-1] for task in tasks}
    panels = [*(f"reward/{task}" for task in tasks), "mean_reward"]
    if any(_finite(value) for name in shown for value in curves[name]["normalised_average"]["mean"]):
        panels.append("normalised_average")  # undefined unless every teacher beats the base model
    fig, axes = plt.subplots(1, len(panels), figsize=(3.9 * len(panels), 3.6), constrained_layout=True)
    for panel, ax in zip(panels, axes):
        for name in shown:
            band = curves[name][panel]
            xs = [forwards / 1e6 for forwards in curves[name]["forwards"]]
            keep = [i for i, value in enumerate(band["mean"]) if _finite(value)]
            if not keep:
                continue
            x, y = [xs[i] for i in keep], [band["mean"][i] for i in keep]
            if n >= 3:
                low = [band["mean"][i] - band["se"][i] for i in keep]
                high = [band["mean"][i] + band["se"][i] for i in keep]
            elif n == 2:
                low, high = [band["min"][i] for i in keep], [band["max"][i] for i in keep]
            else:
                low = high = None
            (line,) = ax.plot(x, y, marker="o", markersize=3, label=name)
            if low is not None:
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
            if not panel.startswith("reward/") and name.startswith("OPD"):
                shifted = [value + teachers_total for value in x]
                ax.plot(shifted, y, linestyle=":", color=line.get_color(), alpha=0.7, label=f"{name} + teachers")
        if panel.startswith("reward/"):
            task = panel.split("/", 1)[1]
            level, title = teacher_levels[task], f"{task} reward"
        elif panel == "mean_reward":
            level, title = sum(teacher_levels.values()) / len(tasks), "mean reward"
        else:
            level, title = 1.0, "normalised average"
        ax.axhline(level, color="black", linestyle="--", linewidth=1, label="teachers' level")
        ax.set_title(title)
        ax.set_xlabel("training image-forwards (M)")
        ax.grid(alpha=0.3)
    band_label = {1: "one seed", 2: "2 seeds, band: min-max"}.get(n, f"{n} seeds, band: ± SE")
    axes[0].set_ylabel(f"validation reward ({band_label})")
    axes[-1].legend(fontsize=7, loc="best")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(output_dir: Union[str, os.PathLike], reference_seed: Optional[int] = None) -> dict[str, Any]:
    """
    Aggregates every `<output_dir>/seed-*.json` (see [`load_seed_tables`]) and writes `<output_dir>.json` (strict
    JSON), `<output_dir>.md` and `<output_dir>_curves.png`.

    Args:
        output_dir (`str`): the runs' root (`TableConfig.output_dir`).
        reference_seed (`int`, *optional*): the seed whose settings the aggregated seeds must share (the newest
            seed table's by default).

    Returns:
        `dict`: the report (what the JSON holds), plus `"markdown"` and `"paths"`.
    """
    tables, excluded = load_seed_tables(output_dir, reference_seed)
    if not tables:
        raise FileNotFoundError(f"No seed table (seed-*.json) in {output_dir}: run a seed first.")
    report = aggregate(tables, excluded)
    markdown = format_markdown(report)
    stem = os.path.normpath(output_dir)
    paths = {"json": f"{stem}.json", "markdown": f"{stem}.md", "curves": f"{stem}_curves.png"}
    _write_atomic(paths["json"], _dump(report))
    _write_atomic(paths["markdown"], "# Toy Table 1\n\n" + markdown + "\n")
    plot_curves(report, paths["curves"])
    logger.info("Report over seeds %s: %s", report["seeds"], paths["markdown"])
    return {**report, "markdown": markdown, "paths": paths}
