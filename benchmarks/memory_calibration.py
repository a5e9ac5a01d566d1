"""The activation term of `diffusion_opd_trainer.memory`: bytes autograd saves per token and block, by width.

    python benchmarks/memory_calibration.py

Builds SD3 transformers of several widths, depths and token counts from configs (random weights), attaches the
default attention LoRA (r32, base frozen: the training setting), runs one forward with gradients and counts the bytes
of the tensors saved for the backward pass (`memory.saved_activation_bytes`, each storage once, parameters excluded).
Fits bytes per (token x block) = a x width + c by least squares (`a`: the values kept per unit of width; `c`: what
does not grow with the width, such as the LoRA's rank-32 intermediates) and prints the fit's error at every size:
`memory.ACTIVATION_CALIBRATION["SD3Family"]` holds (a, c), rounded up. Deterministic (a count, not a timing): the
machine's load does not matter.
"""

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from diffusion_opd_trainer.lora import default_lora_config  # noqa: E402
from diffusion_opd_trainer.memory import ACTIVATION_CALIBRATION, saved_activation_bytes  # noqa: E402
from diffusion_opd_trainer.testing import tiny_sd3_transformer  # noqa: E402


# (attention heads, head dim, blocks, latent side, text tokens)
SIZES = ((4, 16, 2, 32, 16), (4, 32, 4, 32, 16), (4, 32, 2, 64, 16), (8, 32, 2, 32, 77), (8, 64, 3, 48, 77))


def measure(heads: int, head_dim: int, blocks: int, side: int, text_tokens: int) -> dict:
    """One size: the saved bytes of a forward with gradients through the LoRA, and per (token x width x block)."""
    torch.manual_seed(0)
    denoiser = tiny_sd3_transformer(side, blocks, num_attention_heads=heads, attention_head_dim=head_dim)
    denoiser.requires_grad_(False)
    denoiser.add_adapter(default_lora_config(r=32))  # only the LoRA trains, as in the trainers
    inputs = dict(
        hidden_states=torch.randn(1, 4, side, side),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, text_tokens, 32),
        pooled_projections=torch.randn(1, 32),
        return_dict=False,
    )
    saved = saved_activation_bytes(denoiser, **inputs)
    tokens = (side // 2) ** 2 + text_tokens
    width = heads * head_dim
    return dict(
        heads=heads,
        head_dim=head_dim,
        width=width,
        blocks=blocks,
        tokens=tokens,
        saved_bytes=saved,
        bytes_per_element=saved / (tokens * width * blocks),
    )


def fit(rows: list[dict]) -> tuple[float, float]:
    """Least-squares (a, c) of bytes per (token x block) = a x width + c."""
    x = torch.tensor([float(row["width"]) for row in rows], dtype=torch.float64)
    y = torch.tensor([row["saved_bytes"] / (row["tokens"] * row["blocks"]) for row in rows], dtype=torch.float64)
    design = torch.stack([x, torch.ones_like(x)], dim=1)
    a, c = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1).tolist()
    return a, c


def main() -> list[dict]:
    torch.set_num_threads(1)
    rows = [measure(*size) for size in SIZES]
    a, c = fit(rows)
    shipped_a, shipped_c = ACTIVATION_CALIBRATION["SD3Family"]
    print("| width | blocks | tokens | saved MiB | fit MiB | shipped constants MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        per = row["tokens"] * row["blocks"] / 2**20
        print(
            f"| {row['width']} | {row['blocks']} | {row['tokens']} | {row['saved_bytes'] / 2**20:.2f} | "
            f"{(a * row['width'] + c) * per:.2f} | {(shipped_a * row['width'] + shipped_c) * per:.2f} |"
        )
    print(f"\nfit (float32): a = {a:.1f} bytes per unit of width, c = {c:.0f} bytes, per token and block")
    print(f"memory.ACTIVATION_CALIBRATION['SD3Family'] = {ACTIVATION_CALIBRATION['SD3Family']}")
    return rows


if __name__ == "__main__":
    main()
