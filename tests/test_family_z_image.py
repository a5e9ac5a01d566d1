"""The Z-Image family (`ZImagePipeline`: Z-Image-Turbo and Z-Image): parity, training, saving, teachers, errors.

Guidance semantics (Z-Image): `guidance_scale`, in `rollout`, `PipelineFamily.predict` and the trainers' configs,
means what it means in `ZImagePipeline.__call__`: classifier-free guidance as `pos + g * (pos - neg)` with the
negative prompt, i.e. the usual CFG scale `1 + g` (`ZImageFamily.cfg_scale`). Any `g <= 0` disables it: one forward,
no negative prompt (Z-Image-Turbo is sampled with `guidance_scale=0`). The pipeline's `cfg_normalization` and
`cfg_truncation` are given to the family (`ZImageFamily(pipe, cfg_normalization=..., cfg_truncation=...)`), with the
pipeline's defaults (both off).

`ZImagePipeline._encode_prompt` writes the chat-templated prompts into the list it is given, so the pipeline is
always called with a copy of the prompt lists here.
"""

import time

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from family_training import (
    check_grpo_trains_and_reloads,
    check_grpo_with_default_kernel_settings,
    check_opd_with_three_teacher_formats,
    lora_modules,
    opd_trainer,
    teachers_in_two_formats,
)

from diffusion_opd_trainer import lora as lora_module
from diffusion_opd_trainer.pipelines import get_family
from diffusion_opd_trainer.pipelines.z_image import ZImageFamily
from diffusion_opd_trainer.rollout import rollout
from diffusion_opd_trainer.testing import (
    save_random_lora,
    tiny_flux_pipeline,
    tiny_z_image_pipeline,
)


PROMPTS = ["a red circle", "two blue squares", "a photo of a cat"]
TEXT_LENGTH = 32  # the tiny prompts are at most 16 tokens once chat-templated; the pipeline's 512 only costs time
# The module-name markers proposed for `lora._ARCHITECTURE_MARKERS` (patched in where not there yet).
Z_IMAGE_MARKERS = (
    ("attention.to_", "Z-Image (ZImageTransformer2DModel)"),
    ("feed_forward.w", "Z-Image (ZImageTransformer2DModel)"),
)


def pipeline_images(pipe, prompts, seed=0, steps=4, size=32, **kwargs):
    """The pipeline's own sampler, images in [0, 1] (it renders 1024 px unless told a size)."""
    if isinstance(kwargs.get("negative_prompt"), str):  # the pipeline takes one negative prompt per prompt
        kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(prompts)
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        list(prompts),
        height=size,
        width=size,
        num_inference_steps=steps,
        generator=generator,
        output_type="pt",
        max_sequence_length=TEXT_LENGTH,
        **kwargs,
    ).images


