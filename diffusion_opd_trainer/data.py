"""Loading prompts for the example scripts: a Hub dataset, a JSON/JSONL/CSV/Parquet file, or a text file."""

import os
from typing import Optional

from datasets import Dataset, load_dataset


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
