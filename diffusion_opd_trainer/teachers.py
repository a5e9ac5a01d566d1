"""Teacher LoRAs for on-policy distillation: resolving sources, loading them as frozen adapters, running as one."""

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

from .hub import download_lora
from .lora import active_adapter, adapter_checksum, load_adapter, read_lora


logger = logging.getLogger(__name__)

TeacherSource = Union[str, os.PathLike, "TeacherConfig", dict]


@dataclass
class TeacherConfig:
    """
    A teacher LoRA and how to run it.

    Args:
        source (`str` or `os.PathLike`):
            A PEFT folder (`adapter_config.json` + `adapter_model.safetensors`), a diffusers LoRA folder or
            `.safetensors` file, or a Hub id `owner/repo[/subfolder][@revision]`.
        guidance_scale (`float`, *optional*):
            The teacher's CFG scale (1 for a CFG-free teacher). Defaults to the student's.
    """

    source: Union[str, os.PathLike]
    guidance_scale: Optional[float] = None


@dataclass
class Teacher:
    """A loaded teacher: the adapter on the student's denoiser, its CFG scale, where it came from."""

    task: str
    adapter_name: str
    guidance_scale: Optional[float]
    source: str
    path: Path
    format: str
    checksum: float


def is_local_source(source: Union[str, os.PathLike]) -> bool:
    """The source rule: absolute, `./`, `../`, `~`, or existing paths are local; anything else is a Hub id."""
    text = os.fspath(source)
    return (
        isinstance(source, os.PathLike)
        or os.path.isabs(text)
        or text.startswith(("./", "../", "~", ".\\", "..\\"))
        or os.path.exists(text)
    )


def resolve_source(source: Union[str, os.PathLike], owner: str, token=None) -> Path:
    """
    The local folder or file of a LoRA source, downloading Hub ids (or reading the Hub cache offline).

    Args:
        source (`str` or `os.PathLike`): a local path or `owner/repo[/subfolder][@revision]`.
        owner (`str`): who the LoRA is for, named in errors (e.g. "Teacher for task 'ocr'").
        token (`str` or `bool`, *optional*): a Hub token; never logged.
    """
    if is_local_source(source):
        path = Path(os.fspath(source)).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{owner}: local path {os.fspath(source)!r} does not exist.")
        return path
    try:
        return download_lora(os.fspath(source), token=token)
    except HfHubHTTPError as error:
        raise OSError(f"{owner}: cannot fetch the Hub LoRA {os.fspath(source)!r}: {error}") from error
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        raise OSError(
            f"{owner}: the Hub LoRA {os.fspath(source)!r} is not in the local Hub cache and the Hub cannot be "
            f"reached ({type(error).__name__}). Download it while online, or pass a local path."
        ) from error


def check_local_sources(teachers: dict[str, TeacherSource]) -> None:
    """Raises `FileNotFoundError` for the first local teacher path that does not exist (before any model loads)."""
    for task, source in teachers.items():
        path = _as_config(source).source
        if is_local_source(path):
            resolve_source(path, f"Teacher for task {task!r}")


def _as_config(source: TeacherSource) -> TeacherConfig:
    if isinstance(source, TeacherConfig):
        return source
    if isinstance(source, dict):
        return TeacherConfig(**source)
    return TeacherConfig(source=source)


def load_teachers(
    denoiser: torch.nn.Module,
    teachers: dict[str, TeacherSource],
    denoiser_name: str,
    base_model: Optional[str] = None,
    guidance_overrides: Optional[dict[str, float]] = None,
    token=None,
) -> dict[str, Teacher]:
    """
    Loads each task's teacher LoRA as a frozen adapter (named `teacher_<task>`) on `denoiser`.

    Raises, naming the task and the source: `FileNotFoundError` for a missing local path, `OSError` for a Hub LoRA
    that cannot be fetched (offline and not cached), `ValueError` for an unreadable file, non-finite weights, or a
    LoRA whose modules or shapes do not fit the denoiser (another architecture). Warns when a teacher was trained on
    another base model.
    """
    if not teachers:
        raise ValueError("`teachers` is empty: OPD needs at least one task -> teacher LoRA.")
    guidance_overrides = guidance_overrides or {}
    unknown = sorted(set(guidance_overrides) - set(teachers))
    if unknown:
        raise ValueError(
            f"`teacher_guidance_scales` names task(s) {unknown} that have no teacher ({sorted(teachers)})."
        )
    loaded = {}
    for task, source in teachers.items():
        config = _as_config(source)
        owner = f"Teacher for task {task!r}"
        path = resolve_source(config.source, owner, token=token)
        try:
            state_dict, lora_config, fmt = read_lora(path, denoiser_name, denoiser=denoiser)
        except (ValueError, FileNotFoundError) as error:
            raise type(error)(f"{owner} ({os.fspath(config.source)!r}): {error}") from error
        adapter_name = f"teacher_{task}"
        # Read before injecting: PEFT overwrites the config's base model with the denoiser's own name.
        teacher_base = lora_config.base_model_name_or_path
        load_adapter(denoiser, state_dict, lora_config, adapter_name, f"{os.fspath(config.source)!r} (task {task!r})")
        if base_model and teacher_base and os.path.basename(str(teacher_base)) != os.path.basename(str(base_model)):
            logger.warning(
                "Teacher for task %r was trained on %r but the pipeline is %r: its LoRA may not transfer.",
                task,
                teacher_base,
                base_model,
            )
        loaded[task] = Teacher(
            task=task,
            adapter_name=adapter_name,
            guidance_scale=guidance_overrides.get(task, config.guidance_scale),
            source=os.fspath(config.source),
            path=path,
            format=fmt,
            checksum=adapter_checksum(denoiser, adapter_name),
        )
        logger.info("Loaded teacher %r for task %r (%s format, %s)", adapter_name, task, fmt, path)
    return loaded


@contextlib.contextmanager
def as_teacher(denoiser: torch.nn.Module, teacher: Teacher):
    """Runs the block as `teacher` (no grad); the student adapter and its trainability are restored on exit."""
    with torch.no_grad(), active_adapter(denoiser, teacher.adapter_name):
        yield
