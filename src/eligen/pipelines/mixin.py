"""What an EliGen pipeline adds to its diffusers parent besides the call: loading (the shipped model, the model's
declared defaults, its LoRA), the regional attention processors, LoRAs, compilation, and the entity helpers the web
app and the tests use. The family-specific pieces come from ``self.family``."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from diffusers.utils.torch_utils import get_module_execution_device

from ..entities import LayoutError
from ..families import card_of_index
from ..families.base import ModelFamily
from ..lora import load_lora_adapter, set_adapter_scale
from ..masks import token_cover
from ..models import model_defaults, resolve_model
from ..regional.flex import FlexSlot
from ..regional.processors import install_regional_processors
from .entities import entity_latent_masks

FAR_FROM_NATIVE = 4.0  # warn when the pixel count differs from the native size's by more than this factor
logger = logging.getLogger("eligen.pipelines")


class EliGenMixin:
    """The family-independent half of an EliGen pipeline (mixed into a diffusers pipeline class)."""

    family: ClassVar[ModelFamily]
    eligen_defaults: dict[str, Any] = {}  # noqa: RUF012  (replaced per instance, never mutated)

    if TYPE_CHECKING:  # the host is a diffusers pipeline: its components and methods are its parent's
        def __getattr__(self, name: str) -> Any: ...

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, load_default_lora: bool = True, **kwargs):
        """diffusers' ``from_pretrained``; ``"eligen-tiny"`` is the model shipped in the package, and a checkpoint
        of another family is refused naming the pipeline class that runs it.

        A checkpoint that declares its own defaults (``eligen_defaults.json``: steps, true CFG, guidance, token
        length, native size, its EliGen LoRA) gets them for every call that leaves them out, as the CLI does, and
        its LoRA is loaded as the adapter ``"eligen"`` unless ``load_default_lora=False``.
        """
        path = resolve_model(pretrained_model_name_or_path)
        index = Path(str(path)) / "model_index.json"
        if index.is_file():  # the family's, or the variant's card whose pipeline class the checkpoint names
            serving = card_of_index(json.loads(index.read_text()), str(path))
            if not cls._serves(serving):
                raise ValueError(f"{path} is a {serving.title} checkpoint; load it with "
                                 f"eligen.{serving.pipeline_class_name}")
        pipe = super().from_pretrained(path, **kwargs)  # type: ignore[misc]
        pipe.eligen_defaults = model_defaults(path)
        if load_default_lora:
            for lora in pipe.eligen_defaults.get("lora", []):
                pipe.load_eligen_lora(lora)
        return pipe

    @classmethod
    def _serves(cls, serving) -> bool:
        """Whether this class loads checkpoints that the card ``serving`` serves (by default: its own card's)."""
        return serving.name == cls.family.name and serving.eligen_pipeline == cls.family.card.eligen_pipeline

    def register_modules(self, **kwargs):
        """diffusers' ``register_modules``, then eligen's attention processors on the transformer (without a mask
        they compute exactly what the stock ones do)."""
        super().register_modules(**kwargs)  # type: ignore[misc]
        if kwargs.get("transformer") is not None:
            install_regional_processors(kwargs["transformer"], self.family.processors)

    # -- sizes ------------------------------------------------------------------------------------------------

    def native_size(self) -> tuple[int, int]:
        """``(height, width)`` the model was trained at: its declared size, else diffusers' default size."""
        side = self.default_sample_size * self.vae_scale_factor
        width, height = self.eligen_defaults.get("native_size") or (side, side)
        return height, width

    @property
    def patch_grid(self) -> int:
        """Pixels per token side."""
        return self.vae_scale_factor * self.family.patch_size

    def _size(self, height: int | None, width: int | None, inpainting: bool = False) -> tuple[int, int]:
        """The output size: as given, else the model's native size. Warns when it is far from the native size, and
        when it is off the patch grid (diffusers renders the grid size below it; inpainting restores the size)."""
        native_height, native_width = self.native_size()
        height, width = height or native_height, width or native_width
        grid = self.patch_grid
        if not inpainting and (height % grid or width % grid):
            logger.warning(f"{width}x{height} is not a multiple of the model's {grid}-pixel patch grid: the image will "
                           f"be {width // grid * grid}x{height // grid * grid}")
        ratio = (height * width) / (native_height * native_width)
        if ratio > FAR_FROM_NATIVE or ratio < 1 / FAR_FROM_NATIVE:
            logger.warning(f"{width}x{height} is far from the {native_width}x{native_height} this model was trained "
                           "at: expect a poor image (and, if larger, a long wait); pass a size near "
                           f"{native_width}x{native_height}")
        return height, width

    # -- LoRA -------------------------------------------------------------------------------------------------

    def load_eligen_lora(self, path_or_hub_id: str | Path, adapter_name: str = "eligen", scale: float = 1.0,
                         filename: str | None = None) -> str:
        """Load an EliGen LoRA in any of its key formats as the named peft adapter ``adapter_name``.

        ``path_or_hub_id`` is a ``.safetensors`` file, a folder holding one, or a hub id (the released EliGen
        repos resolve to their LoRA file). The LoRA is checked against the transformer as a whole (family, names,
        shapes) before anything is applied, cast to the transformer's dtype, and activated at ``scale`` beside any
        adapters already active (stack and re-weight them with ``set_adapters``). Returns the detected format.
        """
        return load_lora_adapter(self, path_or_hub_id, adapter_name, scale, filename, self.family.name)

    def set_lora_scale(self, adapter_name: str, scale: float) -> None:
        """Re-weight one adapter of the transformer without touching the others."""
        set_adapter_scale(self.transformer, adapter_name, scale)

    # -- speed ------------------------------------------------------------------------------------------------

    def attention_mode(self, attention: str, device: torch.device) -> str:
        """``auto`` -> the exact mode that is fastest here: on CUDA ``segmented`` (unmasked flash-attention calls
        merged by log-sum-exp, compiled or not), elsewhere ``dense``; under context parallelism always ``dense`` (the
        only form diffusers parallelises, docs/design.md section 24)."""
        if attention != "auto":
            return attention
        if getattr(self.transformer, "_parallel_config", None) is not None:
            return "dense"
        return "segmented" if device.type == "cuda" else "dense"

    def compile_transformer(self, **compile_kwargs: Any) -> None:
        """``torch.compile`` the repeated transformer blocks once (regional compilation: every block of a kind
        shares one compiled graph)."""
        transformer = self.transformer
        if not getattr(transformer, "_eligen_compiled", False):
            # before compiling: a processor swap would recompile
            install_regional_processors(transformer, self.family.processors)
            transformer.compile_repeated_blocks(**{"fullgraph": True, **compile_kwargs})
            transformer._eligen_compiled = True

    def _flex_slot(self, branch: str) -> FlexSlot:
        """This pipeline's own FlexAttention slot for a CFG branch (never shared with another pipeline)."""
        slots = self.__dict__.setdefault("_eligen_flex_slots", {})
        return slots.setdefault(branch, FlexSlot())

    # -- entities and images ----------------------------------------------------------------------------------

    def entity_latent_masks(self, masks: Sequence[Any], height: int, width: int,
                            fields: Sequence[str] | None = None) -> torch.Tensor:
        """Binary masks of any resolution -> ``(N, h, w)`` bool on this pipeline's latent grid (NEAREST).

        Raises :class:`LayoutError` naming the entity whose mask covers no token.
        """
        return entity_latent_masks(masks, height, width, self.vae_scale_factor,
                                   self.family.patch_size, fields)

    def entity_token_covers(self, masks: Sequence[Any], height: int, width: int,
                            fields: Sequence[str] | None = None) -> torch.Tensor:
        """Binary masks of any resolution -> ``(1, N, n_img)`` bool covers on this pipeline's token grid."""
        latent = self.entity_latent_masks(masks, height, width, fields)
        return token_cover(latent, self.family.patch_size).unsqueeze(0)

    def encode_entity_prompts(self, prompts: Sequence[str], max_sequence_length: int = 512,
                              device: torch.device | None = None) -> list[torch.Tensor]:
        """Entity prompts -> ``(1, T_i, D)`` segments, each encoded as the family encodes the global prompt."""
        for i, text in enumerate(prompts):
            if not isinstance(text, str) or not text.strip():
                raise LayoutError("the entity prompt is missing or empty", entity=i, field="prompt")
        return self.family.encode_entities(self, prompts, max_sequence_length,
                                           device or self._execution_device)

    def encode_image_latents(self, rgb: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``uint8 (H, W, 3)`` -> packed, normalised VAE latents ``(1, n_img, C)`` (the latent mode, no sampling)."""
        vae = self.vae
        pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1
        pixels = pixels.to(device=get_module_execution_device(vae), dtype=vae.dtype)
        with torch.no_grad():
            packed = self.family.encode_image(self, pixels)
        return packed.to(device=device, dtype=dtype)

    def _text_dtype(self) -> torch.dtype:
        encoder = getattr(self, "text_encoder", None)
        return encoder.dtype if encoder is not None else self.transformer.dtype
