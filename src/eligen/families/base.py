"""The seam between the EliGen core and a model family (docs/design.md section 1).

A family says how its pipeline turns text into segments and where they sit in RoPE, how its VAE latents are
normalised and packed (and how many latent pixels make a token), how one transformer forward takes a regional mask,
how padded text is masked, how true CFG combines the branches, which linear layers an EliGen LoRA adapts and with
which noise levels it is trained. Everything else (entities, masks, the sampling loop, inpainting fusion, LoRA
files, training) is shared. A family subclasses :class:`ModelFamily` in its package and names it on its card.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..choices import CFG_MODES
from ..inpaint import plain_cfg  # N_neg + s (N_pos - N_neg): FLUX's true CFG, the reference's Qwen one
from ..regional.sequence import TokenSequence
from ..schedules import TrainingSchedule, scheduler_resolution_shift
from .card import FamilyCard


@dataclass
class Branch:
    """One CFG branch's conditioning for the transformer.

    ``context (B, T, D)``: the text ``[e_1 | ... | e_N | global]`` laid out as ``sequence`` says; ``pooled (B, P)``:
    the pooled text vector (FLUX) or None; ``text_mask (B, T)``: the text padding mask or None; ``attention_mask``:
    the regional mask in one of its forms, or None without entities; ``positions``: the family's text positions of
    ``sequence`` (:meth:`ModelFamily.positions`); ``lora_tokens``: the entity LoRAs' token weights on this branch
    (:class:`eligen.regional.lora.LoraTokens`), or None without entity LoRAs.
    """

    context: torch.Tensor
    pooled: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    attention_mask: Any = None
    positions: torch.Tensor | None = None
    sequence: TokenSequence | None = None
    lora_tokens: Any = None

    def __post_init__(self) -> None:
        if self.sequence is None:
            self.sequence = TokenSequence((), self.context.shape[1])


@dataclass
class ReferenceTokens:
    """What an edit pipeline appends after the image tokens of every forward (docs/design.md section 21): the input
    image's packed latents ``packed (B, n_ref, C)``, ``extend`` taking the image geometry to that of
    ``[image | reference]``, and ``context (1, T, D)``: the global instruction encoded with the input where the
    pipeline's text encoder sees it (Qwen-Image-Edit), else None."""

    packed: torch.Tensor
    extend: Callable[[Any], Any]
    context: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return self.packed.shape[1]

    def join(self, latents: torch.Tensor, geometry: Any) -> tuple[torch.Tensor, Any]:
        """``(B, n_img, C)`` latents and their geometry -> ``(B, n_img + n_ref, C)`` and the joined geometry."""
        return torch.cat([latents, self.packed.to(latents.dtype)], dim=1), self.extend(geometry)


def rescaled_cfg(positive: torch.Tensor, negative: torch.Tensor, scale: float) -> torch.Tensor:
    """diffusers' Qwen-Image combination: plain CFG rescaled, token by token, to the positive prediction's norm."""
    combined = negative + scale * (positive - negative)
    return combined * (torch.norm(positive, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))


