"""What every EliGen pipeline shares, whatever its family: entities -> segments and covers, the regional mask in
the chosen form, inpainting input and output, the schedule, LoRA loading, and the run of the shared loop
(:func:`eligen.sampling.denoise`). The family-specific pieces come from ``self.family``
(:class:`eligen.families.base.ModelFamily`).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers.utils.torch_utils import get_module_execution_device
from PIL import Image

from ..choices import ATTENTION_MODES, ENTITY_TOKEN_MODES, FUSIONS
from ..entities import Entity, LayoutError, binarize_mask
from ..families import family_of_index
from ..families.base import Branch, ModelFamily
from ..inpaint import pack_mask, paste_back, snap_size, soft_union, to_rgb_array
from ..lora import check_fits, load_state_dict, peft_config, read_lora, resolve_lora_path, write_diffusers
from ..masks import latent_grid_size, latent_mask, resize_nearest, token_cover
from ..regional.dense import regional_attention_mask
from ..regional.flex import FlexSlot, regional_block_mask
from ..regional.processors import check_regional_attention_support, install_regional_processors
from ..regional.segmented import segmented_mask
from ..sampling import Fusion, denoise

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# eligen_defaults.json keys -> the pipeline arguments they fill when a call leaves them out
DEFAULT_ARGUMENTS = {"steps": "num_inference_steps", "true_cfg": "true_cfg_scale", "guidance": "guidance_scale",
                     "max_sequence_length": "max_sequence_length"}
FAR_FROM_NATIVE = 4.0  # warn when the pixel count differs from the native size's by more than this factor
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

    def mask(self, global_length: int, mode: str = "dense", slot: FlexSlot | None = None):
        """The regional mask for ``[entities | global | image]`` in the form ``mode`` needs: a dense bool
        ``(1, 1, L, L)``, a FlexAttention BlockMask (in ``slot``, so a compiled transformer keeps its graphs from
        call to call) or a :class:`~eligen.regional.segmented.SegmentedMask`."""
        if mode == "flex":
            return regional_block_mask(self.cover, self.lengths, global_length, slot=slot)
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


class EliGenMixin:
    """The family-independent half of an EliGen pipeline (mixed into a diffusers pipeline class)."""

    family: ClassVar[ModelFamily]
    eligen_defaults: dict[str, Any] = {}  # noqa: RUF012  (replaced per instance, never mutated)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, load_default_lora: bool = True, **kwargs):
        """diffusers' ``from_pretrained``; ``"eligen-tiny"`` is the model shipped in the package, and a checkpoint
        of another family is refused naming the pipeline class that runs it.

        A checkpoint that declares its own defaults (``eligen_defaults.json``: steps, true CFG, guidance, token
        length, native size, its EliGen LoRA) gets them for every call that leaves them out, as the CLI does, and
        its LoRA is loaded as the adapter ``"eligen"`` unless ``load_default_lora=False``.
        """
        from ..tiny.shipped import model_defaults, resolve_model

        path = resolve_model(pretrained_model_name_or_path)
        index = Path(str(path)) / "model_index.json"
        if index.is_file():
            import json

            family = family_of_index(json.loads(index.read_text()), str(path))
            if family != cls.family.name:
                runs = {"flux": "EliGenPipeline", "qwen_image": "EliGenQwenImagePipeline"}[family]
                raise ValueError(f"{path} is a {family} checkpoint; load it with eligen.{runs}")
        pipe = super().from_pretrained(path, **kwargs)
        pipe.eligen_defaults = model_defaults(path)
        if load_default_lora:
            for lora in pipe.eligen_defaults.get("lora", []):
                pipe.load_eligen_lora(lora)
        return pipe

    def native_size(self) -> tuple[int, int]:
        """``(height, width)`` the model was trained at: its declared size, else diffusers' default size."""
        side = self.default_sample_size * self.vae_scale_factor
        width, height = self.eligen_defaults.get("native_size") or (side, side)
        return height, width

    def _call_defaults(self, given: dict[str, Any], fallbacks: dict[str, Any]) -> dict[str, Any]:
        """Arguments a call left as None -> the model's declared defaults, else diffusers' (``fallbacks``)."""
        declared = {DEFAULT_ARGUMENTS[k]: v for k, v in self.eligen_defaults.items() if k in DEFAULT_ARGUMENTS}
        return {k: given[k] if given[k] is not None else declared.get(k, fallback) for k, fallback in fallbacks.items()}

    def _declared_negative(self, negative_prompt, negative_prompt_embeds, given_true_cfg: float | None) -> Any:
        """A call that leaves true CFG to a model declaring it above 1 runs it with an empty negative prompt when
        none is given (as the CLI does); otherwise diffusers' rule holds: no negative prompt, no true CFG."""
        declared = self.eligen_defaults.get("true_cfg")
        if (given_true_cfg is None and declared is not None and declared > 1 and negative_prompt is None
                and negative_prompt_embeds is None):
            return ""
        return negative_prompt

    def _size(self, height: int | None, width: int | None, inpainting: bool = False) -> tuple[int, int]:
        """The output size: as given, else the model's native size. Warns when it is far from the native size, and
        when it is off the patch grid (diffusers renders the grid size below it; inpainting restores the size)."""
        native_height, native_width = self.native_size()
        height, width = height or native_height, width or native_width
        grid = self.vae_scale_factor * 2
        if not inpainting and (height % grid or width % grid):
            logger.warning(f"{width}x{height} is not a multiple of the model's {grid}-pixel patch grid: the image will "
                           f"be {width // grid * grid}x{height // grid * grid}")
        ratio = (height * width) / (native_height * native_width)
        if ratio > FAR_FROM_NATIVE or ratio < 1 / FAR_FROM_NATIVE:
            logger.warning(f"{width}x{height} is far from the {native_width}x{native_height} this model was trained "
                           "at: expect a poor image (and, if larger, a long wait); pass a size near "
                           f"{native_width}x{native_height}")
        return height, width


    def register_modules(self, **kwargs):
        """diffusers' ``register_modules``, then eligen's attention processors on the transformer (without a mask
        they compute exactly what the stock ones do)."""
        super().register_modules(**kwargs)
        if kwargs.get("transformer") is not None:
            install_regional_processors(kwargs["transformer"], self.family.processors)

    # -- LoRA -------------------------------------------------------------------------------------------------

    def load_eligen_lora(
        self, path_or_hub_id: str | Path, adapter_name: str = "eligen", scale: float = 1.0,
        filename: str | None = None,
    ) -> str:
        """Load an EliGen LoRA in any of its key formats as the named peft adapter ``adapter_name``.

        ``path_or_hub_id`` is a ``.safetensors`` file, a folder holding one, or a hub id (the released EliGen
        repos resolve to their LoRA file). The LoRA is checked against the transformer as a whole (family, names,
        shapes) before anything is applied, cast to the transformer's dtype, and activated at ``scale`` beside any
        adapters already active (stack and re-weight them with ``set_adapters``). Returns the detected format.
        """
        weights, fmt = read_lora(load_state_dict(resolve_lora_path(path_or_hub_id, filename)), self.family.name)
        check_fits(weights, self.transformer)
        previous = self.get_active_adapters() if getattr(self.transformer, "peft_config", None) else []
        dtype = self.transformer.dtype
        state = {k: v.to(dtype) for k, v in write_diffusers(weights, with_alpha=False).items()}
        with warnings.catch_warnings():  # stacking adapters is the point here, not a mistake peft should flag
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            self.transformer.load_lora_adapter(
                state, prefix="transformer", adapter_name=adapter_name, metadata=peft_config(weights),
                _pipeline=self, low_cpu_mem_usage=True,
            )
        self.transformer.set_adapter([*previous, adapter_name])  # keeps the others active, at their weights
        if scale != 1.0:
            self.set_lora_scale(adapter_name, scale)
        return fmt

    def set_lora_scale(self, adapter_name: str, scale: float) -> None:
        """Re-weight one adapter of the transformer without touching the others."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in self.transformer.modules():
            if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "scaling", {}):
                module.set_scale(adapter_name, scale)

    # -- speed ------------------------------------------------------------------------------------------------

    def attention_mode(self, attention: str, device: torch.device) -> str:
        """``auto`` -> the exact mode that is fastest here: on CUDA ``segmented`` (unmasked flash-attention calls
        merged by log-sum-exp, compiled or not), elsewhere ``dense``."""
        if attention != "auto":
            return attention
        return "segmented" if device.type == "cuda" else "dense"

    def compile_transformer(self, **compile_kwargs: Any) -> None:
        """``torch.compile`` the repeated transformer blocks once (regional compilation: every block of a kind
        shares one compiled graph)."""
        if not getattr(self.transformer, "_eligen_compiled", False):
            # before compiling: a processor swap would recompile
            install_regional_processors(self.transformer, self.family.processors)
            self.transformer.compile_repeated_blocks(**{"fullgraph": True, **compile_kwargs})
            self.transformer._eligen_compiled = True

    # -- entities ---------------------------------------------------------------------------------------------

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

    def encode_entity_prompts(self, prompts: Sequence[str], max_sequence_length: int = 512,
                              device: torch.device | None = None) -> list[torch.Tensor]:
        """Entity prompts -> ``(1, T_i, D)`` segments, each encoded as the family encodes the global prompt."""
        for i, text in enumerate(prompts):
            if not isinstance(text, str) or not text.strip():
                raise LayoutError("the entity prompt is missing or empty", entity=i, field="prompt")
        return self.family.encode_entities(self, prompts, max_sequence_length, device or self._execution_device)

    def _trim_segments(self, embeds: list[torch.Tensor], prompts: Sequence[str],
                       max_sequence_length: int) -> list[torch.Tensor]:
        """``entity_tokens="trim"``: segments cut to their real tokens plus a few pads (families that pad)."""
        return embeds

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
            embeds = [_broadcast_batch(e, batch, "entity prompt embeds") for e in encoded]
            if entity_tokens == "trim":
                embeds = self._trim_segments(embeds, entity_prompts, max_sequence_length)
        else:
            embeds = [
                _broadcast_batch(e.to(device=device, dtype=dtype), batch, f"entity_prompt_embeds[{i}]")
                for i, e in enumerate(entity_prompt_embeds)
            ]
        return EntityBatch(embeds=embeds, latent_masks=latent_masks, pixel_masks=binaries)

    def _flex_slot(self, branch: str) -> FlexSlot:
        """This pipeline's own FlexAttention slot for a CFG branch (never shared with another pipeline)."""
        slots = self.__dict__.setdefault("_eligen_flex_slots", {})
        return slots.setdefault(branch, FlexSlot())

    def _branches(
        self, ents: EntityBatch | None, positive: Branch, negative: Branch | None, mode: str,
        entities_on_negative: bool,
    ) -> dict[str, Branch]:
        """The CFG branches with their full text sequences, text positions and regional masks (built once per call
        and branch). The negative branch has no entities unless ``entities_on_negative`` (the reference's "enable
        on negative": the negative prompt in every entity slot, under the same masks)."""
        device, dtype = positive.context.device, self._text_dtype()
        branches = {"cond": positive}
        global_length = positive.context.shape[1]
        lengths: list[int] = []
        if ents is not None:
            install_regional_processors(self.transformer, self.family.processors)
            check_regional_attention_support(self.transformer, backend=mode)
            lengths = ents.lengths
            positive.context = ents.context(positive.context)
            positive.attention_mask = ents.mask(global_length, mode, self._flex_slot("cond"))
        positive.positions = self.family.positions(lengths, global_length, device, dtype)
        if negative is None:
            return branches
        branches["uncond"] = negative
        neg_global, neg_lengths = negative.context.shape[1], []
        if ents is not None and entities_on_negative:
            neg_ents = EntityBatch([negative.context] * len(ents.embeds), ents.latent_masks)
            neg_lengths = neg_ents.lengths
            negative.context = neg_ents.context(negative.context)
            same_shape = neg_lengths == lengths and negative.context.shape[1] == positive.context.shape[1]
            negative.attention_mask = (positive.attention_mask if same_shape
                                       else neg_ents.mask(neg_global, mode, self._flex_slot("uncond")))
        negative.positions = self.family.positions(neg_lengths, neg_global, device, dtype)
        return branches

    def _text_dtype(self) -> torch.dtype:
        encoder = getattr(self, "text_encoder", None)
        return encoder.dtype if encoder is not None else self.transformer.dtype

    # -- inpainting -------------------------------------------------------------------------------------------

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
        """``uint8 (H, W, 3)`` -> packed, normalised VAE latents ``(1, n_img, C*4)`` (the latent mode, no sampling)."""
        pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1
        pixels = pixels.to(device=get_module_execution_device(self.vae), dtype=self.vae.dtype)
        with torch.no_grad():
            packed = self.family.encode_image(self, pixels)
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

    # -- schedule ---------------------------------------------------------------------------------------------

    def _timesteps(
        self, num_inference_steps: int, sigmas: Sequence[float] | None, shift_sigmas: bool, image_seq_len: int,
        device: torch.device,
    ):
        """Set up the scheduler exactly as diffusers' FLUX and Qwen-Image pipelines do (a resolution-dependent
        shift ``mu``); ``shift_sigmas=False`` uses ``sigmas`` verbatim."""
        scheduler = self.scheduler
        if not shift_sigmas:
            if sigmas is None:
                raise ValueError("`shift_sigmas=False` needs explicit `sigmas`, e.g. eligen.reference_sigmas(50)")
            # shift 1 without dynamic shifting is the identity, so the given sigmas are used exactly.
            scheduler = type(self.scheduler).from_config(self.scheduler.config, use_dynamic_shifting=False, shift=1.0)
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        config = scheduler.config
        mu = resolution_shift(image_seq_len, config.get("base_image_seq_len", 256),
                              config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                              config.get("max_shift", 1.15))
        if sigmas is None:  # as diffusers' retrieve_timesteps: given sigmas set the number of steps
            scheduler.set_timesteps(num_inference_steps, device=device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        scheduler.set_begin_index(0)
        return scheduler, scheduler.timesteps, len(scheduler.timesteps)

    # -- the run ----------------------------------------------------------------------------------------------

    def _check_speed_options(self, attention: str, entity_tokens: str, output_type: str) -> None:
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if entity_tokens not in ENTITY_TOKEN_MODES:
            raise ValueError(f"entity_tokens must be one of {ENTITY_TOKEN_MODES}, got {entity_tokens!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")

    def _check_memory(self, batch: int, work_size: tuple[int, int], dense_mask: bool, device: torch.device) -> None:
        """Refuse up front a call whose tensors cannot fit the device: the activations (about 16 floats per image
        token and model width) and, for the dense form, the ``n_img x n_img`` bools of the mask, against the memory
        free now. A lower bound (text tokens are not counted), so it only stops what cannot run."""
        lat_h, lat_w = latent_grid_size(*work_size, self.vae_scale_factor)
        n_img = (lat_h // 2) * (lat_w // 2)
        config = self.transformer.config
        width = getattr(config, "num_attention_heads", 1) * getattr(config, "attention_head_dim", 64)
        need = 16 * 4 * batch * n_img * width + (n_img * n_img if dense_mask else 0)
        free = free_memory(device)
        if free is not None and need > free:
            raise ValueError(f"{work_size[1]}x{work_size[0]} needs at least {need / 2**30:.1f} GiB on {device} but "
                             f"{free / 2**30:.1f} GiB are free; use a smaller size or fewer images"
                             + (", or attention='segmented' (no mask tensor)" if dense_mask else ""))

    @staticmethod
    def _check_finite(**values: Any) -> None:
        """Refuse NaN / inf in scales and in tensors a caller passes in, naming the argument (they would only show
        as a black or noise image at the end)."""
        import math

        for name, value in values.items():
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                bad = not value.float().isfinite().all()
            elif isinstance(value, (list, tuple)):
                bad = any(not v.float().isfinite().all() for v in value if isinstance(v, torch.Tensor))
            else:
                bad = not math.isfinite(value)
            if bad:
                raise ValueError(f"{name} holds NaN or inf; pass finite values")

    def _source_and_size(self, image: Any, inpaint: bool, height: int | None, width: int | None, strength: float,
                         fusion: str, mask_dilate: int, mask_blur: float):
        """The inpainting input (or None), the output size and the working size (the patch grid) of a call."""
        source = None
        if image is not None or inpaint:
            source = self._inpaint_source(image, inpaint, height, width, strength, fusion, mask_dilate, mask_blur)
            height, width = source.height, source.width
        height, width = self._size(height, width, inpainting=source is not None)
        work = (source.work_height, source.work_width) if source else (height, width)
        return source, height, width, work

    def _guidance(self, guidance_scale: float | None, batch: int, device: torch.device) -> torch.Tensor | None:
        """The embedded guidance ``(B,)`` for guidance-distilled transformers (FLUX.1-dev), else None."""
        if not self.transformer.config.guidance_embeds:
            return None
        if guidance_scale is None:
            raise ValueError("this transformer is guidance-distilled: pass guidance_scale")
        return torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(batch)

    def _step_callback(self, callback: Callable | None, tensor_inputs: Sequence[str], branches: dict[str, Branch],
                       ents: EntityBatch | None, prompt_embeds: torch.Tensor) -> Callable:
        """diffusers' ``callback_on_step_end`` as the loop's ``on_step_end``: a callback that returns new
        ``prompt_embeds`` rebuilds the positive branch's text sequence (and sees them on the next step)."""
        state = {"prompt_embeds": prompt_embeds}

        def on_step_end(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
            if callback is None:
                return latents
            state["latents"] = latents
            outputs = callback(self, i, t, {k: state[k] for k in tensor_inputs})
            if "prompt_embeds" in outputs:
                state["prompt_embeds"] = outputs.pop("prompt_embeds")
                embeds = state["prompt_embeds"]
                branches["cond"].context = ents.context(embeds) if ents is not None else embeds
            return outputs.pop("latents", latents)

        return on_step_end

    def _velocity(self, latents: torch.Tensor, timestep: torch.Tensor, branch: Branch, geometry,
                  guidance: torch.Tensor | None) -> torch.Tensor:
        """One transformer forward of one branch (its regional mask, if any, reaches every attention layer)."""
        return self.family.forward(self.transformer, latents, timestep, branch, geometry, guidance,
                                   self._eligen_attention_kwargs)

    def _run(
        self,
        latents: torch.Tensor,
        branches: dict[str, Branch],
        ents: EntityBatch | None,
        source: InpaintSource | None,
        work_size: tuple[int, int],
        num_inference_steps: int,
        sigmas: Sequence[float] | None,
        shift_sigmas: bool,
        guidance: torch.Tensor | None,
        true_cfg_scale: float,
        combine: Callable,
        strength: float,
        fusion: str,
        mask_dilate: int,
        mask_blur: float,
        on_step_end: Callable | None,
        entity_steps: int | None = None,
    ) -> torch.Tensor:
        """Schedule, inpainting set-up and the shared loop from prepared latents ``(B, n_img, C)``.

        ``entity_steps=k`` (approximate, opt-in): entities in the first ``k`` steps only (see
        :meth:`_entity_step_plan`); None runs them in every step (exact)."""
        if entity_steps is not None and (isinstance(entity_steps, bool) or not isinstance(entity_steps, int)
                                         or entity_steps < 0):
            raise ValueError(f"entity_steps is a number of steps >= 0 (None: every step), got {entity_steps!r}")
        device = latents.device
        work_height, work_width = work_size
        if ents is not None and ents.cover.shape[-1] != latents.shape[1]:
            raise ValueError(f"`latents` hold {latents.shape[1]} tokens but the entity masks were rasterised for "
                             f"{ents.cover.shape[-1]} ({work_width}x{work_height}); pass matching height/width")
        scheduler, timesteps, num_inference_steps = self._timesteps(
            num_inference_steps, sigmas, shift_sigmas, latents.shape[1], device
        )
        lat_h, lat_w = latent_grid_size(work_height, work_width, self.vae_scale_factor)
        geometry = self.family.geometry(self, latents.shape[0], lat_h, lat_w, device, latents.dtype)
        plan = None
        if source is not None:
            z_init = self.encode_image_latents(source.work_rgb, device, latents.dtype).expand(latents.shape[0], -1, -1)
            latent_union = soft_union(ents.latent_masks.cpu(), mask_dilate, mask_blur)
            channels = latents.shape[-1] // 4
            union = pack_mask(latent_union, channels).to(device=device, dtype=latents.dtype)
            t_start = len(timesteps) - max(1, int(num_inference_steps * strength))
            timesteps = timesteps[t_start:]
            scheduler.set_begin_index(t_start)
            sigma_start = scheduler.sigmas[t_start].to(device=device, dtype=latents.dtype)
            latents = sigma_start * latents + (1 - sigma_start) * z_init
            plan = Fusion(z_init, union, fusion, t_start)
        self._num_timesteps = len(timesteps)
        branch_at = self._entity_step_plan(branches, ents, entity_steps, len(timesteps))

        def velocity(z: torch.Tensor, t: torch.Tensor, name: str) -> torch.Tensor:
            self._current_timestep = t
            timestep = t.expand(z.shape[0]).to(z.dtype)
            with self.transformer.cache_context(name):
                return self._velocity(z, timestep / 1000, branches[name], geometry, guidance)

        with self.progress_bar(total=len(timesteps)) as progress_bar:
            latents = denoise(velocity, latents, scheduler, timesteps, true_cfg_scale if "uncond" in branches else None,
                              combine, plan, on_step_end, progress_bar, lambda: self.interrupt, branch_at)
        self._current_timestep = None
        return latents

    def _entity_step_plan(self, branches: dict[str, Branch], ents: EntityBatch | None, entity_steps: int | None,
                          steps: int) -> Callable[[int, str], str] | None:
        """``entity_steps=k``: each branch that carries entities runs them in the first ``k`` steps only, then
        without its entity segments and mask, i.e. the plain forward of its global prompt (the regional-prompting
        trade: late steps refine details, the layout is set early). Approximate; None when every step is exact.
        The entity-free branches are new names (``"cond-global"``), so a step cache keeps their state apart."""
        if entity_steps is None or ents is None or entity_steps >= steps:
            return None
        device, dtype = branches["cond"].context.device, self._text_dtype()
        for name in [n for n, b in branches.items() if b.attention_mask is not None]:
            branch = branches[name]
            total = branch.context.shape[1]
            # [e_1 | ... | e_N | global]: cond's segments are the entities'; uncond's (entities_on_negative) are
            # N copies of the negative prompt, as long as its global one
            entity_length = sum(ents.lengths) if name == "cond" else total - total // (len(ents.embeds) + 1)
            mask = branch.text_mask
            late = dataclasses.replace(  # keeps the branch's other conditioning (a global IP-Adapter image)
                branch, context=branch.context[:, entity_length:], text_mask=None if mask is None else
                mask[:, entity_length:], attention_mask=None,
                positions=self.family.positions([], total - entity_length, device, dtype))
            if hasattr(late, "entity_ip"):
                late.entity_ip = None  # an entity's image goes with its entity
            branches[f"{name}-global"] = late
        return lambda i, name: name if i < entity_steps or f"{name}-global" not in branches else f"{name}-global"

    def _output(self, latents: torch.Tensor, ents: EntityBatch | None, source: InpaintSource | None,
                work_size: tuple[int, int], output_type: str, paste_back: bool, mask_dilate: int, mask_blur: float):
        """Decode (and for inpainting restore the input's size and paste the untouched pixels back)."""
        if output_type == "latent":
            return latents
        image = self.family.decode(self, latents, *work_size)
        if source is None:
            return self.image_processor.postprocess(image, output_type=output_type)
        keep = None
        if paste_back:  # the union at pixel precision, grown and softened like the latent one
            f = self.vae_scale_factor
            keep = soft_union(ents.pixel_union(source.height, source.width)[None], mask_dilate * f,
                              mask_blur * f).numpy()
        return self._finish_inpaint(image, source, keep, output_type)


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` now (CUDA: the driver's count; CPU: the kernel's MemAvailable); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def resolution_shift(image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float,
                     max_shift: float) -> float:
    """diffusers' resolution-dependent shift ``mu``: linear in the image token count between the two anchors."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


__all__ = ["EliGenMixin", "EntityBatch", "InpaintSource"]
