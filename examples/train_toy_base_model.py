"""
Reproduces the toy world's bundled base model from scratch (about ten minutes on two CPU cores).

    python examples/train_toy_base_model.py --output_dir toy_base_model            # the bundled model (seed 0)
    python examples/train_toy_base_model.py --output_dir /tmp/toy_smoke --smoke    # a seconds-long check

Copy the output folder (without `training_summary.json` if you like) over `diffusion_opd_trainer/toy/base_model/` to
replace the bundled model, or load it with `toy.load_pipeline(path)`.
"""

import json
import logging
import sys

from diffusion_opd_trainer.toy.train_base import main


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    summary = main(sys.argv[1:])
    print(json.dumps({k: summary[k] for k in ("timings_s", "size_bytes", "test_rewards") if k in summary}, indent=2))
