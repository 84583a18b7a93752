"""FLUX.1 (diffusers ``FluxPipeline``): T5 segments padded to ``max_sequence_length``, text ids all zero, the
pooled CLIP vector of the global prompt, a shifted and scaled VAE latent, plain true CFG (docs/design.md 2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.utils.torch_utils import get_module_execution_device

from .base import Branch, ModelFamily


class FluxFamily(ModelFamily):
    name = "flux"
    pipeline_class = "FluxPipeline"
    transformer_class = "FluxTransformer2DModel"
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    lora_rank = 64  # the paper's rank (the reference's FLUX trainer uses 32)
    def encode_entities(self, pipe, prompts: Sequence[str], max_sequence_length: int,
                        device: torch.device) -> list[torch.Tensor]:
        """T5 exactly like the global prompt (same padding to ``max_sequence_length``)."""
        encoded = pipe._get_t5_prompt_embeds(prompt=list(prompts), max_sequence_length=max_sequence_length,
                                             device=device)
        return list(encoded.unsqueeze(1))

    def positions(self, entity_lengths: Sequence[int], global_length: int, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
        """``txt_ids (T, 3)``: all zero, as FLUX's text ids are."""
        return torch.zeros(sum(entity_lengths) + global_length, 3, device=device, dtype=dtype)

    def encode_image(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        z = vae_latents(pipe.vae, pixels)
        return pipe._pack_latents(z, z.shape[0], z.shape[1], z.shape[2], z.shape[3])

    def decode(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        latents = latents.to(get_module_execution_device(pipe.vae))
        return pipe.vae.decode(latents, return_dict=False)[0]

    def geometry(self, pipe, batch: int, height: int, width: int, device: torch.device, dtype: torch.dtype):
        """``img_ids (n_img, 3)`` for a latent grid ``height x width`` (latent pixels)."""
        return pipe._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)

    has_pooled = True

    def encode_texts(self, pipe, prompts: Sequence[str],
                     max_sequence_length: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        seq, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None,
                                            max_sequence_length=max_sequence_length)
        return list(zip(seq.cpu(), pooled.cpu(), strict=True))

    def training_schedule(self):
        from ..train.loss import reference_schedule

        return reference_schedule()

    def forward(self, transformer, latents: torch.Tensor, timestep: torch.Tensor, branch: Branch, geometry,
                guidance: torch.Tensor | None, attention_kwargs: dict | None = None) -> torch.Tensor:
        kwargs = dict(attention_kwargs or {})
        if branch.attention_mask is not None:
            kwargs["attention_mask"] = branch.attention_mask
        return transformer(
            hidden_states=latents, timestep=timestep, guidance=guidance, pooled_projections=branch.pooled,
            encoder_hidden_states=branch.context, txt_ids=branch.positions, img_ids=geometry,
            joint_attention_kwargs=kwargs, return_dict=False,
        )[0]


@torch.no_grad()
def vae_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels ``(B, 3, H, W)`` in [-1, 1] -> the VAE's latent mode, shifted and scaled for the transformer:
    ``(B, C, H/f, W/f)`` (the inverse of :meth:`FluxFamily.decode`'s normalisation)."""
    z = vae.encode(pixels).latent_dist.mode()
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


FLUX = FluxFamily()
