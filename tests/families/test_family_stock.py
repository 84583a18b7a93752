"""Zero entities are the stock diffusers pipeline, bit for bit (docs/design.md sections 1 and 10): the family's EliGen
pipeline and its diffusers parent (``card.pipelines[0]``), on the same weights, seed and arguments."""

from __future__ import annotations

import inspect

import pytest
import torch

from families.support import accepted, call_kwargs, cfg_kwargs, gen


@pytest.mark.parametrize("output_type", ["latent", "pt"], ids=["latents", "decoded"])
@pytest.mark.parametrize("cfg", [False, True], ids=["no-cfg", "true-cfg"])
def test_zero_entities_equal_the_stock_pipeline(pipe, stock_pipe, cfg, output_type):
    assert isinstance(pipe, type(stock_pipe)) and type(pipe) is not type(stock_pipe)  # EliGen subclasses stock
    card = pipe.family.card
    if cfg and not {"negative_prompt", card.cfg_argument} <= set(inspect.signature(stock_pipe.__call__).parameters):
        pytest.skip(f"{type(stock_pipe).__name__} takes no negative_prompt / {card.cfg_argument}: the family's own "
                    "tests compare its CFG with the stock pipeline's")
    extra = cfg_kwargs(pipe, cfg)
    ours = pipe(**call_kwargs(pipe, output_type=output_type, **extra), generator=gen(1)).images
    theirs = stock_pipe(**accepted(stock_pipe, call_kwargs(pipe, output_type=output_type, **extra)),
                        generator=gen(1)).images
    assert isinstance(ours, torch.Tensor) and isinstance(theirs, torch.Tensor)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert torch.equal(ours, theirs)
    if cfg:  # the negative branch ran: without it the stock pipeline gives something else
        off = call_kwargs(pipe, output_type=output_type, **cfg_kwargs(pipe, False))
        plain = stock_pipe(**accepted(stock_pipe, off), generator=gen(1)).images
        assert not torch.equal(plain, theirs)
