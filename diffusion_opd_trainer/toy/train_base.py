"""
Trains the toy world's base model from scratch: a small `StableDiffusion3Pipeline`, in about ten minutes on two cores.

Stages (all seeded, so a fixed seed and thread count give the same weights):
1. render a fixed training set of world images (train prompts of every task, fresh layouts);
2. build the text side: word-level CLIP and T5 tokenizers over the world's vocabulary and three small text encoders,
   frozen at their random initialisation (they only need to keep tokens and positions apart; the transformer learns
   what they mean), and encode every train prompt once;
3. train a small VAE (AutoencoderKL, 2x downsampling, 4 latent channels) on the images, then encode them and set the
   VAE's shift and scale factors from the latents' mean and standard deviation;
4. train an SD3 transformer by rectified flow (velocity `noise - x0`, logit-normal timesteps, caption dropout for
   classifier-free guidance, EMA of the weights);
5. save the pipeline (EMA weights, safetensors) and score it on the world's test prompts.

Preference-task ("poster") images are drawn on mixed backgrounds - white, pale or vivid, a third each - like web data
of mixed quality, while the renderer's ground truth is always the vivid one: the base model then sits between the two,
and RL on the preference reward has something to find. In the same spirit a third of the shapes are washed out and
40% of the texts are drawn as a banner at the top, off their place: every task has a failure that does not depend on
the prompt and that the base model sometimes makes, which is what RL sharpens away with few samples.

Run it with `python examples/train_toy_base_model.py --output_dir <dir>`.
"""

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from ..quiet import quiet_pipeline_imports
from ..testing import (
    build_clip_tokenizer,
    build_t5_tokenizer,
    tiny_clip_text_config,
    tiny_sd3_transformer,
    tiny_t5_encoder_config,
    tiny_vae,
)
from .model import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS, DEFAULT_SHIFT, evaluate_pipeline
from .render import DEFAULT_RESOLUTION, render_spec
from .world import TASKS, VOCABULARY, caption, specs


with quiet_pipeline_imports():  # the first import of diffusers' pipeline classes
    from diffusers import StableDiffusion3Pipeline


logger = logging.getLogger(__name__)

TEXT_MAX_LENGTH = 12


@dataclass
class TrainBaseConfig:
    """
    Settings of the base model's training run (the defaults reproduce the bundled model).

    Args:
        output_dir (`str`): where the pipeline folder is written.
        seed (`int`, defaults to 0): seeds data, initialisation and training.
        num_threads (`int`, defaults to 1): torch intra-op threads (results are bitwise reproducible for a fixed
            seed and thread count; on two shared cores one thread is faster than two as soon as anything else runs).
        num_images (`int`, defaults to 16000): size of the rendered training set.
        task_weights (`tuple[float, float, float]`): sampling weights of the compositional, text and preference
            tasks in the training set.
        faded_fraction (`float`, defaults to 1/3): the fraction of compositional training images whose shapes are
            drawn washed out toward white (by `fade_range`, defaults to 0.4-0.6): pale colours that the detector does
            not recognise.
        misplaced_fraction (`float`, defaults to 0.55): the fraction of text training images whose string is drawn
            off its place, as a banner at the top (`misplaced_offset`, defaults to 8 pixels up): glyphs that the
            reader, which looks where text belongs, barely sees. A fixed place rather than a random shift, so that
            the base model learns two clean layouts, one right and one wrong, instead of smearing its glyphs over many.
            Like the posters' mixed backgrounds, these two give the base model a failure that does not depend on the
            prompt, which RL can find and fix with few samples (the failures the base model makes on its own, such
            as letters bound to the wrong place, differ from prompt to prompt and need far more samples).
        vae_steps (`int`), vae_batch_size (`int`), vae_lr (`float`): the VAE's training.
        transformer_steps (`int`), batch_size (`int`), lr (`float`), warmup_steps (`int`), ema_decay (`float`),
            caption_dropout (`float`): the transformer's training.
        num_layers (`int`), num_attention_heads (`int`), attention_head_dim (`int`): the transformer's size.
        resolution (`int`, defaults to 32): the image size.
        autocast_bf16 (`bool`, defaults to `True`): bfloat16 autocast for the VAE and transformer training (about 3x
            faster on CPUs with bf16 matrix units; the weights stay float32).
        eval_prompts_per_task (`int`, *optional*): test prompts per task for the final evaluation (`None`: all,
            0: skip).
        log_every (`int`, defaults to 50): steps between log lines.
    """

    output_dir: str
    seed: int = 0
    num_threads: int = 1
    resolution: int = DEFAULT_RESOLUTION
    num_images: int = 16000
    task_weights: tuple = (0.5, 0.3, 0.2)
    faded_fraction: float = 1 / 3
    fade_range: tuple = (0.4, 0.6)
    misplaced_fraction: float = 0.55
    misplaced_offset: tuple = (0, -8)
    vae_steps: int = 300
    vae_batch_size: int = 32
    vae_lr: float = 2e-3
    transformer_steps: int = 1000
    batch_size: int = 48
    lr: float = 1.5e-3
    warmup_steps: int = 50
    ema_decay: float = 0.995
    caption_dropout: float = 0.1
    num_layers: int = 6
    num_attention_heads: int = 2
    attention_head_dim: int = 64
    autocast_bf16: bool = True
    eval_prompts_per_task: Optional[int] = None
    log_every: int = 50


