"""EliGenPipeline: diffusers' FluxPipeline with entity prompts and regional attention (DESIGN.md section 2).

The text sequence is ``[e_1 | ... | e_N | global]`` (each entity T5-encoded exactly like the global prompt),
all text RoPE ids are zero, the pooled CLIP vector comes from the global prompt alone, and one bool mask
``(1, 1, L, L)`` built per call and CFG branch reaches every attention layer through
``joint_attention_kwargs["attention_mask"]``. With no entities every step is stock FluxPipeline.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.utils.torch_utils import get_module_execution_device
from PIL import Image

from .attention import check_regional_attention_support, flex_backend
from .entities import Entity, LayoutError, binarize_mask
from .flex import BlockMask, regional_block_mask
from .inpaint import (
    FUSIONS,
    background_velocity,
    fuse_velocity,
    pack_mask,
    paste_back,
    snap_size,
    soft_union,
    to_rgb_array,
)
from .lora import check_fits, load_state_dict, peft_config, read_lora, resolve_lora_path, write_diffusers
from .masks import (
    ATTENTION_MODES,
    ENTITY_TOKEN_MODES,
    latent_grid_size,
    latent_mask,
    regional_attention_mask,
    resize_nearest,
    token_cover,
)
from .segmented import SegmentedMask, segmented_backend, segmented_mask

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
TRIM_MARGIN = 8  # pad tokens kept after each trimmed entity prompt
logger = logging.getLogger(__name__)


@dataclass
class InpaintSource:
    """The input image as ``uint8 (H, W, 3)`` at the output size and at the working size (the patch grid)."""

    rgb: np.ndarray
    work_rgb: np.ndarray

    @property
    def height(self) -> int:
        return self.rgb.shape[0]

    @property
    def width(self) -> int:
        return self.rgb.shape[1]

    @property
    def work_height(self) -> int:
        return self.work_rgb.shape[0]

    @property
    def work_width(self) -> int:
        return self.work_rgb.shape[1]


def _resize_rgb(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.array(Image.fromarray(rgb).resize((width, height), Image.Resampling.LANCZOS))


@dataclass
class EntityBatch:
    """Entities resolved for one call: text segments ``(B, T_i, D)`` and masks on the latent grid ``(N, h, w)``."""

    embeds: list[torch.Tensor]
    latent_masks: torch.Tensor
    pixel_masks: list[np.ndarray] | None = None  # the binary masks as given (any resolution)

    def pixel_union(self, height: int, width: int) -> torch.Tensor:
        """``(height, width)`` bool: the union of the masks resized (NEAREST) to an image size."""
        union = np.zeros((height, width), dtype=bool)
        for mask in self.pixel_masks or []:
            union |= resize_nearest(mask, height, width)
        return torch.from_numpy(union)

    @property
    def cover(self) -> torch.Tensor:
        """``(1, N, n_img)`` bool: which image tokens each entity covers."""
        return token_cover(self.latent_masks).unsqueeze(0)

    @property
    def lengths(self) -> list[int]:
        return [e.shape[1] for e in self.embeds]

    def context(self, global_embeds: torch.Tensor) -> torch.Tensor:
        """``[e_1 | ... | e_N | global]`` along the sequence axis: ``(B, sum T_i + T, D)``."""
        return torch.cat([*self.embeds, global_embeds], dim=1)

    def mask(self, global_length: int, mode: str = "dense", slot: str = "cond"):
        """The regional mask for ``[entities | global | image]`` in the form ``mode`` needs: a dense bool
        ``(1, 1, L, L)``, a FlexAttention BlockMask (in a per-branch ``slot``, so a compiled transformer keeps
        its graphs from call to call) or a :class:`SegmentedMask`."""
        if mode == "flex":
            return regional_block_mask(self.cover, self.lengths, global_length, slot=f"pipeline-{slot}")
        if mode == "segmented":
            return segmented_mask(self.cover, self.lengths, global_length)
        return regional_attention_mask(self.cover, self.lengths, global_length)


def _broadcast_batch(embeds: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """``(T, D)``, ``(1, T, D)`` or ``(batch, T, D)`` -> ``(batch, T, D)``."""
    if embeds.ndim == 2:
        embeds = embeds.unsqueeze(0)
    if embeds.ndim != 3 or embeds.shape[0] not in (1, batch):
        raise ValueError(f"{what} must be (T, D), (1, T, D) or ({batch}, T, D), got {tuple(embeds.shape)}")
    return embeds.expand(batch, -1, -1)


@torch.no_grad()
def vae_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels ``(B, 3, H, W)`` in [-1, 1] -> the VAE's latent mode, shifted and scaled for the transformer:
    ``(B, C, H/f, W/f)`` (the inverse of the decode in ``__call__``)."""
    z = vae.encode(pixels).latent_dist.mode()
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


