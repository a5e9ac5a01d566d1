"""The interface every pipeline family implements: encode prompts, run the denoiser with CFG, make noise, decode."""

import contextlib
import logging
import weakref
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from diffusers.utils import logging as diffusers_logging

from ..quiet import dropped_log_messages


logger = logging.getLogger(__name__)

# The pipelines whose prompt truncation was already warned about.
_WARNED_TRUNCATION: "weakref.WeakSet" = weakref.WeakSet()
# The pipelines whose text encoders were released (`release_text_encoders`), and which ones: any family built on such
# a pipeline later (evaluations wrap it in families of their own) must say so rather than fail inside diffusers.
_RELEASED_TEXT_ENCODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class TextEncodersReleasedError(RuntimeError):
    """A prompt needs encoding but the pipeline's text encoders were released after the datasets' prompts were."""


@contextlib.contextmanager
def modules_on(modules: Sequence[torch.nn.Module], device: torch.device):
    """
    Moves each module not already on `device` there for the block, and back to where it was afterwards: an offloaded
    component (text encoder, VAE) borrows the accelerator only while it computes. A module on `device` is untouched.
    """
    moved = []
    for module in modules:
        parameter = next(module.parameters(), None)
        if parameter is not None and parameter.device != device:
            moved.append((module, parameter.device))
            module.to(device)
    try:
        yield
    finally:
        for module, home in moved:
            module.to(home)


@contextlib.contextmanager
def _diffusers_warnings_silenced():
    # diffusers' `encode_prompt` warns about truncation once per batch; the family says it once per run instead.
    # It also tokenizes each prompt untruncated to compare, and transformers then says (once per tokenizer) that the
    # sequence "will result in indexing errors": it will not, the encoder's input is the truncated one.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.ERROR)
    try:
        with dropped_log_messages(
            "transformers.tokenization_utils_base", r"^Token indices sequence length is longer than the specified"
        ):
            yield
    finally:
        diffusers_logging.set_verbosity(verbosity)


def concat_padded(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """
    Concatenates conditioning tensors along the batch. Token sequences of different lengths (dimension 1, as the
    prompt embeddings and attention masks of families whose text encoder is not padded to a fixed length) are
    right-padded with zeros first: a zero in an attention mask is a masked token.
    """
    lengths = {t.shape[1] for t in tensors if t.dim() >= 2}
    if len(lengths) > 1:
        longest = max(lengths)
        tensors = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, longest - t.shape[1])) for t in tensors]
    return torch.cat(list(tensors))


@dataclass
class PromptEmbeddings:
    """
    Text conditioning of a batch, as the denoiser of one pipeline family consumes it.

    Args:
        cond (`dict[str, torch.Tensor]`):
            The prompts' conditioning, each tensor with the batch as its first dimension (e.g. SD3's
            `encoder_hidden_states` and `pooled_projections`).
        uncond (`dict[str, torch.Tensor]`, *optional*):
            The negative prompt's conditioning, same keys and shapes, for classifier-free guidance.
    """

    cond: dict[str, torch.Tensor]
    uncond: Optional[dict[str, torch.Tensor]] = None

    def __len__(self) -> int:
        return next(iter(self.cond.values())).shape[0]

    def __getitem__(self, index: Union[int, slice, Sequence[int], torch.Tensor]) -> "PromptEmbeddings":
        if isinstance(index, int):
            index = slice(index, index + 1)
        if isinstance(index, Sequence):
            index = torch.as_tensor(index, dtype=torch.long)
        uncond = None if self.uncond is None else {k: v[index] for k, v in self.uncond.items()}
        return PromptEmbeddings({k: v[index] for k, v in self.cond.items()}, uncond)

    @staticmethod
    def cat(items: Sequence["PromptEmbeddings"]) -> "PromptEmbeddings":
        """Concatenates along the batch dimension."""
        cond = {k: concat_padded([item.cond[k] for item in items]) for k in items[0].cond}
        uncond = None
        if all(item.uncond is not None for item in items):
            uncond = {k: concat_padded([item.uncond[k] for item in items]) for k in items[0].uncond}
        return PromptEmbeddings(cond, uncond)


