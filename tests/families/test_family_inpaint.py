"""Inpainting fusion, ``fusion="exact"`` (docs/design.md section 5): the packed latents outside the union of the entity
masks end at the input image's latents, with true CFG or without; inside it they are repainted. The union is the
oracle's (:func:`families.oracles.latent_union`), packed with ``eligen.inpaint.pack_mask``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eligen.inpaint import pack_mask
from families import oracles
from families.support import call_kwargs, cfg_kwargs, entity_kwargs, gen, image_size, packed

CFG = pytest.mark.parametrize("cfg", [False, True], ids=["no-cfg", "true-cfg"])


def inpaint(pipe, cfg: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, z_init, inside)``: the call's packed latents, the input's, and the oracle's union packed like them."""
    height, width = image_size(pipe)
    rgb = np.random.default_rng(4).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ents = entity_kwargs(2)
    out = packed(pipe(**call_kwargs(pipe, **cfg_kwargs(pipe, cfg)), image=rgb, inpaint=True, **ents,
                      generator=gen(5)).images)
    z_init = pipe.encode_image_latents(rgb, out.device, out.dtype).expand_as(out)
    patch = pipe.family.patch_size
    union = oracles.latent_union(ents["entity_masks"], height, width, pipe.vae_scale_factor, patch)
    inside = pack_mask(torch.from_numpy(union), out.shape[-1] // patch**2, patch).bool().expand_as(out)
    assert inside.any() and not inside.all()
    return out, z_init, inside


@CFG
def test_exact_fusion_keeps_the_latents_outside_the_union(pipe, cfg):
    out, z_init, inside = inpaint(pipe, cfg)
    torch.testing.assert_close(out[~inside], z_init[~inside], rtol=0, atol=1e-6)
    assert (out - z_init)[inside].abs().mean() > 1e-2  # the entities were repainted


@CFG
def test_exact_fusion_ends_bit_for_bit_on_the_input_latents(pipe, cfg):
    out, z_init, inside = inpaint(pipe, cfg)
    assert torch.equal(out[~inside], z_init[~inside])
