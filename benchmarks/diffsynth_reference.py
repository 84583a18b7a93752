"""The reference implementation (DiffSynth-Studio's ``diffsynth``) on the weights of a diffusers transformer.

Used by ``regional_attention.py`` and ``generate_e2e.py`` to time the reference in the same run, and by
``tests/test_diffsynth_reference.py`` to check our regional attention against it. Nothing here is needed
by eligen itself; it runs only where ``diffsynth`` is importable. Only four of its modules are used:
``diffsynth.models.flux_dit`` (the FLUX DiT and its EliGen mask builder), ``diffsynth.models.qwen_image_dit`` (the
Qwen-Image DiT and its mask builder), ``diffsynth.models.general_modules`` and
``diffsynth.utils.state_dict_converters.flux_dit`` (diffusers -> DiffSynth key names for FLUX; the Qwen-Image DiT
uses diffusers' names as they are).

The reference DiTs have their model's widths built in (FLUX.1: 3072 wide, 24 heads of 128, T5 4096, CLIP 768;
Qwen-Image: 3072 wide, 24 heads of 128, text 3584, RoPE axes 16/56/56); only the number of blocks can differ, so
the diffusers model must have those widths.
"""

from __future__ import annotations

import functools

import torch
from einops import rearrange

FLUX_WIDTHS = {"num_attention_heads": 24, "attention_head_dim": 128, "joint_attention_dim": 4096,
               "pooled_projection_dim": 768, "in_channels": 64, "patch_size": 1}


def available() -> bool:
    try:
        import diffsynth.models.flux_dit
        import diffsynth.utils.state_dict_converters.flux_dit  # noqa: F401
    except ImportError:
        return False
    return True


def qwen_available() -> bool:
    try:
        import diffsynth.models.qwen_image_dit  # noqa: F401
    except ImportError:
        return False
    return True


def width_mismatch(model: torch.nn.Module, widths: dict) -> dict:
    """The entries of ``widths`` that ``model.config`` does not have (a tuple matches a list of the same values)."""
    config = model.config
    return {k: config.get(k) for k, v in widths.items()
            if (tuple(config[k]) if isinstance(v, tuple) and k in config else config.get(k)) != v}


def has_flux_widths(model: torch.nn.Module) -> bool:
    return not width_mismatch(model, FLUX_WIDTHS)


def reference_dit(model: torch.nn.Module) -> torch.nn.Module:
    """DiffSynth's ``FluxDiT`` holding exactly the weights of ``model`` (a diffusers FluxTransformer2DModel).

    Raises ValueError when ``model`` does not have FLUX.1's widths (the reference hard-codes them).
    """
    from diffsynth.models.flux_dit import FluxDiT
    from diffsynth.utils.state_dict_converters.flux_dit import FluxDiTStateDictConverterFromDiffusers

    config = model.config
    wrong = width_mismatch(model, FLUX_WIDTHS)
    if wrong:
        raise ValueError(f"the reference DiT has FLUX.1's widths {FLUX_WIDTHS}; this transformer has {wrong}")
    param = next(model.parameters())
    with torch.device("meta"):
        dit = FluxDiT(disable_guidance_embedder=not config.guidance_embeds, num_blocks=config.num_layers)
        dit.single_blocks = dit.single_blocks[:config.num_single_layers]
    state = FluxDiTStateDictConverterFromDiffusers(model.state_dict())
    dit.load_state_dict(state, strict=True, assign=True)
    return dit.to(device=param.device, dtype=param.dtype).eval().requires_grad_(False)


