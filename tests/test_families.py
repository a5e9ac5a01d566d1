"""Pipeline families beyond SD3: Flux.1 (dev and schnell) parity, training, saving, teachers, errors; defaults on all;
the real-scale sizes of every family. SDXL, Qwen-Image, Z-Image and FLUX.2 have a test module each.

Guidance semantics (Flux): `guidance_scale`, in `rollout`, `PipelineFamily.predict` and the trainers' configs, means
what it means in `FluxPipeline.__call__`. For Flux.1-dev (a guidance-distilled model, `guidance_embeds=True`) it is
the *embedded* guidance, fed to the transformer's guidance embedding: one forward per step, no negative prompt, no CFG
(the pipeline's default is 3.5). Flux.1-schnell has no guidance embedding and ignores it, as the pipeline does. True
classifier-free guidance with a negative prompt is the pipeline's `true_cfg_scale`, given to the family:
`FluxFamily(pipe, true_cfg_scale=s)`. For SD3 and SD 1.x `guidance_scale` is the CFG scale, as in their pipelines.
"""

import time

import pytest
import torch
from diffusers import DiffusionPipeline
from family_training import (
    check_grpo_trains_and_reloads,
    check_grpo_with_default_kernel_settings,
    check_opd_with_three_teacher_formats,
    grpo_trainer,
    lora_modules,
    opd_trainer,
    teachers_in_two_formats,
)

from diffusion_opd_trainer.pipelines import FluxFamily, get_family
from diffusion_opd_trainer.rollout import rollout
from diffusion_opd_trainer.testing import (
    save_random_lora,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
)


PROMPTS = ["a red circle", "two blue squares", "a photo of a cat"]
BUILDERS = {
    "sd3": tiny_sd3_pipeline,
    "sd15": tiny_sd_pipeline,
    "flux-dev": lambda: tiny_flux_pipeline(variant="dev"),
    "flux-schnell": lambda: tiny_flux_pipeline(variant="schnell"),
}


def pipeline_images(pipe, prompts, seed=0, steps=4, **kwargs):
    """The pipeline's own sampler, images in [0, 1] (T5 length 8: the tiny tokenizers')."""
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        prompts, num_inference_steps=steps, generator=generator, output_type="pt", max_sequence_length=8, **kwargs
    ).images


