"""Checkpoint integrity: what a resumable checkpoint holds, checking it before loading, finding the newest intact one.

Checkpoints are written to a staging folder and renamed into place (see `DiffusionTrainerBase._save_checkpoint`), so a
process killed mid-save leaves the previous checkpoints as they were; these checks catch what renaming cannot (a disk
filling up, a file damaged later, a copy cut short).
"""

import json
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Optional, Union

from safetensors.torch import load_file

from .lora import nonfinite_keys


logger = logging.getLogger(__name__)

__all__ = ["STAGING_DIR", "checkpoint_problems", "latest_intact_checkpoint", "list_checkpoints"]

# Where a checkpoint is written before it is renamed to `checkpoint-<step>` (not a checkpoint name: never resumed).
STAGING_DIR = ".checkpoint-staging"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: Union[str, os.PathLike]) -> list[Path]:
    """The `checkpoint-<step>` folders of `output_dir`, newest (highest step) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [path for _, path in sorted(found, reverse=True)]


def _safetensors_problem(path: Path) -> Optional[str]:
    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors has its own error type for a cut or corrupt file
        return f"{path.name} is unreadable ({error})"
    bad = nonfinite_keys(tensors)
    return f"{path.name} has non-finite values in {bad[:3]}" if bad else None


def _torch_file_problem(path: Path) -> Optional[str]:
    # `torch.save` writes a zip archive: checking every member's CRC finds a cut or damaged file without unpickling.
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError) as error:
        return f"{path.name} is unreadable ({error})"
    return f"{path.name} is damaged (member {damaged})" if damaged else None


def _json_problem(path: Path) -> Optional[str]:
    try:
        json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{path.name} is unreadable ({error})"
    return None


def checkpoint_problems(checkpoint: Union[str, os.PathLike], weight_name: str) -> list[str]:
    """
    What is wrong with a checkpoint folder, each problem naming its file (empty when it can be resumed from): the LoRA
    weights `weight_name` must be there, readable and finite; `trainer_state.json` must be there and parse; every
    other state file present (optimizer, scheduler, RNG, EMA) must be readable. Nothing is unpickled.
    """
    folder = Path(checkpoint)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    problems = []
    for required in (weight_name, "trainer_state.json"):
        if not (folder / required).is_file():
            problems.append(f"{required} is missing")
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
        elif path.suffix in (".pt", ".pth"):
            problem = _torch_file_problem(path)
        elif path.suffix == ".json":
            problem = _json_problem(path)
        else:
            continue
        if problem:
            problems.append(problem)
    return problems


def latest_intact_checkpoint(output_dir: Union[str, os.PathLike], weight_name: str) -> str:
    """
    The newest checkpoint of `output_dir` with no [`checkpoint_problems`]; each damaged newer one is skipped with a
    warning naming its files. Raises `ValueError` when there is no checkpoint, or none is intact (naming the files).
    """
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        raise ValueError(f"No checkpoint to resume from in {output_dir} (no `checkpoint-<step>` folder).")
    damaged = {}
    for checkpoint in checkpoints:
        problems = checkpoint_problems(checkpoint, weight_name)
        if not problems:
            return str(checkpoint)
        damaged[checkpoint.name] = problems
        logger.warning("Skipping the damaged checkpoint %s: %s.", checkpoint, "; ".join(problems))
    details = "; ".join(f"{name}: {', '.join(problems)}" for name, problems in damaged.items())
    raise ValueError(f"No intact checkpoint to resume from in {output_dir}: {details}.")
