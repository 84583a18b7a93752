"""The regional mask of a call: built once per call and per CFG branch that carries entities, whatever its form, and
equal to the suite's oracle (:func:`families.oracles.regional_mask`) over the branch's own segments
(docs/design.md sections 2 and 11)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import eligen.regional.sequence as sequence_module
from families import oracles
from families.support import STEPS, call_kwargs, cfg_kwargs, entity_kwargs, gen, spy_velocity, token_covers

BUILDERS = {"dense": "regional_attention_mask", "flex": "regional_block_mask", "segmented": "segmented_mask"}


@pytest.fixture
def builds(monkeypatch) -> list[str]:
    """The name of every regional-mask builder ``eligen.regional.sequence`` calls, in order."""
    called: list[str] = []
    for name in BUILDERS.values():
        original = getattr(sequence_module, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            called.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(sequence_module, name, counting)
    return called


@pytest.mark.parametrize("entities_on_negative", [False, True], ids=["plain-negative", "entities-on-negative"])
@pytest.mark.parametrize("attention", list(BUILDERS))
def test_the_mask_is_built_once_per_branch_with_entities(pipe, builds, monkeypatch, attention, entities_on_negative):
    seen = spy_velocity(pipe, monkeypatch)
    pipe(**call_kwargs(pipe, **cfg_kwargs(pipe, True)), **entity_kwargs(2), attention=attention,
         entities_on_negative=entities_on_negative, generator=gen(2))
    assert len(seen) == 2 * STEPS  # both branches ran at every step
    branches = {id(s["branch"]): s for s in seen}
    assert len(branches) == 2
    with_entities = [s for s in branches.values() if s["sequence"].entities]
    assert len(with_entities) == (2 if entities_on_negative else 1)
    assert all(s["mask"] is not None for s in with_entities)
    assert all(s["mask"] is None for s in branches.values() if not s["sequence"].entities)
    assert builds and set(builds) == {BUILDERS[attention]}  # the form asked for, and only that one
    if entities_on_negative:
        assert 1 <= len(builds) <= 2, builds
    else:
        assert len(builds) == 1, builds


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("cfg", [False, True], ids=["no-cfg", "entities-on-negative"])
def test_the_mask_equals_the_oracle(pipe, monkeypatch, count, cfg):
    seen = spy_velocity(pipe, monkeypatch)
    ents = entity_kwargs(count)
    extra = {**cfg_kwargs(pipe, cfg), **({"entities_on_negative": True} if cfg else {})}
    pipe(**call_kwargs(pipe, num_inference_steps=1, **extra), **ents, attention="dense", generator=gen(3))
    assert len(seen) == (2 if cfg else 1)
    covers = token_covers(pipe, ents["entity_masks"])
    n_img = seen[0]["latents"].shape[1]
    assert all(len(c) == n_img for c in covers)  # the oracle's token grid is the pipeline's
    for record in seen:  # every branch carries the entities here
        branch, sequence, mask = record["branch"], record["sequence"], record["mask"]
        assert sequence.entities == count
        assert sequence.text_length == branch.context.shape[1]
        expected = oracles.regional_mask(covers, sequence.entity_lengths, sequence.global_length, n_img)
        assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
        assert tuple(mask.shape) == (1, 1, *expected.shape)
        assert np.array_equal(mask[0, 0].cpu().numpy(), expected)
