"""Regional attention as processors: no global state, stock numerics without a mask, one rule for every form."""

from __future__ import annotations

import threading

import numpy as np
import torch
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0
from hypothesis import given, settings
from hypothesis import strategies as st

from eligen import EliGenPipeline, EliGenQwenImagePipeline, Entity
from eligen.families.flux.model import RegionalFluxAttnProcessor
from eligen.families.qwen_image.model import RegionalQwenAttnProcessor
from eligen.regional.dense import regional_attention_mask
from eligen.regional.flex import regional_block_mask
from eligen.regional.rule import allowed, regional_tables
from reference import reference_mask_segments

FLUX_CALL = dict(prompt="a red circle", height=32, width=48, num_inference_steps=3, max_sequence_length=16,
                 output_type="latent", negative_prompt="blurry", true_cfg_scale=3.0)
QWEN_CALL = dict(prompt="a red circle", height=32, width=48, num_inference_steps=3, output_type="latent",
                 negative_prompt="blurry", true_cfg_scale=4.0)
LAYOUT_A = [Entity("a dog", box=(2, 2, 14, 10)), Entity("a cat", box=(20, 12, 46, 30))]
LAYOUT_B = [Entity("a blue square", box=(0, 0, 24, 32))]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_pipelines_install_their_processors_and_keep_stock_numerics(tiny_pipeline_dir, tiny_qwen_dir):
    flux = EliGenPipeline.from_pretrained(tiny_pipeline_dir)
    qwen = EliGenQwenImagePipeline.from_pretrained(tiny_qwen_dir)
    assert all(type(p) is RegionalFluxAttnProcessor for p in flux.transformer.attn_processors.values())
    assert all(type(p) is RegionalQwenAttnProcessor for p in qwen.transformer.attn_processors.values())
    g = gen(0)
    flux_attn = flux.transformer.transformer_blocks[0].attn
    image, text = torch.randn(1, 24, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    ours = RegionalFluxAttnProcessor()(flux_attn, image, text)
    stock = FluxAttnProcessor()(flux_attn, image, text)
    assert all(torch.equal(a, b) for a, b in zip(ours, stock, strict=True))
    qwen_attn = qwen.transformer.transformer_blocks[0].attn
    padding = torch.tensor([[True] * 4 + [False]])
    rope = (torch.polar(torch.ones(24, 8), torch.randn(24, 8, generator=g)),
            torch.polar(torch.ones(5, 8), torch.randn(5, 8, generator=g)))
    for mask in (None, padding):
        ours = RegionalQwenAttnProcessor()(qwen_attn, image, text, mask, image_rotary_emb=rope)
        stock = QwenDoubleStreamAttnProcessor2_0()(qwen_attn, image, text, mask, image_rotary_emb=rope)
        assert all(torch.equal(a, b) for a, b in zip(ours, stock, strict=True))


def run_alone_and_together(jobs):
    alone = [job() for job in jobs]
    together: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def work(i):
        barrier.wait()
        together[i] = jobs[i]()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return alone, together


def test_two_pipelines_in_two_threads_do_not_interfere(tiny_pipeline_dir, tiny_qwen_dir):
    """Flex masks live in per-pipeline slots and nothing is swapped in diffusers' registry, so concurrent calls
    with different layouts and attention forms give what each gives alone."""
    pipes = [EliGenPipeline.from_pretrained(tiny_pipeline_dir) for _ in range(2)]
    qwen = EliGenQwenImagePipeline.from_pretrained(tiny_qwen_dir)
    for p in (*pipes, qwen):
        p.set_progress_bar_config(disable=True)
    jobs = [
        lambda: pipes[0](**FLUX_CALL, entities=LAYOUT_A, attention="flex", generator=gen(1)).images,
        lambda: pipes[1](**FLUX_CALL, entities=LAYOUT_B, attention="flex", generator=gen(2)).images,
        lambda: qwen(**QWEN_CALL, entities=LAYOUT_A, attention="segmented", generator=gen(3)).images,
    ]
    active = _AttentionBackendRegistry.get_active_backend()[0]
    alone, together = run_alone_and_together(jobs)
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(alone[0], alone[1])
    assert _AttentionBackendRegistry.get_active_backend()[0] == active  # the registry was never touched


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=0, max_size=3), st.integers(1, 4), st.integers(1, 6),
       st.randoms(use_true_random=False))
def test_every_form_is_the_one_rule(lengths, global_len, n_img, rnd):
    covers = [[rnd.random() < 0.5 for _ in range(n_img)] for _ in lengths]
    cover = torch.tensor(covers, dtype=torch.bool).reshape(1, len(lengths), n_img)
    expected = reference_mask_segments(covers, lengths, global_len, n_img)
    dense = regional_attention_mask(cover, lengths, global_len)
    assert torch.equal(dense, expected)
    tables = regional_tables(cover, lengths, global_len)
    size = expected.shape[-1]
    q, k = torch.arange(size)[:, None], torch.arange(size)[None, :]
    assert torch.equal(allowed(tables, torch.zeros(1, 1, dtype=torch.long), q, k), expected[0, 0])
    block = regional_block_mask(cover, lengths, global_len, block_size=4)
    assert np.array_equal(block.to_dense().bool().numpy()[0, 0], _blocks_of(expected[0, 0], 4))


def _blocks_of(mask: torch.Tensor, size: int) -> np.ndarray:
    """Which ``size x size`` tiles of ``mask`` hold any allowed pair (the BlockMask's coarse structure)."""
    n = -(-mask.shape[0] // size)
    padded = torch.zeros(n * size, n * size, dtype=torch.bool)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    return padded.view(n, size, n, size).any(dim=3).any(dim=1).numpy()


def test_a_pipelines_flex_slot_is_its_own(tiny_pipeline_dir):
    """A mask built in one pipeline's slot keeps its layout when another pipeline builds its own."""
    a, b = (EliGenPipeline.from_pretrained(tiny_pipeline_dir) for _ in range(2))
    assert a._flex_slot("cond") is not b._flex_slot("cond") and a._flex_slot("cond") is a._flex_slot("cond")
    cover_a = torch.tensor([[[True, False, False, True]]])
    mask_a = regional_block_mask(cover_a, [3], 2, block_size=4, slot=a._flex_slot("cond"))
    regional_block_mask(~cover_a, [3], 2, block_size=4, slot=b._flex_slot("cond"))
    size = 3 + 2 + 4
    q, k = torch.arange(size)[:, None], torch.arange(size)[None, :]
    values = mask_a.mask_mod(torch.zeros(1, 1, dtype=torch.long), 0, q, k)
    assert torch.equal(values, reference_mask_segments(cover_a[0].tolist(), [3], 2, 4)[0, 0])
