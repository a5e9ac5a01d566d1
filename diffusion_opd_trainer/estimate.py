"""`python -m diffusion_opd_trainer.estimate PIPELINE_FOLDER [options]`: the memory table of a run, before the run.

    python -m diffusion_opd_trainer.estimate examples/configs/stable-diffusion-3.5-medium --num_teachers 3 \\
        --resolution 512 --gradient_checkpointing --optimizer_8bit --text_encoders_off_device --vae_off_device

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
    parser.add_argument("--optimizer_8bit", action="store_true")
    parser.add_argument("--text_encoders_off_device", action="store_true")
    parser.add_argument("--vae_off_device", action="store_true")
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
        optimizer_8bit=args.optimizer_8bit,
        text_encoders_on_device=not args.text_encoders_off_device,
        vae_on_device=not args.vae_off_device,
    )
    print(estimate.table())
    return estimate


if __name__ == "__main__":
    main()
