"""Helpers shared by the benchmarks: peak memory of a child process, a quiet-machine check, tiny fixtures."""

import json
import os
import resource
import statistics
import subprocess
import sys


def peak_rss_mib() -> float:
    """This process' peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_average() -> float:
    return os.getloadavg()[0]


def load_averages() -> str:
    """The 1, 5 and 15 minute load averages, to print beside timings (with more than one per core they are noise)."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min, {os.cpu_count()} CPUs)"


def median_and_spread(values: list[float]) -> dict:
    """The median of repeated timings, their range (min, max) and the relative spread `(max - min) / median`."""
    median = statistics.median(values)
    return {
        "median": median,
        "min": min(values),
        "max": max(values),
        "spread": (max(values) - min(values)) / median,
        "n": len(values),
    }


def run_isolated(module: str, *args: str) -> dict:
    """Runs `python -m <module> --child <args>`; returns the JSON it prints last (one process per peak memory)."""
    out = subprocess.run(
        [sys.executable, "-m", module, "--child", *args], check=True, capture_output=True, text=True, cwd=os.getcwd()
    )
    return json.loads(out.stdout.strip().splitlines()[-1])
