"""
`diffusion-opd toy`: the paper's Table 1 in miniature on the toy world (GRPO teachers, OPD, multi-task and cascade
GRPO), by `benchmarks/toy_table.py` of the repository checkout.

    diffusion-opd toy --quick          # the whole pipeline at small scale, about 3 minutes on two cores
    diffusion-opd toy --seed 0         # one seed of the full table
    diffusion-opd toy --help           # every option of benchmarks/toy_table.py

Its caches and tables go under the current directory (`results/toy_table` by default, see `--output_dir`). The
benchmark code lives next to the package in the repository (`benchmarks/`), not inside it: an installed wheel
without the checkout cannot run this command.
"""

import argparse
import contextlib
import importlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional


__all__ = ["TOY_TABLE", "find_toy_table", "main"]

# The script, relative to the folder that holds the package (the repository root in a checkout).
TOY_TABLE = Path("benchmarks") / "toy_table.py"


def find_toy_table(root: Optional[Path] = None) -> Path:
    """
    The repository root whose `benchmarks/toy_table.py` this command runs.

    Args:
        root (`Path`, *optional*): where to look; defaults to the folder above the installed package.

    Raises:
        `FileNotFoundError`: naming the missing script and how to get it.
    """
    if root is None:
        root = Path(__file__).resolve().parents[2]
    if not (root / TOY_TABLE).is_file():
        raise FileNotFoundError(
            f"`diffusion-opd toy` runs {TOY_TABLE} of the repository checkout, and there is no {root / TOY_TABLE}: "
            "the benchmarks are not part of the installed package. Clone the repository and install it with "
            "`pip install -e .`, then run the command again (or `python benchmarks/toy_table.py` in the checkout)."
        )
    return root


@contextlib.contextmanager
def _program_name(prog: str) -> Iterator[None]:
    # toy_table.py's parser takes its name from sys.argv[0]: name the command its usage lines show.
    saved = sys.argv[0] if sys.argv else None
    if sys.argv:
        sys.argv[0] = prog
    else:
        sys.argv.append(prog)
    try:
        yield
    finally:
        if saved is None:
            sys.argv.pop(0)
        else:
            sys.argv[0] = saved


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None, root: Optional[Path] = None) -> int:
    """Runs `benchmarks/toy_table.py`'s `main(argv)` (the command line by default) from the repository checkout."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or "diffusion-opd toy"
    try:
        root = find_toy_table(root)
    except FileNotFoundError as error:
        argparse.ArgumentParser(prog=prog).error(str(error))
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    toy_table = importlib.import_module("benchmarks.toy_table")
    if Path(toy_table.__file__).resolve() != (root / TOY_TABLE).resolve():
        argparse.ArgumentParser(prog=prog).error(
            f"`benchmarks.toy_table` was imported from {toy_table.__file__}, not from {root / TOY_TABLE}: another "
            "`benchmarks` package shadows the repository's; run the command from the repository root."
        )
    with _program_name(prog):
        toy_table.main(argv)
    return 0
