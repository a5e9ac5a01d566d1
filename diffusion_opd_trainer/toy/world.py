"""The toy world's vocabulary, prompt grammar, and its fixed train/test prompt sets.

Every prompt is the caption of a *spec*: a JSON-able dict that says what the image must show. Three tasks mirror the
DiffusionOPD paper's (arXiv 2605.15055, its tasks and rewards):

- `"compositional"` (GenEval-like): `"a red circle"`, `"three blue squares"`, `"a red circle and a blue square"`,
  `"a red circle left of a blue square"` (categories `single`, `counting`, `two_objects`, `position`);
- `"text"` (OCR-like): `'the text "kfz"'`, one to three letters of an eight-letter bitmap font;
- `"preference"` (aesthetic-like): `"a poster of two green triangles"`; the reward ignores the prompt and scores how
  vivid, contrasted and clean the image is.

Specs carry a `seed` that fixes the layout the renderer draws, so `render` is a function of the dataset row.
"""

import json
import re
import zlib
from functools import cache
from typing import Any, Optional, Union

import numpy as np

from .font import LETTERS


__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "RELATIONS",
    "SHAPES",
    "TASKS",
    "VOCABULARY",
    "caption",
    "parse_prompt",
    "prompts",
    "specs",
]

TASKS = ("compositional", "text", "preference")

# A fixed palette, far apart in RGB so that the detector can tell colours by their nearest palette entry even after
# the VAE and the model blur them (the closest pair, orange and yellow, is 0.45 apart).
COLORS = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.10, 0.20, 0.90),
    "yellow": (1.00, 0.95, 0.00),
    "purple": (0.60, 0.10, 0.80),
    "orange": (1.00, 0.50, 0.00),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}

# Vivid background colours of the preference task's posters. They stay clear of the palette above, so that a poster's
# objects keep their colours; a compositional image drawn on them confuses the detector (the tasks interfere).
BACKGROUNDS = {
    "pink": (1.00, 0.40, 0.70),
    "teal": (0.00, 0.55, 0.55),
    "cyan": (0.15, 0.85, 1.00),
    "lime": (0.65, 1.00, 0.25),
    "magenta": (0.95, 0.05, 0.95),
    "indigo": (0.25, 0.05, 0.55),
}

VOCABULARY = tuple(
    dict.fromkeys(
        "a an the text and of left right above below poster".split()
        + list(NUMBER_WORDS.values())
        + list(COLORS)
        + [name for shape in SHAPES for name in (shape, shape + "s")]
    )
)

# How many prompts of each category go to the test split (the rest is train). Position prompts dominate the
# compositional set; the test split keeps every category represented.
_TEST_SIZES = {
    "compositional": {"single": 6, "counting": 14, "two_objects": 30, "position": 50},
    "text": {"length_1": 2, "length_2": 12, "length_3": 50},
    "preference": {"single": 6, "counting": 10, "two_objects": 24},
}
_SPLIT_SEED = 20260526


# ----- captions ------------------------------------------------------------------------------------------------------
def _object_phrase(obj: dict) -> str:
    count = obj.get("count", 1)
    if count == 1:
        article = "an" if obj["color"][0] in "aeiou" else "a"
        return f"{article} {obj['color']} {obj['shape']}"
    return f"{NUMBER_WORDS[count]} {obj['color']} {obj['shape']}s"


def caption(spec: dict) -> str:
    """
    The prompt of a spec.

    Args:
        spec (`dict`): a world spec (`task`, and `objects` and `relation`, or `text`).
    """
    if spec["task"] == "text":
        return f'the text "{spec["text"]}"'
    objects = spec["objects"]
    if spec.get("relation"):
        phrase = f"{_object_phrase(objects[0])} {spec['relation']} {_object_phrase(objects[1])}"
    else:
        phrase = " and ".join(_object_phrase(obj) for obj in objects)
    return f"a poster of {phrase}" if spec["task"] == "preference" else phrase


_COLOR_RE = "|".join(COLORS)
_SHAPE_RE = "|".join(SHAPES)
_OBJECT_RE = rf"(an?|two|three|four) ({_COLOR_RE}) ({_SHAPE_RE})s?"
_RELATION_RE = "|".join(RELATIONS)
_TEXT_PROMPT = re.compile(r'^the text "([^"]*)"$')
_OBJECTS_PROMPT = re.compile(rf"^(a poster of )?{_OBJECT_RE}(?: (and|{_RELATION_RE}) {_OBJECT_RE})?$")


