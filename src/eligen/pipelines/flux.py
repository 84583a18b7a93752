"""EliGenPipeline: diffusers' FluxPipeline with entity prompts and regional attention (docs/design.md section 2).

The text sequence is ``[e_1 | ... | e_N | global]`` (each entity T5-encoded exactly like the global prompt),
all text RoPE ids are zero, the pooled CLIP vector comes from the global prompt alone, and the regional mask, built
once per call and CFG branch, reaches every attention layer through ``joint_attention_kwargs["attention_mask"]``.
With no entities every step is stock FluxPipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

from ..entities import Entity, LayoutError, load_reference_image
from ..families.flux import FLUX, FluxBranch
from ..regional.processors import install_regional_processors
from .common import TRIM_MARGIN, EliGenMixin

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


class EliGenPipeline(EliGenMixin, FluxPipeline):
    """FLUX with EliGen entity control. Loads any diffusers FLUX directory or hub id via ``from_pretrained``, and
    ``"eligen-tiny"``: the small model trained on the shapes world that ships inside the package."""

    family = FLUX

    def entity_token_counts(self, prompts: Sequence[str], max_sequence_length: int = 512) -> list[int]:
        """Real (non-padding) T5 tokens of each prompt, end-of-sequence token included."""
        ids = self.tokenizer_2(list(prompts), max_length=max_sequence_length, truncation=True).input_ids
        return [len(i) for i in ids]

    def _trim_segments(self, embeds: list[torch.Tensor], prompts: Sequence[str],
                       max_sequence_length: int) -> list[torch.Tensor]:
        """Same embeddings, minus most of the padding after each prompt."""
        counts = self.entity_token_counts(prompts, max_sequence_length)
        return [e[:, : min(n + TRIM_MARGIN, e.shape[1])] for e, n in zip(embeds, counts, strict=True)]

    # -- IP-Adapter ---------------------------------------------------------------------------------------------

    def load_eligen_ip_adapter(self, path_or_hub_id: str | Path, scale: float = 1.0,
                               image_encoder: str | Path | None = None) -> None:
        """diffusers' ``load_ip_adapter`` from one name, as ``--ip-adapter`` takes it: a ``.safetensors`` file, a
        folder holding one, or a hub id (its ``ip_adapter.safetensors``). The CLIP image encoder is
        ``image_encoder``, else an ``image_encoder/`` folder beside the file, else :data:`DEFAULT_IMAGE_ENCODER`;
        it runs in the transformer's dtype. Then ``set_ip_adapter_scale(scale)``."""
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
        true_cfg_scale: float | None = None,
        cfg_mode: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: Sequence[float] | None = None,
        shift_sigmas: bool = True,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_ip_adapter_image: Any = None,
        negative_ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int | None = None,
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
        entity_steps: int | None = None,
    ) -> FluxPipelineOutput | tuple:
        r"""Generate images with entity control.

        Args beyond diffusers' FluxPipeline:
            entities: :class:`eligen.Entity` list (a prompt and one of mask / box / polygon each).
            entity_prompts / entity_prompt_embeds: the entity texts, or their T5 embeddings ``(T, D)``,
                ``(1, T, D)`` or ``(B, T, D)`` each (the low-level path), with ``entity_masks``.
            entity_masks: one mask per entity (PIL image, numpy array or tensor, any resolution).
            entities_on_negative: the reference's "enable on negative": run the negative CFG branch with the
                negative prompt copied into every entity slot under the same masks. Default: no entities there.
            cfg_mode: "plain" (default: ``neg + s (pos - neg)``) or "rescaled" (the combination rescaled to the
                positive prediction's norm, as diffusers' Qwen-Image does).
            shift_sigmas: with False, ``sigmas`` are used verbatim (e.g. ``eligen.reference_sigmas(50)``);
                with True (default) they are shifted by the scheduler exactly as in FluxPipeline.

        IP-Adapter (after ``pipe.load_ip_adapter(...)``; docs/design.md section 14): ``ip_adapter_image`` /
        ``ip_adapter_image_embeds`` and their negatives as in FluxPipeline (one image per loaded adapter; with true
        CFG and no negative image the negative branch gets a black one). The regional mask governs the joint
        attention; the image-prompt branch reaches every image token. An entity's own ``image`` (at its
        ``image_scale``) reaches only the image tokens it covers, in the positive branch; both can be used at once.

        Inpainting fusion (``image=..., inpaint=True``): the entities' masks mark what to repaint, everything
        else stays ``image``; all entities are rendered in one pass (docs/design.md section 5).
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
            entity_steps: entities in the first ``entity_steps`` steps only, then the plain global-prompt forward
                (approximate, faster; None: every step). See :mod:`eligen.speedups`.
        """
        # 0. Validate; what the call leaves out comes from the model's declared defaults, else diffusers'.
        self._check_speed_options(attention, entity_tokens, output_type)
        negative_prompt = self._declared_negative(negative_prompt, negative_prompt_embeds, true_cfg_scale)
        num_inference_steps, true_cfg_scale, guidance_scale, max_sequence_length = self._call_defaults(
            dict(num_inference_steps=num_inference_steps, true_cfg_scale=true_cfg_scale,
                 guidance_scale=guidance_scale, max_sequence_length=max_sequence_length),
            dict(num_inference_steps=28, true_cfg_scale=1.0, guidance_scale=3.5, max_sequence_length=512),
        ).values()
        combine = self.family.combine(cfg_mode or self.family.default_cfg)
        self._check_finite(true_cfg_scale=true_cfg_scale, guidance_scale=guidance_scale, latents=latents,
                           prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                           entity_prompt_embeds=entity_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                           negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
        source, height, width, work = self._source_and_size(image, inpaint, height, width, strength, fusion,
                                                            mask_dilate, mask_blur)
        self.check_inputs(
            prompt, prompt_2, *work,
            negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=list(callback_on_step_end_tensor_inputs),
            max_sequence_length=max_sequence_length,
        )
        self._check_image_prompts(entities, ip_adapter_image, ip_adapter_image_embeds, negative_ip_adapter_image,
                                  negative_ip_adapter_image_embeds)
        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = self._eligen_attention_kwargs = dict(joint_attention_kwargs or {})
        self._current_timestep = None
        self._interrupt = False
        batch_size = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else prompt_embeds.shape[0]
        batch = batch_size * num_images_per_prompt
        device = self._execution_device
        given_entities = bool(entities) or bool(entity_masks)
        self._check_memory(batch, work, given_entities and self.attention_mode(attention, device) == "dense", device)
        lora_scale = self._joint_attention_kwargs.get("scale", None)
        has_neg_prompt = negative_prompt is not None or (
            negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None
        )
        do_true_cfg = true_cfg_scale > 1 and has_neg_prompt

        # 1. Text: global prompt (T5 sequence + pooled CLIP), entity segments, negative prompt; the CFG branches.
        prompt_embeds, pooled_prompt_embeds, _ = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, device=device, num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length, lora_scale=lora_scale,
        )
        ents = self._resolve_entities(
            entities, entity_prompts, entity_prompt_embeds, entity_masks, height, width, batch,
            max_sequence_length, device, prompt_embeds.dtype, grid=work, entity_tokens=entity_tokens,
        )
        if compile:
            self.compile_transformer()
        mode = self.attention_mode(attention, device)
        if source is not None and ents is None:
            raise ValueError("inpainting needs at least one entity: the entity masks mark what to repaint")
        negative = None
        if do_true_cfg:
            negative_prompt_embeds, negative_pooled_prompt_embeds, _ = self.encode_prompt(
                prompt=negative_prompt, prompt_2=negative_prompt_2, prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=negative_pooled_prompt_embeds, device=device,
                num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
                lora_scale=lora_scale,
            )
            negative = FluxBranch(negative_prompt_embeds, negative_pooled_prompt_embeds)
        branches = self._branches(ents, FluxBranch(prompt_embeds, pooled_prompt_embeds), negative, mode,
                                  entities_on_negative)
        self._image_prompt_branches(branches, entities, ents, ip_adapter_image, ip_adapter_image_embeds,
                                    negative_ip_adapter_image, negative_ip_adapter_image_embeds, batch, work, device)

        # 2. Latents and embedded guidance.
        latents, _ = self.prepare_latents(
            batch, self.transformer.config.in_channels // 4, *work, prompt_embeds.dtype, device, generator, latents
        )
        guidance = self._guidance(guidance_scale, latents.shape[0], device)

        on_step_end = self._step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs, branches, ents,
                                          prompt_embeds)

        # 3. The shared loop: schedule, inpainting fusion, Euler steps on the true-CFG velocity.
        latents = self._run(latents, branches, ents, source, work, num_inference_steps, sigmas, shift_sigmas,
                            guidance, true_cfg_scale, combine, strength, fusion, mask_dilate,
                            mask_blur, on_step_end, entity_steps)

        # 4. Decode.
        image = self._output(latents, ents, source, work, output_type, paste_back, mask_dilate, mask_blur)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return FluxPipelineOutput(images=image)
