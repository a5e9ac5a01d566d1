"""The FLUX.2 family (`Flux2KleinPipeline`, `Flux2Pipeline`): parity, schedule, training, saving, teachers, errors.

Guidance semantics: `guidance_scale`, in `rollout`, `PipelineFamily.predict` and the trainers' configs, means what it
means in each pipeline's `__call__`.

- `Flux2KleinPipeline` (FLUX.2 [klein]): classifier-free guidance with the empty negative prompt when
  `guidance_scale > 1` (1 disables it: one forward, no negative prompt), unless the pipeline is step-distilled
  (`is_distilled=True`, as the released 4B and 9B klein models), which ignores it. Klein's transformers have no
  guidance embedding.
- `Flux2Pipeline` (FLUX.2 [dev], guidance-distilled): the *embedded* guidance, fed to the transformer's guidance
  embedding, one forward per step, never a negative prompt. No value disables it: every value is embedded.

The tiny `Flux2Pipeline` takes a byte-level BPE tokenizer with Mistral's chat template as its `tokenizer`, in place of
the released model's `PixtralProcessor` (whose image processor needs torchvision): the pipeline only calls
`apply_chat_template` on text messages, which the processor hands to that same kind of tokenizer.
"""

import time

import pytest
import torch
from family_training import (
    check_grpo_trains_and_reloads,
    check_grpo_with_default_kernel_settings,
    check_opd_with_three_teacher_formats,
    lora_modules,
    opd_trainer,
    teachers_in_two_formats,
)

from diffusion_opd_trainer.pipelines import get_family
from diffusion_opd_trainer.pipelines.flux2 import Flux2Family
from diffusion_opd_trainer.rollout import rollout
from diffusion_opd_trainer.testing import (
    save_random_lora,
    tiny_flux2_klein_pipeline,
    tiny_flux2_pipeline,
    tiny_flux_pipeline,
)


PROMPTS = ["a red circle", "two blue squares", "a photo of a cat"]
TEXT_LENGTH = 48  # the pipelines pad every prompt to `max_sequence_length` (512 by default)
BUILDERS = {
    "klein": tiny_flux2_klein_pipeline,
    "klein-distilled": lambda **kwargs: tiny_flux2_klein_pipeline(is_distilled=True, **kwargs),
    "dev": tiny_flux2_pipeline,
}


def pipeline_images(pipe, prompts, guidance_scale, seed=0, steps=4, **kwargs):
    """The pipeline's own sampler, images in [0, 1]. Both pipelines take an image first: the prompt is a keyword."""
    generator = torch.Generator().manual_seed(seed)
    kwargs.setdefault("max_sequence_length", TEXT_LENGTH)
    return pipe(
        prompt=prompts,
        num_inference_steps=steps,
        generator=generator,
        output_type="pt",
        guidance_scale=guidance_scale,
        **kwargs,
    ).images


