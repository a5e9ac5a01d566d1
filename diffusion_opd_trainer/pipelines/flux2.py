"""The FLUX.2 family (`Flux2Pipeline`, `Flux2KleinPipeline`): flow matching on 2x2-patchified, normalised latents."""

from typing import Optional

import torch

from .base import PipelineFamily


class Flux2Family(PipelineFamily):
    """
    [`PipelineFamily`] for `Flux2Pipeline` (FLUX.2 [dev]: a Mistral-Small-3.1 text encoder) and `Flux2KleinPipeline`
    (FLUX.2 [klein]: a Qwen3 text encoder), both a `Flux2Transformer2DModel` predicting velocities on 2x2-patchified
    latents, an `AutoencoderKLFlux2` and a `FlowMatchEulerDiscreteScheduler` shifted by the pipelines' empirical
    `mu` (a function of the image sequence length and the number of steps).

    **Guidance.** `guidance_scale` (of [`~rollout.rollout`], [`predict`] and the trainers' configs) means what it
    means in each pipeline's `__call__`:

    - `Flux2Pipeline` (FLUX.2 [dev], guidance-distilled): the *embedded* guidance, fed to the transformer's guidance
      embedding with one forward per step and no negative prompt (the pipeline's default is 4.0), as Flux.1-dev. The
      pipeline has no true CFG.
    - `Flux2KleinPipeline`: classifier-free guidance with the empty negative prompt when `guidance_scale > 1` (the
      pipeline's default is 4.0; 1 or below: one forward, no negative), unless the pipeline is step-distilled
      (`is_distilled=True` in its config, as FLUX.2 [klein] 4B and 9B, which sample in 4 steps): there it is
      ignored. The transformer of every Klein model has no guidance embedding. The pipeline's negative prompt is
      always `""`; `rollout(..., negative_prompt=...)` may give another one.

    **Latents.** Rollouts keep the latents as the pipelines sample them: patchified 2x2 and normalised by the VAE's
    batch-norm statistics, `(B, 4 * C, H / 16, W / 16)` with `4 * C` the transformer's `in_channels` (128). That is
    the pipelines' own state (their packed `(B, H * W / 256, 128)` sequence, row-major, is a reshape of it) and their
    noise is drawn in that shape, so the initial noise and every step are the pipelines' exactly. The kernels act
    element-wise, so the reshape into the transformer's sequence commutes with them; the normalisation does not (the
    SDE's noise would be rescaled per channel), which is why the state stays normalised. [`decode`] undoes the
    normalisation and the patchification before the VAE, as the pipelines do.

    **Text.** The prompts go through the pipeline's own `encode_prompt` (its chat template, FLUX.2 [dev]'s system
    message, and the stacked hidden states of three encoder layers), padded to `max_sequence_length` (the pipelines'
    default 512, not capped by the tokenizer). The transformer takes no text attention mask: the padding tokens are
    part of the conditioning, and every prompt of a run has the same length. The once-per-run truncation warning
    counts a prompt's tokens with the pipeline's tokenizer against that length less the template's; FLUX.2 [dev]'s
    released `tokenizer` is a `PixtralProcessor`, for which the check is skipped.

    Args:
        pipeline (`Flux2Pipeline` or `Flux2KleinPipeline`): the pipeline to wrap.
    """

    denoiser_name = "transformer"
    default_max_sequence_length = 512  # the pipelines' own
    # Both streams of the double-stream blocks, and the single-stream blocks' fused projection that makes q, k, v
    # (together with the MLP's input: one layer). Their fused output projection (attention and MLP) is in the FFN
    # option, as Flux.1's `proj_out`.
    lora_attention_modules = PipelineFamily.lora_attention_modules + ("to_qkv_mlp_proj",)
    lora_ffn_modules = ("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out")

    def __init__(self, pipeline):
        super().__init__(pipeline)
        from diffusers import Flux2KleinPipeline

        # Klein: CFG, no guidance embedding; FLUX.2 [dev]: embedded guidance.
        self.is_klein = isinstance(pipeline, Flux2KleinPipeline)

    @property
    def patch_size(self) -> int:
        return 2  # the 2x2 patchification: image sides must be multiples of vae_scale_factor * 2

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, ...]:
        factor = self.vae_scale_factor * self.patch_size
        if height % factor or width % factor:
            raise ValueError(
                f"height and width must be multiples of {factor} for this pipeline, got {height}x{width}."
            )
        return (batch_size, self.num_latent_channels, height // factor, width // factor)

    def lora_target_modules(self, ffn: bool = False) -> list[str]:
        targets = super().lora_target_modules(ffn)
        if ffn:
            # One by one: PEFT matches suffixes, and a bare `attn.to_out` would catch the double-stream blocks'
            # `to_out` module list too.
            num_single = self.denoiser.config.num_single_layers
            targets += [f"single_transformer_blocks.{i}.attn.to_out" for i in range(num_single)]
        return targets

    def cfg_scale(self, guidance_scale: float) -> float:
        # Klein's `do_classifier_free_guidance`; FLUX.2 [dev] embeds `guidance_scale` instead.
        if self.is_klein and guidance_scale > 1 and not self.pipeline.config.is_distilled:
            return guidance_scale
        return 1.0

    def text_length_limits(self, max_sequence_length: Optional[int]) -> dict[str, int]:
        from transformers import PreTrainedTokenizerBase

        tokenizer = self.pipeline.tokenizer
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            return {}  # FLUX.2 [dev]'s `PixtralProcessor`: not checked
        # The chat template (and FLUX.2 [dev]'s system message) take their share of the encoder's length.
        if self.is_klein:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": ""}], tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
            template = len(tokenizer(text)["input_ids"])
        else:
            from diffusers.pipelines.flux2.pipeline_flux2 import format_input

            messages = format_input([""], system_message=self.pipeline.system_message)
            template = len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"][0])
        return {"tokenizer": self.effective_max_sequence_length(max_sequence_length) - template}

    def _encode(self, prompts: list[str], max_sequence_length: Optional[int]) -> dict[str, torch.Tensor]:
        prompt_embeds, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            device=self.device,
            max_sequence_length=self.effective_max_sequence_length(max_sequence_length),
        )
        # The text ids are positions 0..L-1 (`_prepare_text_ids`): rebuilt in `_forward`, not cached per prompt.
        return {"encoder_hidden_states": prompt_embeds}

    def _forward(self, denoiser, latents, timestep, cond, guidance_scale):
        pipe = self.pipeline
        batch, channels, height, width = latents.shape
        text = cond["encoder_hidden_states"].to(self.dtype)
        guidance = None
        if not self.is_klein:  # FLUX.2 [dev] always passes it; a transformer without guidance embedding ignores it
            guidance = torch.full((batch,), float(guidance_scale), device=latents.device, dtype=torch.float32)
        velocity = denoiser(
            hidden_states=pipe._pack_latents(latents),
            # The pipelines cast the scheduler's timestep to the latents' dtype, then divide by 1000.
            timestep=timestep.to(latents.dtype) / 1000,
            guidance=guidance,
            encoder_hidden_states=text,
            # The transformer reads the first sample's position ids only (they are the same for every sample).
            txt_ids=pipe._prepare_text_ids(text[:1]).to(latents.device),
            img_ids=pipe._prepare_latent_ids(latents[:1]).to(latents.device),
            return_dict=False,
        )[0]
        # The inverse of `_pack_latents` (the pipelines' `_unpack_latents_with_ids` for their row-major ids).
        return velocity.transpose(1, 2).reshape(batch, channels, height, width)

    def set_timesteps(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        import numpy as np
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, retrieve_timesteps

        # As the pipelines' `__call__`: linear sigmas 1 -> 1/N (unless the scheduler makes its own flow sigmas) and
        # the empirical mu of the image sequence length and the number of steps.
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if self.scheduler.config.get("use_flow_sigmas"):
            sigmas = None
        _, _, latent_height, latent_width = self.latent_shape(1, height, width)
        mu = compute_empirical_mu(image_seq_len=latent_height * latent_width, num_steps=num_inference_steps)
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, self.device, sigmas=sigmas, mu=mu)
        return timesteps

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """
        Decodes latents into images `[B, 3, H, W]` in `[0, 1]` (float32) as the pipelines do: undo the batch-norm
        normalisation (the VAE's running mean and variance), unpatchify 2x2, decode.
        """
        pipe, vae = self.pipeline, self.pipeline.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).float()
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1).float() + vae.config.batch_norm_eps)
        latents = pipe._unpatchify_latents(latents.float() * std.to(latents.device) + mean.to(latents.device))
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
