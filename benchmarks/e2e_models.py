"""What ``generate_e2e.py`` does differently per model family: components of a size, the call's inputs, and the
reference's own true-CFG Euler loop (FLUX.1 through ``diffsynth.models.flux_dit``, Qwen-Image through
``diffsynth.models.qwen_image_dit``, see ``diffsynth_reference.py``).

Every size has random weights; the text encoders are the tiny pipeline's and never run (the prompt embeddings are
random and given to ``__call__``). The ``*-1block`` sizes have the released model's widths and one block of each
kind, so the reference path (which hard-codes the widths) can run on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import diffsynth_reference
import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    FluxPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope
from regional_attention import build_transformer, random_covers, random_model

from eligen import EliGenPipeline, EliGenQwenImagePipeline
from eligen.families.flux.testing import build_components as build_tiny_flux_components
from eligen.families.qwen_image.testing import build_components as build_tiny_qwen_image_components
from eligen.schedules import flow_timesteps


@dataclass(frozen=True)
class Size:
    """``family``: "flux" or "qwen_image"; ``transformer``: a size of ``regional_attention.SIZES`` (FLUX) or a
    ``QwenImageTransformer2DModel`` config (None: the tiny random pipeline's); ``full_vae``: the released VAE's
    shapes (random weights), else the tiny pipeline's; text tokens of the global (and negative) prompt and of
    each entity prompt."""

    family: str
    transformer: str | dict | None
    side: int
    full_vae: bool
    global_tokens: int
    entity_tokens: int


SIZES = {
    "tiny": Size("flux", "tiny", 64, False, 32, 32),
    "flux-dev": Size("flux", "flux-dev", 1024, True, 512, 512),  # T5 pads every segment to 512
    "flux-1block": Size("flux", "flux-1block", 64, True, 16, 16),
    "qwen-tiny": Size("qwen_image", None, 64, False, 24, 12),
    # Qwen-Image prompts are unpadded: a long global prompt and short entity phrases, as in the released examples
    "qwen-image": Size("qwen_image", {}, 1024, True, 128, 32),
    "qwen-1block": Size("qwen_image", {"num_layers": 1}, 64, True, 16, 8),
}


def flux_vae(device: torch.device, dtype: torch.dtype) -> AutoencoderKL:
    """A VAE of FLUX.1's shapes (16 latent channels, scale factor 8), random weights."""
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.1159, scaling_factor=0.3611)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def qwen_vae(device: torch.device, dtype: torch.dtype) -> AutoencoderKLQwenImage:
    """A VAE of Qwen-Image's shapes (diffusers' default config: 16 latent channels, scale factor 8, Qwen-Image's
    latent statistics), random weights."""
    torch.manual_seed(0)
    return AutoencoderKLQwenImage().to(device=device, dtype=dtype).eval().requires_grad_(False)


def qwen_transformer(config: dict, device: torch.device, dtype: torch.dtype) -> QwenImageTransformer2DModel:
    model = random_model(QwenImageTransformer2DModel, config, device, dtype)
    # the RoPE tables are plain attributes, not buffers: rebuilt off the meta device
    model.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(model.config.axes_dims_rope), scale_rope=True)
    return model


def build_components(size: Size, device: torch.device, dtype: torch.dtype) -> dict:
    """The family's pipeline components at ``size``: its random transformer (and the released VAE's shapes where
    ``size.full_vae``) beside the tiny text encoders."""
    if size.family == "flux":
        components = build_tiny_flux_components(0)
        components["transformer"] = build_transformer(size.transformer, device, dtype)
        if size.full_vae:
            components["vae"] = flux_vae(device, dtype)
    else:
        components = build_tiny_qwen_image_components(0)
        if size.transformer is not None:
            components["transformer"] = qwen_transformer(size.transformer, device, dtype)
        if size.full_vae:
            components["vae"] = qwen_vae(device, dtype)
    for name, component in components.items():
        if isinstance(component, torch.nn.Module):
            components[name] = component.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return components


def pipelines(size: Size, components: dict):
    """(the EliGen pipeline, diffusers' stock pipeline) on the same components."""
    if size.family == "flux":
        return EliGenPipeline(**components), FluxPipeline(**components)
    return EliGenQwenImagePipeline(**components), QwenImagePipeline(**components)