# ----- data ----------------------------------------------------------------------------------------------------------
def build_training_set(config: TrainBaseConfig) -> tuple[np.ndarray, list[str]]:
    """Renders `num_images` training images of train prompts; returns `(images [N, H, W, 3] uint8, prompts)`."""
    rng = np.random.default_rng([config.seed, 1])
    task_specs = {task: specs(task, "train") for task in TASKS}
    tasks = rng.choice(
        len(TASKS), size=config.num_images, p=np.asarray(config.task_weights) / sum(config.task_weights)
    )
    images = np.empty((config.num_images, config.resolution, config.resolution, 3), dtype=np.uint8)
    prompts = []
    for i, task_index in enumerate(tasks):
        task = TASKS[task_index]
        spec = task_specs[task][int(rng.integers(len(task_specs[task])))]
        spec = {k: v for k, v in spec.items() if k not in ("seed", "background")}  # fresh layout and background
        # Posters come with backgrounds of mixed quality (see the module docstring); the other tasks are on white.
        background = ("white", "pastel", "vivid")[int(rng.integers(3))] if task == "preference" else None
        # Likewise a `faded_fraction` of the shapes are washed out and a `misplaced_fraction` of the texts are off
        # their place (no draw when a fraction is 0, so that the data of a model trained without them stays the same).
        fade, text_offset = 0.0, (0, 0)
        if config.faded_fraction > 0 and task == "compositional" and rng.random() < config.faded_fraction:
            fade = float(rng.uniform(*config.fade_range))
        if config.misplaced_fraction > 0 and task == "text" and rng.random() < config.misplaced_fraction:
            text_offset = tuple(config.misplaced_offset)
        image = render_spec(
            spec, resolution=config.resolution, background=background, rng=rng, fade=fade, text_offset=text_offset
        )
        images[i] = np.round(image * 255).astype(np.uint8)
        prompts.append(caption(spec))
    return images, prompts


