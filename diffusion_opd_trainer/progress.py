"""The phases of a training step ("rollout", "reward", "teachers", "train 3/9"), shown beside the progress bar."""

import time
from typing import Optional

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback


__all__ = ["StepPhaseCallback", "report_phase"]


def report_phase(trainer, phase: str) -> None:
    """
    Announces that the current step of `trainer` enters `phase` to every callback with an
    `on_step_phase(args, state, control, phase)` method ([`StepPhaseCallback`] among them).
    """
    for callback in trainer.callback_handler.callbacks:
        hook = getattr(callback, "on_step_phase", None)
        if hook is not None:
            hook(trainer.args, trainer.state, trainer.control, phase=phase)


class StepPhaseCallback(TrainerCallback):
    """
    Writes the phase of the current step after the Trainer's progress bar (`50%|█████ | 1/2 [...] rollout`), with
    the micro-batch when gradients accumulate (`micro-batch 2/4: train 3/9`), once steps are long: the step running
    (or the previous one) took `min_step_seconds` or more. Quick steps show nothing (the bar would only flicker and
    logs fill with its redraws); a long step redraws it once per phase. Without a progress bar (`disable_tqdm=True`,
    or on other processes than the main one) it does nothing.

    The trainers announce the phases through [`report_phase`]: `"rollout"`, `"reward"` (GRPO's rewards, OPD's
    monitoring rewards), `"teachers"` (OPD's teacher means of a cached rollout) and `"train k/K"` (the `k`-th of the
    `K` trained timesteps). Any callback with an `on_step_phase(args, state, control, phase, **kwargs)` method gets
    them too.
    """

    min_step_seconds: float = 5.0

    def __init__(self, trainer):
        self.trainer = trainer
        self._step_start = time.perf_counter()
        self._last_step_seconds = 0.0
        self._micro_batch = 1
        self.shown: Optional[str] = None  # what the bar shows now

    def _bar(self):
        for callback in self.trainer.callback_handler.callbacks:
            if isinstance(callback, ProgressCallback):
                return callback.training_bar
        return None

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()
        self._micro_batch = 1

    def on_substep_end(self, args, state, control, **kwargs):
        self._micro_batch += 1

    def on_optimizer_step(self, args, state, control, **kwargs):
        # Before `on_step_end`, where the progress callback advances and redraws the bar: without the phase.
        self._last_step_seconds = time.perf_counter() - self._step_start
        bar = self._bar()
        if self.shown is not None and bar is not None:
            bar.set_postfix_str("", refresh=False)
        self.shown = None

    def on_step_phase(self, args, state, control, phase: str, **kwargs):
        bar = self._bar()
        if bar is None or not state.is_world_process_zero:
            return
        now = time.perf_counter()
        if max(self._last_step_seconds, now - self._step_start) < self.min_step_seconds:
            return
        accumulation = args.gradient_accumulation_steps
        text = phase if accumulation == 1 else f"micro-batch {self._micro_batch}/{accumulation}: {phase}"
        if text != self.shown:
            bar.set_postfix_str(text)
            self.shown = text