def ode_images(pipe, prompts, seed=0, steps=4, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return rollout(
        pipe, prompts, num_inference_steps=steps, noise_level=0.0, generator=generator, decode=True, **kwargs
    ).images


# ----- tiny pipelines ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_tiny_flux_pipelines_build_fast_offline_and_deterministic(variant):
    start = time.process_time()  # CPU time: the wall clock of a shared machine says little
    pipe = tiny_flux_pipeline(seed=1, variant=variant)
    assert time.process_time() - start < 1.0
    assert pipe.transformer.config.guidance_embeds == (variant == "dev")
    again = tiny_flux_pipeline(seed=1, variant=variant)
    for (name, p), q in zip(pipe.transformer.named_parameters(), again.transformer.parameters()):
        assert torch.equal(p, q), name


# ----- parity --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_flux_ode_rollout_gives_the_pipelines_images(variant):
    """`rollout(noise_level=0)` = `FluxPipeline.__call__`, same seed, steps and `guidance_scale` (embedded for dev)."""
    pipe = tiny_flux_pipeline(variant=variant)
    expected = pipeline_images(pipe, PROMPTS, guidance_scale=3.5)
    got = ode_images(pipe, PROMPTS, guidance_scale=3.5, max_sequence_length=8)
    assert got.shape == (3, 3, 32, 32)  # the pipeline's default size: no height or width given to either
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    # The schedule is the pipeline's (dynamic shifting for dev: mu from the packed sequence length).
    torch.testing.assert_close(get_family(pipe).set_timesteps(4, 32, 32), pipe.scheduler.timesteps)
    other_guidance = ode_images(pipe, PROMPTS, guidance_scale=1.0, max_sequence_length=8)
    if variant == "dev":  # the guidance embedding sees the value
        assert (other_guidance - got).abs().max() > 1e-4
    else:  # schnell has none, as in the pipeline
        torch.testing.assert_close(other_guidance, got, rtol=0, atol=0)


def test_flux_true_cfg_with_a_negative_prompt_gives_the_pipelines_images():
    pipe = tiny_flux_pipeline(variant="dev")
    expected = pipeline_images(pipe, PROMPTS, guidance_scale=3.5, true_cfg_scale=4.0, negative_prompt="text")
    family = FluxFamily(pipe, true_cfg_scale=4.0)
    got = ode_images(family, PROMPTS, guidance_scale=3.5, negative_prompt="text", max_sequence_length=8)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert (got - ode_images(pipe, PROMPTS, guidance_scale=3.5, max_sequence_length=8)).abs().max() > 1e-4


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_flux_sde_rollout_has_finite_log_probs(variant):
    pipe = tiny_flux_pipeline(variant=variant)
    trajectory = rollout(
        pipe, PROMPTS, num_inference_steps=4, noise_level=0.7, generator=torch.Generator().manual_seed(0)
    )
    assert trajectory.latents.shape == (3, 5, 4, 16, 16)  # unpacked latents, as the VAE sees them
    assert trajectory.log_probs.shape == (3, 4)
    assert torch.isfinite(trajectory.log_probs).all()


def test_flux_default_size_comes_from_the_pipeline():
    pipe = tiny_flux_pipeline()
    assert "sample_size" not in pipe.transformer.config  # what the trainers used to read
    assert get_family(pipe).default_resolution == 32
    pipe.default_sample_size = 128  # FluxPipeline's own default: 128 latent pixels
    assert get_family(pipe).default_resolution == 128 * pipe.vae_scale_factor


# ----- LoRA targets --------------------------------------------------------------------------------------------------
def test_flux_default_lora_targets_cover_every_attention_projection():
    pipe = tiny_flux_pipeline()
    family = get_family(pipe)
    double = [f"transformer_blocks.0.attn.{m}" for m in family.lora_attention_modules]
    single = [f"single_transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v")]
    assert lora_modules(pipe, family.lora_target_modules()) == set(double + single)
    with_ffn = lora_modules(tiny_flux_pipeline(), family.lora_target_modules(ffn=True))
    ffn = {
        "transformer_blocks.0.ff.net.0.proj",
        "transformer_blocks.0.ff.net.2",
        "transformer_blocks.0.ff_context.net.0.proj",
        "transformer_blocks.0.ff_context.net.2",
        "single_transformer_blocks.0.proj_mlp",
        "single_transformer_blocks.0.proj_out",
    }
    assert with_ffn == set(double + single) | ffn  # not the transformer's final `proj_out`


# ----- training ------------------------------------------------------------------------------------------------------
def trained_images(pipe, prompts):
    return ode_images(pipe, prompts, guidance_scale=3.5, max_sequence_length=8)


def reference_images(pipe, prompts):
    return pipeline_images(pipe, prompts, guidance_scale=3.5)


def test_flux_grpo_trains_two_steps_and_the_saved_lora_loads_in_flux_pipeline(tmp_path):
    check_grpo_trains_and_reloads(
        tmp_path, tiny_flux_pipeline, PROMPTS, trained_images, reference_images, guidance_scale=3.5
    )


@pytest.fixture(scope="module")
def flux_teachers(tmp_path_factory):
    """Flux teachers in both formats: a PEFT folder and a diffusers LoRA file."""
    return teachers_in_two_formats(tmp_path_factory.mktemp("flux_teachers"), tiny_flux_pipeline())


def test_flux_opd_with_peft_diffusers_and_hub_teachers(tmp_path, flux_teachers, local_hub):
    check_opd_with_three_teacher_formats(
        tmp_path,
        tiny_flux_pipeline,
        flux_teachers,
        local_hub,
        PROMPTS,
        trained_images,
        reference_images,
        guidance_scale=3.5,
    )


@pytest.mark.parametrize("family", ["sd3", "sd15", "flux-dev", "flux-schnell"])
def test_grpo_with_default_kernel_settings_runs_on_every_family(tmp_path, family):
    """GRPO's defaults (noise 0.7, beta 0.04, `kl_scaling="sigma"`, guidance 4.5) work on every kernel (DDIM too)."""
    check_grpo_with_default_kernel_settings(tmp_path, BUILDERS[family](), PROMPTS)