def reference_forward(dit: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor, prompt_emb: torch.Tensor,
                      pooled_prompt_emb: torch.Tensor, guidance: torch.Tensor | None,
                      entity_prompt_emb: torch.Tensor | None = None,
                      entity_masks: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's EliGen forward (``model_fn_flux_image`` without its ControlNet/Kontext/TeaCache branches).

    latents ``(B, 16, h, w)`` latent image; timestep ``(B,)`` in the reference's units (diffusers' x 1000);
    prompt_emb ``(B, L, 4096)``; pooled ``(B, 768)``; guidance ``(B,)`` (the reference scales it by 1000);
    entity_prompt_emb ``(B, N, L, 4096)``; entity_masks ``(B, N, 1, h, w)`` on the latent grid.
    Returns the packed prediction ``(B, h/2 * w/2, 64)``, the layout of FluxPipeline._pack_latents.
    """
    text_ids = torch.zeros(latents.shape[0], prompt_emb.shape[1], 3, device=latents.device, dtype=latents.dtype)
    image_ids = dit.prepare_image_ids(latents)
    conditioning = dit.time_embedder(timestep, latents.dtype) + dit.pooled_text_embedder(pooled_prompt_emb)
    if dit.guidance_embedder is not None:
        conditioning = conditioning + dit.guidance_embedder(guidance * 1000, latents.dtype)
    hidden = dit.x_embedder(dit.patchify(latents))
    if entity_prompt_emb is not None and entity_masks is not None:
        prompt, rotary, mask = dit.process_entity_masks(hidden, prompt_emb, entity_prompt_emb, entity_masks,
                                                        text_ids, image_ids, latents.shape[1])
    else:
        prompt, mask = dit.context_embedder(prompt_emb), None
        rotary = dit.pos_embedder(torch.cat((text_ids, image_ids), dim=1))
    for block in dit.blocks:
        hidden, prompt = block(hidden, prompt, conditioning, rotary, mask)
    hidden = torch.cat([prompt, hidden], dim=1)
    for block in dit.single_blocks:
        hidden, prompt = block(hidden, prompt, conditioning, rotary, mask)
    hidden = hidden[:, prompt.shape[1]:]
    return dit.final_proj_out(dit.final_norm_out(hidden, conditioning))


# -- Qwen-Image --------------------------------------------------------------------------------------------------------

QWEN_WIDTHS = {"num_attention_heads": 24, "attention_head_dim": 128, "joint_attention_dim": 3584, "in_channels": 64,
               "patch_size": 2, "axes_dims_rope": (16, 56, 56)}


def has_qwen_widths(model: torch.nn.Module) -> bool:
    return not width_mismatch(model, QWEN_WIDTHS)


def _tanh_gelu(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(module.proj(x), approximate="tanh")


def reference_qwen_dit(model: torch.nn.Module, diffusers_activation: bool = True) -> torch.nn.Module:
    """DiffSynth's ``QwenImageDiT`` on exactly the weights of ``model`` (a diffusers QwenImageTransformer2DModel;
    the tensors are shared, not copied: both use the same key names).

    ``diffusers_activation``: the reference's MLPs compute ``x * sigmoid(1.702 x)`` where diffusers computes
    tanh-GELU (docs/design.md section 11); True gives the reference diffusers' activation, so a comparison measures
    the two implementations rather than the activation (the cost of either is the same elementwise pass).
    Raises ValueError when ``model`` does not have Qwen-Image's widths (the reference hard-codes them).
    """
    from diffsynth.models.qwen_image_dit import ApproximateGELU, QwenEmbedRope, QwenImageDiT

    config = model.config
    wrong = width_mismatch(model, QWEN_WIDTHS)
    if wrong:
        raise ValueError(f"the reference DiT has Qwen-Image's widths {QWEN_WIDTHS}; this transformer has {wrong}")
    param = next(model.parameters())
    with torch.device("meta"):
        dit = QwenImageDiT(num_layers=config.num_layers)
    dit.pos_embed = QwenEmbedRope(theta=10000, axes_dim=[16, 56, 56], scale_rope=True)  # its tables are not buffers
    dit.load_state_dict(model.state_dict(), strict=True, assign=True)
    if diffusers_activation:
        for module in dit.modules():
            if isinstance(module, ApproximateGELU):
                module.forward = functools.partial(_tanh_gelu, module)
    return dit.to(device=param.device, dtype=param.dtype).eval().requires_grad_(False)


def reference_qwen_forward(dit: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                           prompt_emb: torch.Tensor, entity_prompt_emb: list[torch.Tensor] | None = None,
                           entity_masks: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's Qwen-Image EliGen forward (``model_fn_qwen_image`` without its edit, layer, ControlNet and
    KV-cache branches), for unpadded prompts.

    latents ``(B, 16, h, w)`` latent image; timestep ``(B,)`` in the reference's units (sigma x 1000);
    prompt_emb ``(B, L, 3584)``; entity_prompt_emb: N tensors ``(B, L_i, 3584)``; entity_masks
    ``(B, N, 1, h, w)`` on the latent grid. Returns the packed prediction ``(B, h/2 * w/2, 64)``, the layout of
    QwenImagePipeline._pack_latents.
    """
    def ones(embeds: torch.Tensor) -> torch.Tensor:
        return torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)

    height, width = latents.shape[2] * 8, latents.shape[3] * 8  # the reference counts in pixels (VAE factor 8)
    img_shapes = [(1, latents.shape[2] // 2, latents.shape[3] // 2)]
    image = dit.img_in(rearrange(latents, "B C (H P) (W Q) -> B (H W) (C P Q)", P=2, Q=2))
    conditioning = dit.time_text_embed(timestep / 1000, image.dtype)
    if entity_prompt_emb:
        text, rotary, mask = dit.process_entity_masks(
            latents, prompt_emb, ones(prompt_emb), list(entity_prompt_emb), [ones(e) for e in entity_prompt_emb],
            entity_masks, height, width, image, img_shapes)
    else:
        text, mask = dit.txt_in(dit.txt_norm(prompt_emb)), None
        rotary = dit.pos_embed(img_shapes, [prompt_emb.shape[1]], device=latents.device)
    for block in dit.transformer_blocks:
        text, image = block(image=image, text=text, temb=conditioning, image_rotary_emb=rotary, attention_mask=mask)
    return dit.proj_out(dit.norm_out(image, conditioning))