def ode_images(pipe, prompts, seed=0, steps=4, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return rollout(
        pipe,
        prompts,
        num_inference_steps=steps,
        noise_level=0.0,
        generator=generator,
        decode=True,
        max_sequence_length=TEXT_LENGTH,
        **kwargs,
    ).images


# ----- tiny pipeline -------------------------------------------------------------------------------------------------
def test_tiny_z_image_pipeline_builds_fast_offline_and_deterministic():
    start = time.process_time()  # CPU time: the wall clock of a shared machine says little
    pipe = tiny_z_image_pipeline(seed=1)
    assert time.process_time() - start < 1.0
    again = tiny_z_image_pipeline(seed=1)
    for module in ("transformer", "text_encoder", "vae"):
        for (name, p), q in zip(getattr(pipe, module).named_parameters(), getattr(again, module).parameters()):
            assert torch.equal(p, q), f"{module}.{name}"
    assert not torch.equal(
        pipe.transformer.layers[0].attention.to_q.weight,
        tiny_z_image_pipeline(seed=2).transformer.layers[0].attention.to_q.weight,
    )
    # The chat template renders what Qwen3's renders for the pipeline's messages, and words are single tokens.
    tokenizer = pipe.tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a red circle"}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert text == "<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
    assert tokens == [
        "<|im_start|>",
        "user",
        "Ċ",
        "a",
        "Ġred",
        "Ġcircle",
        "<|im_end|>",
        "Ċ",
        "<|im_start|>",
        "assistant",
        "Ċ",
    ]
    assert tokenizer.decode(tokenizer("a zebra, 42!")["input_ids"]) == "a zebra, 42!"  # unknown words: bytes
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.padding_side == "right"


# ----- parity --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance_scale", [0.0, 4.0], ids=["turbo-no-cfg", "base-cfg"])
def test_z_image_ode_rollout_gives_the_pipelines_images(guidance_scale):
    """`rollout(noise_level=0)` = `ZImagePipeline.__call__`, same seed, steps and `guidance_scale` (0: no CFG)."""
    pipe = tiny_z_image_pipeline()
    expected = pipeline_images(pipe, PROMPTS, guidance_scale=guidance_scale)
    got = ode_images(pipe, PROMPTS, guidance_scale=guidance_scale)
    assert got.shape == (3, 3, 32, 32)  # the tiny pipeline's default size in the library
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(get_family(pipe).set_timesteps(4, 32, 32), pipe.scheduler.timesteps, rtol=0, atol=0)
    family = get_family(pipe)
    assert family.cfg_scale(guidance_scale) == (1.0 if guidance_scale == 0 else 1.0 + guidance_scale)
    if guidance_scale:
        assert (got - ode_images(pipe, PROMPTS, guidance_scale=0.0)).abs().max() > 1e-3  # CFG changes the images
    else:  # a negative scale disables CFG too, as in the pipeline
        torch.testing.assert_close(ode_images(pipe, PROMPTS, guidance_scale=-1.0), got, rtol=0, atol=0)


def test_z_image_bfloat16_rollout_gives_the_pipelines_images():
    """In bfloat16 too: the same latents, decoded as the pipeline decodes them (cast to the VAE's dtype first)."""
    pipe = tiny_z_image_pipeline(dtype=torch.bfloat16)
    expected = pipeline_images(pipe, PROMPTS, guidance_scale=4.0)
    got = ode_images(pipe, PROMPTS, guidance_scale=4.0)
    assert expected.dtype == torch.bfloat16 and got.dtype == torch.float32  # the library's images are float32
    torch.testing.assert_close(got.bfloat16(), expected, rtol=0, atol=0)


def test_z_image_negative_prompt_cfg_normalization_and_truncation_give_the_pipelines_images():
    pipe = tiny_z_image_pipeline()
    plain = ode_images(pipe, PROMPTS, guidance_scale=3.0, negative_prompt="text")
    torch.testing.assert_close(
        plain, pipeline_images(pipe, PROMPTS, guidance_scale=3.0, negative_prompt="text"), rtol=0, atol=1e-4
    )
    assert (plain - ode_images(pipe, PROMPTS, guidance_scale=3.0)).abs().max() > 1e-3
    # Normalised times of the 4 steps: 0, 0.1, 0.25, 0.5; a truncation at 0.2 drops CFG from the third step on.
    for options in (dict(cfg_normalization=0.5), dict(cfg_truncation=0.2), dict(cfg_normalization=True)):
        expected = pipeline_images(pipe, PROMPTS, guidance_scale=3.0, negative_prompt="text", **options)
        got = ode_images(ZImageFamily(pipe, **options), PROMPTS, guidance_scale=3.0, negative_prompt="text")
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        if options != dict(cfg_normalization=True):  # a bound of 1x the positive norm may not bind here
            assert (got - plain).abs().max() > 1e-4, options


def test_z_image_cfg_truncation_with_per_sample_timesteps_drops_guidance_row_by_row():
    pipe = tiny_z_image_pipeline()
    family = ZImageFamily(pipe, cfg_truncation=0.2)
    family.set_timesteps(4, 32, 32)
    embeddings = family.encode_prompts(PROMPTS[:2], negative_prompt="text", max_sequence_length=TEXT_LENGTH)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed = family.predict(x, torch.tensor([900.0, 500.0]), embeddings, guidance_scale=3.0)
        guided = family.predict(x[:1], torch.tensor(900.0), embeddings[0], guidance_scale=3.0)  # time 0.1: CFG
        unguided = family.predict(x[1:], torch.tensor(500.0), embeddings[1], guidance_scale=0.0)  # time 0.5: none
        truncated = family.predict(x[1:], torch.tensor(500.0), embeddings[1], guidance_scale=3.0)
    torch.testing.assert_close(mixed, torch.cat([guided, unguided]), rtol=0, atol=1e-5)
    torch.testing.assert_close(truncated, unguided, rtol=0, atol=0)


def test_z_image_dynamic_shifting_schedule_and_non_square_images_follow_the_pipeline():
    """Z-Image-Turbo's scheduler has a fixed shift; one with dynamic shifting gets the pipeline's `mu`."""
    pipe = tiny_z_image_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=16, max_image_seq_len=256
    )
    generator = torch.Generator().manual_seed(0)
    expected = pipe(
        list(PROMPTS[:2]),
        height=32,
        width=48,
        num_inference_steps=4,
        generator=generator,
        guidance_scale=0.0,
        output_type="latent",
        max_sequence_length=TEXT_LENGTH,
    ).images
    pipeline_sigmas = pipe.scheduler.sigmas.clone()
    trajectory = rollout(
        pipe,
        PROMPTS[:2],
        num_inference_steps=4,
        noise_level=0.0,
        generator=torch.Generator().manual_seed(0),
        guidance_scale=0.0,
        height=32,
        width=48,
        max_sequence_length=TEXT_LENGTH,
    )
    torch.testing.assert_close(pipe.scheduler.sigmas, pipeline_sigmas, rtol=0, atol=0)
    assert trajectory.latents.shape == (2, 5, 4, 16, 24)
    torch.testing.assert_close(trajectory.latents[:, -1], expected, rtol=0, atol=1e-5)


