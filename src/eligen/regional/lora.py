"""Regional LoRA, model-free: which tokens an entity's LoRA reaches, and how much (docs/design.md section 22).

An entity LoRA's update ``B(A(x)) * scaling`` in an adapted layer is multiplied, token by token, by a weight: the
entity's ``lora_scale`` on its own text tokens and on the image tokens its mask covers, 0 on every other token.
:class:`LoraTokens` holds these weights for one CFG branch, per adapter, over the branch's text
``[e_1 | ... | e_N | global]`` and its image tokens, and gives a layer the weights of the stream it acts on:

- ``"text"``: the text tokens; ``"image"``: the image tokens; ``"joint"``: ``[text | image]`` (the order diffusers
  concatenates the streams in); extra image tokens an edit model appends after them (its input image's) get 0, and
  a joint layer given fewer tokens than ``[text | image]`` runs its tail (a family that caches its text rows runs
  the image rows alone after the first step);
- ``"text-rows"``: the text tokens on the first axis instead of the second (a layer that runs every token's stack of
  encoder layers as one row of a batch, as a layer-wise text fusion does);
- a stream the family's forward *places* (:meth:`LoraTokens.place`): for a forward that lays its tokens out its own
  way (padding inside the sequence, segments run apart, the image first), the index of each of a layer's tokens
  into the branch's ``[text | image]`` weights, -1 for a token no entity LoRA reaches.

Rules (the reasons are in the design doc): overlapping entities with different adapters each add their update
(sum of deltas); entities sharing one adapter take the union of their tokens, each token at the scale of largest
magnitude among the entities covering it (one update, never counted twice); the global prompt's tokens and image
tokens outside every mask get 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .sequence import TokenSequence

LORA_STREAMS = ("text", "image", "joint", "text-rows")


@dataclass(frozen=True)
class LoraTokens:
    """Per-adapter token weights of one branch: ``text[a] (1, T)`` over the branch's text and ``image[a]
    (1, n_img)`` over its image tokens (float, the entity scales where the adapter reaches, 0 elsewhere);
    ``placed``: the streams the family's forward placed (:meth:`place`)."""

    text: dict[str, torch.Tensor]
    image: dict[str, torch.Tensor]
    placed: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self.image)

    def without_text(self, text_length: int) -> LoraTokens:
        """The same image weights for a branch whose text is ``text_length`` tokens that carry no entity's text (the
        negative prompt, or the global prompt alone after ``entity_steps``)."""
        return LoraTokens({a: w.new_zeros(w.shape[0], text_length) for a, w in self.text.items()}, self.image)

    def place(self, stream: str, index: torch.Tensor) -> None:
        """Name the layout of ``stream`` for the layers that run next: ``index`` (long) gives, for each token on a
        layer output's leading axes (``(N,)`` for ``(N, features)``, ``(B, L)`` for ``(B, L, ...)``), its token in
        ``[text | image]``, or -1 (weight 0: padding, a token of no entity). A family whose forward runs one stream
        in several passes (text segments refined apart) places it again before each."""
        self.placed[stream] = index

    def weight(self, adapter: str, stream: str, shape: Sequence[int]) -> torch.Tensor:
        """The weights of a layer whose output has ``shape``, ready to multiply it: ``(1, L, 1, ...)`` for ``L`` tokens
        on the second axis, ``(rows, 1, ...)`` for ``"text-rows"`` (``rows``: the batch's text tokens, batch-major).
        Raises ``ValueError`` when the tokens do not fit the stream."""
        if stream in self.placed:
            return self._placed(adapter, stream, shape)
        if stream == "text-rows":
            text = self.text[adapter][0]
            if shape[0] % len(text):
                raise ValueError(f"a regional LoRA layer of text rows got {shape[0]} rows for {len(text)} text tokens; "
                                 "the family's lora_stream names this layer's stream wrongly")
            return text.repeat(shape[0] // len(text)).view(-1, *[1] * (len(shape) - 1))
        if len(shape) < 3:
            raise ValueError(f"a regional LoRA layer of the {stream} stream gives {tuple(shape)}, not (batch, tokens, "
                             "..., features); the family's lora_stream must name it as a layer without a token axis "
                             "(None)")
        return self.row(adapter, stream, shape[1]).view(1, shape[1], *[1] * (len(shape) - 2))

    def _placed(self, adapter: str, stream: str, shape: Sequence[int]) -> torch.Tensor:
        """The weights of a placed stream: ``index``'s shape, then 1s (a -1 reads the 0 appended to the table)."""
        index = self.placed[stream]
        if tuple(shape[: index.ndim]) != tuple(index.shape) or len(shape) <= index.ndim:
            raise ValueError(f"a regional LoRA layer of the {stream} stream gives {tuple(shape)} where the family's "
                             f"forward placed {tuple(index.shape)} tokens; the family's lora_stream names this "
                             "layer's stream wrongly")
        text, image = self.text[adapter], self.image[adapter]
        table = torch.cat([text, image, image.new_zeros(1, 1)], dim=1)[0]
        return table[index.to(table.device)].view(*index.shape, *[1] * (len(shape) - index.ndim))

    def row(self, adapter: str, stream: str, length: int) -> torch.Tensor:
        """``(1, length)``: the weights over ``length`` tokens of ``stream`` (see the module's rules)."""
        text, image = self.text[adapter], self.image[adapter]
        if stream == "text":
            row = text
        elif stream == "image":
            row = image
        elif stream == "joint":
            row = torch.cat([text, image], dim=1)
        else:
            raise ValueError(f"a LoRA stream is one of {LORA_STREAMS} or one the family's forward placed, got "
                             f"{stream!r}")
        if stream == "joint" and image.shape[1] <= length < row.shape[1]:
            return row[:, -length:]  # the image rows alone: the text rows ran at the first step (a text cache)
        short = length - row.shape[1]
        if short < 0 or (short and stream == "text"):
            raise ValueError(f"a regional LoRA layer of the {stream} stream got {length} tokens where the branch has "
                             f"{row.shape[1]}; the family's lora_stream names this layer's stream wrongly")
        if short:
            row = torch.cat([row, row.new_zeros(row.shape[0], short)], dim=1)
        return row


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
