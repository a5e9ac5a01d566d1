"""
Narrow filters for library log lines that mean nothing in this package's runs. Each drops one exact message, only
while the call that causes it runs: the same message from anywhere else still gets through.
"""

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager


__all__ = [
    "dropped_log_messages",
    "import_bitsandbytes_quietly",
    "quiet_loading_bars",
    "quiet_lora_saving",
    "quiet_pipeline_imports",
]


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


@contextmanager
def dropped_log_messages(logger_name: str, pattern: str) -> Iterator[None]:
    """While inside, the records of logger `logger_name` whose message matches the regular expression `pattern` are
    dropped (a filter on that one logger, removed on exit)."""
    logger = logging.getLogger(logger_name)
    drop = _DropMatching(pattern)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def quiet_pipeline_imports():
    """
    Around the first import of diffusers' pipeline classes: without torchvision, transformers says (once per class)
    that the image processors those modules import, SD3's SigLIP processor (IP-Adapter images) and SD's CLIP
    processor (the safety checker's input), fall back to their PIL versions. The trainers never use either
    processor, so the notice means nothing here; the reward models' own processors are not concerned.
    """
    return dropped_log_messages(
        "transformers.utils.import_utils",
        r"^`(Siglip|CLIP)ImageProcessor` requires torchvision \(not installed\); falling back to",
    )


def quiet_lora_saving():
    """
    Around `save_lora_weights` into a temporary folder ([`~hub.save_lora`]): diffusers' `Model weights saved in
    <temporary folder>` names a folder that is gone a moment later; the trainers log where the LoRA really went.
    """
    return dropped_log_messages("diffusers.loaders.lora_base", r"^Model weights saved in ")


@contextmanager
def quiet_loading_bars() -> Iterator[None]:
    """
    While inside, diffusers' and transformers' loading progress bars ("Loading pipeline components", "Loading
    weights") are off; each library's previous setting comes back on exit. For models that load in a second (the toy
    model, tests), where the bars are only noise in the job's output; a large checkpoint keeps its bars.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = [module for module in (diffusers_logging, transformers_logging) if module.is_progress_bar_enabled()]
    for module in libraries:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module in libraries:
            module.enable_progress_bar()


def import_bitsandbytes_quietly() -> None:
    """
    Imports bitsandbytes, when installed and not imported yet, without its CPU backend's import-time warning that the
    optional `kernels` package is missing for its 4-bit CPU matmul: that concerns 4-bit quantised weights, which the
    library does not use (8-bit AdamW is its only use of bitsandbytes). peft imports bitsandbytes whenever it is
    installed, so the library imports it first, once, at no extra cost.
    """
    import importlib.util
    import sys

    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        return
    with dropped_log_messages("bitsandbytes.backends.cpu.ops", r"^Failed to load CPU gemm_4bit_forward"):
        import bitsandbytes  # noqa: F401
