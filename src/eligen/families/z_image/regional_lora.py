"""Regional LoRA on Z-Image (docs/design.md sections 18 and 22): which layer acts on which tokens, and where Z-Image's
forwards put each token.

Z-Image lays its tokens out its own way, so most of its streams are *placed* by the forward
(:meth:`eligen.regional.lora.LoraTokens.place`): for each token of a layer's output, its token in the branch's
``[text | image]`` weights, -1 for weight 0. The rules:

- a text segment's padding (to a multiple of 32, the model's learned pad token) belongs to its segment, as in the
  regional mask: an entity's padding gets the entity's weight, the global prompt's 0;
- the image's padding and a batch's padding (samples of different lengths) get 0;
- the orders: the patch and caption embedders see every sample's tokens flattened on one axis (the regional forward:
  segment by segment, each over the batch); the noise refiner ``[image | image padding]`` (the plain ``image``
  stream, padded with 0); the context refiner one segment at a time in the regional forward, the whole padded
  caption in the stock one; the main layers and the final layer ``[e_1 | ... | global | image padding | image]`` in
  the regional forward, ``[image | image padding | caption]`` in the stock one (diffusers' order).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.nn.utils.rnn import pad_sequence

if TYPE_CHECKING:
    from ...regional.lora import LoraTokens
    from .model import Layout

# the streams Z-Image's forwards place
PATCHES, CAPTIONS = "z-image-patches", "z-image-captions"
REFINED_TEXT, UNIFIED = "z-image-refined-text", "z-image-unified"

# which token stream each linear layer acts on (regional LoRA, docs/design.md section 22); None: no token axis
Z_IMAGE_LORA_STREAMS: tuple[tuple[str, str | None], ...] = (
    (r"t_embedder\..+", None),
    (r"(noise_refiner|layers)\.\d+\.adaLN_modulation\.\d+", None),
    (r"all_final_layer\.[^.]+\.adaLN_modulation\.\d+", None),
    (r"all_x_embedder\.[^.]+", PATCHES),
    (r"cap_embedder\.\d+", CAPTIONS),
    (r"noise_refiner\.\d+\..+", "image"),
    (r"context_refiner\.\d+\..+", REFINED_TEXT),
    (r"layers\.\d+\..+", UNIFIED),
    (r"all_final_layer\.[^.]+\.linear", UNIFIED),
)


def segment_sources(layout: Layout, s: int, b: int) -> torch.Tensor:
    """``(P,)``: segment ``s`` of sample ``b`` padded to ``P`` tokens, each token's place in ``[text | image]`` (the
    padding: its segment's first token)."""
    start, real = sum(layout.raw[:s]), layout.real[b][s]
    pad = layout.padded(b)[s] - real
    return torch.cat([start + torch.arange(real), torch.full((pad,), start)])


def image_sources(layout: Layout) -> torch.Tensor:
    """``(n_img + image_pad,)``: ``[image | image padding]`` (the padding: -1)."""
    return torch.cat([sum(layout.raw) + torch.arange(layout.n_img), torch.full((layout.image_pad,), -1)])


def batched(rows: list[torch.Tensor]) -> torch.Tensor:
    """``(B, L)``: one row per sample, the shorter ones padded with -1 (batch padding)."""
    return pad_sequence(rows, batch_first=True, padding_value=-1)


def place_regional(tokens: LoraTokens, layout: Layout, device: torch.device) -> None:
    """Place the embedders' and the main layers' tokens of the regional forward (see the module doc)."""
    image, segments = image_sources(layout), range(len(layout.raw))
    tokens.place(PATCHES, image.repeat(layout.batch).to(device))
    tokens.place(CAPTIONS, torch.cat([segment_sources(layout, s, b) for s in segments
                                      for b in range(layout.batch)]).to(device))
    padding_first = image.roll(layout.image_pad)  # [image padding | image]
    unified = [torch.cat([*(segment_sources(layout, s, b) for s in segments), padding_first])
               for b in range(layout.batch)]
    tokens.place(UNIFIED, batched(unified).to(device))


def place_refined_segment(tokens: LoraTokens, layout: Layout, s: int, device: torch.device) -> None:
    """Place segment ``s``'s tokens for the context refiner's pass over it (regional forward)."""
    tokens.place(REFINED_TEXT, batched([segment_sources(layout, s, b) for b in range(layout.batch)]).to(device))


def place_stock(tokens: LoraTokens, layout: Layout, device: torch.device) -> None:
    """Place every stream of diffusers' own forward of one caption per sample (see the module doc)."""
    image = image_sources(layout)
    captions = [segment_sources(layout, 0, b) for b in range(layout.batch)]
    tokens.place(PATCHES, image.repeat(layout.batch).to(device))
    tokens.place(CAPTIONS, torch.cat(captions).to(device))
    tokens.place(REFINED_TEXT, batched(captions).to(device))
    tokens.place(UNIFIED, batched([torch.cat([image, caption]) for caption in captions]).to(device))
