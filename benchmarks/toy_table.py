"""The paper's Table 1 in miniature on the toy world: GRPO teachers, OPD (ODE and SDE), multi-task and cascade GRPO.

    python benchmarks/toy_table.py --quick                 # the whole pipeline at tiny scale, a few minutes
    python benchmarks/toy_table.py                         # the committed table, about an hour on two cores
    python benchmarks/toy_table.py --output_dir /tmp/t --force --threads 2

Writes `<output_dir>.json`, `<output_dir>.md` and `<output_dir>_curves.png` (defaults: `results/toy_table*`, or
`results/toy_table_quick*` with `--quick`); every stage is cached under `<output_dir>/`, so teachers train once.
"""

import argparse
import logging
import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import transformers  # noqa: E402

from diffusion_opd_trainer.toy.table import TableConfig, run_table  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny scale: checks the pipeline, in a few minutes")
    parser.add_argument("--output_dir", default=None, help="stage cache; the table is written next to it")
    parser.add_argument("--force", action="store_true", help="retrain and re-evaluate every stage")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("diffusion_opd_trainer.toy.table").setLevel(logging.INFO)
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    overrides = {} if args.output_dir is None else {"output_dir": args.output_dir}
    config = TableConfig.quick(**overrides) if args.quick else TableConfig.full(**overrides)

    start = time.perf_counter()
    table = run_table(config, force=args.force, show_progress=not args.no_progress)
    print()
    print(table["markdown"])
    print()
    print(
        f"Done in {time.perf_counter() - start:.0f} s. Table: {table['paths']['markdown']} and "
        f"{table['paths']['json']}; curves: {table['paths']['curves']}; stage cache: {config.output_dir}/"
    )
    return table


if __name__ == "__main__":
    main()
