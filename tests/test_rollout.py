"""Trajectory sampling: parity with the pipelines' own samplers, shapes, determinism, cached prompt embeddings."""

import time

import pytest
import torch

from diffusion_opd_trainer.pipelines import PromptEmbeddings, get_family
from diffusion_opd_trainer.rollout import rollout
from diffusion_opd_trainer.testing import build_clip_tokenizer, build_t5_tokenizer, tiny_sd3_pipeline


PROMPTS = ["a red circle", "two blue squares", "a photo of a cat"]


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_ode_rollout_matches_sd3_pipeline(sd3_pipe, guidance_scale):
    expected = sd3_pipe(
        PROMPTS,
        num_inference_steps=6,
        guidance_scale=guidance_scale,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        max_sequence_length=8,
    ).images
    trajectory = rollout(
        sd3_pipe,
        PROMPTS,
        num_inference_steps=6,
        guidance_scale=guidance_scale,
        noise_level=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(trajectory.latents[:, -1], expected, rtol=1e-5, atol=1e-5)
    assert trajectory.latents.shape == (3, 7, 4, 16, 16)
    assert trajectory.log_probs is None
    torch.testing.assert_close(trajectory.timesteps, sd3_pipe.scheduler.timesteps)


def test_ode_rollout_matches_sd_pipeline_with_ddim(sd_pipe):
    expected = sd_pipe(
        PROMPTS,
        num_inference_steps=5,
        guidance_scale=4.5,
        output_type="latent",
        generator=torch.Generator().manual_seed(1),
    ).images
    trajectory = rollout(
        sd_pipe,
        PROMPTS,
        num_inference_steps=5,
        guidance_scale=4.5,
        noise_level=0.0,
        generator=torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(trajectory.latents[:, -1], expected, rtol=1e-5, atol=1e-5)


def test_sde_rollout_shapes_and_log_probs(sd3_pipe):
    trajectory = rollout(
        sd3_pipe,
        PROMPTS,
        num_inference_steps=4,
        noise_level=0.7,
        generator=torch.Generator().manual_seed(0),
        decode=True,
    )
    assert trajectory.latents.shape == (3, 5, 4, 16, 16)
    assert trajectory.log_probs.shape == (3, 4)
    assert torch.isfinite(trajectory.log_probs).all()
    assert trajectory.images.shape == (3, 3, 32, 32)
    assert trajectory.images.min() >= 0 and trajectory.images.max() <= 1
    sub = trajectory[[0, 2]]
    torch.testing.assert_close(sub.latents, trajectory.latents[[0, 2]])
    assert len(sub.prompt_embeds) == 2


def test_rollout_is_deterministic_under_a_generator(sd3_pipe):
    a = rollout(sd3_pipe, PROMPTS, num_inference_steps=4, noise_level=0.7, generator=torch.Generator().manual_seed(7))
    b = rollout(sd3_pipe, PROMPTS, num_inference_steps=4, noise_level=0.7, generator=torch.Generator().manual_seed(7))
    c = rollout(sd3_pipe, PROMPTS, num_inference_steps=4, noise_level=0.7, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=0, atol=0)
    assert not torch.equal(a.latents, c.latents)


def test_prompt_embeddings_are_computed_once_and_reusable(sd3_pipe):
    family = get_family(sd3_pipe)
    calls = []
    original = family._encode
    family._encode = lambda prompts, length: calls.append(list(prompts)) or original(prompts, length)
    first = family.encode_prompts(PROMPTS + PROMPTS[:1])
    second = family.encode_prompts(PROMPTS[::-1])
    assert calls == [PROMPTS, [""]]  # each distinct prompt once, the negative prompt once
    torch.testing.assert_close(first.cond["encoder_hidden_states"][:3], second.cond["encoder_hidden_states"].flip(0))
    from_embeds = rollout(
        family,
        prompt_embeds=first[:3],
        num_inference_steps=3,
        noise_level=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    from_prompts = rollout(
        family, PROMPTS, num_inference_steps=3, noise_level=0.0, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(from_embeds.latents, from_prompts.latents)
    merged = PromptEmbeddings.cat([first[:1], second[:2]])
    assert len(merged) == 3


def test_tiny_pipelines_build_fast_and_offline():
    start = time.perf_counter()
    pipe = tiny_sd3_pipeline(seed=1)
    assert time.perf_counter() - start < 1.0
    again = tiny_sd3_pipeline(seed=1)
    for (name, p), q in zip(pipe.transformer.named_parameters(), again.transformer.parameters()):
        assert torch.equal(p, q), name


def test_word_level_tokenizers_are_deterministic_and_whole_word():
    words = ["red", "circle", "circles", "to", "photo", "otto"]
    clip = build_clip_tokenizer(words, model_max_length=16)
    tokens = clip.convert_ids_to_tokens(clip("photo to circles red otto").input_ids)
    assert tokens[1:-1] == ["photo</w>", "to</w>", "circles</w>", "red</w>", "otto</w>"]
    assert build_clip_tokenizer(words).get_vocab() == clip.get_vocab()
    t5 = build_t5_tokenizer(words)
    assert t5.convert_ids_to_tokens(t5("red circles").input_ids) == ["\u2581red", "\u2581circles", "</s>"]
