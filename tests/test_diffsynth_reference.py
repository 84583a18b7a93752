"""Our regional attention against the reference implementation itself (DiffSynth-Studio's ``diffsynth``).

Runs only where ``diffsynth`` is importable (it is not a dependency: it pulls torchvision and more). The
FLUX transformer has FLUX.1's full widths (the reference hard-codes them) but one block of each kind, random
weights, fp32 on the CPU; both sides hold the same weights through DiffSynth's own diffusers key converter. The
Qwen-Image transformer has Qwen-Image's widths and one block; the reference uses diffusers' key names as they are.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from eligen.families.flux.model import FLUX
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


# -- Qwen-Image ----------------------------------------------------------------------------------------------------

QWEN_LENGTHS = (5, 9, 3)  # unpadded entity segments of different lengths (docs/design.md section 11)
QWEN_GLOBAL = 7


@pytest.fixture(scope="module")
def qwen_models():
    """Qwen-Image's widths, one block, random weights; the reference shares the tensors (same key names)."""
    from diffusers import QwenImageTransformer2DModel

    from eligen.families.qwen_image.model import QWEN_IMAGE

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(num_layers=1).eval().requires_grad_(False)
    install_regional_processors(model, QWEN_IMAGE.processors)
    return model, ref.reference_qwen_dit(model), ref.reference_qwen_dit(model, diffusers_activation=False)


def qwen_inputs(n: int):
    g = torch.Generator().manual_seed(10 + n)
    latents = torch.randn(1, 16, LATENT, LATENT, generator=g)
    prompt = torch.randn(1, QWEN_GLOBAL, 3584, generator=g)
    entity_prompts = [torch.randn(1, length, 3584, generator=g) for length in QWEN_LENGTHS[:n]]
    return latents, prompt, entity_prompts, latent_masks(n, g)


def qwen_ours(model, latents, prompt, entity_prompts, masks, attention: str) -> torch.Tensor:
    """Ours: ``[e_1 | ... | e_N | global]`` unpadded, positions restarting per segment, the mask in the processor."""
    from diffusers import QwenImagePipeline

    from eligen.families.base import Branch
    from eligen.families.qwen_image.model import QWEN_IMAGE
    from eligen.regional.sequence import TokenSequence

    lengths = [e.shape[1] for e in entity_prompts]
    mask = None
    if lengths:
        cover = token_cover(masks[:, :, 0].bool())
        builder = {"dense": regional_attention_mask, "flex": regional_block_mask, "segmented": segmented_mask}
        mask = builder[attention](cover, lengths, QWEN_GLOBAL)
    branch = Branch(torch.cat([*entity_prompts, prompt], dim=1), attention_mask=mask,
                    positions=QWEN_IMAGE.positions(TokenSequence.of(lengths, QWEN_GLOBAL), torch.device("cpu"),
                                                   torch.float32))
    packed = QwenImagePipeline._pack_latents(latents, 1, 16, LATENT, LATENT)
    with torch.no_grad():
        return QWEN_IMAGE.forward(model, packed, torch.tensor([0.7]), branch, [[(1, LATENT // 2, LATENT // 2)]], None)


@pytest.mark.parametrize("attention", ["dense", "flex", "segmented"])
@pytest.mark.parametrize("n", [0, 1, 3])
def test_qwen_image_forward_equals_the_reference(qwen_models, attention, n):
    model, dit, _ = qwen_models
    latents, prompt, entity_prompts, masks = qwen_inputs(n)
    with torch.no_grad():
        expected = ref.reference_qwen_forward(dit, latents, torch.tensor([700.0]), prompt, entity_prompts,
                                              masks if n else None)
    ours = qwen_ours(model, latents, prompt, entity_prompts, masks, attention)
    assert (ours - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


def test_qwen_image_reference_activation_is_what_the_comparison_aligns(qwen_models):
    """The reference's own MLP activation (x * sigmoid(1.702 x)) differs from diffusers' tanh-GELU: the aligned
    reference above is needed, and the unaligned one really is the reference's."""
    model, _, own = qwen_models
    latents, prompt, entity_prompts, masks = qwen_inputs(1)
    with torch.no_grad():
        expected = ref.reference_qwen_forward(own, latents, torch.tensor([700.0]), prompt, entity_prompts, masks)
    ours = qwen_ours(model, latents, prompt, entity_prompts, masks, "dense")
    tolerance = 1e-5 * max(1.0, expected.abs().max().item())  # that of the equivalence test
    assert (ours - expected).abs().max().item() > 10 * tolerance
