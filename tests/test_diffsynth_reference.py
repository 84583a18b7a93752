"""Our regional attention against the reference implementation itself (DiffSynth-Studio's ``diffsynth``).

Runs only where ``diffsynth`` is importable (it is not a dependency: it pulls torchvision and more). The
transformer has FLUX.1's full widths (the reference hard-codes them) but one block of each kind, random
weights, fp32 on the CPU; both sides hold the same weights through DiffSynth's own diffusers key converter.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from eligen.families.flux import FLUX
from eligen.masks import token_cover
from eligen.regional.dense import regional_attention_mask
from eligen.regional.flex import regional_block_mask
from eligen.regional.processors import install_regional_processors
from eligen.regional.segmented import segmented_mask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import diffsynth_reference as ref

# `make test` provides the reference modules and requires them; elsewhere the test skips without them.
if os.environ.get("ELIGEN_REQUIRE_DIFFSYNTH") and not ref.available():
    raise RuntimeError("ELIGEN_REQUIRE_DIFFSYNTH is set but diffsynth is not importable: run "
                       "bash benchmarks/diffsynth_min.sh and put .diffsynth-min on PYTHONPATH")
pytestmark = pytest.mark.skipif(not ref.available(), reason="the reference package diffsynth is not importable")

LATENT = 8  # latent side: 4 x 4 = 16 image tokens
SEGMENT = 6  # T5 tokens per prompt segment


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True).eval()
    model.requires_grad_(False)
    install_regional_processors(model, FLUX.processors)  # every mask form reaches attention through eligen's processors
    return model, ref.reference_dit(model)


def latent_masks(n: int, generator: torch.Generator) -> torch.Tensor:
    """``(1, n, 1, LATENT, LATENT)`` float 0/1: random rectangles on the latent grid (one may be empty)."""
    masks = torch.zeros(1, n, 1, LATENT, LATENT)
    for i in range(n):
        y0, x0 = torch.randint(0, LATENT - 1, (2,), generator=generator).tolist()
        y1, x1 = y0 + 1 + torch.randint(0, LATENT - y0, (1,), generator=generator).item(), \
            x0 + 1 + torch.randint(0, LATENT - x0, (1,), generator=generator).item()
        masks[0, i, 0, y0:y1, x0:x1] = 1
    return masks


@pytest.mark.parametrize("attention", ["dense", "flex", "segmented"])
@pytest.mark.parametrize("n", [0, 1, 3])
def test_forward_equals_the_reference(models, attention, n):
    model, dit = models
    g = torch.Generator().manual_seed(n)
    latents = torch.randn(1, 16, LATENT, LATENT, generator=g)
    prompt = torch.randn(1, SEGMENT, 4096, generator=g)
    entity_prompts = torch.randn(1, n, SEGMENT, 4096, generator=g)
    masks = latent_masks(n, g)
    pooled, sigma, guidance = torch.randn(1, 768, generator=g), torch.tensor([0.7]), torch.tensor([3.5])

    expected = ref.reference_forward(dit, latents, sigma * 1000, prompt, pooled, guidance,
                                     entity_prompts if n else None, masks if n else None)

    # Ours: entity segments then the global prompt, text ids zero, the bool mask through joint_attention_kwargs.
    text = torch.cat([*entity_prompts.unbind(1), prompt], dim=1)
    cover = token_cover(masks[:, :, 0].bool())
    lengths = [SEGMENT] * n
    mask = {
        "dense": lambda: regional_attention_mask(cover, lengths, SEGMENT),
        "flex": lambda: regional_block_mask(cover, lengths, SEGMENT),
        "segmented": lambda: segmented_mask(cover, lengths, SEGMENT),
    }[attention]
    kwargs = {"joint_attention_kwargs": {"attention_mask": mask()}} if n else {}
    with torch.no_grad():
        ours = model(hidden_states=FluxPipeline._pack_latents(latents, 1, 16, LATENT, LATENT), timestep=sigma,
                     guidance=guidance, pooled_projections=pooled, encoder_hidden_states=text,
                     txt_ids=torch.zeros(text.shape[1], 3),
                     img_ids=FluxPipeline._prepare_latent_image_ids(1, LATENT // 2, LATENT // 2, "cpu", torch.float32),
                     return_dict=False, **kwargs)[0]
    scale = expected.abs().max().item()
    assert (ours - expected).abs().max().item() <= 1e-5 * max(1.0, scale)