class ModelFamily:
    """What differs between model families. Subclasses hold no state: one instance per family."""

    card: ClassVar[FamilyCard]
    patch_size: ClassVar[int] = 2  # latent pixels per token side: the mask-to-token rule's patch
    lora_rank: ClassVar[int] = 32  # the reference's training rank for the family
    block_lists: ClassVar[tuple[str, ...]] = ("transformer_blocks",)  # the transformer's lists of blocks
    block_kwargs: ClassVar[str] = "joint_attention_kwargs"  # the block argument that carries the mask
    processors: ClassVar[dict[type, type]]  # diffusers' stock attention processor -> the family's regional one
    has_pooled: ClassVar[bool] = False  # the transformer takes a pooled text vector
    # the family's forward carries the regional mask under diffusers' context parallelism (docs/design.md section 24)
    context_parallel: ClassVar[bool] = False
    # options the architecture cannot have -> why (eligen.speedups and the pipelines refuse them by name)
    unsupported: ClassVar[dict[str, str]] = {}
    # (module-name pattern, token stream) for regional LoRA (:meth:`lora_stream`); empty: the family has none
    lora_streams: ClassVar[tuple[tuple[str, str | None], ...]] = ()

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def default_cfg(self) -> str:
        return self.card.default_cfg

    def combine(self, mode: str):
        """The CFG combination ``(positive, negative, scale) -> velocity`` for ``mode`` in :data:`CFG_MODES`."""
        if mode not in CFG_MODES:
            raise ValueError(f"cfg_mode must be one of {CFG_MODES}, got {mode!r}")
        return plain_cfg if mode == "plain" else rescaled_cfg

    def block_linear_names(self, transformer: torch.nn.Module) -> list[str]:
        """Every ``nn.Linear`` inside the transformer blocks (the paper's LoRA set: attention, MLPs, AdaLN)."""
        return [name for name, module in transformer.named_modules()
                if isinstance(module, torch.nn.Linear) and name.split(".")[0] in self.block_lists]

    def lora_train_names(self, transformer: torch.nn.Module) -> list[str]:
        """The linear layers ``eligen train`` adapts (the family's recipe; by default every block linear)."""
        return self.block_linear_names(transformer)

    def lora_stream(self, module: str) -> str | None:
        """The token stream an adapted linear layer acts on (docs/design.md section 22): ``"text"``, ``"image"``,
        ``"joint"`` (``[text | image]`` in one sequence), ``"text-rows"``, a stream the family's forward places
        (:meth:`eligen.regional.lora.LoraTokens.place`) or None (no token axis: modulation and timestep layers, where
        an entity LoRA is not applied). The first of :attr:`lora_streams` whose pattern matches the whole name wins.
        Raises ``ValueError`` for a layer the family cannot place, or a family without regional LoRA."""
        if not self.lora_streams:
            raise ValueError(f"{self.card.title} has no regional LoRA yet: an entity cannot carry 'lora' on this "
                             "model; load the LoRA globally (--lora) instead")
        for pattern, stream in self.lora_streams:
            if re.fullmatch(pattern, module):
                return stream
        raise ValueError(f"an entity LoRA adapts {module}, a layer {self.card.title}'s regional LoRA cannot place on "
                         "a token stream; load this LoRA globally (--lora) instead")

    def drop_mask_in(self, block: torch.nn.Module) -> Any:
        """:func:`eligen.speedups.mask_only_in_blocks`: let ``block`` attend without the regional mask; returns a
        handle whose ``remove()`` undoes it. By default a forward pre-hook takes ``attention_mask`` out of the block's
        :attr:`block_kwargs`; a family whose blocks get the mask otherwise overrides this."""
        from ..speedups import mask_dropper

        return block.register_forward_pre_hook(mask_dropper(self.block_kwargs), with_kwargs=True)

    # -- text ------------------------------------------------------------------------------------------------

    def encode_entities(self, pipe, prompts: Sequence[str], max_sequence_length: int,
                        device: torch.device) -> list[torch.Tensor]:
        """Entity prompts -> one ``(1, T_i, D)`` segment each, encoded as the family encodes the global prompt."""
        raise NotImplementedError

    def trim_entities(self, pipe, embeds: list[torch.Tensor], prompts: Sequence[str],
                      max_sequence_length: int) -> list[torch.Tensor]:
        """``entity_tokens="trim"``: segments cut to their real tokens plus a few pads (families that pad)."""
        return embeds

    def encode_texts(self, pipe, prompts: Sequence[str],
                     max_sequence_length: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Prompts -> ``(sequence (T, D), pooled (P,) or None)`` each, as the family encodes a global prompt
        (training)."""
        raise NotImplementedError

    def positions(self, sequence: TokenSequence, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """The text positions of ``sequence`` in the form the family's transformer takes (see :class:`Branch`)."""
        raise NotImplementedError

    def padding(self, sequence: TokenSequence, valid: torch.Tensor | None, regional: Any) -> tuple[Any, Any]:
        """The padding rule: ``(text_mask, attention_mask)`` of a branch whose text ``valid (B, T)`` marks its real
        tokens (None: all real) and whose regional mask is ``regional`` (None without entities). By default padding
        is attended, as in FLUX (nothing masks it)."""
        return None, regional

    # -- latents ---------------------------------------------------------------------------------------------

    def encode_image(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, 3, H, W)`` in [-1, 1] -> packed, normalised latents ``(B, n_img, C)`` (latent mode)."""
        raise NotImplementedError

    def decode(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents -> decoded pixels ``(B, 3, H, W)`` in [-1, 1] (before the image processor)."""
        raise NotImplementedError

    def geometry(self, pipe, batch: int, height: int, width: int, device: torch.device, dtype: torch.dtype):
        """The image-token positions the transformer takes for a latent grid ``height x width`` (latent pixels)."""
        raise NotImplementedError

    # -- the transformer -------------------------------------------------------------------------------------

    def forward(self, transformer, latents: torch.Tensor, timestep: torch.Tensor, branch: Branch, geometry,
                guidance: torch.Tensor | None, attention_kwargs: dict | None = None) -> torch.Tensor:
        """One forward: packed latents ``(B, n_img, C)`` and ``timestep`` (B,) in [0, 1] -> velocity."""
        raise NotImplementedError

    def schedule_mu(self, scheduler_config, image_seq_len: int, num_inference_steps: int) -> float:
        """The scheduler's dynamic shift ``mu`` for a call of ``num_inference_steps`` steps over ``image_seq_len``
        image tokens, as the family's diffusers pipeline computes it; by default diffusers' resolution shift (linear
        in the token count between the scheduler's anchors)."""
        return scheduler_resolution_shift(scheduler_config, image_seq_len)

    # -- training --------------------------------------------------------------------------------------------

    def training_schedule(self) -> TrainingSchedule:
        """The reference trainer's noise levels and loss weights for this family."""
        raise NotImplementedError


def framed_latent_statistics(vae, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A frame-axis VAE's per-channel latent mean and ``1 / std`` (its config's ``latents_mean`` / ``latents_std``),
    shaped ``(1, C, 1, 1, 1)`` as diffusers makes them."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(device, dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(device, dtype)
    return mean, inv_std


def encode_framed(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` pixels in [-1, 1] -> packed, normalised latents through a frame-axis VAE (one frame), as the
    pipelines of such a VAE prepare an input image."""
    z = pipe.vae.encode(pixels[:, :, None]).latent_dist.mode()  # (B, C, 1, h, w): one frame
    mean, inv_std = framed_latent_statistics(pipe.vae, z.device, z.dtype)
    z = ((z - mean) * inv_std)[:, :, 0]
    return pipe._pack_latents(z, z.shape[0], z.shape[1], z.shape[2], z.shape[3])
