"""FLUX.1's IP-Adapter with entities (docs/design.md section 14): diffusers' adapter, with the regional mask on the
joint attention and a reference image per entity reaching only the image tokens the entity covers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...choices import SCALE_LIMIT
from ...entities import LayoutError, load_reference_image
from ...regional.processors import install_regional_processors

DEFAULT_IMAGE_ENCODER = "openai/clip-vit-large-patch14"  # the CLIP encoder of XLabs' FLUX IP-Adapter
IP_ADAPTER_FILE = "ip_adapter.safetensors"  # the file name in XLabs' and most FLUX IP-Adapter repos


def ip_adapter_location(path_or_hub_id: str | Path) -> tuple[str, str]:
    """``(folder or hub id, weight file name)`` for ``load_ip_adapter``: a file is split, a folder's one
    ``.safetensors`` file (or its ``ip_adapter.safetensors``) is found, anything else is a hub id."""
    path = Path(path_or_hub_id)
    if path.is_file():
        return str(path.parent), path.name
    if path.is_dir():
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if IP_ADAPTER_FILE in files or len(files) == 1:
            return str(path), IP_ADAPTER_FILE if IP_ADAPTER_FILE in files else files[0]
        raise ValueError(f"--ip-adapter {path}: expected one .safetensors file (or {IP_ADAPTER_FILE}) in the "
                         f"folder, found {files or 'none'}; pass the file itself")
    if str(path_or_hub_id).count("/") != 1 or str(path_or_hub_id).endswith((".safetensors", ".bin")):
        raise ValueError(f"--ip-adapter {path_or_hub_id}: no such file or folder (a hub id is owner/name)")
    return str(path_or_hub_id), IP_ADAPTER_FILE


class EntityIPAdapterMixin:
    """The IP-Adapter part of :class:`~.pipeline.EliGenPipeline` (mixed in before diffusers' ``FluxPipeline``)."""

    if TYPE_CHECKING:  # the host is a diffusers pipeline: its components and methods are its parent's
        def __getattr__(self, name: str) -> Any: ...

    def load_eligen_ip_adapter(self, path_or_hub_id: str | Path, scale: float = 1.0,
                               image_encoder: str | Path | None = None) -> None:
        """diffusers' ``load_ip_adapter`` from one name, as ``--ip-adapter`` takes it: a ``.safetensors`` file, a
        folder holding one, or a hub id (its ``ip_adapter.safetensors``). The CLIP image encoder is
        ``image_encoder``, else an ``image_encoder/`` folder beside the file, else :data:`DEFAULT_IMAGE_ENCODER`;
        it runs in the transformer's dtype. Then ``set_ip_adapter_scale(scale)``."""
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= SCALE_LIMIT:
            raise ValueError(f"the IP-Adapter scale must be a number in 0..{SCALE_LIMIT}, got {scale!r}")
        folder, weight_name = ip_adapter_location(path_or_hub_id)
        if image_encoder is None:
            beside = Path(folder) / "image_encoder"
            image_encoder = str(beside) if beside.is_dir() else DEFAULT_IMAGE_ENCODER
        self.load_ip_adapter(folder, weight_name=weight_name, image_encoder_pretrained_model_name_or_path=str(
            image_encoder), image_encoder_dtype=self.transformer.dtype)
        self.set_ip_adapter_scale(scale)

    def _ip_adapter_count(self) -> int:
        """How many IP-Adapters are loaded (0: none)."""
        projection = getattr(self.transformer, "encoder_hid_proj", None)
        return projection.num_ip_adapters if projection is not None else 0

    def _check_image_prompts(self, entities, image, embeds, negative_image, negative_embeds) -> None:
        """Refuse, naming the argument, image prompts that cannot run: no adapter loaded, no image encoder for an
        image, an unreadable image, or a count other than one per loaded adapter."""
        count = self._ip_adapter_count()
        load = ("load one first: pipe.load_ip_adapter(path_or_id, weight_name=..., "
                "image_encoder_pretrained_model_name_or_path=...)")
        for i, entity in enumerate(entities or []):
            if getattr(entity, "image", None) is not None and count == 0:
                raise LayoutError(f"a reference image needs an IP-Adapter; {load}", entity=i, field="image")
        given = {"ip_adapter_image": image, "ip_adapter_image_embeds": embeds,
                 "negative_ip_adapter_image": negative_image, "negative_ip_adapter_image_embeds": negative_embeds}
        for name, value in given.items():
            if value is None:
                continue
            if count == 0:
                raise ValueError(f"{name} needs an IP-Adapter; {load}")
            values = value if isinstance(value, list) else [value]
            if len(values) != count:
                raise ValueError(f"{name} holds {len(values)} entries for {count} loaded IP-Adapter(s); give one per "
                                 "adapter")
            if name.endswith("_image"):
                for item in values:
                    load_reference_image(item, field=name)
        uses_images = image is not None or negative_image is not None or any(
            getattr(e, "image", None) is not None for e in entities or [])
        if uses_images and getattr(self, "image_encoder", None) is None:
            raise ValueError("reference images need the IP-Adapter's image encoder, but none is loaded: pass "
                             "image_encoder_pretrained_model_name_or_path to load_ip_adapter, or give "
                             "ip_adapter_image_embeds")

    def _reference_images(self, value: Any, field: str) -> list[Any]:
        """One image per loaded adapter; paths and data URIs opened (diffusers' feature extractor takes images)."""
        values = value if isinstance(value, list) else [value]
        return [load_reference_image(v, field=field) if isinstance(v, str) or hasattr(v, "__fspath__") else v
                for v in values]

    def _image_prompt_branches(self, branches, entities, ents, image, embeds, negative_image, negative_embeds,
                               batch: int, work: tuple[int, int], device: torch.device) -> None:
        """Set each CFG branch's image prompts, with diffusers' defaults: a missing side of the pair gets a black
        image (``(width, height, 3)``, as FluxPipeline makes it), the negative is encoded only when true CFG runs,
        and the entities' own images go to the positive branch. With an adapter loaded but no image the branch
        adds nothing (diffusers' processor would fail), so the regional IP processors are installed then too."""
        if self._ip_adapter_count():
            install_regional_processors(self.transformer, self.family.processors)
        has_positive = image is not None or embeds is not None
        has_negative = negative_image is not None or negative_embeds is not None
        black = [np.zeros((work[1], work[0], 3), dtype=np.uint8)] * self._ip_adapter_count()
        if has_positive or has_negative:
            image = black if not has_positive else (None if embeds is not None else
                                                   self._reference_images(image, "ip_adapter_image"))
            branches["cond"].ip_adapter_image_embeds = self.prepare_ip_adapter_image_embeds(image, embeds, device,
                                                                                            batch)
            if "uncond" in branches:
                negative_image = black if not has_negative else (
                    None if negative_embeds is not None
                    else self._reference_images(negative_image, "negative_ip_adapter_image"))
                branches["uncond"].ip_adapter_image_embeds = self.prepare_ip_adapter_image_embeds(
                    negative_image, negative_embeds, device, batch)
        branches["cond"].entity_ip = self._entity_image_prompts(entities, ents, batch, device)

    def _entity_image_prompts(self, entities, ents, batch: int, device: torch.device):
        """``(states, weights)`` for the entities with an image and a non-zero ``image_scale``: the projected image
        tokens (one ``(B, 1, T_ip, C)`` per adapter) and ``image_scale * cover`` as ``(1, n_img, 1)``; or None."""
        chosen = [(i, e) for i, e in enumerate(entities or [])
                  if getattr(e, "image", None) is not None and e.image_scale != 0]
        if not chosen:
            return None
        states, weights = [], []
        dtype = self.transformer.dtype
        for i, entity in chosen:
            picture = load_reference_image(entity.image, i)
            embeds = self.prepare_ip_adapter_image_embeds([picture] * self._ip_adapter_count(), None, device, batch)
            states.append(self.transformer.encoder_hid_proj(embeds))
            weights.append((entity.image_scale * ents.cover[:, i].to(device=device, dtype=dtype)).unsqueeze(-1))
        return states, weights

