"""FLUX.1 (diffusers ``FluxPipeline``): T5 segments padded to ``max_sequence_length``, text ids all zero, the
pooled CLIP vector of the global prompt, a shifted and scaled VAE latent, plain true CFG, the regional mask in all
double- and single-stream blocks through ``joint_attention_kwargs`` (docs/design.md section 2)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxIPAdapterAttnProcessor,
    _get_qkv_projections,
)
from diffusers.utils.torch_utils import get_module_execution_device

from ...regional.parallel import context_parallel_mask
from ...regional.processors import RegionalProcessor, attend
from ...regional.sequence import TokenSequence
from ...schedules import TrainingSchedule, shifted_training_schedule
from ..base import Branch, ModelFamily
from . import CARD, CONTROLNET_CARD, KONTEXT_CARD

TRIM_MARGIN = 8  # pad tokens kept after each trimmed entity prompt


def joint_attention(processor, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                    image_rotary_emb=None):
    """diffusers' FLUX joint attention with :func:`attend` as the attention call (every form of the regional mask).

    Returns ``(image_out (B, n_img, D), text_out (B, T, D) or None, image_query (B, n_img, H, d))``:
    double-stream blocks give both outputs projected, single-stream blocks the whole sequence as ``image_out`` and
    no text output; ``image_query`` is the image tokens' normalised query before RoPE (the IP-Adapter's query).
    """
    query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
        attn, hidden_states, encoder_hidden_states
    )
    query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
    query, key = attn.norm_q(query), attn.norm_k(key)
    image_query = query
    if attn.added_kv_proj_dim is not None:  # double-stream block: text first, as diffusers concatenates
        encoder_query, encoder_key, encoder_value = (
            x.unflatten(-1, (-1, attn.head_dim)) for x in (encoder_query, encoder_key, encoder_value))
        encoder_query, encoder_key = attn.norm_added_q(encoder_query), attn.norm_added_k(encoder_key)
        query = torch.cat([encoder_query, query], dim=1)
        key = torch.cat([encoder_key, key], dim=1)
        value = torch.cat([encoder_value, value], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    hidden_states = attend(query, key, value, attention_mask, processor._attention_backend,
                           processor._parallel_config)
    hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
    if encoder_hidden_states is None:
        return hidden_states, None, image_query
    encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
        [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
    )
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
    return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous()), image_query


class RegionalFluxAttnProcessor(RegionalProcessor, FluxAttnProcessor):
    """diffusers' ``FluxAttnProcessor`` whose attention call is :func:`attend` (every form of the regional mask).
    ``entity_ip`` is accepted and ignored: only the double-stream IP-Adapter layers read it."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 entity_ip=None):
        image_out, text_out, _ = joint_attention(self, attn, hidden_states, encoder_hidden_states, attention_mask,
                                                 image_rotary_emb)
        return image_out if text_out is None else (image_out, text_out)


