"""The Qwen-Image family (`QwenImagePipeline`): tiny pipeline, parity, padding, training, saving, teachers.

Guidance semantics (Qwen-Image): `guidance_scale`, in `rollout`, `PipelineFamily.predict` and the trainers' configs,
means the pipeline's `true_cfg_scale` with `negative_prompt=""`: `rollout(pipe, prompts, guidance_scale=g)` samples as
`pipe(prompts, true_cfg_scale=g, negative_prompt="")`, including the pipeline's rescale of the guided velocity to the
conditional velocity's norm (per packed 2x2 token). `g <= 1` disables CFG as in the pipeline (one forward per step, no
negative prompt). The pipeline's own `guidance_scale` (embedded guidance of guidance-distilled variants) has no
counterpart and is ignored, as the pipeline ignores it for the released Qwen-Image (`guidance_embeds=False`): diffusers
0.42.1's `QwenImageTransformer2DModel` has no guidance embedding at all.
"""

import time

import pytest
import torch
from diffusers import QwenImagePipeline
from family_training import (
    check_grpo_trains_and_reloads,
    check_grpo_with_default_kernel_settings,
    check_opd_with_three_teacher_formats,
    lora_modules,
    opd_trainer,
    teachers_in_two_formats,
)

from diffusion_opd_trainer.pipelines import get_family
from diffusion_opd_trainer.pipelines.qwen_image import QwenImageFamily
from diffusion_opd_trainer.rollout import rollout
from diffusion_opd_trainer.testing import (
    DEFAULT_WORDS,
    QWEN_TEMPLATE_WORDS,
    save_random_lora,
    tiny_flux_pipeline,
    tiny_qwen_image_pipeline,
    tiny_sd3_pipeline,
)


# Three token lengths: a batch of them is right-padded (with a mask) by the pipeline and by the family.
PROMPTS = ["a red circle", "two blue squares next to a photo of a cat", "a dog"]


def pipeline_images(pipe, prompts, guidance_scale, seed=0, steps=4):
    """The pipeline's own sampler, images in [0, 1], with the CFG that the library's `guidance_scale` means."""
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        prompts,
        num_inference_steps=steps,
        generator=generator,
        output_type="pt",
        true_cfg_scale=guidance_scale,
        negative_prompt="",
    ).images


def ode_images(pipe, prompts, guidance_scale, seed=0, steps=4):
    generator = torch.Generator().manual_seed(seed)
    return rollout(
        pipe,
        prompts,
        num_inference_steps=steps,
        noise_level=0.0,
        generator=generator,
        decode=True,
        guidance_scale=guidance_scale,
    ).images


# ----- tiny pipeline -------------------------------------------------------------------------------------------------
def test_tiny_qwen_image_pipeline_builds_fast_offline_and_deterministic():
    start = time.process_time()  # CPU time: the wall clock of a shared machine says little
    pipe = tiny_qwen_image_pipeline(seed=1)
    assert time.process_time() - start < 1.0
    again = tiny_qwen_image_pipeline(seed=1)
    for name in ("transformer", "text_encoder", "vae"):
        for (param_name, p), q in zip(getattr(pipe, name).named_parameters(), getattr(again, name).parameters()):
            assert torch.equal(p, q), f"{name}.{param_name}"
    assert not pipe.transformer.config.guidance_embeds  # as the released Qwen-Image
    assert pipe.vae_scale_factor == 4 and get_family(pipe).default_resolution == 32


def test_tiny_qwen2_tokenizer_drops_exactly_the_template_system_part():
    """The template's system part is 34 tokens, as with the real tokenizer; each known word is one token."""
    pipe = tiny_qwen_image_pipeline()
    tokenizer = pipe.tokenizer
    assert tiny_qwen_image_pipeline().tokenizer.get_vocab() == tokenizer.get_vocab()  # deterministic
    template, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(template.format("a red circle"))["input_ids"])
    assert drop == 34 and tokens[drop - 3 : drop] == ["<|im_start|>", "user", "Ċ"]
    assert tokens[drop:] == ["a", "Ġred", "Ġcircle", "<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"]
    # The pipeline keeps `max_sequence_length` hidden states: the prompt's tokens and the template's 5 last ones.
    assert pipe.encode_prompt("a red circle")[0].shape[1] == 3 + 5
    assert get_family(pipe).text_length_limits(None) == {"tokenizer": 512 - 5}
    for word in QWEN_TEMPLATE_WORDS + DEFAULT_WORDS:
        assert len(tokenizer(" " + word)["input_ids"]) == 1 and len(tokenizer(word)["input_ids"]) == 1, word
    assert tokenizer.decode(tokenizer("a red çircle 42!")["input_ids"]) == "a red çircle 42!"  # byte fallback