# ----- errors --------------------------------------------------------------------------------------------------------
def test_unsupported_pipeline_is_a_type_error_naming_the_families(tmp_path):
    class OtherPipeline(DiffusionPipeline):
        pass

    with pytest.raises(
        TypeError,
        match="OtherPipeline.*StableDiffusion3Pipeline.*FluxPipeline.*StableDiffusionXLPipeline.*QwenImagePipeline"
        ".*ZImagePipeline.*Flux2Pipeline.*Flux2KleinPipeline",
    ):
        grpo_trainer(tmp_path, OtherPipeline(), PROMPTS[:2])


def test_teacher_lora_of_another_family_names_task_source_and_both_architectures(tmp_path, flux_teachers):
    peft_dir, _ = flux_teachers
    with pytest.raises(ValueError, match=r"task 'a'.*peft.*Flux\.1 \(FluxTransformer2DModel\).*SD3Transformer2DModel"):
        opd_trainer(tmp_path, tiny_sd3_pipeline(), {"a": peft_dir})
    sd3_lora = save_random_lora(tiny_sd3_pipeline(), tmp_path / "sd3_lora", "diffusers")
    with pytest.raises(ValueError, match=r"task 'b'.*sd3_lora.*SD3/SD3\.5.*another model.*FluxTransformer2DModel"):
        opd_trainer(tmp_path, tiny_flux_pipeline(), {"b": sd3_lora})


# ----- real scale, on the meta device --------------------------------------------------------------------------------
# Base parameters and default-LoRA layers of every released model in `model_sizes` (its public config, meta device).
REAL_SCALE = {
    "SD3.5-Medium": (2_243_171_520, 243),  # 24 joint blocks x 7 or 8 projections + 13 second attentions x 4
    "SD3.5-Large": (8_056_627_520, 303),  # 38 joint blocks x 8, but the last block's to_add_out
    "Flux.1-dev": (11_901_408_320, 266),  # "12B": 19 double-stream blocks x 8 + 38 single-stream x 3 (q, k, v)
    "FLUX.2-dev": (32_223_281_152, 112),  # "32B": 8 double-stream blocks x 8 + 48 single-stream fused qkv-mlp
    "FLUX.2-klein-4B": (3_875_544_576, 60),  # 5 x 8 + 20
    "Qwen-Image": (20_430_401_088, 480),  # "20B": 60 dual-stream blocks x 8
    "Z-Image-Turbo": (6_154_908_736, 136),  # "6B": (30 layers + 2 x 2 refiners) x 4
    "SDXL": (2_567_463_684, 560),  # 70 transformer blocks x 2 attentions x 4
}


def test_real_scale_denoisers_and_default_loras_on_the_meta_device():
    """Every released model of the families table: no weight allocated, exact parameter counts."""
    from diffusion_opd_trainer.model_sizes import REAL_SCALE_DENOISERS, denoiser_size, size_table

    assert set(REAL_SCALE_DENOISERS) == set(REAL_SCALE)
    sizes = {name: denoiser_size(name) for name in REAL_SCALE}
    for name, (base_params, lora_layers) in REAL_SCALE.items():
        size = sizes[name]
        assert size.devices == ["meta"], name
        assert (size.base_params, size.lora_layers) == (base_params, lora_layers), name
    # r32 on a d x d projection: 32 * 2d (SD3.5-Medium d 1536, Flux.1-dev d 3072).
    assert sizes["SD3.5-Medium"].lora_params == 243 * 32 * 2 * 1536
    assert sizes["Flux.1-dev"].lora_params == 266 * 32 * 2 * 3072
    assert (
        round(sizes["Flux.1-dev"].teacher_bf16_mib, 1) == 99.8
        and round(sizes["SD3.5-Medium"].teacher_bf16_mib, 1) == 45.6
    )
    assert "| Flux.1-dev | 11.901 B | 22.17 GiB | 266 | 52.30 M | 99.8 MiB |" in size_table(sizes=list(sizes.values()))