class RegionalFluxIPAdapterAttnProcessor(RegionalProcessor, FluxIPAdapterAttnProcessor):
    """diffusers' ``FluxIPAdapterAttnProcessor`` (same weights, same scales) with the regional mask on the joint
    attention and a reference image per entity (docs/design.md section 14).

    The image-prompt branch is unmasked, as in diffusers: every image token attends to the projected image tokens
    of the global reference (``ip_hidden_states``). ``entity_ip = (states, weights)`` adds one branch per entity:
    ``states[n]`` the projected image tokens of entity n's reference, one ``(B, 1, T_ip, C)`` per loaded adapter,
    and ``weights[n] (1 or B, n_img, 1)`` its ``image_scale`` on the image tokens it covers, 0 elsewhere. The
    output is ``sum_k scale_k ip_k(global) + sum_n weights[n] * sum_k scale_k ip_k(entity n)``.
    """

    @classmethod
    def from_stock(cls, stock: FluxIPAdapterAttnProcessor) -> RegionalFluxIPAdapterAttnProcessor:
        """The regional processor sharing ``stock``'s IP weights (no copy) and per-layer scales."""
        regional = cls(stock.hidden_size, stock.cross_attention_dim, num_tokens=[4] * len(stock.to_k_ip),
                       scale=list(stock.scale), device="meta")
        regional.to_k_ip, regional.to_v_ip = stock.to_k_ip, stock.to_v_ip
        return regional

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 ip_hidden_states=None, ip_adapter_masks=None, entity_ip=None):
        image_out, text_out, query = joint_attention(self, attn, hidden_states, encoder_hidden_states,
                                                     attention_mask, image_rotary_emb)
        if text_out is None:
            return image_out
        if ip_hidden_states is None and entity_ip is None:
            return image_out, text_out
        ip_out = torch.zeros_like(image_out)
        if ip_hidden_states is not None:
            ip_out = self._image_prompt(attn, query, ip_hidden_states, ip_out)
        for states, weight in zip(*(entity_ip or ((), ())), strict=True):
            ip_out = ip_out + weight * self._image_prompt(attn, query, states, torch.zeros_like(image_out))
        return image_out, text_out, ip_out

    def _image_prompt(self, attn, query: torch.Tensor, states, out: torch.Tensor) -> torch.Tensor:
        """``out + sum_k scale_k softmax(q K_k^T / sqrt(d)) V_k`` over the loaded adapters, as diffusers sums it:
        ``query (B, n_img, H, d)``, one ``(B, 1, T_ip, C)`` image-token tensor per adapter -> ``(B, n_img, H d)``."""
        batch = query.shape[0]
        for current, scale, to_k_ip, to_v_ip in zip(states, self.scale, self.to_k_ip, self.to_v_ip, strict=False):
            key = to_k_ip(current).view(batch, -1, attn.heads, attn.head_dim)
            value = to_v_ip(current).view(batch, -1, attn.heads, attn.head_dim)
            current = dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                            backend=self._attention_backend, parallel_config=self._parallel_config)
            out += scale * current.reshape(batch, -1, attn.heads * attn.head_dim).to(query.dtype)
        return out


@dataclass
class FluxBranch(Branch):
    """A FLUX CFG branch with its image prompts: ``ip_adapter_image_embeds`` in diffusers' form (one
    ``(B, 1, D_clip)`` per loaded adapter; the transformer projects them) and ``entity_ip`` (see
    :class:`RegionalFluxIPAdapterAttnProcessor`), or None for none."""

    ip_adapter_image_embeds: list[torch.Tensor] | None = None
    entity_ip: tuple[list[list[torch.Tensor]], list[torch.Tensor]] | None = None


# which token stream each linear layer acts on (regional LoRA, docs/design.md section 22): the double blocks keep
# text and image apart, the single blocks run [text | image] as one sequence
FLUX_LORA_STREAMS: tuple[tuple[str, str | None], ...] = (
    (r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0)|ff\.net\..+)", "image"),
    (r"transformer_blocks\.\d+\.(attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)|ff_context\.net\..+)", "text"),
    (r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)", "joint"),
    (r"x_embedder|proj_out", "image"),
    (r"context_embedder", "text"),
    (r"(transformer_blocks|single_transformer_blocks)\.\d+\.(norm1|norm1_context|norm)\.linear|norm_out\.linear"
     r"|time_text_embed\..+", None),
)


