"""Regional locality (docs/design.md sections 2 and 11): in a one-block transformer, one step, an image token sees
entity i's prompt only if entity i covers it. So changing entity i's prompt moves no packed image token outside its
token cover (the oracle's, :func:`families.oracles.token_cover`), and moves some token inside it; in every form of
the mask."""

from __future__ import annotations

import pytest
import torch

from families.support import (
    ENTITY_PROMPTS,
    OTHER_PROMPTS,
    call_kwargs,
    cfg_kwargs,
    entity_kwargs,
    gen,
    packed,
    spy_velocity,
    token_covers,
)


@pytest.mark.parametrize("attention", ["dense", "flex", "segmented"])
def test_an_entity_prompt_moves_only_the_tokens_it_covers(one_layer_pipe, monkeypatch, attention):
    pipe = one_layer_pipe
    blocks = [getattr(pipe.transformer, name, ()) for name in pipe.family.block_lists]
    assert sum(len(b) for b in blocks) == 1  # one block: no image-to-image relay of what an entity wrote
    seen = spy_velocity(pipe, monkeypatch)

    def one_step(prompts):
        """``(packed latents (n_img, C), the branch's TokenSequence)`` of one step with these entity prompts."""
        seen.clear()
        out = packed(pipe(**call_kwargs(pipe, num_inference_steps=1, **cfg_kwargs(pipe, False)),
                          **entity_kwargs(len(prompts), prompts), attention=attention, generator=gen(6)).images)
        assert len(seen) == 1  # no true CFG: one forward
        return out[0], seen[0]["sequence"]

    prompts = list(ENTITY_PROMPTS)
    base, sequence = one_step(prompts)
    covers = torch.tensor(token_covers(pipe, entity_kwargs(len(prompts))["entity_masks"]))
    assert covers.shape == (len(prompts), base.shape[0])
    for i, other in enumerate(OTHER_PROMPTS):
        changed, changed_sequence = one_step([*prompts[:i], other, *prompts[i + 1:]])
        # the same segment lengths: the attention runs over the same layout, so untouched tokens are bit-equal
        assert changed_sequence == sequence, "pick replacement prompts of the same token length"
        moved = (changed != base).any(dim=-1)
        outside = moved & ~covers[i]
        assert not outside.any(), f"entity {i}'s prompt moved tokens it does not cover: {outside.nonzero().ravel()}"
        assert moved[covers[i]].any(), f"entity {i}'s prompt moved none of its tokens"