class EliGenPipeline(FluxPipeline):
    """FLUX with EliGen entity control. Loads any diffusers FLUX directory or hub id via ``from_pretrained``, and
    ``"eligen-tiny"``: the small model trained on the shapes world that ships inside the package."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        from .tiny.shipped import resolve_model

        return super().from_pretrained(resolve_model(pretrained_model_name_or_path), **kwargs)

    # ------------------------------------------------------------------------------------------------------
    # EliGen LoRA
    # ------------------------------------------------------------------------------------------------------

    def load_eligen_lora(
        self, path_or_hub_id: str | Path, adapter_name: str = "eligen", scale: float = 1.0,
        filename: str | None = None,
    ) -> str:
        """Load an EliGen LoRA in any of the three key formats as the named peft adapter ``adapter_name``.

        ``path_or_hub_id`` is a ``.safetensors`` file, a folder holding one, or a hub id (``modelscope/EliGen``
        resolves to its ``model_bf16.safetensors``). The LoRA is checked against the transformer as a whole
        before anything is applied, cast to the transformer's dtype, and activated at ``scale`` beside any
        adapters already active (stack and re-weight them with ``set_adapters``). Returns the detected format.
        """
        weights, fmt = read_lora(load_state_dict(resolve_lora_path(path_or_hub_id, filename)))
        check_fits(weights, self.transformer)
        previous = self.get_active_adapters() if getattr(self.transformer, "peft_config", None) else []
        dtype = self.transformer.dtype
        state = {k: v.to(dtype) for k, v in write_diffusers(weights, with_alpha=False).items()}
        self.transformer.load_lora_adapter(
            state, prefix="transformer", adapter_name=adapter_name, metadata=peft_config(weights), _pipeline=self,
            low_cpu_mem_usage=True,
        )
        self.transformer.set_adapter([*previous, adapter_name])  # keeps the others active, at their weights
        if scale != 1.0:
            self.set_lora_scale(adapter_name, scale)
        return fmt

    def attention_mode(self, attention: str, device: torch.device) -> str:
        """``auto`` -> the exact mode that is fastest here: on CUDA ``segmented`` (unmasked flash-attention calls
        merged by log-sum-exp, compiled or not), elsewhere ``dense``."""
        if attention != "auto":
            return attention
        return "segmented" if device.type == "cuda" else "dense"

    def compile_transformer(self, **compile_kwargs: Any) -> None:
        """``torch.compile`` the repeated double/single blocks once (regional compilation: the 57 FLUX blocks share
        two compiled graphs, so compiling takes about as long as compiling two blocks)."""
        if not getattr(self.transformer, "_eligen_compiled", False):
            self.transformer.compile_repeated_blocks(**{"fullgraph": True, **compile_kwargs})
            self.transformer._eligen_compiled = True

    def set_lora_scale(self, adapter_name: str, scale: float) -> None:
        """Re-weight one adapter of the transformer without touching the others."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in self.transformer.modules():
            if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "scaling", {}):
                module.set_scale(adapter_name, scale)

    # ------------------------------------------------------------------------------------------------------
    # Entities -> text segments and token covers
    # ------------------------------------------------------------------------------------------------------

    def encode_entity_prompts(
        self, prompts: Sequence[str], max_sequence_length: int = 512, device: torch.device | None = None
    ) -> torch.Tensor:
        """T5-encode entity prompts exactly like the global prompt (same padding): ``(N, T, D)``."""
        for i, text in enumerate(prompts):
            if not isinstance(text, str) or not text.strip():
                raise LayoutError("the entity prompt is missing or empty", entity=i, field="prompt")
        return self._get_t5_prompt_embeds(
            prompt=list(prompts), max_sequence_length=max_sequence_length, device=device or self._execution_device
        )

    def entity_token_counts(self, prompts: Sequence[str], max_sequence_length: int = 512) -> list[int]:
        """Real (non-padding) T5 tokens of each prompt, end-of-sequence token included."""
        ids = self.tokenizer_2(list(prompts), max_length=max_sequence_length, truncation=True).input_ids
        return [len(i) for i in ids]

    def entity_latent_masks(
        self, masks: Sequence[Any], height: int, width: int, fields: Sequence[str] | None = None
    ) -> torch.Tensor:
        """Binary masks of any resolution -> ``(N, h, w)`` bool on this pipeline's latent grid (NEAREST).

        Raises :class:`LayoutError` naming the entity whose mask covers no token.
        """
        lat_h, lat_w = latent_grid_size(height, width, self.vae_scale_factor)
        latents = []
        for i, mask in enumerate(masks):
            binary = mask if isinstance(mask, np.ndarray) and mask.dtype == bool else binarize_mask(mask, index=i)
            latent = latent_mask(binary, height, width, self.vae_scale_factor)
            if not latent.any():
                field = fields[i] if fields is not None else "mask"
                raise LayoutError(
                    f"the {field} covers no token at the {lat_w}x{lat_h} latent grid of a {width}x{height} image "
                    f"(one token = {self.vae_scale_factor * 2}x{self.vae_scale_factor * 2} pixels); make it larger",
                    entity=i, field=field,
                )
            latents.append(latent)
        return torch.stack(latents) if latents else torch.zeros(0, lat_h, lat_w, dtype=torch.bool)

    def entity_token_covers(
        self, masks: Sequence[Any], height: int, width: int, fields: Sequence[str] | None = None
    ) -> torch.Tensor:
        """Binary masks of any resolution -> ``(1, N, n_img)`` bool covers on this pipeline's token grid."""
        return token_cover(self.entity_latent_masks(masks, height, width, fields)).unsqueeze(0)

    def _resolve_entities(
        self,
        entities: Sequence[Entity] | None,
        entity_prompts: Sequence[str] | None,
        entity_prompt_embeds: Sequence[torch.Tensor] | None,
        entity_masks: Sequence[Any] | None,
        height: int,
        width: int,
        batch: int,
        max_sequence_length: int,
        device: torch.device,
        dtype: torch.dtype,
        grid: tuple[int, int] | None = None,
        entity_tokens: str = "full",
    ) -> EntityBatch | None:
        """Validate the entity arguments and encode them; None when there are no entities.

        Boxes and polygons are drawn at ``height x width`` (the output); masks go to the latent grid of
        ``grid`` (the size the model works at; by default the output size).
        """
        if entities is not None and (entity_prompts is not None or entity_prompt_embeds is not None
                                     or entity_masks is not None):
            raise ValueError("pass either `entities` or `entity_prompts`/`entity_prompt_embeds` + `entity_masks`")
        if entity_prompts is not None and entity_prompt_embeds is not None:
            raise ValueError("pass either `entity_prompts` or `entity_prompt_embeds`, not both")
        fields: list[str] | None = None
        if entities is not None:
            entities = list(entities)
            for i, entity in enumerate(entities):
                if not isinstance(entity, Entity):
                    raise TypeError(f"entities[{i}] must be an eligen.Entity, got {type(entity).__name__}")
                entity.validate(i, width, height)
            entity_prompts = [e.prompt for e in entities]
            entity_masks = [e.rasterize(width, height, i) for i, e in enumerate(entities)]
            fields = [e.spatial_field for e in entities]
        texts = entity_prompts if entity_prompts is not None else entity_prompt_embeds
        if texts is None and entity_masks is None:
            return None
        if texts is None or entity_masks is None or len(texts) != len(entity_masks):
            raise ValueError(
                "entity prompts (or `entity_prompt_embeds`) and `entity_masks` must be given together, one mask per "
                f"entity; got {0 if texts is None else len(texts)} prompts and "
                f"{0 if entity_masks is None else len(entity_masks)} masks"
            )
        if len(texts) == 0:
            return None
        binaries = [m if isinstance(m, np.ndarray) and m.dtype == bool else binarize_mask(m, index=i)
                    for i, m in enumerate(entity_masks)]
        grid_height, grid_width = grid or (height, width)
        latent_masks = self.entity_latent_masks(binaries, grid_height, grid_width, fields).to(device)
        if entity_prompts is not None:
            encoded = self.encode_entity_prompts(entity_prompts, max_sequence_length, device)
            embeds = [_broadcast_batch(e, batch, "entity prompt embeds") for e in encoded.unsqueeze(1)]
            if entity_tokens == "trim":  # same embeddings, minus most of the padding after each prompt
                counts = self.entity_token_counts(entity_prompts, max_sequence_length)
                embeds = [e[:, : min(n + TRIM_MARGIN, e.shape[1])] for e, n in zip(embeds, counts, strict=True)]
        else:
            embeds = [
                _broadcast_batch(e.to(device=device, dtype=dtype), batch, f"entity_prompt_embeds[{i}]")
                for i, e in enumerate(entity_prompt_embeds)
            ]
        return EntityBatch(embeds=embeds, latent_masks=latent_masks, pixel_masks=binaries)

    # ------------------------------------------------------------------------------------------------------
    # Inpainting
    # ------------------------------------------------------------------------------------------------------

    def _inpaint_source(
        self, image: Any, inpaint: bool, height: int | None, width: int | None, strength: float, fusion: str,
        mask_dilate: int, mask_blur: float,
    ) -> InpaintSource:
        """Validate the inpainting arguments and prepare the input at the output and the working size."""
        if not inpaint:
            raise ValueError("`image` is only read for inpainting: pass inpaint=True (plain image-to-image is not "
                             "supported)")
        if image is None:
            raise ValueError("inpaint=True needs the input `image`")
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if isinstance(mask_dilate, bool) or not isinstance(mask_dilate, int) or mask_dilate < 0:
            raise ValueError(f"mask_dilate is a number of latent pixels >= 0, got {mask_dilate!r}")
        if not mask_blur >= 0:
            raise ValueError(f"mask_blur is a Gaussian sigma in latent pixels >= 0, got {mask_blur!r}")
        rgb, note = to_rgb_array(image)
        if note:
            logger.warning(note)
        in_height, in_width = rgb.shape[:2]
        height, width = height or in_height, width or in_width
        if (height, width) != (in_height, in_width):
            if abs(height / width - in_height / in_width) > 0.01 * (in_height / in_width):
                raise ValueError(f"the input image is {in_width}x{in_height} but the output is asked to be "
                                 f"{width}x{height}, another aspect ratio; resize or crop the image, or scale the "
                                 "layout to it")
            logger.warning(f"input image resized from {in_width}x{in_height} to {width}x{height}")
            rgb = _resize_rgb(rgb, height, width)
        grid = self.vae_scale_factor * 2
        work_height, work_width = snap_size(height, grid), snap_size(width, grid)
        work_rgb = rgb
        if (work_height, work_width) != (height, width):
            logger.warning(f"{width}x{height} is not a multiple of the model's {grid}-pixel patch grid: generating "
                           f"at {work_width}x{work_height} and restoring {width}x{height}")
            work_rgb = _resize_rgb(rgb, work_height, work_width)
        return InpaintSource(rgb, work_rgb)

    def encode_image_latents(self, rgb: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``uint8 (H, W, 3)`` -> packed, scaled VAE latents ``(1, n_img, C*4)`` (the latent mode, no sampling)."""
        pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1
        pixels = pixels.to(device=get_module_execution_device(self.vae), dtype=self.vae.dtype)
        z = vae_latents(self.vae, pixels)
        packed = self._pack_latents(z, 1, z.shape[1], z.shape[2], z.shape[3])
        return packed.to(device=device, dtype=dtype)

    def _finish_inpaint(self, decoded: torch.Tensor, source: InpaintSource, repaint: np.ndarray | None,
                        output_type: str):
        """Decoded ``(B, 3, h, w)`` -> the output type at the input's size; where ``repaint`` (``(H, W)`` in
        [0, 1], None = no paste-back) is 0 the input's pixels come back byte for byte."""
        images = self.image_processor.postprocess(decoded, output_type="np")
        images = (images * 255).round().astype(np.uint8)  # exactly how diffusers makes PIL images
        if images.shape[1:3] != (source.height, source.width):
            images = np.stack([_resize_rgb(im, source.height, source.width) for im in images])
        if repaint is not None:
            images = np.stack([paste_back(source.rgb, im, repaint) for im in images])
        if output_type == "pil":
            return [Image.fromarray(im) for im in images]
        as_float = images.astype(np.float32) / 255
        if output_type == "np":
            return as_float
        return torch.from_numpy(as_float).permute(0, 3, 1, 2)

    # ------------------------------------------------------------------------------------------------------
    # Schedule
    # ------------------------------------------------------------------------------------------------------

    def _timesteps(
        self, num_inference_steps: int, sigmas: Sequence[float] | None, shift_sigmas: bool, image_seq_len: int,
        device: torch.device,
    ):
        """Set up the scheduler exactly as FluxPipeline does; ``shift_sigmas=False`` uses ``sigmas`` verbatim."""
        scheduler = self.scheduler
        if not shift_sigmas:
            if sigmas is None:
                raise ValueError("`shift_sigmas=False` needs explicit `sigmas`, e.g. eligen.reference_sigmas(50)")
            # shift 1 without dynamic shifting is the identity, so the given sigmas are used exactly.
            scheduler = type(self.scheduler).from_config(self.scheduler.config, use_dynamic_shifting=False, shift=1.0)
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(
            image_seq_len,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        timesteps, num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=sigmas,
                                                            mu=mu)
        scheduler.set_begin_index(0)
        return scheduler, timesteps, num_inference_steps

    # ------------------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------------------

    def _velocity(
        self, latents, timestep, guidance, pooled, context, text_ids, image_ids, mask, cache_name: str
    ) -> torch.Tensor:
        """One transformer forward; ``mask`` (or None) reaches every attention layer."""
        attention_kwargs = dict(self._joint_attention_kwargs)
        if mask is not None:
            attention_kwargs["attention_mask"] = mask
        backend = contextlib.nullcontext()
        if isinstance(mask, SegmentedMask):
            backend = segmented_backend()
        elif BlockMask is not None and isinstance(mask, BlockMask):
            # on CUDA the fused flex kernel needs compiling; inside a compiled transformer it is compiled already
            kernel = latents.device.type == "cuda" and not getattr(self.transformer, "_eligen_compiled", False)
            backend = flex_backend(compiled=kernel)
        with backend, self.transformer.cache_context(cache_name):
            return self.transformer(
                hidden_states=latents,
                timestep=timestep / 1000,
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=context,
                txt_ids=text_ids,
                img_ids=image_ids,
                joint_attention_kwargs=attention_kwargs,
                return_dict=False,
            )[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        entities: Sequence[Entity] | None = None,
        entity_prompts: Sequence[str] | None = None,
        entity_prompt_embeds: Sequence[torch.Tensor] | None = None,
        entity_masks: Sequence[Any] | None = None,
        entities_on_negative: bool = False,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: Sequence[float] | None = None,
        shift_sigmas: bool = True,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int = 512,
        image: Any = None,
        inpaint: bool = False,
        strength: float = 1.0,
        fusion: str = "exact",
        mask_dilate: int = 0,
        mask_blur: float = 0.0,
        paste_back: bool = True,
        attention: str = "auto",
        entity_tokens: str = "full",
        compile: bool = False,
    ) -> FluxPipelineOutput | tuple:
        r"""Generate images with entity control.

        Args beyond diffusers' FluxPipeline:
            entities: :class:`eligen.Entity` list (a prompt and one of mask / box / polygon each).
            entity_prompts / entity_prompt_embeds: the entity texts, or their T5 embeddings ``(T, D)``,
                ``(1, T, D)`` or ``(B, T, D)`` each (the low-level path), with ``entity_masks``.
            entity_masks: one mask per entity (PIL image, numpy array or tensor, any resolution).
            entities_on_negative: the reference's "enable on negative": run the negative CFG branch with the
                negative prompt copied into every entity slot under the same masks. Default: no entities there.
            shift_sigmas: with False, ``sigmas`` are used verbatim (e.g. ``eligen.reference_sigmas(50)``);
                with True (default) they are shifted by the scheduler exactly as in FluxPipeline.

        Inpainting fusion (``image=..., inpaint=True``): the entities' masks mark what to repaint, everything
        else stays ``image``; all entities are rendered in one pass (DESIGN.md section 5).
            image: the input (path, PIL image, numpy array or tensor); height/width default to its size, and
                a size off the patch grid is resized for the model and restored at the end.
            strength: below 1 starts from a partly noised input (skips the first steps).
            fusion: "exact" (default; CFG first, latents outside the union end exactly at the input's) or
                "paper" (fuse before CFG, as the paper and the reference do).
            mask_dilate: grow the union by this many latent pixels. mask_blur: Gaussian sigma (latent pixels)
                of a soft rim around the union.
            paste_back: pixels outside the (dilated, blurred) union are copied from the input exactly.

        Speed (same semantics unless noted):
            attention: "dense" (a bool ``(1, 1, L, L)`` mask, SDPA), "flex" (a FlexAttention BlockMask built from
                segment ids and covers, with a compiled fused kernel on CUDA), "segmented" (unmasked attention
                calls, one over ``[global | image]`` and two per entity, merged by log-sum-exp) or "auto" (see
                :meth:`attention_mode`).
            entity_tokens: "full" (default: every entity segment padded to ``max_sequence_length``, as the
                released LoRA was trained) or "trim" (each entity keeps its real tokens plus a few pads: fewer
                tokens, approximate).
            compile: ``torch.compile`` the transformer's repeated blocks (regional compilation), once.
        """
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if entity_tokens not in ENTITY_TOKEN_MODES:
            raise ValueError(f"entity_tokens must be one of {ENTITY_TOKEN_MODES}, got {entity_tokens!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        source = None
        if image is not None or inpaint:
            source = self._inpaint_source(image, inpaint, height, width, strength, fusion, mask_dilate, mask_blur)
            height, width = source.height, source.width
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        work_height, work_width = (source.work_height, source.work_width) if source else (height, width)
        self.check_inputs(
            prompt, prompt_2, work_height, work_width,
            negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=list(callback_on_step_end_tensor_inputs),
            max_sequence_length=max_sequence_length,
        )
        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = dict(joint_attention_kwargs or {})
        self._current_timestep = None
        self._interrupt = False

        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        batch = batch_size * num_images_per_prompt
        device = self._execution_device
        lora_scale = self._joint_attention_kwargs.get("scale", None)
        has_neg_prompt = negative_prompt is not None or (
            negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None
        )
        do_true_cfg = true_cfg_scale > 1 and has_neg_prompt

        # 1. Text: global prompt (T5 sequence + pooled CLIP), entity segments, negative prompt.
        prompt_embeds, pooled_prompt_embeds, _ = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, device=device, num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length, lora_scale=lora_scale,
        )
        ents = self._resolve_entities(
            entities, entity_prompts, entity_prompt_embeds, entity_masks, height, width, batch,
            max_sequence_length, device, prompt_embeds.dtype, grid=(work_height, work_width),
            entity_tokens=entity_tokens,
        )
        if compile:
            self.compile_transformer()
        mode = self.attention_mode(attention, device)
        if source is not None and ents is None:
            raise ValueError("inpainting needs at least one entity: the entity masks mark what to repaint")
        context, mask = prompt_embeds, None
        if ents is not None:
            check_regional_attention_support(self.transformer, backend=mode)
            context = ents.context(prompt_embeds)
            mask = ents.mask(prompt_embeds.shape[1], mode)
        if do_true_cfg:
            negative_prompt_embeds, negative_pooled_prompt_embeds, _ = self.encode_prompt(
                prompt=negative_prompt, prompt_2=negative_prompt_2, prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=negative_pooled_prompt_embeds, device=device,
                num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
                lora_scale=lora_scale,
            )
            neg_context, neg_mask = negative_prompt_embeds, None
            if ents is not None and entities_on_negative:
                neg_ents = EntityBatch([negative_prompt_embeds] * len(ents.embeds), ents.latent_masks)
                neg_context = neg_ents.context(negative_prompt_embeds)
                same_shape = neg_ents.lengths == ents.lengths and neg_context.shape[1] == context.shape[1]
                neg_mask = mask if same_shape else neg_ents.mask(negative_prompt_embeds.shape[1], mode,
                                                                     slot="uncond")
        text_dtype = self.text_encoder.dtype if self.text_encoder is not None else self.transformer.dtype
        text_ids = torch.zeros(context.shape[1], 3, device=device, dtype=text_dtype)
        if do_true_cfg:
            neg_text_ids = torch.zeros(neg_context.shape[1], 3, device=device, dtype=text_dtype)

        # 2. Latents, schedule, embedded guidance; for inpainting the input's latents and the fusion mask.
        num_channels_latents = self.transformer.config.in_channels // 4
        latents, image_ids = self.prepare_latents(
            batch, num_channels_latents, work_height, work_width, prompt_embeds.dtype, device, generator, latents
        )
        if ents is not None and ents.cover.shape[-1] != latents.shape[1]:
            raise ValueError(f"`latents` hold {latents.shape[1]} tokens but the entity masks were rasterised for "
                             f"{ents.cover.shape[-1]} ({work_width}x{work_height}); pass matching height/width")
        scheduler, timesteps, num_inference_steps = self._timesteps(
            num_inference_steps, sigmas, shift_sigmas, latents.shape[1], device
        )
        t_start = 0
        if source is not None:
            z_init = self.encode_image_latents(source.work_rgb, device, latents.dtype).expand(batch, -1, -1)
            latent_union = soft_union(ents.latent_masks.cpu(), mask_dilate, mask_blur)
            union = pack_mask(latent_union, num_channels_latents).to(device=device, dtype=latents.dtype)
            t_start = len(timesteps) - max(1, int(num_inference_steps * strength))
            timesteps = timesteps[t_start:]
            scheduler.set_begin_index(t_start)
            sigma_start = scheduler.sigmas[t_start].to(device=device, dtype=latents.dtype)
            latents = sigma_start * latents + (1 - sigma_start) * z_init
            num_inference_steps = len(timesteps)
        num_warmup_steps = max(len(timesteps) - num_inference_steps * scheduler.order, 0)
        self._num_timesteps = len(timesteps)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(latents.shape[0])

        # 3. Denoising loop: Euler steps on the (true-CFG-combined, inpainting-fused) velocity.
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                timestep = t.expand(latents.shape[0]).to(latents.dtype)
                velocity = self._velocity(latents, timestep, guidance, pooled_prompt_embeds, context, text_ids,
                                          image_ids, mask, "cond")
                neg_velocity = None
                if do_true_cfg:
                    neg_velocity = self._velocity(latents, timestep, guidance, negative_pooled_prompt_embeds,
                                                  neg_context, neg_text_ids, image_ids, neg_mask, "uncond")
                if source is not None:
                    sigma = scheduler.sigmas[t_start + i].to(device=device, dtype=latents.dtype)
                    background = background_velocity(latents, z_init, sigma)
                    velocity = fuse_velocity(velocity, neg_velocity, background, union, true_cfg_scale, fusion)
                elif neg_velocity is not None:
                    velocity = neg_velocity + true_cfg_scale * (velocity - neg_velocity)
                latents = scheduler.step(velocity, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    state = {"latents": latents, "prompt_embeds": prompt_embeds}
                    outputs = callback_on_step_end(
                        self, i, t, {k: state[k] for k in callback_on_step_end_tensor_inputs}
                    )
                    latents = outputs.pop("latents", latents)
                    if "prompt_embeds" in outputs:  # the callback changed the prompt: rebuild the text sequence
                        prompt_embeds = outputs.pop("prompt_embeds")
                        context = ents.context(prompt_embeds) if ents is not None else prompt_embeds
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % scheduler.order == 0):
                    progress_bar.update()
        self._current_timestep = None

        # 4. Decode (and for inpainting restore the input's size and paste the untouched pixels back).
        if output_type == "latent":
            image = latents
        else:
            latents = self._unpack_latents(latents, work_height, work_width, self.vae_scale_factor)
            latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
            latents = latents.to(get_module_execution_device(self.vae))
            image = self.vae.decode(latents, return_dict=False)[0]
            if source is None:
                image = self.image_processor.postprocess(image, output_type=output_type)
            else:
                keep = None
                if paste_back:  # the union at pixel precision, grown and softened like the latent one
                    f = self.vae_scale_factor
                    keep = soft_union(ents.pixel_union(source.height, source.width)[None], mask_dilate * f,
                                      mask_blur * f).numpy()
                image = self._finish_inpaint(image, source, keep, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return FluxPipelineOutput(images=image)
