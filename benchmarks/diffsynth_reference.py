"""The reference implementation (DiffSynth-Studio's ``diffsynth``) on the weights of a diffusers transformer.

Used by ``regional_attention.py`` to time the reference in the same run, and by
``tests/test_diffsynth_reference.py`` to check our regional attention against it. Nothing here is needed
by eligen itself; it runs only where ``diffsynth`` is importable. Only three of its modules are used:
``diffsynth.models.flux_dit`` (the DiT and its EliGen mask builder), ``diffsynth.models.general_modules`` and
``diffsynth.utils.state_dict_converters.flux_dit`` (diffusers -> DiffSynth key names).

The reference DiT has FLUX.1's widths built in (3072 wide, 24 heads of 128, T5 4096, CLIP 768); only the
number of blocks can differ, so the diffusers model must have those widths.
"""

from __future__ import annotations

import torch

FLUX_WIDTHS = {"num_attention_heads": 24, "attention_head_dim": 128, "joint_attention_dim": 4096,
               "pooled_projection_dim": 768, "in_channels": 64, "patch_size": 1}


def available() -> bool:
    try:
        import diffsynth.models.flux_dit
        import diffsynth.utils.state_dict_converters.flux_dit  # noqa: F401
    except ImportError:
        return False
    return True


def has_flux_widths(model: torch.nn.Module) -> bool:
    return all(model.config[k] == v for k, v in FLUX_WIDTHS.items())


def reference_dit(model: torch.nn.Module) -> torch.nn.Module:
    """DiffSynth's ``FluxDiT`` holding exactly the weights of ``model`` (a diffusers FluxTransformer2DModel).

    Raises ValueError when ``model`` does not have FLUX.1's widths (the reference hard-codes them).
    """
    from diffsynth.models.flux_dit import FluxDiT
    from diffsynth.utils.state_dict_converters.flux_dit import FluxDiTStateDictConverterFromDiffusers

    config = model.config
    wrong = {k: config[k] for k, v in FLUX_WIDTHS.items() if config[k] != v}
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
