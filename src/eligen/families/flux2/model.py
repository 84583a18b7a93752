"""FLUX.2 (diffusers ``Flux2Pipeline`` [dev] and ``Flux2KleinPipeline`` [klein]; docs/design.md section 17).

- every entity prompt is encoded exactly as the pipeline encodes its global prompt: its chat template ([dev]:
  Mistral-3 with FLUX.2's system message; [klein]: Qwen3's user turn without thinking), the same hidden layers
  stacked, padded to ``max_sequence_length`` (512); the padding stays in the sequence and is attended, as the model
  attends its global prompt's;
- the text positions count up per token (FLUX.1's are all zero): every segment gets the positions the global
  prompt has without entities (``0 .. T_i - 1``, restarting per segment), so the global prompt keeps its own;
- the mask rule is FLUX.1's over ``[e_1 | ... | e_N | global | image]``, which is the order in which both block
  kinds see the tokens (the double-stream blocks join text before image, the single-stream blocks run on that
  joined sequence), so the mask reaches every block through ``joint_attention_kwargs`` unchanged;
- latents are the VAE's 2x2-patchified latents normalised by its batch-norm statistics, one token per patch;
- the schedule's shift ``mu`` is the pipelines' empirical one (image tokens and steps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import (
    Flux2AttnProcessor,
    Flux2ParallelSelfAttnProcessor,
    _get_qkv_projections,
)
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, format_input
from diffusers.utils.torch_utils import get_module_execution_device

from ...regional.processors import RegionalProcessor, attend
from ...regional.sequence import TokenSequence
from ...schedules import TrainingSchedule, bell_weighted
from ..base import Branch, ModelFamily
from . import CARD, KLEIN_CARD

TRIM_MARGIN = 8  # pad tokens kept beside each trimmed entity prompt
TRAIN_SIZE, TRAIN_STEPS = 4096, 50  # the training shift is the inference one at 1024x1024 (4096 tokens), 50 steps
LAYERS_ATTRIBUTE = "_text_encoder_out_layers"  # the call's text_encoder_out_layers, kept for its entity prompts


class RegionalFlux2AttnProcessor(RegionalProcessor, Flux2AttnProcessor):
    """diffusers' ``Flux2AttnProcessor`` (the double-stream blocks: text first, then image) whose attention call is
    :func:`attend`, so it runs every form of the regional mask; without a mask it computes what the stock one does."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query, encoder_key, encoder_value = (
                x.unflatten(-1, (-1, attn.head_dim)) for x in (encoder_query, encoder_key, encoder_value))
            encoder_query, encoder_key = attn.norm_added_q(encoder_query), attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        hidden_states = attend(query, key, value, attention_mask, self._attention_backend, self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states if encoder_hidden_states is None else (hidden_states, encoder_hidden_states)


class RegionalFlux2ParallelSelfAttnProcessor(RegionalProcessor, Flux2ParallelSelfAttnProcessor):
    """diffusers' ``Flux2ParallelSelfAttnProcessor`` (the single-stream blocks, over ``[text | image]``, attention and
    MLP fused in one projection) whose attention call is :func:`attend`."""

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        hidden_states = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp_hidden_states = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in qkv.chunk(3, dim=-1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        hidden_states = attend(query, key, value, attention_mask, self._attention_backend, self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        mlp_hidden_states = attn.mlp_act_fn(mlp_hidden_states)
        return attn.to_out(torch.cat([hidden_states, mlp_hidden_states], dim=-1))


def text_ids(positions: torch.Tensor) -> torch.Tensor:
    """``(T,)`` positions -> FLUX.2's ``txt_ids (T, 4)``: ``(t, h, w, l) = (0, 0, 0, position)``."""
    ids = torch.zeros(positions.shape[0], 4, dtype=torch.long, device=positions.device)
    ids[:, 3] = positions
    return ids


# which token stream each linear layer acts on (regional LoRA, docs/design.md section 22): the double blocks keep
# text and image apart, the single blocks run [text | image] as one sequence; modulation is shared by all blocks
FLUX2_LORA_STREAMS: tuple[tuple[str, str | None], ...] = (
    (r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0)|ff\.(linear_in|linear_out))|x_embedder|proj_out",
     "image"),
    (r"transformer_blocks\.\d+\.(attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)|ff_context\.(linear_in|"
     r"linear_out))|context_embedder", "text"),
    (r"single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)", "joint"),
    (r"(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation|norm_out)\.linear"
     r"|time_guidance_embed\..+", None),
)


class Flux2Family(ModelFamily):
    """FLUX.2 [dev]: the Mistral-3 text encoder (hidden layers 10, 20, 30 by default)."""

    card = CARD
    lora_streams = FLUX2_LORA_STREAMS
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    lora_rank = 64  # the EliGen paper's rank (FLUX.1); no FLUX.2 EliGen reference exists
    processors: ClassVar[dict[type, type]] = {
        Flux2AttnProcessor: RegionalFlux2AttnProcessor,
        Flux2ParallelSelfAttnProcessor: RegionalFlux2ParallelSelfAttnProcessor,
    }
    text_layers: ClassVar[tuple[int, ...]] = (10, 20, 30)  # the pipeline's default text_encoder_out_layers
    unsupported: ClassVar[dict[str, str]] = {
        "first_block_cache": "diffusers' First Block Cache takes the residual of the last block against the first "
                             "block's output, but FLUX.2's last (single-stream) block returns the joined text and "
                             "image stream as one tensor while its first (double-stream) block returns the two "
                             "streams apart, so diffusers' hook fails on it (with or without entities)",
    }

    # -- text ------------------------------------------------------------------------------------------------

    def layers(self, pipe) -> tuple[int, ...]:
        """The hidden layers a prompt is read from: the current call's ``text_encoder_out_layers`` (the pipeline
        keeps them while it encodes), else the pipeline's default."""
        return tuple(pipe.__dict__.get(LAYERS_ATTRIBUTE) or self.text_layers)

    def encode(self, pipe, prompts: Sequence[str], max_sequence_length: int, device: torch.device) -> torch.Tensor:
        """Prompts -> ``(B, max_sequence_length, 3 D)`` exactly as the pipeline encodes its prompt."""
        return pipe._get_mistral_3_small_prompt_embeds(
            text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, prompt=list(prompts), device=device,
            max_sequence_length=max_sequence_length, system_message=pipe.system_message,
            hidden_states_layers=self.layers(pipe),
        )

    def real_tokens(self, pipe, prompts: Sequence[str], max_sequence_length: int) -> torch.Tensor:
        """``(B, max_sequence_length)`` bool: the tokens of each encoded prompt that are not padding."""
        inputs = pipe.tokenizer.apply_chat_template(
            format_input(prompts=list(prompts), system_message=pipe.system_message), add_generation_prompt=False,
            tokenize=True, return_dict=True, return_tensors="pt", padding="max_length", truncation=True,
            max_length=max_sequence_length,
        )
        return inputs["attention_mask"].bool()

    def encode_entities(self, pipe, prompts: Sequence[str], max_sequence_length: int,
                        device: torch.device) -> list[torch.Tensor]:
        """The global prompt's encoding (template, layers, padding to ``max_sequence_length``), one segment each."""
        return list(self.encode(pipe, prompts, max_sequence_length, device).unsqueeze(1))

    def trim_entities(self, pipe, embeds: list[torch.Tensor], prompts: Sequence[str],
                      max_sequence_length: int) -> list[torch.Tensor]:
        """Each segment cut to its real tokens plus :data:`TRIM_MARGIN` of the pads beside them (on the side the
        tokenizer pads)."""
        real = self.real_tokens(pipe, prompts, max_sequence_length)
        out = []
        for segment, valid in zip(embeds, real, strict=True):
            keep = min(int(valid.sum()) + TRIM_MARGIN, segment.shape[1])
            left = bool(valid[-1]) and not bool(valid[0])  # padded on the left: the real tokens end the segment
            out.append(segment[:, segment.shape[1] - keep:] if left else segment[:, :keep])
        return out

    def encode_texts(self, pipe, prompts: Sequence[str],
                     max_sequence_length: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        encoded = self.encode(pipe, prompts, max_sequence_length, pipe._execution_device)
        return [(sequence.cpu(), None) for sequence in encoded]

    def positions(self, sequence: TokenSequence, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``txt_ids (T, 4)`` long: ``(0, 0, 0, l)`` with ``l = 0 .. T_i - 1`` in every segment, i.e. each entity
        segment and the global prompt get the positions the global prompt has without entities."""
        return text_ids(sequence.positions_restarting(device))

    # -- latents ---------------------------------------------------------------------------------------------

    @staticmethod
    def _bn(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's batch-norm mean and standard deviation over the patchified channels, ``(1, 4 C, 1, 1)``."""
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def encode_image(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        """As the pipelines encode a reference image: the latent mode, patchified 2x2, batch-norm normalised,
        packed."""
        z = pipe._patchify_latents(pipe.vae.encode(pixels).latent_dist.mode())
        mean, std = self._bn(pipe.vae, z)
        return pipe._pack_latents((z - mean) / std)

    def unpack(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents ``(B, n_img, 4 C)`` of an ``height x width`` image -> the VAE's latents ``(B, C, h, w)``:
        unpacked, de-normalised and unpatchified exactly as the pipelines do it before decoding."""
        grid = pipe.vae_scale_factor * 2
        ids = self.geometry(pipe, latents.shape[0], 2 * (height // grid), 2 * (width // grid), latents.device,
                            latents.dtype)
        latents = pipe._unpack_latents_with_ids(latents, ids.expand(latents.shape[0], -1, -1))
        mean, std = self._bn(pipe.vae, latents)
        return pipe._unpatchify_latents(latents * std + mean)

    def decode(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        latents = self.unpack(pipe, latents, height, width).to(get_module_execution_device(pipe.vae))
        return pipe.vae.decode(latents, return_dict=False)[0]

    def geometry(self, pipe, batch: int, height: int, width: int, device: torch.device, dtype: torch.dtype):
        """``img_ids (n_img, 4)`` long, ``(t, h, w, l) = (0, row, column, 0)`` over the token grid of a latent grid
        ``height x width`` (latent pixels), as ``_prepare_latent_ids`` makes them."""
        return torch.cartesian_prod(torch.arange(1), torch.arange(height // 2), torch.arange(width // 2),
                                    torch.arange(1)).to(device)

    # -- the transformer -------------------------------------------------------------------------------------

    def forward(self, transformer, latents: torch.Tensor, timestep: torch.Tensor, branch: Branch, geometry,
                guidance: torch.Tensor | None, attention_kwargs: dict | None = None) -> torch.Tensor:
        """One forward; the branch's own regional mask (if any) joins the call's attention kwargs, so each CFG
        branch gets the mask of its own sequence."""
        kwargs = dict(attention_kwargs or {})
        if branch.attention_mask is not None:
            kwargs["attention_mask"] = branch.attention_mask
        return transformer(
            hidden_states=latents.to(getattr(transformer, "dtype", latents.dtype)), timestep=timestep,
            guidance=guidance, encoder_hidden_states=branch.context, txt_ids=branch.positions, img_ids=geometry,
            joint_attention_kwargs=kwargs, return_dict=False,
        )[0]

    def schedule_mu(self, scheduler_config, image_seq_len: int, num_inference_steps: int) -> float:
        """The FLUX.2 pipelines' empirical shift: a function of the image tokens and the number of steps."""
        return compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_inference_steps)

    # -- training --------------------------------------------------------------------------------------------

    def training_schedule(self) -> TrainingSchedule:
        """``linspace(1, 0, 1001)[:-1]`` under the pipelines' exponential shift at 1024x1024 and 50 steps
        (``mu`` about 2.02), with the reference trainer's bell weights (no FLUX.2 EliGen trainer exists)."""
        shift = math.exp(compute_empirical_mu(image_seq_len=TRAIN_SIZE, num_steps=TRAIN_STEPS))
        sigmas = torch.linspace(1.0, 0.0, 1001)[:-1]
        return bell_weighted(shift / (shift + (1 / sigmas - 1)))


class Flux2KleinFamily(Flux2Family):
    """FLUX.2 [klein]: the Qwen3 text encoder (hidden layers 9, 18, 27 by default); everything else as [dev]."""

    card = KLEIN_CARD
    text_layers: ClassVar[tuple[int, ...]] = (9, 18, 27)

    def encode(self, pipe, prompts: Sequence[str], max_sequence_length: int, device: torch.device) -> torch.Tensor:
        return pipe._get_qwen3_prompt_embeds(
            text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, prompt=list(prompts), device=device,
            max_sequence_length=max_sequence_length, hidden_states_layers=self.layers(pipe),
        )

    def real_tokens(self, pipe, prompts: Sequence[str], max_sequence_length: int) -> torch.Tensor:
        rows = []
        for prompt in prompts:
            text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True, enable_thinking=False)
            rows.append(pipe.tokenizer(text, return_tensors="pt", padding="max_length", truncation=True,
                                       max_length=max_sequence_length)["attention_mask"])
        return torch.cat(rows).bool()


FLUX2 = Flux2Family()
FLUX2_KLEIN = Flux2KleinFamily()
