"""Qwen-Image (diffusers ``QwenImagePipeline``), the reference's Qwen-Image EliGen semantics (docs/design.md 11).

- every entity prompt is encoded alone with the global prompt's chat template (its leading tokens dropped, as
  diffusers does), unpadded: segments have their true lengths;
- the text RoPE positions restart for every segment at the global prompt's first position;
- the mask rule is FLUX's (:mod:`eligen.regional.rule`) over the variable-length segments;
- true CFG is diffusers' norm-rescaled combination by default, the reference's plain one on request;
- latents are normalised by the VAE's per-channel ``latents_mean`` / ``latents_std`` and have one frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.utils.torch_utils import get_module_execution_device

from .base import Branch, ModelFamily


class QwenImageFamily(ModelFamily):
    name = "qwen_image"
    pipeline_class = "QwenImagePipeline"
    transformer_class = "QwenImageTransformer2DModel"
    default_cfg = "rescaled"
    # the reference's lora_target_modules for Qwen-Image EliGen (rank 32, lr 1e-4)
    lora_targets = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                    "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1")

    def lora_train_names(self, transformer: torch.nn.Module) -> list[str]:
        return [name for name in self.block_linear_names(transformer)
                if any(name.endswith("." + target) for target in self.lora_targets)]

    def encode_entities(self, pipe, prompts: Sequence[str], max_sequence_length: int,
                        device: torch.device) -> list[torch.Tensor]:
        """One prompt at a time, so no segment carries padding."""
        return [pipe._get_qwen_prompt_embeds(text, device)[0][:, :max_sequence_length] for text in prompts]

    def encode_texts(self, pipe, prompts: Sequence[str],
                     max_sequence_length: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return [(pipe._get_qwen_prompt_embeds(text)[0][0, :max_sequence_length].cpu(), None) for text in prompts]

    def training_schedule(self):
        from ..train.loss import qwen_reference_schedule

        return qwen_reference_schedule()

    def positions(self, entity_lengths: Sequence[int], global_length: int, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
        """``(T,)`` long: ``0..T_i - 1`` for every segment (each starts where the global prompt starts); None without
        entities (the transformer's own positions are then the same)."""
        if not entity_lengths:
            return None
        return torch.cat([torch.arange(n, device=device) for n in (*entity_lengths, global_length)])

    def _statistics(self, vae, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's per-channel latent mean and ``1 / std``, shaped ``(1, C, 1, 1, 1)`` (as diffusers makes them)."""
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(device, dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(device, dtype)
        return mean, inv_std

    def encode_image(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        z = pipe.vae.encode(pixels[:, :, None]).latent_dist.mode()  # (B, C, 1, h, w): one frame
        mean, inv_std = self._statistics(pipe.vae, z.device, z.dtype)
        z = ((z - mean) * inv_std)[:, :, 0]
        return pipe._pack_latents(z, z.shape[0], z.shape[1], z.shape[2], z.shape[3])

    def decode(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(pipe.vae.dtype)
        mean, inv_std = self._statistics(pipe.vae, latents.device, latents.dtype)
        latents = (latents / inv_std + mean).to(get_module_execution_device(pipe.vae))
        return pipe.vae.decode(latents, return_dict=False)[0][:, :, 0]

    def geometry(self, pipe, batch: int, height: int, width: int, device: torch.device, dtype: torch.dtype):
        """``img_shapes``: ``[[(frames, token rows, token columns)]]`` per sample, for a latent grid ``height x width``
        (latent pixels)."""
        return [[(1, height // 2, width // 2)]] * batch

    def forward(self, transformer, latents: torch.Tensor, timestep: torch.Tensor, branch: Branch, geometry,
                guidance: torch.Tensor | None, attention_kwargs: dict | None = None) -> torch.Tensor:
        kwargs = dict(attention_kwargs or {})
        if branch.attention_mask is not None:
            kwargs["attention_mask"] = branch.attention_mask
        if branch.positions is not None:
            kwargs["text_positions"] = branch.positions
        return transformer(
            hidden_states=latents, timestep=timestep, guidance=guidance, encoder_hidden_states_mask=branch.text_mask,
            encoder_hidden_states=branch.context, img_shapes=geometry, attention_kwargs=kwargs, return_dict=False,
        )[0]


QWEN_IMAGE = QwenImageFamily()