@dataclass
class _EmbeddingCache:
    """Per-prompt embeddings kept on the CPU: text encoders are frozen, so a prompt is encoded once per run."""

    max_items: Optional[int] = 50_000  # `None`: no limit (every prompt of the run, encoded up front)
    items: dict = field(default_factory=dict)

    def get(self, key):
        return self.items.get(key)

    def put(self, key, value) -> None:
        if self.max_items is not None and len(self.items) >= self.max_items:
            self.items.pop(next(iter(self.items)))
        self.items[key] = value

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for item in self.items.values() for t in item.values())


# Each pipeline's prompt caches, shared by every family built on it (the trainer's, and those evaluations build): a
# prompt is encoded once per pipeline, and prompts encoded up front serve evaluations after the encoders are gone.
_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _shared_caches(pipeline) -> tuple[_EmbeddingCache, dict]:
    """The prompt and negative-prompt caches of `pipeline` (fresh ones for an object that takes no weak reference)."""
    try:
        caches = _CACHES.get(pipeline)
        if caches is None:
            caches = _CACHES[pipeline] = (_EmbeddingCache(), {})
        return caches
    except TypeError:
        return _EmbeddingCache(), {}


def _tokenizer_limit(tokenizer) -> Optional[int]:
    """The tokenizer's own maximum length; `None` without a tokenizer or with transformers' "no limit" sentinel."""
    if tokenizer is not None and tokenizer.model_max_length and tokenizer.model_max_length < 10**6:
        return tokenizer.model_max_length
    return None


