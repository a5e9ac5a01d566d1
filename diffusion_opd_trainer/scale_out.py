"""
What the trainers do differently when accelerate shards the denoiser: FSDP2 and DeepSpeed ZeRO-2 (DDP needs nothing).

Under FSDP2 (`fsdp_version: 2`) every parameter of the denoiser, the frozen base weights and the frozen teacher
adapters included, is a `DTensor` holding this process's shard, and each fully-sharded module gathers its weights from
every process in the pre-hook of its forward. Hence:

- every process must run the same denoiser forwards in the same order: rollouts do (the same batch size and steps on
  each), the teachers' forwards are made so ([`ScaleOutSupport.same_forwards_across_processes`]), and evaluation
  (`evaluate`, `EvaluationCallback`) samples on every process under FSDP (the main process's scores are logged);
- saving gathers the adapters whole on every process (`lora.full_tensor`) and the main process writes them; loading
  copies each process's shard out of the whole weights (`lora.copy_full_`); a checkpoint holds the LoRA, the
  optimizer (accelerate's FSDP optimizer state, sharded or full as the config's `fsdp_state_dict_type` says) and the
  rest as without FSDP, never the frozen base weights.

Under DeepSpeed ZeRO-2 the weights stay whole on each process and only the optimizer state and gradients of the
student LoRA are partitioned; the engine steps the optimizer inside the backward of an accumulation boundary, so the
per-timestep backwards mark only the last one as such.
"""

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from typing import Optional

import torch
from accelerate.utils import save_fsdp_optimizer
from safetensors.torch import load_file
from transformers.trainer import SCHEDULER_NAME

from .lora import STUDENT_ADAPTER, adapter_checksum, lora_parameters


logger = logging.getLogger(__name__)

__all__ = ["ScaleOutSupport"]


