"""Regional LoRA, model-free: which tokens an entity's LoRA reaches, and how much (docs/design.md section 22).

An entity LoRA's update ``B(A(x)) * scaling`` in an adapted layer is multiplied, token by token, by a weight: the
entity's ``lora_scale`` on its own text tokens and on the image tokens its mask covers, 0 on every other token.
:class:`LoraTokens` holds these weights for one CFG branch, per adapter, over the branch's text
``[e_1 | ... | e_N | global]`` and its image tokens, and gives a layer the weights of the stream it acts on:

- ``"text"``: the text tokens; ``"image"``: the image tokens; ``"joint"``: ``[text | image]`` (the order diffusers
  concatenates the streams in); extra image tokens an edit model appends after them (its input image's) get 0.

Rules (the reasons are in the design doc): overlapping entities with different adapters each add their update
(sum of deltas); entities sharing one adapter take the union of their tokens, each token at the scale of largest
magnitude among the entities covering it (one update, never counted twice); the global prompt's tokens and image
tokens outside every mask get 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .sequence import TokenSequence

LORA_STREAMS = ("text", "image", "joint")


@dataclass(frozen=True)
class LoraTokens:
    """Per-adapter token weights of one branch: ``text[a] (1, T)`` over the branch's text and ``image[a]
    (1, n_img)`` over its image tokens (float, the entity scales where the adapter reaches, 0 elsewhere)."""

    text: dict[str, torch.Tensor]
    image: dict[str, torch.Tensor]

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self.image)

    def without_text(self, text_length: int) -> LoraTokens:
        """The same image weights for a branch whose text is ``text_length`` tokens that carry no entity's text (the
        negative prompt, or the global prompt alone after ``entity_steps``)."""
        return LoraTokens({a: w.new_zeros(w.shape[0], text_length) for a, w in self.text.items()}, self.image)

    def weight(self, adapter: str, stream: str, length: int) -> torch.Tensor:
        """``(1, length, 1)``: the weights of a layer over ``length`` tokens of ``stream``; image tokens past the
        entities' (an edit model's input image) get 0. Raises ``ValueError`` when ``length`` does not fit."""
        text, image = self.text[adapter], self.image[adapter]
        if stream == "text":
            row = text
        elif stream == "image":
            row = image
        elif stream == "joint":
            row = torch.cat([text, image], dim=1)
        else:
            raise ValueError(f"a LoRA stream is one of {LORA_STREAMS}, got {stream!r}")
        short = length - row.shape[1]
        if short < 0 or (short and stream == "text"):
            raise ValueError(f"a regional LoRA layer of the {stream} stream got {length} tokens where the branch has "
                             f"{row.shape[1]}; the family's lora_stream names this layer's stream wrongly")
        if short:
            row = torch.cat([row, row.new_zeros(row.shape[0], short)], dim=1)
        return row.unsqueeze(-1)


def entity_lora_tokens(sequence: TokenSequence, cover: torch.Tensor, adapters: Sequence[str | None],
                       scales: Sequence[float], with_text: bool = True) -> LoraTokens:
    """The token weights of a branch laid out as ``sequence``, for entity covers ``(1, N, n_img)`` bool, entity
    ``n``'s adapter ``adapters[n]`` (None: the entity has no LoRA) at ``scales[n]``. ``with_text``: the branch's
    entity segments hold the entities' own prompts (the positive branch); otherwise no text token is reached."""
    if len(adapters) != cover.shape[1] or len(scales) != len(adapters):
        raise ValueError(f"{len(adapters)} entity adapters and {len(scales)} scales for {cover.shape[1]} entity masks")
    text: dict[str, torch.Tensor] = {}
    image: dict[str, torch.Tensor] = {}
    slices = sequence.slices()
    for n, (adapter, scale) in enumerate(zip(adapters, scales, strict=True)):
        if adapter is None:
            continue
        if adapter not in image:
            text[adapter] = torch.zeros(1, sequence.text_length, device=cover.device)
            image[adapter] = torch.zeros(1, cover.shape[-1], device=cover.device)
        stronger = cover[:1, n] & (abs(float(scale)) > image[adapter].abs())  # (1, n_img)
        image[adapter] = torch.where(stronger, float(scale), image[adapter])
        if with_text and n < sequence.entities:
            text[adapter][:, slices[n]] = float(scale)
    return LoraTokens(text, image)