class PipelineFamily(ABC):
    """
    What the library needs to know about one family of diffusers pipelines.

    A family knows how its pipelines encode prompts, call the denoiser with classifier-free guidance (one batched
    forward for the negative and positive halves), draw initial noise, set the sampling schedule and decode
    latents. Everything else in the library (kernels, rollout, trainers) is family-agnostic.

    Args:
        pipeline (`DiffusionPipeline`): the pipeline to wrap; its modules are used in place, not copied.
    """

    denoiser_name: str = "transformer"
    # Families with a T5 encoder: its tokenizer's component name and the pipeline's default T5 length.
    t5_tokenizer_name: Optional[str] = None
    default_max_sequence_length: Optional[int] = None

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self._cache, self._negative_cache = _shared_caches(pipeline)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def scheduler(self):
        return self.pipeline.scheduler

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return self.pipeline.vae_scale_factor

    @property
    def default_resolution(self) -> int:
        """The pipeline's native image size in pixels, as its own `__call__` picks it when no size is given."""
        # Pipelines with a `default_sample_size` (SD3, Flux...) size their images by it; Flux transformers have no
        # `sample_size` in their config at all. UNet pipelines (SD 1.x/2.x) read the UNet's `sample_size`.
        sample_size = getattr(self.pipeline, "default_sample_size", None) or self.denoiser.config.sample_size
        return sample_size * self.vae_scale_factor

    @property
    def num_latent_channels(self) -> int:
        return self.denoiser.config.in_channels

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The pipeline's text encoders by component name (those it has: SD3 may run without its T5)."""
        components = getattr(self.pipeline, "components", None) or {}
        return {
            name: module
            for name, module in components.items()
            if name.startswith("text_encoder") and isinstance(module, torch.nn.Module)
        }

    def release_text_encoders(self) -> list[str]:
        """
        Removes the text encoders from the pipeline (their memory is freed once nothing else holds them), after the
        prompts that will be needed were encoded: every family of this pipeline then serves only prompts in its cache,
        and raises [`TextEncodersReleasedError`] for any other. Returns the released components' names.
        """
        names = list(self.text_encoders)
        for name in names:
            setattr(self.pipeline, name, None)
        _RELEASED_TEXT_ENCODERS[self.pipeline] = tuple(names)
        return names

    def _text_encoders_on_device(self):
        """The text encoders on the denoiser's device for the block (moved there and back when offloaded)."""
        return modules_on(list(self.text_encoders.values()), self.device)

    def _vae_on_device(self):
        """The VAE on the denoiser's device for the block (moved there and back when it is offloaded to the CPU)."""
        vae = getattr(self.pipeline, "vae", None)
        return modules_on([vae] if isinstance(vae, torch.nn.Module) else [], self.device)

    # ----- LoRA -----------------------------------------------------------------------------------------------------
    #: The default LoRA targets: the attention projections of every stream, as PEFT module-name suffixes.
    lora_attention_modules: tuple[str, ...] = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"
    )  # fmt: skip
    #: The feed-forward layers, added to the targets on request (`lora_target_modules(ffn=True)`).
    lora_ffn_modules: tuple[str, ...] = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")

    def lora_target_modules(self, ffn: bool = False) -> list[str]:
        """The family's default LoRA targets: the attention projections, plus the feed-forward layers with `ffn`."""
        return list(self.lora_attention_modules) + (list(self.lora_ffn_modules) if ffn else [])

    # ----- text -----------------------------------------------------------------------------------------------------
    @abstractmethod
    def _encode(self, prompts: list[str], max_sequence_length: Optional[int]) -> dict[str, torch.Tensor]:
        """Encodes prompts into the denoiser's conditioning tensors (batch first)."""

    def _encode_negative(self, negative_prompt: str, max_sequence_length: Optional[int]) -> dict[str, torch.Tensor]:
        """Encodes CFG's negative prompt (batch of one); families whose pipeline treats `""` specially override it."""
        return self._encode([negative_prompt], max_sequence_length)

    def text_length_limits(self, max_sequence_length: Optional[int]) -> dict[str, int]:
        """Each tokenizer of the pipeline (by component name) and the token length its encoder truncates prompts to."""
        limits = {}
        for name in ("tokenizer", "tokenizer_2"):
            limit = _tokenizer_limit(getattr(self.pipeline, name, None))
            if limit is not None:
                limits[name] = limit
        if self.t5_tokenizer_name is not None and getattr(self.pipeline, self.t5_tokenizer_name, None) is not None:
            limits[self.t5_tokenizer_name] = self.effective_max_sequence_length(max_sequence_length)
        return limits

    def effective_max_sequence_length(self, max_sequence_length: Optional[int]) -> int:
        """The T5 length: the requested one (the pipeline's default if unset), capped at the T5 tokenizer's maximum."""
        length = self.default_max_sequence_length if max_sequence_length is None else max_sequence_length
        tokenizer = getattr(self.pipeline, self.t5_tokenizer_name, None) if self.t5_tokenizer_name else None
        limit = _tokenizer_limit(tokenizer)
        return length if limit is None else min(length, limit)

    def _warn_truncation_once(self, prompts: list[str], max_sequence_length: Optional[int]) -> None:
        # Once per pipeline, not per family object: evaluations wrap the trained pipeline in families of their own.
        if self.pipeline in _WARNED_TRUNCATION:
            return
        for name, limit in self.text_length_limits(max_sequence_length).items():
            tokenizer = getattr(self.pipeline, name)
            lengths = [len(ids) for ids in tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]
            longest = max(range(len(prompts)), key=lengths.__getitem__)
            if lengths[longest] > limit:
                logger.warning(
                    "Prompts longer than %d tokens are truncated by `%s`'s text encoder (e.g. one of %d tokens: %r). "
                    "Said once per run.",
                    limit,
                    name,
                    lengths[longest],
                    prompts[longest][:80],
                )
                _WARNED_TRUNCATION.add(self.pipeline)
                return

    @torch.no_grad()
    def encode_prompts(
        self,
        prompts: Sequence[str],
        negative_prompt: Optional[str] = "",
        max_sequence_length: Optional[int] = None,
        cache: bool = True,
    ) -> PromptEmbeddings:
        """
        Encodes a batch of prompts (and the negative prompt for CFG), each distinct prompt once per run.

        Args:
            prompts (`Sequence[str]`): the prompts.
            negative_prompt (`str`, *optional*, defaults to `""`): the CFG negative prompt; `None` skips it.
            max_sequence_length (`int`, *optional*): the T5 sequence length, where the family has one.
            cache (`bool`, defaults to `True`): keep each prompt's embeddings (on the CPU) for later calls.
        """
        prompts = list(prompts)
        key = max_sequence_length
        missing = list(dict.fromkeys(p for p in prompts if not cache or self._cache.get((p, key)) is None))
        fresh = {}
        if missing:
            self._check_text_encoders(missing)
            self._warn_truncation_once(missing, max_sequence_length)
            with _diffusers_warnings_silenced(), self._text_encoders_on_device():
                encoded = self._encode(missing, max_sequence_length)
            for i, prompt in enumerate(missing):
                fresh[prompt] = {k: v[i : i + 1] for k, v in encoded.items()}
                if cache:
                    self._cache.put((prompt, key), {k: v.cpu() for k, v in fresh[prompt].items()})
        device = self.device
        rows = [fresh.get(p) or self._cache.get((p, key)) for p in prompts]
        cond = {k: concat_padded([row[k].to(device) for row in rows]) for k in rows[0]}
        uncond = None
        if negative_prompt is not None:
            negative = self._negative_conditioning(negative_prompt, max_sequence_length)
            uncond = {k: v.to(device).expand(len(prompts), *v.shape[1:]) for k, v in negative.items()}
        return PromptEmbeddings(cond, uncond)

    def _negative_conditioning(self, negative_prompt: str, max_sequence_length: Optional[int]) -> dict:
        """The negative prompt's conditioning (batch of one), encoded once per run."""
        key = (negative_prompt, max_sequence_length)
        if key not in self._negative_cache:
            self._check_text_encoders([negative_prompt], negative=True)
            with _diffusers_warnings_silenced(), self._text_encoders_on_device():
                self._negative_cache[key] = self._encode_negative(negative_prompt, max_sequence_length)
        return self._negative_cache[key]

    def _check_text_encoders(self, prompts: list[str], negative: bool = False) -> None:
        """Raises [`TextEncodersReleasedError`] for prompts to encode once the pipeline's text encoders are gone."""
        released = _RELEASED_TEXT_ENCODERS.get(self.pipeline)
        if released:
            what = "The negative prompt" if negative else f"{len(prompts)} prompt(s), e.g."
            raise TextEncodersReleasedError(
                f"{what} {prompts[0]!r} must be encoded, but the "
                f"pipeline's text encoders ({', '.join(released)}) were released after the datasets' prompts were "
                'encoded (`text_encoder_offload="free"`): only those prompts can be used. Add the prompts to the '
                'datasets, or use `text_encoder_offload="cpu"` to keep the encoders on the CPU.'
            )

    def precompute_prompt_embeddings(
        self,
        prompts: Sequence[str],
        negative_prompt: Optional[str] = "",
        max_sequence_length: Optional[int] = None,
        batch_size: int = 32,
        show_progress: bool = False,
    ) -> int:
        """
        Encodes every distinct prompt once into the cache (on the CPU), with the text encoders on the denoiser's device
        for the whole pass, and lifts the cache's size limit: the cache then holds every prompt of the run, so the
        text encoders can be offloaded or released. Returns the cache's size in bytes.

        Args:
            prompts (`Sequence[str]`): the prompts (repeats are encoded once).
            negative_prompt (`str`, *optional*, defaults to `""`): CFG's negative prompt; `None` skips it.
            max_sequence_length (`int`, *optional*): the T5 sequence length, where the family has one.
            batch_size (`int`, defaults to 32): prompts per encoder forward.
            show_progress (`bool`, defaults to `False`): a progress bar over the batches.
        """
        from tqdm.auto import tqdm

        self._cache.max_items = None
        distinct = list(dict.fromkeys(prompts))
        starts = range(0, len(distinct), batch_size)
        with self._text_encoders_on_device():
            for start in tqdm(starts, desc="Encoding prompts", disable=not show_progress):
                self.encode_prompts(distinct[start : start + batch_size], None, max_sequence_length)
            if negative_prompt is not None:
                self._negative_conditioning(negative_prompt, max_sequence_length)
        return self._cache.nbytes() + sum(
            t.numel() * t.element_size() for item in self._negative_cache.values() for t in item.values()
        )

    # ----- denoiser -------------------------------------------------------------------------------------------------
    @abstractmethod
    def _forward(
        self,
        denoiser: torch.nn.Module,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        cond: dict[str, torch.Tensor],
        guidance_scale: float,
    ) -> torch.Tensor:
        """
        One denoiser call on a batch, without classifier-free guidance. `guidance_scale` is the caller's, for
        families whose denoiser takes the guidance as an input (Flux.1-dev's guidance embedding); others ignore it.
        """

    def cfg_scale(self, guidance_scale: float) -> float:
        """
        The classifier-free guidance scale that [`predict`] applies for a `guidance_scale` argument (1: no CFG and no
        negative prompt needed). The argument itself for CFG families; a guidance-distilled family that embeds
        `guidance_scale` instead (Flux) returns its own true-CFG scale.
        """
        return guidance_scale

    def set_true_cfg_scale(self, scale: float) -> None:
        """
        Sets the true classifier-free guidance that a guidance-distilled family runs on top of its embedded guidance
        (the pipeline's `true_cfg_scale`, with the negative prompt; 1 disables it). Only such families have it
        (Flux.1); for the others `guidance_scale` already is the CFG scale, and a value other than 1 is an error.
        """
        if scale != 1.0:
            raise ValueError(
                f"`true_cfg_scale` ({scale}) is true CFG on top of embedded guidance, which {type(self).__name__} "
                "does not have: its `guidance_scale` already is the classifier-free guidance scale. Leave "
                "`true_cfg_scale` at 1."
            )

    def predict(
        self,
        latents: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        embeddings: PromptEmbeddings,
        guidance_scale: Union[float, Sequence[float]] = 1.0,
        denoiser: Optional[torch.nn.Module] = None,
    ) -> torch.Tensor:
        """
        The denoiser's output after classifier-free guidance, in float32.

        With CFG (`cfg_scale(guidance_scale) != 1`) the negative and positive halves go through the denoiser as one
        batch of `2B` (one forward, so a DDP-wrapped denoiser is called once per backward).

        Args:
            latents (`torch.Tensor` of shape `(B, C, H, W)`, or `(B, C, F, H, W)` for video): the current states.
            timestep (`float` or `torch.Tensor`): a value of `scheduler.timesteps`, one or one per sample.
            embeddings ([`PromptEmbeddings`]): the batch's conditioning (needs `uncond` for CFG).
            guidance_scale (`float`, defaults to 1.0): the pipeline's own `guidance_scale`: the CFG scale (1 means no
                guidance, one forward of `B`), or a guidance-distilled family's embedded guidance ([`cfg_scale`]).
                A sequence gives each row its own CFG scale, all running CFG, in one forward (the OPD teachers of
                several tasks): only for families whose forward does not read the scale.
            denoiser (`torch.nn.Module`, *optional*): the module to call, e.g. the DDP-wrapped denoiser in training.
        """
        denoiser = self.denoiser if denoiser is None else denoiser
        batch_size = latents.shape[0]
        timestep = torch.as_tensor(timestep, device=latents.device).reshape(-1)
        timestep = timestep.expand(batch_size) if timestep.numel() == 1 else timestep
        model_input = latents.to(self.dtype)
        if not isinstance(guidance_scale, (int, float)):
            return self._predict_per_row(denoiser, model_input, timestep, embeddings, list(guidance_scale))
        cfg_scale = self.cfg_scale(guidance_scale)
        if cfg_scale == 1.0:
            return self._forward(denoiser, model_input, timestep, embeddings.cond, guidance_scale).float()
        if embeddings.uncond is None:
            raise ValueError(f"CFG scale {cfg_scale} needs negative-prompt embeddings; none were encoded.")
        cond = {k: concat_padded([embeddings.uncond[k], v]) for k, v in embeddings.cond.items()}
        output = self._forward(
            denoiser, torch.cat([model_input] * 2), torch.cat([timestep] * 2), cond, guidance_scale
        ).float()
        uncond_out, cond_out = output.chunk(2)
        return self.combine_guidance(uncond_out, cond_out, cfg_scale)

    def _predict_per_row(self, denoiser, model_input, timestep, embeddings, scales: list[float]) -> torch.Tensor:
        """[`predict`]'s CFG forward of the negative then positive halves, each row then guided by its own scale."""
        if len(scales) != model_input.shape[0] or any(self.cfg_scale(scale) == 1.0 for scale in scales):
            raise ValueError(f"Per-row guidance needs one CFG scale above 1 per row, got {scales}.")
        if embeddings.uncond is None:
            raise ValueError(f"CFG scales {sorted(set(scales))} need negative-prompt embeddings; none were encoded.")
        cond = {k: concat_padded([embeddings.uncond[k], v]) for k, v in embeddings.cond.items()}
        # The forward does not read the scale in the families this serves: any row's will do.
        output = self._forward(
            denoiser, torch.cat([model_input] * 2), torch.cat([timestep] * 2), cond, scales[0]
        ).float()
        uncond_out, cond_out = output.chunk(2)
        guided = torch.empty_like(cond_out)
        for scale in dict.fromkeys(scales):
            rows = torch.tensor([i for i, s in enumerate(scales) if s == scale], device=cond_out.device)
            guided[rows] = self.combine_guidance(uncond_out[rows], cond_out[rows], self.cfg_scale(scale))
        return guided

    def combine_guidance(self, uncond: torch.Tensor, cond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """
        Mixes the negative- and positive-prompt predictions (float32) as the family's pipeline does:
        `uncond + cfg_scale * (cond - uncond)`, unless a family's pipeline does more (Qwen-Image rescales the result).
        """
        return uncond + cfg_scale * (cond - uncond)

    # ----- noise, schedule, decoding --------------------------------------------------------------------------------
    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, ...]:
        factor = self.vae_scale_factor
        if height % (factor * self.patch_size) or width % (factor * self.patch_size):
            raise ValueError(
                f"height and width must be multiples of {factor * self.patch_size} for this pipeline, got "
                f"{height}x{width}."
            )
        return (batch_size, self.num_latent_channels, height // factor, width // factor)

    @property
    def patch_size(self) -> int:
        return 1

    def prepare_latents(
        self,
        batch_size: int,
        height: int,
        width: int,
        generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
    ) -> torch.Tensor:
        """Initial noise x_0 in float32, drawn as the pipeline draws it (same generator, same numbers)."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = self.latent_shape(batch_size, height, width)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        return latents * float(getattr(self.scheduler, "init_noise_sigma", 1.0))

    def shift_mu(self, height: int, width: int, patch_size: int = 2, max_shift: float = 1.15) -> float:
        """
        The `mu` of resolution-dependent (dynamic) shifting, as the flow-matching pipelines compute it: diffusers'
        `calculate_shift` of the image's token count (latents in `patch_size` patches) with the scheduler config's
        bounds (`max_shift` is the pipeline's default when the config has none: 1.15, SD3's 1.16).
        """
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = self.scheduler.config
        factor = self.vae_scale_factor * patch_size
        return calculate_shift(
            (height // factor) * (width // factor),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", max_shift),
        )

    @abstractmethod
    def set_timesteps(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        """Sets the scheduler's schedule as the pipeline's `__call__` would; returns the timesteps."""

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """
        Decodes latents into images `[B, 3, H, W]` in `[0, 1]` (float32), with the VAE on the latents' device for the
        call (a VAE offloaded to the CPU moves there and back).
        """
        with self._vae_on_device():
            return self._decode(latents)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """
        Decodes as the pipelines' `AutoencoderKL` does: unscale, unshift (the flow models' VAEs have a
        `shift_factor`; SD's has none), decode. Families whose VAE differs override this.
        """
        vae = self.pipeline.vae
        latents = latents / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