def test_z_image_sde_rollout_has_finite_log_probs():
    pipe = tiny_z_image_pipeline()
    trajectory = rollout(
        pipe,
        PROMPTS,
        num_inference_steps=4,
        noise_level=0.7,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        max_sequence_length=TEXT_LENGTH,
    )
    assert trajectory.latents.shape == (3, 5, 4, 16, 16)  # (B, C, H / 8, W / 8): the transformer patches inside
    assert trajectory.log_probs.shape == (3, 4)
    assert torch.isfinite(trajectory.log_probs).all()


def test_z_image_default_size_is_the_pipelines():
    pipe = tiny_z_image_pipeline()
    assert get_family(pipe).default_resolution == 32  # the tiny pipeline's own
    del pipe.default_sample_size
    assert get_family(pipe).default_resolution == 1024  # `ZImagePipeline.__call__`'s


def test_z_image_prompt_embeddings_are_the_pipelines_unpadded_per_prompt():
    pipe = tiny_z_image_pipeline()
    embeddings = get_family(pipe).encode_prompts(PROMPTS, negative_prompt="", max_sequence_length=TEXT_LENGTH)
    expected, negative = pipe.encode_prompt(list(PROMPTS), max_sequence_length=TEXT_LENGTH)
    lengths = embeddings.cond["prompt_mask"].sum(dim=1).tolist()
    assert lengths == [len(e) for e in expected] and len(set(lengths)) > 1  # the prompts differ in length
    for i, embeds in enumerate(expected):
        torch.testing.assert_close(embeddings.cond["prompt_embeds"][i, : lengths[i]], embeds, rtol=0, atol=0)
        assert embeddings.cond["prompt_embeds"][i, lengths[i] :].eq(0).all()
    torch.testing.assert_close(embeddings.uncond["prompt_embeds"][0], negative[0], rtol=0, atol=0)