def make_inputs(pipe, size: Size, entities: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Random text embeddings, entity masks (overlapping rectangles, about a third of the image each) and the
    initial latents, identical for every row with the same entity count. Keys are ``__call__`` arguments; the
    entity ones (``entity_prompt_embeds``, ``entity_masks``) are left out for the stock pipeline."""
    config = pipe.transformer.config
    g = torch.Generator().manual_seed(1234)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    grid = size.side // (pipe.vae_scale_factor * 2)
    covers = random_covers(entities, grid * grid, grid, torch.device("cpu"))[0].view(entities, grid, grid)
    pixel = size.side // grid
    masks = [c.repeat_interleave(pixel, 0).repeat_interleave(pixel, 1).numpy() for c in covers]
    width = config.joint_attention_dim
    inputs = dict(
        prompt_embeds=randn(1, size.global_tokens, width),
        negative_prompt_embeds=randn(1, size.global_tokens, width),
        entity_prompt_embeds=[randn(1, size.entity_tokens, width) for _ in range(entities)],
        entity_masks=masks,
        latents=randn(1, grid * grid, config.in_channels),
        height=size.side, width=size.side,
    )
    if size.family == "flux":
        inputs |= dict(pooled_prompt_embeds=randn(1, config.pooled_projection_dim),
                       negative_pooled_prompt_embeds=randn(1, config.pooled_projection_dim))
    else:
        ones = torch.ones(1, size.global_tokens, dtype=torch.long, device=device)
        inputs |= dict(prompt_embeds_mask=ones, negative_prompt_embeds_mask=ones)
    return inputs


def guidance_options(size: Size, guidance: float) -> dict:
    """FLUX.1-dev is guidance-distilled (``guidance_scale``); Qwen-Image is not (diffusers warns if it is given)."""
    return {"guidance_scale": guidance} if size.family == "flux" else {}


# -- the reference ---------------------------------------------------------------------------------------------------

def reference_problem(size: Size, transformer: torch.nn.Module) -> str | None:
    """Why the reference cannot run at this size (None: it can)."""
    flux = size.family == "flux"
    if not (diffsynth_reference.available() if flux else diffsynth_reference.qwen_available()):
        return "diffsynth is not importable (bash benchmarks/diffsynth_min.sh; PYTHONPATH=.diffsynth-min)"
    fits = diffsynth_reference.has_flux_widths if flux else diffsynth_reference.has_qwen_widths
    if not fits(transformer):
        return (f"needs {'FLUX.1' if flux else 'Qwen-Image'}'s widths (--size "
                f"{'flux-dev or flux-1block' if flux else 'qwen-image or qwen-1block'})")
    return None


def reference_dit(size: Size, transformer: torch.nn.Module) -> torch.nn.Module:
    """The reference's DiT on the transformer's weights (FLUX: a converted copy; Qwen-Image: shared tensors, with
    diffusers' MLP activation so the error column compares implementations, docs/design.md section 11)."""
    if size.family == "flux":
        return diffsynth_reference.reference_dit(transformer)
    return diffsynth_reference.reference_qwen_dit(transformer)


def reference_image(size: Size, pipe, dit, inputs: dict, steps: int, true_cfg: float, guidance: float) -> np.ndarray:
    """The reference's own loop: its EliGen forward for the positive pass, its plain forward for the negative one,
    the CFG combination of the exact row (FLUX: ``neg + s (pos - neg)``, the reference's; Qwen-Image: diffusers'
    rescaled one, the pipeline's default, which costs the same as the reference's plain one), Euler steps on the
    pipeline's schedule; decoded by the pipeline's VAE."""
    flux = size.family == "flux"
    height, width = inputs["height"], inputs["width"]
    latents = inputs["latents"].clone()
    scheduler, timesteps, _ = flow_timesteps(pipe.scheduler, steps, None, True, latents.shape[1], latents.device)
    sigmas = scheduler.sigmas.to(latents.device)
    entity_prompts = inputs["entity_prompt_embeds"]
    masks = None
    if entity_prompts:
        grid = height // pipe.vae_scale_factor
        masks = torch.stack([torch.from_numpy(m) for m in inputs["entity_masks"]]).to(latents.device, latents.dtype)
        masks = torch.nn.functional.interpolate(masks[None], size=(grid, grid), mode="nearest")[0]
        masks = masks.view(1, len(entity_prompts), 1, grid, grid)
    combine = pipe.family.combine(pipe.family.default_cfg)
    guidance_t = torch.full((1,), guidance, device=latents.device, dtype=torch.float32)

    def velocity(unpacked, timestep, positive: bool) -> torch.Tensor:
        prefix = "" if positive else "negative_"
        ents = (entity_prompts or None) if positive else None
        if flux:
            stacked = torch.stack(ents, dim=1) if ents else None
            return diffsynth_reference.reference_forward(
                dit, unpacked, timestep, inputs[f"{prefix}prompt_embeds"], inputs[f"{prefix}pooled_prompt_embeds"],
                guidance_t, stacked, masks if ents else None)
        return diffsynth_reference.reference_qwen_forward(dit, unpacked, timestep, inputs[f"{prefix}prompt_embeds"],
                                                          ents, masks if ents else None)

    for i, t in enumerate(timesteps):
        unpacked = type(pipe)._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        if not flux:
            unpacked = unpacked[:, :, 0]  # Qwen-Image latents carry one frame
        timestep = t.expand(1).to(latents.dtype)
        v = combine(velocity(unpacked, timestep, True), velocity(unpacked, timestep, False), true_cfg)
        latents = latents + (sigmas[i + 1] - sigmas[i]) * v
    image = pipe.family.decode(pipe, latents, height, width)
    return pipe.image_processor.postprocess(image, output_type="np")[0]
