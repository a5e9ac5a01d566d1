"""Helpers shared by the benchmarks: peak memory of a child process, a quiet-machine check, tiny fixtures."""

import json
import os
import resource
import subprocess
import sys


def peak_rss_mib() -> float:
    """This process' peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_average() -> float:
    return os.getloadavg()[0]


def run_isolated(module: str, *args: str) -> dict:
    """Runs `python -m <module> --child <args>`; returns the JSON it prints last (one process per peak memory)."""
    out = subprocess.run(
        [sys.executable, "-m", module, "--child", *args], check=True, capture_output=True, text=True, cwd=os.getcwd()
    )
    return json.loads(out.stdout.strip().splitlines()[-1])
