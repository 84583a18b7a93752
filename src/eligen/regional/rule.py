"""The one rule of regional attention: which token may see which (docs/design.md section 2).

A token's *kind* is its text segment (``0..N-1`` the entities, ``N`` the global prompt) or ``N + 1`` for the
image tokens. With ``sees (B, N + 1, n_img)`` the entity covers plus an all-true row for the global prompt::

    allowed(q, k) = kind[q] == kind[k]                          # own segment; image <-> image
                  | text(q) & image(k) & sees[kind[q], k - T]   # a text segment sees the image tokens it covers
                  | image(q) & text(k) & sees[kind[k], q - T]   # and those image tokens see it

So an image token sees every image token, the global prompt and each entity covering it; segments never see
each other (the global prompt included). The dense mask (:mod:`.dense`) and the FlexAttention ``mask_mod``
(:mod:`.flex`) both evaluate :func:`allowed`; the segmented form (:mod:`.segmented`) is tested against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def segment_ids(entity_lengths: Sequence[int], global_length: int) -> torch.Tensor:
    """``(T,)`` segment id of every text token: ``0..N-1`` for the entities, ``N`` for the global prompt."""
    lengths = torch.tensor([*entity_lengths, global_length], dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths)


class RegionalTables:
    """What :func:`allowed` reads: ``kind (L,)`` long, ``sees (B, N + 1, n_img)`` bool and the text length.

    Mutable on purpose: a FlexAttention slot keeps one ``RegionalTables`` and refills it for each new layout.
    """

    kind: torch.Tensor
    sees: torch.Tensor
    n_text: int
    image_kind: int
    last: int
    last_image: int

    def fill(self, cover: torch.Tensor, entity_lengths: Sequence[int], global_length: int) -> RegionalTables:
        """Set the tables for covers ``(B, N, n_img)`` bool over ``[e_1 | ... | e_N | global | image]``."""
        if cover.ndim != 3 or cover.shape[1] != len(entity_lengths):
            raise ValueError(f"cover must be (B, N, n_img) with N = {len(entity_lengths)}, got {tuple(cover.shape)}")
        batch, _, n_img = cover.shape
        device = cover.device
        text_kind = segment_ids(entity_lengths, global_length).to(device)
        self.image_kind = len(entity_lengths) + 1
        image_kind = torch.full((n_img,), self.image_kind, dtype=torch.long, device=device)
        self.kind = torch.cat([text_kind, image_kind])
        self.sees = torch.cat([cover.bool(), torch.ones(batch, 1, n_img, dtype=torch.bool, device=device)], dim=1)
        self.n_text = text_kind.numel()
        self.last, self.last_image = self.kind.numel() - 1, n_img - 1
        return self


def regional_tables(cover: torch.Tensor, entity_lengths: Sequence[int], global_length: int) -> RegionalTables:
    return RegionalTables().fill(cover, entity_lengths, global_length)


def allowed(t: RegionalTables, b: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """May query ``q`` attend to key ``k`` in sample ``b``? Broadcasts over index tensors; indices past the end
    (kernels probe padded tiles) are clamped."""
    kind_q, kind_k = t.kind[q.clamp(max=t.last)], t.kind[k.clamp(max=t.last)]
    image_q, image_k = kind_q == t.image_kind, kind_k == t.image_kind
    pos_q = (q - t.n_text).clamp(0, t.last_image)
    pos_k = (k - t.n_text).clamp(0, t.last_image)
    text_sees_image = ~image_q & image_k & t.sees[b, kind_q.clamp(max=t.image_kind - 1), pos_k]
    image_sees_text = image_q & ~image_k & t.sees[b, kind_k.clamp(max=t.image_kind - 1), pos_q]
    return (kind_q == kind_k) | text_sees_image | image_sees_text
