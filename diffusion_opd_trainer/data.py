"""Prompt datasets: loading them (a Hub dataset, a JSON/JSONL/CSV/Parquet file, a text file) and checking them."""

import logging
import os
from typing import Optional

from datasets import Dataset, DatasetDict, load_dataset


logger = logging.getLogger(__name__)


_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_prompt_dataset(name_or_path: str, split: str = "train", prompt_column: Optional[str] = None) -> Dataset:
    """
    Loads prompts as a `datasets.Dataset` with a `prompt` column (other columns, e.g. `task` or metadata, are kept).

    Args:
        name_or_path (`str`): a `.txt` file (one prompt per line), a `.json`/`.jsonl`/`.csv`/`.parquet` file, or a
            dataset id / folder for `datasets.load_dataset`.
        split (`str`, defaults to `"train"`): the split to take from a dataset id.
        prompt_column (`str`, *optional*): the column holding the prompts, renamed to `prompt` (Flow-GRPO's metadata
            files use `prompt` already).
    """
    extension = os.path.splitext(name_or_path)[1].lower()
    if extension == ".txt":
        if not os.path.isfile(name_or_path):
            raise FileNotFoundError(f"Prompt file {name_or_path} does not exist.")
        with open(name_or_path, encoding="utf-8") as handle:
            prompts = [line.strip() for line in handle if line.strip()]
        dataset = Dataset.from_dict({"prompt": prompts})
    elif extension in _FORMATS:
        if not os.path.isfile(name_or_path):
            raise FileNotFoundError(f"Prompt file {name_or_path} does not exist.")
        dataset = load_dataset(_FORMATS[extension], data_files=name_or_path, split="train")
    else:
        dataset = load_dataset(name_or_path, split=split)
    if prompt_column and prompt_column != "prompt":
        dataset = dataset.rename_column(prompt_column, "prompt")
    if "prompt" not in dataset.column_names:
        raise ValueError(
            f"{name_or_path} has no `prompt` column (columns: {dataset.column_names}); set prompt_column."
        )
    return dataset


def check_prompt_dataset(dataset, name: str) -> None:
    """
    Checks a trainer's dataset once, before any model work: a `datasets.Dataset` with a `prompt` column of strings.
    Raises `TypeError` for another type and `ValueError` naming the first bad row (its index and value); empty
    prompts are allowed, with one warning, as unconditional prompts.

    Args:
        dataset (`datasets.Dataset`, *optional*): the dataset (`None` passes).
        name (`str`): the argument's name, for the messages (e.g. `"train_dataset"`).
    """
    if dataset is None:
        return
    if isinstance(dataset, DatasetDict):
        raise TypeError(f"`{name}` is a DatasetDict (splits {list(dataset)}): pass one split, e.g. `ds['train']`.")
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"`{name}` must be a `datasets.Dataset` with a `prompt` column (e.g. "
            f"`Dataset.from_dict({{'prompt': [...]}})`), got {type(dataset).__name__}."
        )
    if "prompt" not in dataset.column_names:
        raise ValueError(f"`{name}` needs a `prompt` column; it has {dataset.column_names}.")
    if len(dataset) == 0:
        raise ValueError(f"`{name}` has no rows.")
    empty = []
    for index, prompt in enumerate(dataset["prompt"]):
        if not isinstance(prompt, str):
            raise ValueError(
                f"`{name}` row {index}: the prompt must be a string, got {prompt!r} ({type(prompt).__name__})."
            )
        if not prompt.strip():
            empty.append(index)
    if empty:
        logger.warning(
            "`%s` has %d empty prompt(s) (first at row %d): they train as unconditional (empty-text) prompts.",
            name,
            len(empty),
            empty[0],
        )
