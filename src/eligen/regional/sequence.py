"""The joint token sequence of one CFG branch, described once: ``[e_1 | ... | e_N | global | image]``.

Entity segments come first, then the global prompt, then the image tokens (text first, as diffusers concatenates
the streams). A :class:`TokenSequence` knows the text segments' lengths; it joins and splits text embeddings, says
where each segment sits, builds the regional mask (:mod:`.rule`) in any of its forms, and drops the entities for
``entity_steps``. The pipelines, the trainer and the families all describe their sequences with it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import torch

from .dense import regional_attention_mask
from .flex import FlexSlot, regional_block_mask
from .segmented import segmented_mask

MASK_FORMS = ("dense", "flex", "segmented")


@dataclass(frozen=True)
class TokenSequence:
    """Text segment lengths of ``[e_1 | ... | e_N | global]``; the image tokens follow them."""

    entity_lengths: tuple[int, ...]
    global_length: int

    @classmethod
    def of(cls, entity_lengths: Sequence[int], global_length: int) -> TokenSequence:
        return cls(tuple(int(n) for n in entity_lengths), int(global_length))

    @property
    def entities(self) -> int:
        return len(self.entity_lengths)

    @property
    def entity_length(self) -> int:
        """Text tokens of all entity segments together (where the global prompt starts)."""
        return sum(self.entity_lengths)

    @property
    def text_length(self) -> int:
        """All text tokens (where the image tokens start)."""
        return self.entity_length + self.global_length

    @property
    def lengths(self) -> tuple[int, ...]:
        """Every text segment's length, the global prompt last."""
        return (*self.entity_lengths, self.global_length)

    def slices(self) -> list[slice]:
        """Every text segment's slice of the sequence, the global prompt last."""
        starts = [0, *itertools.accumulate(self.lengths)]
        return [slice(a, b) for a, b in itertools.pairwise(starts)]

    def join(self, entity_embeds: Sequence[torch.Tensor], global_embeds: torch.Tensor) -> torch.Tensor:
        """``(B, T_i, ...)`` segments and ``(B, T, ...)`` global -> the text ``(B, sum T_i + T, ...)``."""
        lengths = tuple(e.shape[1] for e in entity_embeds)
        if lengths != self.entity_lengths or global_embeds.shape[1] != self.global_length:
            raise ValueError(f"segments of lengths {lengths} + {global_embeds.shape[1]} do not make the sequence "
                             f"{self.entity_lengths} + {self.global_length}")
        return torch.cat([*entity_embeds, global_embeds], dim=1)

    def global_part(self, text: torch.Tensor) -> torch.Tensor:
        """The global prompt's part ``(B, T, ...)`` of a joined text ``(B, sum T_i + T, ...)``."""
        return text[:, self.entity_length:]

    def global_only(self) -> TokenSequence:
        """The same branch without its entities (``entity_steps``: the plain forward of the global prompt)."""
        return TokenSequence((), self.global_length)

    def with_entities(self, entity_lengths: Sequence[int]) -> TokenSequence:
        return TokenSequence.of(entity_lengths, self.global_length)

    @overload
    def text_valid(self, global_valid: torch.Tensor,
                   entity_valid: Sequence[torch.Tensor] | None = None) -> torch.Tensor: ...

    @overload
    def text_valid(self, global_valid: torch.Tensor | None,
                   entity_valid: Sequence[torch.Tensor] | None = None) -> torch.Tensor | None: ...

    def text_valid(self, global_valid: torch.Tensor | None,
                   entity_valid: Sequence[torch.Tensor] | None = None) -> torch.Tensor | None:
        """The joined text's padding mask ``(B, sum T_i + T)`` (True = a real token) from the global prompt's
        ``(B, T)`` and the entities' ``(B, T_i)`` (None: every token of the segment is real); None when every token
        is real."""
        if global_valid is None and not entity_valid:
            return None
        reference = global_valid
        if reference is None:
            assert entity_valid  # the early return leaves a global mask or at least one entity mask
            reference = entity_valid[0]
        batch = reference.shape[0]
        device = reference.device
        parts = list(entity_valid) if entity_valid else [torch.ones(batch, n, dtype=torch.bool, device=device)
                                                          for n in self.entity_lengths]
        parts.append(global_valid.bool() if global_valid is not None
                     else torch.ones(batch, self.global_length, dtype=torch.bool, device=device))
        return torch.cat([p.bool() for p in parts], dim=1)

    def mask(self, cover: torch.Tensor, form: str = "dense", slot: FlexSlot | None = None):
        """The regional mask over ``[entities | global | image]`` for covers ``(B, N, n_img)`` bool, in the form
        ``form`` needs: a dense bool ``(B, 1, L, L)``, a FlexAttention BlockMask (in ``slot``, so a compiled
        transformer keeps its graphs from call to call) or a :class:`~.segmented.SegmentedMask`."""
        if form == "flex":
            return regional_block_mask(cover, self.entity_lengths, self.global_length, slot=slot)
        if form == "segmented":
            return segmented_mask(cover, self.entity_lengths, self.global_length)
        if form != "dense":
            raise ValueError(f"the regional mask's form is one of {MASK_FORMS}, got {form!r}")
        return regional_attention_mask(cover, self.entity_lengths, self.global_length)

    def positions_restarting(self, device: torch.device | None = None) -> torch.Tensor:
        """``(T,)`` long: ``0 .. T_i - 1`` within every segment (each restarts where the global prompt starts)."""
        return torch.cat([torch.arange(n, device=device) for n in self.lengths])