class FluxFamily(ModelFamily):
    card = CARD
    lora_streams = FLUX_LORA_STREAMS
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    lora_rank = 64  # the paper's rank (the reference's FLUX trainer uses 32)
    has_pooled = True
    context_parallel = True
    processors: ClassVar[dict[type, type]] = {FluxAttnProcessor: RegionalFluxAttnProcessor,
                                              FluxIPAdapterAttnProcessor: RegionalFluxIPAdapterAttnProcessor}

    def encode_entities(self, pipe, prompts: Sequence[str], max_sequence_length: int,
                        device: torch.device) -> list[torch.Tensor]:
        """T5 exactly like the global prompt (same padding to ``max_sequence_length``)."""
        encoded = pipe._get_t5_prompt_embeds(prompt=list(prompts), max_sequence_length=max_sequence_length,
                                             device=device)
        return list(encoded.unsqueeze(1))

    def trim_entities(self, pipe, embeds: list[torch.Tensor], prompts: Sequence[str],
                      max_sequence_length: int) -> list[torch.Tensor]:
        """Each segment cut to its real T5 tokens (end-of-sequence included) plus :data:`TRIM_MARGIN` pads."""
        counts = [len(ids) for ids in pipe.tokenizer_2(list(prompts), max_length=max_sequence_length,
                                                       truncation=True).input_ids]
        return [e[:, : min(n + TRIM_MARGIN, e.shape[1])] for e, n in zip(embeds, counts, strict=True)]

    def encode_texts(self, pipe, prompts: Sequence[str],
                     max_sequence_length: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        seq, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None,
                                            max_sequence_length=max_sequence_length)
        return list(zip(seq.cpu(), pooled.cpu(), strict=True))

    def positions(self, sequence: TokenSequence, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``txt_ids (T, 3)``: all zero, as FLUX's text ids are."""
        return torch.zeros(sequence.text_length, 3, device=device, dtype=dtype)

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

    def forward(self, transformer, latents: torch.Tensor, timestep: torch.Tensor, branch: Branch, geometry,
                guidance: torch.Tensor | None, attention_kwargs: dict | None = None) -> torch.Tensor:
        kwargs = dict(attention_kwargs or {})
        parallel = getattr(transformer, "_parallel_config", None)
        if branch.attention_mask is not None:
            kwargs["attention_mask"] = context_parallel_mask(branch.attention_mask, parallel,
                                                             branch.context.shape[1], latents.shape[1])
        if parallel is not None and getattr(branch, "entity_ip", None) is not None:
            raise ValueError("entity reference images (Entity(image=...)) are not supported under context "
                             "parallelism; run on one device (docs/design.md section 24)")
        if getattr(branch, "ip_adapter_image_embeds", None) is not None:  # projected by the transformer
            kwargs["ip_adapter_image_embeds"] = branch.ip_adapter_image_embeds  # type: ignore[attr-defined]
        if getattr(branch, "entity_ip", None) is not None:
            kwargs["entity_ip"] = branch.entity_ip  # type: ignore[attr-defined]
        return transformer(
            hidden_states=latents, timestep=timestep, guidance=guidance, pooled_projections=branch.pooled,
            encoder_hidden_states=branch.context, txt_ids=branch.positions, img_ids=geometry,
            joint_attention_kwargs=kwargs, return_dict=False,
        )[0]

    def training_schedule(self) -> TrainingSchedule:
        """The reference FLUX trainer's: shift 3 over 1000 levels, bell-weighted."""
        return shifted_training_schedule()


@torch.no_grad()
def vae_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels ``(B, 3, H, W)`` in [-1, 1] -> the VAE's latent mode, shifted and scaled for the transformer:
    ``(B, C, H/f, W/f)`` (the inverse of :meth:`FluxFamily.decode`'s normalisation)."""
    z = vae.encode(pixels).latent_dist.mode()
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


FLUX = FluxFamily()


class FluxKontextFamily(FluxFamily):
    """FLUX.1 Kontext (diffusers ``FluxKontextPipeline``): FLUX.1's transformer, text and latents; only the card
    (defaults, classes) differs. The reference-image tokens are the pipeline's (docs/design.md section 21)."""

    card = KONTEXT_CARD
    context_parallel = False  # untested with the reference-image tokens (docs/design.md section 24)


FLUX_KONTEXT = FluxKontextFamily()


class FluxControlNetFamily(FluxFamily):
    """FLUX.1 with a ControlNet (diffusers ``FluxControlNetPipeline``): FLUX.1's transformer, text and latents; only
    the card (defaults, classes) differs. The residuals are the pipeline's (docs/design.md section 23)."""

    card = CONTROLNET_CARD
    context_parallel = False  # diffusers' ControlNet model is not context-parallel (docs/design.md section 24)


FLUX_CONTROLNET = FluxControlNetFamily()
