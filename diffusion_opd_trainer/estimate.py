"""`python -m diffusion_opd_trainer.estimate PIPELINE_FOLDER [options]`: the memory table of a run, before the run.

    python -m diffusion_opd_trainer.estimate examples/configs/stable-diffusion-3.5-medium --num_teachers 3 \\
        --resolution 512 --gradient_checkpointing --optim adamw_bnb_8bit --text_encoder_offload free --offload_vae

A pipeline folder's configs are enough: no weights are read ([`~memory.estimate_memory`]).
"""

import torch

from .memory import MemoryEstimate, estimate_memory


def main(argv=None) -> MemoryEstimate:
    """Prints the table of [`~memory.estimate_memory`] for the command line's arguments."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("model", help="a diffusers pipeline folder (configs are enough: no weights are read)")
    parser.add_argument("--num_teachers", type=int, default=0)
    parser.add_argument("--lora_rank", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=1, help="images per forward with gradients, per device")
    parser.add_argument("--guidance_scale", type=float, default=4.5)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    # The training config's own names and values, so that a run's flags can be pasted here.
    parser.add_argument("--optim", default="adamw_torch", help="the Trainer's optimizer; '*8bit*': 8-bit AdamW state")
    parser.add_argument("--text_encoder_offload", choices=["none", "cpu", "free"], default="none")
    parser.add_argument("--offload_vae", action="store_true")
    args = parser.parse_args(argv)
    estimate = estimate_memory(
        args.model,
        num_teachers=args.num_teachers,
        lora_rank=args.lora_rank,
        resolution=args.resolution,
        batch_size=args.batch_size,
        guidance_scale=args.guidance_scale,
        weights_dtype=getattr(torch, args.dtype),
        gradient_checkpointing=args.gradient_checkpointing,
        optimizer_8bit="8bit" in args.optim,
        text_encoders_on_device=args.text_encoder_offload == "none",
        vae_on_device=not args.offload_vae,
    )
    print(estimate.table())
    return estimate


if __name__ == "__main__":
    main()