def parse_prompt(prompt: str) -> Optional[dict]:
    """
    The spec of a prompt of the toy grammar (without a layout seed), or `None` if the prompt is not one.

    Args:
        prompt (`str`): e.g. `"two red circles"`, `'the text "kfz"'`, `"a poster of a blue square"`.
    """
    prompt = " ".join(prompt.strip().lower().split())
    match = _TEXT_PROMPT.match(prompt)
    if match:
        return {"task": "text", "category": f"length_{len(match.group(1))}", "text": match.group(1)}
    match = _OBJECTS_PROMPT.match(prompt)
    if match is None:
        return None
    poster, count, color, shape, joiner, count_2, color_2, shape_2 = match.groups()
    numbers = {"a": 1, "an": 1, **{word: number for number, word in NUMBER_WORDS.items()}}
    objects = [{"color": color, "shape": shape, "count": numbers[count]}]
    if joiner is not None:
        objects.append({"color": color_2, "shape": shape_2, "count": numbers[count_2]})
    relation = joiner if joiner in RELATIONS else None
    if relation is not None:
        category = "position"
    elif len(objects) == 2:
        category = "two_objects"
    else:
        category = "counting" if objects[0]["count"] > 1 else "single"
    spec = {"task": "preference" if poster else "compositional", "category": category, "objects": objects}
    if not poster:
        spec["relation"] = relation
    return spec


# ----- prompt sets ---------------------------------------------------------------------------------------------------
def _all_specs(task: str) -> dict[str, list[dict]]:
    """Every spec of a task, by category, in a fixed order."""
    singles = [{"color": c, "shape": s, "count": 1} for c in COLORS for s in SHAPES]
    counted = [{"color": c, "shape": s, "count": n} for n in NUMBER_WORDS for c in COLORS for s in SHAPES]
    pairs = [[a, b] for a in singles for b in singles if a != b]
    if task == "text":
        by_length = {}
        for length in (1, 2, 3):
            strings = [""]
            for _ in range(length):
                strings = [s + letter for s in strings for letter in LETTERS]
            by_length[f"length_{length}"] = [{"text": s} for s in strings]
        return by_length
    categories = {
        "single": [{"objects": [obj]} for obj in singles],
        "counting": [{"objects": [obj]} for obj in counted],
        "two_objects": [{"objects": pair} for pair in pairs],
    }
    if task == "compositional":
        categories = {name: [dict(spec, relation=None) for spec in items] for name, items in categories.items()}
        categories["position"] = [{"objects": pair, "relation": rel} for rel in RELATIONS for pair in pairs]
    return categories


def _spec_seed(prompt: str, split: str) -> int:
    # A layout seed that depends only on the prompt, so the same row always renders the same image.
    return zlib.crc32(f"{split}:{prompt}".encode())


@cache
def _specs(task: str, split: str) -> tuple[str, ...]:
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; the toy tasks are {TASKS}.")
    if split not in ("train", "test"):
        raise ValueError(f"Unknown split {split!r}; use 'train' or 'test'.")
    rng = np.random.default_rng([_SPLIT_SEED, TASKS.index(task)])
    rows = []
    for category, items in _all_specs(task).items():
        order = rng.permutation(len(items))
        num_test = _TEST_SIZES[task][category]
        chosen = order[:num_test] if split == "test" else order[num_test:]
        for index in sorted(chosen):
            spec = {"task": task, "category": category, **items[index]}
            if task == "preference":
                spec["background"] = _poster_background(np.random.default_rng(_spec_seed(caption(spec), split)))
            spec["seed"] = _spec_seed(caption(spec), split)
            rows.append(json.dumps(spec, sort_keys=True))
    # One shuffled order for the whole split, so a prefix of it mixes categories.
    order = np.random.default_rng([_SPLIT_SEED, TASKS.index(task), split == "test"]).permutation(len(rows))
    return tuple(rows[i] for i in order)


def _poster_background(rng: np.random.Generator) -> dict:
    names = list(BACKGROUNDS)
    first, second = rng.choice(len(names), size=2, replace=False)
    return {"colors": [names[first], names[second]], "direction": ["vertical", "horizontal"][int(rng.integers(2))]}


def specs(task: str, split: str = "train") -> list[dict]:
    """
    The specs of a task's prompt set, in the order of [`prompts`].

    Args:
        task (`str`): one of [`TASKS`].
        split (`str`, defaults to `"train"`): `"train"` or `"test"` (disjoint).
    """
    return [json.loads(row) for row in _specs(task, split)]


def prompts(task: Union[str, None] = None, split: str = "train"):
    """
    A task's prompt set as a `datasets.Dataset`.

    Columns: `prompt`, `task`, `category` (the task's sub-category, e.g. `position`), and `metadata`: the JSON of the
    spec (objects, relation or text, background and layout seed), which the rewards read and [`render`] draws. The
    train and test prompts of a task are disjoint, and the sets are the same on every machine.

    Args:
        task (`str`, *optional*): one of [`TASKS`]; `None` concatenates all tasks (for multi-task training).
        split (`str`, defaults to `"train"`): `"train"` or `"test"`.

    Example:
        ```python
        >>> from diffusion_opd_trainer import toy
        >>> toy.prompts("text", "test")[0]["prompt"]
        'the text "csf"'
        ```
    """
    from datasets import Dataset

    tasks = TASKS if task is None else (task,)
    columns: dict[str, list[Any]] = {"prompt": [], "task": [], "category": [], "metadata": []}
    for name in tasks:
        for row in _specs(name, split):
            spec = json.loads(row)
            columns["prompt"].append(caption(spec))
            columns["task"].append(name)
            columns["category"].append(spec["category"])
            columns["metadata"].append(row)
    return Dataset.from_dict(columns)