def ode_images(pipe, prompts, guidance_scale, seed=0, steps=4, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    kwargs.setdefault("max_sequence_length", TEXT_LENGTH)
    return rollout(
        pipe,
        prompts,
        num_inference_steps=steps,
        noise_level=0.0,
        generator=generator,
        decode=True,
        guidance_scale=guidance_scale,
        **kwargs,
    ).images


# ----- tiny pipelines ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(BUILDERS))
def test_tiny_flux2_pipelines_build_fast_offline_and_deterministic(variant):
    start = time.process_time()  # CPU time: the wall clock of a shared machine says little
    pipe = BUILDERS[variant](seed=1)
    assert time.process_time() - start < 1.0
    assert isinstance(get_family(pipe), Flux2Family)
    assert pipe.transformer.config.guidance_embeds == (variant == "dev")
    again = BUILDERS[variant](seed=1)
    for component in ("transformer", "text_encoder", "vae"):
        state, other = getattr(pipe, component).state_dict(), getattr(again, component).state_dict()
        for name, value in state.items():
            assert torch.equal(value, other[name]), f"{component}.{name}"
    # The latent batch norm is not the identity, so that decoding is tested.
    assert pipe.vae.bn.running_mean.abs().max() > 0.1
    other_seed = BUILDERS[variant](seed=2)
    assert not torch.equal(pipe.transformer.x_embedder.weight, other_seed.transformer.x_embedder.weight)


def test_tiny_tokenizers_apply_the_pipelines_chat_templates():
    klein, dev = tiny_flux2_klein_pipeline(), tiny_flux2_pipeline()
    text = klein.tokenizer.apply_chat_template(
        [{"role": "user", "content": "a red circle"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert text == "<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    tokens = klein.tokenizer.tokenize(text)
    assert tokens[:6] == ["<|im_start|>", "user", "Ċ", "a", "Ġred", "Ġcircle"]
    assert klein.tokenizer.tokenize(" zebra") == ["Ġ", "z", "e", "b", "r", "a"]  # unknown words: byte by byte

    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    ids = dev.tokenizer.apply_chat_template(format_input(["a red circle"]), tokenize=True, return_dict=True)
    text = dev.tokenizer.decode(ids["input_ids"][0])
    assert text.startswith("<s>[SYSTEM_PROMPT]You are an AI that reasons") and text.endswith(
        "[INST]a red circle[/INST]"
    )


# ----- parity --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(BUILDERS))
def test_flux2_ode_rollout_gives_the_pipelines_images(variant):
    """`rollout(noise_level=0)` = the pipeline's `__call__`, same seed, steps and `guidance_scale`, for each scale."""
    pipe = BUILDERS[variant]()
    family = get_family(pipe)
    images = {}
    for guidance in (1.0, 4.0):
        expected = pipeline_images(pipe, PROMPTS, guidance)
        schedule = pipe.scheduler.timesteps.clone()
        images[guidance] = ode_images(pipe, PROMPTS, guidance)
        assert images[guidance].shape == (3, 3, 32, 32)  # the pipeline's default size: no height or width given
        torch.testing.assert_close(images[guidance], expected, rtol=0, atol=1e-4)
        # The schedule is the pipeline's: linear sigmas shifted by the empirical mu of 64 tokens and 4 steps.
        torch.testing.assert_close(family.set_timesteps(4, 32, 32), schedule, rtol=0, atol=0)
    assert family.cfg_scale(4.0) == (4.0 if variant == "klein" else 1.0)
    assert family.cfg_scale(1.0) == family.cfg_scale(0.5) == 1.0  # Klein's CFG needs a scale above 1
    if variant == "klein-distilled":  # the step-distilled pipeline ignores the scale
        torch.testing.assert_close(images[4.0], images[1.0], rtol=0, atol=0)
    else:  # CFG for the Klein base model, the guidance embedding for dev
        assert (images[4.0] - images[1.0]).abs().max() > 1e-3


def test_flux2_schedule_depends_on_the_image_size_and_steps_as_the_pipelines():
    pipe = tiny_flux2_klein_pipeline()
    family = get_family(pipe)
    for steps, size in ((3, 32), (6, 64), (4, 48)):
        pipeline_images(pipe, PROMPTS[:1], 1.0, steps=steps, height=size, width=size)
        torch.testing.assert_close(family.set_timesteps(steps, size, size), pipe.scheduler.timesteps, rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiples of 4"):
        family.latent_shape(1, 30, 32)


def test_klein_default_text_length_and_another_size_give_the_pipelines_images():
    """The pipeline's default `max_sequence_length` (512, not capped by the tokenizer), a non-square size."""
    pipe = tiny_flux2_klein_pipeline()
    expected = pipeline_images(pipe, PROMPTS[:2], 4.0, max_sequence_length=512, height=48, width=32)
    got = ode_images(pipe, PROMPTS[:2], 4.0, max_sequence_length=None, height=48, width=32)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert get_family(pipe).encode_prompts(PROMPTS[:1], None).cond["encoder_hidden_states"].shape == (1, 512, 48)


def test_klein_cfg_with_another_negative_prompt_gives_the_pipelines_images():
    """Klein's negative prompt is always "": another one is the pipeline's `negative_prompt_embeds`."""
    pipe = tiny_flux2_klein_pipeline()
    negative, _ = pipe.encode_prompt(["text"] * 3, max_sequence_length=TEXT_LENGTH)
    expected = pipeline_images(pipe, PROMPTS, 4.0, negative_prompt_embeds=negative)
    got = ode_images(pipe, PROMPTS, 4.0, negative_prompt="text")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert (got - ode_images(pipe, PROMPTS, 4.0)).abs().max() > 1e-4


@pytest.mark.parametrize("variant", ["klein", "dev"])
def test_flux2_sde_rollout_has_finite_log_probs(variant):
    pipe = BUILDERS[variant]()
    trajectory = rollout(
        pipe,
        PROMPTS,
        num_inference_steps=4,
        noise_level=0.7,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        max_sequence_length=TEXT_LENGTH,
    )
    # The pipelines' own state: 2x2-patchified (4 x 4 channels), batch-normalised latents of 32 / 2 / 2 pixels.
    assert trajectory.latents.shape == (3, 5, 16, 8, 8)
    assert trajectory.log_probs.shape == (3, 4)
    assert torch.isfinite(trajectory.log_probs).all()


def test_flux2_default_size_comes_from_the_pipeline():
    pipe = tiny_flux2_klein_pipeline()
    assert get_family(pipe).default_resolution == 32
    pipe.default_sample_size = 128  # the pipelines' own default: 128 latent pixels (1024 with the real VAE)
    assert get_family(pipe).default_resolution == 128 * pipe.vae_scale_factor


def test_flux2_truncation_limit_leaves_room_for_the_chat_template():
    klein, dev = get_family(tiny_flux2_klein_pipeline()), get_family(tiny_flux2_pipeline())
    # Klein's template: `<|im_start|>user\n` ... `<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n`.
    assert klein.text_length_limits(None) == {"tokenizer": 512 - 14}
    assert klein.text_length_limits(64) == {"tokenizer": 64 - 14}
    limit = dev.text_length_limits(None)["tokenizer"]  # dev's system message takes ~30 tokens
    assert 512 - 40 < limit < 512 - 25


# ----- LoRA targets --------------------------------------------------------------------------------------------------
def test_flux2_default_lora_targets_cover_every_attention_projection():
    pipe = tiny_flux2_klein_pipeline()
    family = get_family(pipe)
    double = {
        f"transformer_blocks.0.attn.{m}"
        for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    }
    single = {"single_transformer_blocks.0.attn.to_qkv_mlp_proj"}  # q, k, v (and the MLP's input), fused
    assert lora_modules(pipe, family.lora_target_modules()) == double | single
    ffn = {
        "transformer_blocks.0.ff.linear_in",
        "transformer_blocks.0.ff.linear_out",
        "transformer_blocks.0.ff_context.linear_in",
        "transformer_blocks.0.ff_context.linear_out",
        "single_transformer_blocks.0.attn.to_out",  # attention output and MLP output, fused
    }
    assert lora_modules(tiny_flux2_klein_pipeline(), family.lora_target_modules(ffn=True)) == double | single | ffn


# ----- training ------------------------------------------------------------------------------------------------------
def trained_images(pipe, prompts):
    return ode_images(pipe, prompts, 4.0)


def reference_images(pipe, prompts):
    return pipeline_images(pipe, prompts, 4.0)


@pytest.mark.parametrize("variant", ["klein", "dev"])
def test_flux2_grpo_trains_two_steps_and_the_saved_lora_loads_in_the_pipeline(tmp_path, variant):
    check_grpo_trains_and_reloads(
        tmp_path,
        BUILDERS[variant],
        PROMPTS,
        trained_images,
        reference_images,
        guidance_scale=4.0,
        max_sequence_length=TEXT_LENGTH,
    )


@pytest.fixture(scope="module")
def flux2_teachers(tmp_path_factory):
    """Klein teachers on the family's targets (single-stream blocks too) in both formats: PEFT and diffusers."""
    pipe = tiny_flux2_klein_pipeline()
    targets = get_family(pipe).lora_target_modules()
    return teachers_in_two_formats(tmp_path_factory.mktemp("flux2_teachers"), pipe, target_modules=targets)


def test_flux2_opd_with_peft_diffusers_and_hub_teachers(tmp_path, flux2_teachers, local_hub):
    check_opd_with_three_teacher_formats(
        tmp_path,
        tiny_flux2_klein_pipeline,
        flux2_teachers,
        local_hub,
        PROMPTS,
        trained_images,
        reference_images,
        guidance_scale=4.0,
        max_sequence_length=TEXT_LENGTH,
    )


@pytest.mark.parametrize("variant", ["klein", "dev"])
def test_grpo_with_default_kernel_settings_runs_on_flux2(tmp_path, variant):
    """GRPO's defaults (noise 0.7, beta 0.04, `kl_scaling="sigma"`, guidance 4.5) give two finite steps."""
    check_grpo_with_default_kernel_settings(tmp_path, BUILDERS[variant](), PROMPTS, max_sequence_length=TEXT_LENGTH)


# ----- errors --------------------------------------------------------------------------------------------------------
FLUX2_LABEL = "FLUX.2 (Flux2Transformer2DModel)"


@pytest.fixture
def flux2_marker(monkeypatch):
    """FLUX.2's module-name marker in `lora._ARCHITECTURE_MARKERS` (added here until the library has it)."""
    from diffusion_opd_trainer import lora

    if all(label != FLUX2_LABEL for _, label in lora._ARCHITECTURE_MARKERS):
        monkeypatch.setattr(
            lora, "_ARCHITECTURE_MARKERS", (("to_qkv_mlp_proj", FLUX2_LABEL),) + lora._ARCHITECTURE_MARKERS
        )


def test_teacher_lora_of_another_family_names_task_source_and_both_architectures(
    tmp_path, flux2_teachers, flux2_marker
):
    flux_lora = save_random_lora(tiny_flux_pipeline(), tmp_path / "flux1_lora", "peft")
    with pytest.raises(
        ValueError,
        match=r"task 'a'.*flux1_lora.*Flux\.1 \(FluxTransformer2DModel\).*another model architecture.*"
        r"Flux2Transformer2DModel",
    ):
        opd_trainer(tmp_path, tiny_flux2_klein_pipeline(), {"a": flux_lora}, max_sequence_length=TEXT_LENGTH)
    peft_dir, _ = flux2_teachers
    with pytest.raises(
        ValueError, match=r"task 'b'.*peft.*FLUX\.2 \(Flux2Transformer2DModel\).*another model.*FluxTransformer2DModel"
    ):
        opd_trainer(tmp_path, tiny_flux_pipeline(), {"b": peft_dir}, max_sequence_length=8)