# ----- parity --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance_scale", [4.0, 1.0])
def test_qwen_image_ode_rollout_gives_the_pipelines_images(guidance_scale):
    """`rollout(guidance_scale=g)` = `QwenImagePipeline.__call__(true_cfg_scale=g, negative_prompt="")`."""
    pipe = tiny_qwen_image_pipeline()
    expected = pipeline_images(pipe, PROMPTS, guidance_scale)
    schedule = pipe.scheduler.timesteps.clone()
    got = ode_images(pipe, PROMPTS, guidance_scale)
    assert got.shape == (3, 3, 32, 32)  # the pipeline's default size: no height or width given to either
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    # The schedule is the pipeline's (dynamic, exponential shifting with mu from the packed sequence length).
    torch.testing.assert_close(get_family(pipe).set_timesteps(4, 32, 32), schedule, rtol=0, atol=0)
    if guidance_scale > 1:  # CFG is on, and changes the images
        assert (ode_images(pipe, PROMPTS, 1.0) - got).abs().max() > 1e-4
    else:  # below 1 CFG stays off, as in the pipeline
        torch.testing.assert_close(ode_images(pipe, PROMPTS, 0.5), got, rtol=0, atol=0)


def test_qwen_image_cfg_rescales_to_the_conditional_norm_per_packed_token():
    family = get_family(tiny_qwen_image_pipeline())
    assert isinstance(family, QwenImageFamily)
    uncond, cond = torch.randn(2, 2, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    packed = [QwenImagePipeline._pack_latents(x, 2, 4, 4, 6) for x in (uncond, cond)]
    combined = packed[0] + 3.0 * (packed[1] - packed[0])
    expected = combined * (packed[1].norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
    got = QwenImagePipeline._pack_latents(family.combine_guidance(uncond, cond, 3.0), 2, 4, 4, 6)
    torch.testing.assert_close(got, expected)
    assert family.cfg_scale(1.0) == family.cfg_scale(0.5) == 1.0 and family.cfg_scale(4.0) == 4.0


def test_qwen_image_text_padding_changes_nothing():
    """Prompts of different token lengths, batched or alone, cached in different batches: the same samples."""
    pipe = tiny_qwen_image_pipeline()
    family = get_family(pipe)
    embeddings = family.encode_prompts(PROMPTS, cache=False)
    mask = embeddings.cond["encoder_hidden_states_mask"]
    assert mask.shape[1] == embeddings.cond["encoder_hidden_states"].shape[1]
    assert len(set(mask.sum(dim=1).tolist())) == 3 and not mask.all()  # three lengths, right-padded
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def final_latents(family, prompts, guidance_scale):
        latents = noise.expand(len(prompts), -1, -1, -1)
        kwargs = dict(num_inference_steps=3, noise_level=0.0, guidance_scale=guidance_scale, latents=latents)
        return rollout(family, prompts, **kwargs).latents[:, -1]

    for guidance_scale in (4.0, 1.0):  # with CFG, the negative prompt's 5 tokens are padded to the prompts' too
        alone = torch.cat([final_latents(family, [prompt], guidance_scale) for prompt in PROMPTS])
        assert (alone[0] - alone[1]).abs().max() > 1e-2  # the text matters far more than the tolerance
        # Each prompt's embeddings now come from the cache as encoded alone, padded when batched together.
        torch.testing.assert_close(final_latents(family, PROMPTS, guidance_scale), alone, rtol=0, atol=1e-5)
        # Encoded as one batch, padded by the pipeline's `encode_prompt`.
        torch.testing.assert_close(final_latents(get_family(pipe), PROMPTS, guidance_scale), alone, rtol=0, atol=1e-5)


def test_qwen_image_sde_rollout_has_finite_log_probs():
    pipe = tiny_qwen_image_pipeline()
    trajectory = rollout(
        pipe, PROMPTS, num_inference_steps=4, noise_level=0.7, generator=torch.Generator().manual_seed(0)
    )
    assert trajectory.latents.shape == (3, 5, 4, 8, 8)  # unpacked latents, as the VAE sees them (no frame dim)
    assert trajectory.log_probs.shape == (3, 4)
    assert torch.isfinite(trajectory.log_probs).all()


def test_qwen_image_default_size_comes_from_the_pipeline():
    pipe = tiny_qwen_image_pipeline()
    assert get_family(pipe).default_resolution == 32
    pipe.default_sample_size = 128  # QwenImagePipeline's own default: 128 latent pixels
    assert get_family(pipe).default_resolution == 128 * pipe.vae_scale_factor


# ----- LoRA targets --------------------------------------------------------------------------------------------------
def test_qwen_image_default_lora_targets_cover_every_attention_projection():
    family = get_family(tiny_qwen_image_pipeline())
    attention = {
        f"transformer_blocks.{i}.attn.{m}"
        for i in range(2)
        for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    }
    assert lora_modules(tiny_qwen_image_pipeline(), family.lora_target_modules()) == attention
    ffn = {
        f"transformer_blocks.{i}.{m}"
        for i in range(2)
        for m in ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
    }
    assert lora_modules(tiny_qwen_image_pipeline(), family.lora_target_modules(ffn=True)) == attention | ffn


# ----- training ------------------------------------------------------------------------------------------------------
def trained_images(pipe, prompts):
    return ode_images(pipe, prompts, 4.0)


def reference_images(pipe, prompts):
    return pipeline_images(pipe, prompts, 4.0)


def test_qwen_image_grpo_trains_two_steps_and_the_saved_lora_loads_in_qwen_image_pipeline(tmp_path):
    check_grpo_trains_and_reloads(
        tmp_path, tiny_qwen_image_pipeline, PROMPTS, trained_images, reference_images, 1e-4, guidance_scale=4.0
    )


def test_qwen_image_opd_with_peft_diffusers_and_hub_teachers(tmp_path_factory, tmp_path, local_hub):
    teachers = teachers_in_two_formats(tmp_path_factory.mktemp("qwen_teachers"), tiny_qwen_image_pipeline())
    check_opd_with_three_teacher_formats(
        tmp_path,
        tiny_qwen_image_pipeline,
        teachers,
        local_hub,
        PROMPTS,
        trained_images,
        reference_images,
        guidance_scale=4.0,
    )


def test_qwen_image_grpo_with_default_kernel_settings_runs(tmp_path):
    """GRPO's defaults (noise 0.7, beta 0.04, `kl_scaling="sigma"`, guidance 4.5: CFG on) on Qwen-Image."""
    check_grpo_with_default_kernel_settings(tmp_path, tiny_qwen_image_pipeline(), PROMPTS)


# ----- errors --------------------------------------------------------------------------------------------------------
def test_teacher_lora_of_another_family_on_qwen_image_names_task_source_and_both_architectures(tmp_path):
    flux_lora = save_random_lora(tiny_flux_pipeline(), tmp_path / "flux_lora", "peft")
    with pytest.raises(
        ValueError, match=r"task 'a'.*flux_lora.*Flux\.1 \(FluxTransformer2DModel\).*QwenImageTransformer2DModel"
    ):
        opd_trainer(tmp_path, tiny_qwen_image_pipeline(), {"a": flux_lora})


def test_qwen_image_teacher_lora_on_another_family_names_qwen_image(tmp_path):
    """Named by its MLPs (`img_mlp` / `txt_mlp`): attention-only LoRAs share SD3's and Flux's module names."""
    targets = get_family(tiny_qwen_image_pipeline()).lora_target_modules(ffn=True)
    qwen_lora = save_random_lora(
        tiny_qwen_image_pipeline(), tmp_path / "qwen_lora", "diffusers", target_modules=targets
    )
    with pytest.raises(ValueError, match=r"task 'b'.*qwen_lora.*Qwen-Image.*SD3Transformer2DModel"):
        opd_trainer(tmp_path, tiny_sd3_pipeline(), {"b": qwen_lora})