class ScaleOutSupport:
    """
    Mixin of `DiffusionTrainerBase`: FSDP2 and DeepSpeed ZeRO-2 (see the module's documentation). Every method here
    is a no-op or the `transformers.Trainer` behaviour under DDP and on one process.
    """

    @property
    def shards_parameters(self) -> bool:
        """Whether the denoiser's parameters are sharded across processes (FSDP)."""
        return bool(getattr(self, "is_fsdp_enabled", False))

    @property
    def uses_deepspeed(self) -> bool:
        """Whether DeepSpeed runs the training step (its engine wraps the denoiser)."""
        return bool(getattr(self, "is_deepspeed_enabled", False))

    def check_scale_out(self) -> None:
        """
        Raises a `ValueError` naming the setting when the run cannot work under the accelerate configuration (FSDP
        version 1, DeepSpeed ZeRO stage 3), before anything is prepared; warns when the launcher
        asked for FSDP but accelerate did not enable it (CPU processes: accelerate 1.15 runs DDP there).
        """
        state = self.accelerator.state
        if self.shards_parameters:
            plugin = state.fsdp_plugin
            version = getattr(plugin, "fsdp_version", 1)
            if version != 2:
                raise ValueError(
                    f"FSDP version {version} is not supported: its flat parameters cannot switch the LoRA adapters "
                    "between the student's and the teachers' forwards. Set `fsdp_version: 2` in the accelerate config "
                    "(see examples/accelerate/fsdp2.yaml)."
                )
            if getattr(plugin, "activation_checkpointing", False) and getattr(
                self.family.denoiser, "is_gradient_checkpointing", False
            ):
                raise ValueError(
                    "Both FSDP's `fsdp_activation_checkpointing` and the trainer's `activation_checkpointing` are on: "
                    "each block would be checkpointed twice. Keep one (the examples keep the trainer's)."
                )
        if self.uses_deepspeed and state.deepspeed_plugin.zero_stage == 3:
            raise ValueError(
                "DeepSpeed ZeRO stage 3 is not supported: it partitions the weights, which the rollout and teacher "
                "forwards (outside the engine) and the LoRA switching need whole. Use ZeRO stage 2 "
                "(examples/accelerate/deepspeed_zero2.yaml) or FSDP2 (examples/accelerate/fsdp2.yaml)."
            )
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not self.shards_parameters:
            logger.warning(
                "The launcher asked for FSDP (ACCELERATE_USE_FSDP=true) but accelerate runs %s on %s: FSDP is "
                "enabled only for GPU-like devices (not with ACCELERATE_USE_CPU). Nothing is sharded.",
                state.distributed_type.value,
                self.accelerator.device,
            )

    # ----- every process runs the same forwards ----------------------------------------------------------------------
    def any_process(self, flags: Sequence[bool]) -> list[bool]:
        """For each of `flags` (listed alike on every process), whether it is set on any process (a collective)."""
        local = torch.tensor([[float(flag) for flag in flags]], device=self.accelerator.device)
        return (self.accelerator.gather(local).amax(dim=0) > 0).tolist()

    def same_forwards_across_processes(self) -> Optional[Callable[[Sequence[bool]], list[bool]]]:
        """
        Under FSDP, [`any_process`]: what the teachers' forwards use to run the same forwards on every process
        (`targets.teacher_means`' `same_forwards`); `None` otherwise (each process runs only what its batch needs).
        """
        return self.any_process if self.shards_parameters and self.accelerator.num_processes > 1 else None

    # ----- gradients -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def backward_context(self, model: torch.nn.Module, last: bool):
        """
        The context of one backward of [`train_on_steps`]' per-timestep loop: only the micro-step's last backward may
        reduce the gradients across processes. DDP: `no_sync` before it. FSDP2: also on the last backward of a
        micro-step that does not end the gradient accumulation (accelerate's `no_sync` turns syncing back on when it
        exits, inside the Trainer's own `no_sync`). DeepSpeed: the backwards before it are no accumulation boundary
        (the engine steps the optimizer inside a boundary's backward).

        Args:
            model (`torch.nn.Module`): the prepared denoiser (DDP, FSDP or DeepSpeed engine).
            last (`bool`): whether this is the micro-step's last backward.
        """
        accelerator = self.accelerator
        if self.uses_deepspeed:
            state = accelerator.gradient_state
            sync = state.sync_gradients
            if not last:
                state._set_sync_gradients(False)
            try:
                yield
            finally:
                state._set_sync_gradients(sync)
        elif not last or (accelerator.is_fsdp2 and not accelerator.sync_gradients):
            with accelerator.no_sync(model):
                yield
        else:
            yield

    def backward_kwargs(self) -> dict:
        """
        The keyword arguments of `accelerator.backward`: under DeepSpeed `scale_wrt_gas=False`, as `Trainer`'s
        `training_step` passes it (the loss is already divided by the accumulation steps, see `loss_scale`).
        """
        return {"scale_wrt_gas": False} if self.uses_deepspeed else {}

    # ----- the model after `accelerator.prepare` ---------------------------------------------------------------------
    def _prepare_for_training(self, *args, **kwargs):
        result = super()._prepare_for_training(*args, **kwargs)
        self._after_model_prepared()
        return result

    def _after_model_prepared(self) -> None:
        """
        Under DeepSpeed with bf16 the engine casts the whole denoiser to bf16, the frozen teacher adapters included:
        their checksums (what every save checks) are taken again, as the weights they will keep.
        """
        teachers = getattr(self, "teachers", None)
        if not (self.uses_deepspeed and teachers):
            return
        for teacher in teachers.values():
            checksum = adapter_checksum(self.unwrapped_denoiser, teacher.adapter_name)
            if checksum != teacher.checksum:
                dtype = next(iter(lora_parameters(self.unwrapped_denoiser, teacher.adapter_name).values())).dtype
                logger.info(
                    "DeepSpeed cast the teacher %r to %s: its checksum is taken again.", teacher.adapter_name, dtype
                )
                teacher.checksum = checksum

    def _reshard(self) -> None:
        """Under FSDP2, puts every module's sharded parameters back in place (no communication), as before a save."""
        if not self.shards_parameters:
            return
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def _bind_ema(self) -> None:
        """Points the EMA at the student's current parameters (FSDP2 replaces them with sharded ones in `prepare`)."""
        if self.ema is not None:
            self._reshard()
            self.ema.parameters = lora_parameters(self.unwrapped_denoiser, STUDENT_ADAPTER)

    # ----- saving and resuming ---------------------------------------------------------------------------------------
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """
        Saves the student LoRA (and its model card) to `output_dir`, as `Trainer.save_model`. Under FSDP and DeepSpeed
        only the LoRA is gathered (see `_save`), not the Trainer's whole-model state dict, which would gather the
        frozen base weights too, or under FSDP's sharded state dict save no weight at all. Every process must call it.
        """
        if not (self.shards_parameters or self.uses_deepspeed):
            return super().save_model(output_dir, _internal_call)
        self._save(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # Under FSDP the Trainer would also write the whole sharded denoiser, frozen base weights included: the
        # checkpoint's LoRA is already there (`_save`), so only the optimizer (FSDP's own format) and the scheduler.
        if not self.shards_parameters:
            return super()._save_optimizer_and_scheduler(output_dir)
        plugin = self.accelerator.state.fsdp_plugin
        save_fsdp_optimizer(plugin, self.accelerator, self.optimizer, self.model, output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        # DeepSpeed's engine loads the model from its own checkpoint, without `_load_from_checkpoint`: the EMA here.
        if checkpoint is not None and self.uses_deepspeed:
            self._load_ema_state(checkpoint)

    def _load_ema_state(self, checkpoint: str) -> None:
        from .trainer_base import EMA_STATE_NAME

        ema_file = os.path.join(checkpoint, EMA_STATE_NAME)
        if self.ema is not None and os.path.isfile(ema_file):
            self.ema.load_state_dict(load_file(ema_file))

    # ----- non-finite steps ------------------------------------------------------------------------------------------
    def _raise_if_step_taken(self, step: int, where: str) -> None:
        """Under DeepSpeed a non-finite step cannot be skipped: its engine stepped inside the backward."""
        if self.uses_deepspeed:
            raise RuntimeError(
                f"Training stopped at step {step}: non-finite loss{where} under DeepSpeed, whose engine takes the "
                "optimizer step inside the last backward, so it cannot be skipped as without DeepSpeed; the LoRA may "
                "hold non-finite weights now. Resume from the last checkpoint (every save refuses non-finite weights)."
            )