def _images_to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ----- models --------------------------------------------------------------------------------------------------------
def build_pipeline(config: TrainBaseConfig) -> StableDiffusion3Pipeline:
    """The untrained pipeline: tokenizers over the world's vocabulary, random text encoders, VAE and transformer."""
    torch.manual_seed(config.seed)
    words = list(VOCABULARY)
    tokenizer = build_clip_tokenizer(words, model_max_length=TEXT_MAX_LENGTH)
    tokenizer_2 = build_clip_tokenizer(words, model_max_length=TEXT_MAX_LENGTH)
    tokenizer_3 = build_t5_tokenizer(words, model_max_length=TEXT_MAX_LENGTH)
    clip_config = tiny_clip_text_config(
        len(tokenizer), hidden_size=32, projection_dim=32, max_positions=TEXT_MAX_LENGTH
    )
    text_encoder = CLIPTextModelWithProjection(clip_config)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config)
    t5_config = tiny_t5_encoder_config(len(tokenizer_3), d_model=64, d_kv=16, d_ff=128, num_layers=2)
    text_encoder_3 = T5EncoderModel(t5_config)
    latent_size = config.resolution // 2
    vae = tiny_vae(
        4,
        config.resolution,
        block_out_channels=(32, 64),
        norm_num_groups=16,
        mid_block_add_attention=False,  # at 16x16 latents convolutions suffice, and attention doubles the cost
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    # Text features: the T5 width, which the two CLIP widths (32 + 32) fill exactly; pooled: the two CLIP projections.
    transformer = tiny_sd3_transformer(
        latent_size,
        config.num_layers,
        num_attention_heads=config.num_attention_heads,
        attention_head_dim=config.attention_head_dim,
        joint_attention_dim=64,
        pooled_projection_dim=64,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=DEFAULT_SHIFT),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    for module in (text_encoder, text_encoder_2, text_encoder_3, vae, transformer):
        module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def train_vae(vae: AutoencoderKL, images: np.ndarray, config: TrainBaseConfig) -> float:
    """Reconstruction training (MSE + L1, a tiny KL); returns the last logged reconstruction MSE."""
    generator = torch.Generator().manual_seed(config.seed + 2)
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    mse_avg = float("nan")
    for step in range(config.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config.vae_steps, config.vae_lr, 20)
        index = torch.randint(len(images), (config.vae_batch_size,), generator=generator)
        x = _images_to_tensor(images[index.numpy()])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.autocast_bf16):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
            recon = vae.decode(z).sample.float()
        mse = F.mse_loss(recon, x)
        loss = mse + 0.5 * F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        mse_avg = mse.item() if step == 0 else 0.9 * mse_avg + 0.1 * mse.item()
        if (step + 1) % config.log_every == 0 or step + 1 == config.vae_steps:
            logger.info("vae step %d/%d  recon mse %.5f (images in [-1, 1])", step + 1, config.vae_steps, mse_avg)
    vae.eval().requires_grad_(False)
    return mse_avg


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 256, bf16: bool = True) -> torch.Tensor:
    """Posterior means of all images, unscaled (float32)."""
    latents = []
    for i in range(0, len(images), batch_size):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            latents.append(vae.encode(_images_to_tensor(images[i : i + batch_size])).latent_dist.mean.float())
    return torch.cat(latents)


