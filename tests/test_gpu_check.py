"""
`benchmarks/gpu_check.py --tiny`: the one-command GPU check's code path (the configurations, the interleaved
schedules, the levers, the guards, the JSON) run on the CPU with the tiny SD3 pipeline, so that the script cannot rot
between the GPU runs.
"""

import json
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `benchmarks` is a package at the repository root

from benchmarks import gpu_check  # noqa: E402


CHECKPOINTING = "activation_checkpointing"


def run(tmp_path, *argv: str) -> dict:
    output = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--tiny", "--output", str(output), *argv]) == 0
    return json.loads(output.read_text())


def test_tiny_check_measures_every_configuration(tmp_path, capsys):
    report = run(tmp_path)
    assert report["mode"] == "tiny" and report["complete"], report["time_guard"]
    assert report["time_guard"]["skipped"] == []
    assert report["model"]["parameters"]["transformer"] > 0
    assert report["settings"]["trained_steps"] == 2  # 3 rollout steps in tiny mode, all but the last trained

    # Every OPD configuration, once: 0, 1 and 3 teachers x batch 1 and 4 x levers off and on.
    keys = [(entry["teachers"], entry["batch"], entry["levers"]) for entry in report["opd"]]
    assert sorted(keys) == sorted((t, b, lever) for t in (0, 1, 3) for b in (1, 4) for lever in ("off", "on"))
    for entry in report["opd"]:
        assert entry["status"] == "ok", (entry["name"], entry.get("error"))
        # A warm-up step of each schedule, then one interleaved round (A B A B).
        assert [step["schedule"] for step in entry["steps"]] == ["fused", "two_pass", "fused", "two_pass"]
        assert all(step["seconds"] > 0 for step in entry["steps"])
        for schedule in ("fused", "two_pass"):
            summary = entry[schedule]["step_seconds"]
            assert summary["n"] == 1 and summary["median"] > 0 and summary["values"][0] > 0
            assert entry[schedule]["warmup_seconds"] > 0
            assert "peak_memory_gib" in entry[schedule]  # None on the CPU
        assert entry["two_pass_over_fused"] > 0
        assert entry["estimate"]["total_gib"] > 0
        assert entry["wall_seconds"] >= entry["setup_seconds"] > 0
        state = entry["state"]
        assert state["activation_checkpointing"] is (entry["levers"] == "on")
        assert state["teacher_adapters"] == entry["teachers"]  # 0: the base model as the teacher

    # GRPO, levers off and on.
    assert [entry["levers"] for entry in report["grpo"]] == ["off", "on"]
    for entry in report["grpo"]:
        assert entry["status"] == "ok", (entry["name"], entry.get("error"))
        assert entry["step_seconds"]["median"] > 0 and entry["images_per_second"] > 0
        assert entry["warmup_seconds"] > 0 and len(entry["steps"]) == 2
        assert all(entry["phase_seconds"][phase] > 0 for phase in ("rollout", "reward", "train"))
        assert entry["state"]["activation_checkpointing"] is (entry["levers"] == "on")

    # The levers: applied, but 8-bit AdamW without bitsandbytes (recorded as skipped with the reason).
    off, on = report["levers"]["off"], report["levers"]["on"]
    assert off["applied"][CHECKPOINTING] is False and on["applied"][CHECKPOINTING] is True
    if gpu_check.bitsandbytes_status()[0]:
        assert on["applied"]["optim"] == "adamw_bnb_8bit"
    else:
        assert "bitsandbytes" in on["skipped"]["optim"]
        assert all("8bit" not in entry["optim"] for entry in report["opd"] + report["grpo"])
    for name, value in (("text_encoder_offload", "free"), ("offload_vae", True)):
        assert on["applied"][name] == value and name not in on["skipped"]
    for entry in report["opd"] + report["grpo"]:  # "free": the trainers of the levers-on runs released the encoders
        released = set(entry["state"]["text_encoders"].values()) == {"released"}
        assert released is (entry["levers"] == "on")

    printed = capsys.readouterr().out
    assert "| teachers | batch | levers | fused s/step | two-pass s/step |" in printed
    assert "14 of 14 configurations ok" in printed


def test_time_guard_skips_configurations_and_still_writes_the_json(tmp_path):
    report = run(tmp_path, "--time_budget", "0", "--teachers", "1", "--batches", "1")
    assert not report["complete"]
    names = ["opd/teachers=1/batch=1/levers=off", "opd/teachers=1/batch=1/levers=on", "grpo/levers=off"]
    names.append("grpo/levers=on")
    assert report["time_guard"]["skipped"] == names
    for entry in report["opd"] + report["grpo"]:
        assert entry["status"] == "skipped" and entry["reason"].startswith("time guard")
        assert "steps" not in entry


def test_out_of_memory_is_recorded_and_the_next_configuration_runs(tmp_path, monkeypatch):
    def out_of_memory(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(gpu_check.DiffusionOPDTrainer, "train", out_of_memory)
    report = run(tmp_path, "--teachers", "1", "--batches", "1", "--levers", "off")
    (opd,), (grpo,) = report["opd"], report["grpo"]
    assert opd["status"] == "oom" and "Tried to allocate" in opd["error"]
    assert opd["steps"] == [] and opd["estimate"]["total_gib"] > 0  # what was measured before the failure is kept
    assert grpo["status"] == "ok" and grpo["step_seconds"]["median"] > 0
    assert not report["complete"]


@pytest.mark.parametrize("error", [ValueError("a broken configuration"), RuntimeError("CUDA error: out of memory")])
def test_errors_are_classified(error):
    def fail(partial):
        partial["setup_seconds"] = 1.0
        raise error

    entry = gpu_check.guarded(fail, {"name": "x"}, torch.device("cpu"))
    assert entry["setup_seconds"] == 1.0
    assert entry["status"] == ("oom" if "out of memory" in str(error) else "error")
    assert str(error) in entry["error"]