# ----- LoRA targets --------------------------------------------------------------------------------------------------
def test_z_image_default_lora_targets_cover_the_attention_of_every_stream():
    family = get_family(tiny_z_image_pipeline())
    blocks = ("noise_refiner.0", "context_refiner.0", "layers.0")  # image refiner, text refiner, single stream
    attention = {f"{block}.attention.{m}" for block in blocks for m in ("to_q", "to_k", "to_v", "to_out.0")}
    assert lora_modules(tiny_z_image_pipeline(), family.lora_target_modules()) == attention
    ffn = {f"{block}.feed_forward.{w}" for block in blocks for w in ("w1", "w2", "w3")}
    assert lora_modules(tiny_z_image_pipeline(), family.lora_target_modules(ffn=True)) == attention | ffn


# ----- training ------------------------------------------------------------------------------------------------------
SIZE = dict(resolution=32, max_sequence_length=TEXT_LENGTH)


@pytest.fixture(scope="module")
def z_image_teachers(tmp_path_factory):
    """Z-Image teachers on the family's targets in both formats: a PEFT folder and a diffusers LoRA file."""
    pipe = tiny_z_image_pipeline()
    targets = get_family(pipe).lora_target_modules()
    return teachers_in_two_formats(tmp_path_factory.mktemp("z_image_teachers"), pipe, target_modules=targets)


def test_z_image_grpo_trains_two_steps_and_the_saved_lora_loads_in_z_image_pipeline(tmp_path):
    check_grpo_trains_and_reloads(
        tmp_path,
        tiny_z_image_pipeline,
        PROMPTS,
        lambda pipe, prompts: ode_images(pipe, prompts, guidance_scale=4.0),
        lambda pipe, prompts: pipeline_images(pipe, prompts, guidance_scale=4.0),
        guidance_scale=4.0,
        **SIZE,
    )


def test_z_image_opd_with_peft_diffusers_and_hub_teachers(tmp_path, z_image_teachers, local_hub):
    check_opd_with_three_teacher_formats(
        tmp_path,
        tiny_z_image_pipeline,
        z_image_teachers,
        local_hub,
        PROMPTS,
        lambda pipe, prompts: ode_images(pipe, prompts, guidance_scale=0.0),
        lambda pipe, prompts: pipeline_images(pipe, prompts, guidance_scale=0.0),
        guidance_scale=0.0,  # Turbo-style
        **SIZE,
    )


def test_z_image_grpo_with_default_kernel_settings_runs(tmp_path):
    """GRPO's defaults (noise 0.7, beta 0.04, `kl_scaling="sigma"`, guidance 4.5: CFG scale 5.5 here)."""
    check_grpo_with_default_kernel_settings(tmp_path, tiny_z_image_pipeline(), PROMPTS, **SIZE)


# ----- errors --------------------------------------------------------------------------------------------------------
def test_teacher_lora_of_another_family_names_task_source_and_both_architectures(
    tmp_path, z_image_teachers, monkeypatch
):
    markers = lora_module._ARCHITECTURE_MARKERS
    if not any("ZImageTransformer2DModel" in label for _, label in markers):
        monkeypatch.setattr(lora_module, "_ARCHITECTURE_MARKERS", markers + Z_IMAGE_MARKERS)
    flux_lora = save_random_lora(tiny_flux_pipeline(), tmp_path / "flux_lora", "peft")
    with pytest.raises(
        ValueError,
        match=r"task 'a'.*flux_lora.*Flux\.1 \(FluxTransformer2DModel\).*another model.*ZImageTransformer2DModel",
    ):
        opd_trainer(tmp_path, tiny_z_image_pipeline(), {"a": flux_lora}, **SIZE)
    peft_dir, _ = z_image_teachers
    with pytest.raises(
        ValueError,
        match=r"task 'b'.*peft.*Z-Image \(ZImageTransformer2DModel\).*another model.*FluxTransformer2DModel",
    ):
        opd_trainer(tmp_path, tiny_flux_pipeline(), {"b": peft_dir})