@torch.no_grad()
def encode_prompts(pipe: StableDiffusion3Pipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """`(prompt_embeds, pooled)` of the unique prompts, in order."""
    embeds, pooled = [], []
    for i in range(0, len(prompts), 256):
        e, _, p, _ = pipe.encode_prompt(
            prompts[i : i + 256],
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            max_sequence_length=TEXT_MAX_LENGTH,
        )
        embeds.append(e)
        pooled.append(p)
    return torch.cat(embeds), torch.cat(pooled)


def train_transformer(
    transformer: SD3Transformer2DModel,
    latents: torch.Tensor,
    prompt_index: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    config: TrainBaseConfig,
) -> dict:
    """Rectified-flow training; the last row of `prompt_embeds`/`pooled` is the empty prompt (caption dropout)."""
    generator = torch.Generator().manual_seed(config.seed + 3)
    transformer.train().requires_grad_(True)
    params = [p for p in transformer.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01, betas=(0.9, 0.99))
    empty = prompt_embeds.shape[0] - 1
    loss_avg = float("nan")
    start = time.perf_counter()
    for step in range(config.transformer_steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config.transformer_steps, config.lr, config.warmup_steps)
        index = torch.randint(len(latents), (config.batch_size,), generator=generator)
        x0 = latents[index]
        rows = prompt_index[index].clone()
        rows[torch.rand(config.batch_size, generator=generator) < config.caption_dropout] = empty
        noise = torch.randn(x0.shape, generator=generator)
        # Logit-normal timesteps (SD3's training density): most weight in the middle of the path.
        sigma = torch.sigmoid(torch.randn(config.batch_size, generator=generator))
        noisy = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.autocast_bf16):
            prediction = transformer(
                hidden_states=noisy,
                timestep=sigma * 1000,
                encoder_hidden_states=prompt_embeds[rows],
                pooled_projections=pooled[rows],
                return_dict=False,
            )[0]
        loss = F.mse_loss(prediction.float(), noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            # Warm the EMA up (decay grows from 0) so that short runs still end near the trained weights.
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        loss_avg = loss.item() if step == 0 else 0.98 * loss_avg + 0.02 * loss.item()
        if (step + 1) % config.log_every == 0 or step + 1 == config.transformer_steps:
            elapsed = time.perf_counter() - start
            logger.info(
                "transformer step %d/%d  loss %.4f  %.2f s/step",
                step + 1,
                config.transformer_steps,
                loss_avg,
                elapsed / (step + 1),
            )
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    transformer.eval().requires_grad_(False)
    return {"final_loss": loss_avg}


# ----- the whole run -------------------------------------------------------------------------------------------------
def train_base_model(config: TrainBaseConfig) -> dict:
    """
    Runs every stage and saves the pipeline to `config.output_dir`; returns a summary (timings, losses, rewards).
    """
    torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    timings, start = {}, time.perf_counter()

    t = time.perf_counter()
    images, prompts = build_training_set(config)
    timings["data_s"] = time.perf_counter() - t
    logger.info("rendered %d training images in %.1f s", len(images), timings["data_s"])

    pipe = build_pipeline(config)
    t = time.perf_counter()
    unique = sorted(set(prompts))
    prompt_embeds, pooled = encode_prompts(pipe, unique + [""])
    lookup = {prompt: i for i, prompt in enumerate(unique)}
    prompt_index = torch.tensor([lookup[p] for p in prompts])
    timings["text_s"] = time.perf_counter() - t
    logger.info("encoded %d prompts in %.1f s", len(unique), timings["text_s"])

    t = time.perf_counter()
    vae_mse = train_vae(pipe.vae, images, config)
    latents = encode_images(pipe.vae, images, bf16=config.autocast_bf16)
    # SD3's latent normalisation: z = (latent - shift) * scale, with unit variance over the training set.
    shift, scale = latents.mean().item(), 1.0 / latents.std().item()
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    latents = (latents - shift) * scale
    timings["vae_s"] = time.perf_counter() - t
    logger.info("VAE trained and images encoded in %.1f s (shift %.4f, scale %.4f)", timings["vae_s"], shift, scale)

    t = time.perf_counter()
    transformer_stats = train_transformer(pipe.transformer, latents, prompt_index, prompt_embeds, pooled, config)
    timings["transformer_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    logger.info("transformer trained in %.1f s; total %.1f s", timings["transformer_s"], timings["total_s"])

    os.makedirs(config.output_dir, exist_ok=True)
    pipe.save_pretrained(config.output_dir, safe_serialization=True)
    size = sum(
        os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(config.output_dir) for name in names
    )
    summary = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items() if k != "output_dir"},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "vae_recon_mse": round(vae_mse, 5),
        "transformer": {k: round(v, 4) for k, v in transformer_stats.items()},
        "parameters": {
            name: sum(p.numel() for p in getattr(pipe, name).parameters())
            for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
        },
        "sampling": {
            "num_inference_steps": DEFAULT_NUM_INFERENCE_STEPS,
            "guidance_scale": DEFAULT_GUIDANCE_SCALE,
            "shift": DEFAULT_SHIFT,
            "noise_level": 0.0,
        },
    }
    if config.eval_prompts_per_task != 0:
        t = time.perf_counter()
        summary["test_rewards"] = evaluate_pipeline(pipe, max_prompts=config.eval_prompts_per_task, seed=config.seed)
        summary["timings_s"]["eval_s"] = round(time.perf_counter() - t, 1)
        logger.info("test rewards: %s", summary["test_rewards"])
    summary["size_bytes"] = size
    with open(os.path.join(config.output_dir, "training_summary.json"), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return summary


def parse_args(argv: Optional[list[str]] = None) -> TrainBaseConfig:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="where to write the pipeline folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num_threads", type=int, default=1, help="torch threads (fix it for bitwise reproducibility)"
    )
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run with tiny settings (for tests)")
    defaults = TrainBaseConfig(output_dir="")
    # Overrides of the defaults (which reproduce the bundled model), for experiments.
    for name in ("num_images", "vae_steps", "transformer_steps", "batch_size", "eval_prompts_per_task"):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"default {getattr(defaults, name)}")
    parser.add_argument("--lr", type=float, default=None, help=f"default {defaults.lr}")
    for name in ("faded_fraction", "misplaced_fraction"):
        parser.add_argument(f"--{name}", type=float, default=None, help=f"default {getattr(defaults, name):.3g}")
    args = parser.parse_args(argv)
    config = TrainBaseConfig(output_dir=args.output_dir, seed=args.seed, num_threads=args.num_threads)
    if args.smoke:
        config.num_images, config.vae_steps, config.transformer_steps = 256, 3, 3
        config.vae_batch_size, config.batch_size, config.eval_prompts_per_task, config.log_every = 16, 16, 2, 1
    overrides = ("num_images", "vae_steps", "transformer_steps", "batch_size", "eval_prompts_per_task", "lr")
    for name in (*overrides, "faded_fraction", "misplaced_fraction"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    return config


def main(argv: Optional[list[str]] = None) -> dict:
    """Command-line entry point (see `parse_args`)."""
    return train_base_model(parse_args(argv))
