"""The paper's Table 1 in miniature on the toy world: GRPO teachers, OPD (ODE and SDE), multi-task and cascade GRPO.

    python benchmarks/toy_table.py --quick                 # the whole pipeline at small scale, about 3 minutes
    python benchmarks/toy_table.py --seed 0                # one seed of the full table (2 workers x 1 thread)
    python benchmarks/toy_table.py --seed 1                # another seed (any session); the report covers both
    python benchmarks/toy_table.py --report_only           # re-aggregate the seeds present
    python benchmarks/toy_table.py --workers 1 --threads 2 # everything in this process, one stage at a time

Seed N caches its stages under `<output_dir>/seed-N/` and writes its table to `<output_dir>/seed-N.json`; the report
over every `<output_dir>/seed-*.json` present goes to `<output_dir>.json`, `<output_dir>.md` and
`<output_dir>_curves.png` (defaults: `results/toy_table`, or `results/toy_table_quick` with `--quick`).
"""

import argparse
import logging
import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import transformers  # noqa: E402

from benchmarks import toy_report  # noqa: E402
from benchmarks.toy_stages import TableConfig, run_stages  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small scale (about 3 minutes): each teacher beats the base model, not the claims",
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed of this run")
    parser.add_argument("--output_dir", default=None, help="root of the seeds' caches and tables; report next to it")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (1: everything in this process)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per worker")
    parser.add_argument("--force", action="store_true", help="retrain and re-evaluate every stage of this seed")
    parser.add_argument("--report_only", action="store_true", help="only re-aggregate the seed tables present")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("benchmarks.toy_stages", "benchmarks.toy_report"):
        logging.getLogger(name).setLevel(logging.INFO)
    transformers.logging.set_verbosity_error()
    output_dir = args.output_dir or ("results/toy_table_quick" if args.quick else "results/toy_table")

    start = time.perf_counter()
    if not args.report_only:
        make = TableConfig.quick if args.quick else TableConfig.full
        config = make(output_dir=output_dir, seed=args.seed)
        outputs = run_stages(
            config,
            workers=args.workers,
            threads_per_worker=args.threads,
            force=args.force,
            show_progress=not args.no_progress,
        )
        seed_path = toy_report.write_seed_table(toy_report.assemble_seed(outputs), output_dir)
        logging.getLogger("benchmarks.toy_report").info("Seed %d: %s", args.seed, seed_path)
    try:
        report = toy_report.write_report(output_dir, reference_seed=None if args.report_only else args.seed)
    except FileNotFoundError as error:  # --report_only before any seed ran
        parser.error(str(error))
    paths = report["paths"]
    print()
    print(report["markdown"])
    print()
    print(
        f"Done in {time.perf_counter() - start:.0f} s. Report over seeds {report['seeds']}: {paths['markdown']} and "
        f"{paths['json']}; curves: {paths['curves']}; seed tables and stage caches: {output_dir}/"
    )
    return report


if __name__ == "__main__":
    main()
