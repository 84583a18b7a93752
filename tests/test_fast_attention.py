"""FlexAttention block masks, entity token trimming and compilation (CPU, fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_mask, flex_attention

import eligen.regional.sequence as pipeline_module
from eligen import Entity
from eligen.families.flux.model import TRIM_MARGIN
from eligen.regional.dense import regional_attention_mask
from eligen.regional.flex import regional_block_mask, regional_mask_mod

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def layouts(draw):
    batch = draw(st.integers(1, 2))
    n = draw(st.integers(0, 4))
    lengths = draw(st.lists(st.integers(1, 40), min_size=n, max_size=n))
    global_length = draw(st.integers(1, 40))
    n_img = draw(st.integers(1, 90))
    seed = draw(st.integers(0, 2**16))
    density = draw(st.sampled_from([0.0, 0.2, 0.6, 1.0]))
    cover = torch.rand(batch, n, n_img, generator=torch.Generator().manual_seed(seed)) < density
    block = draw(st.sampled_from([16, 32, 128]))
    return cover, lengths, global_length, block


@SETTINGS
@given(layouts())
def test_mask_mod_equals_the_dense_mask(layout):
    cover, lengths, global_length, _ = layout
    dense = regional_attention_mask(cover, lengths, global_length)
    length = dense.shape[-1]
    mask_mod = regional_mask_mod(cover, lengths, global_length)
    assert torch.equal(create_mask(mask_mod, cover.shape[0], 1, length, length, device="cpu"), dense)


@SETTINGS
@given(layouts())
def test_block_structure_is_exact(layout):
    """Listed partial blocks hold some allowed and some masked pairs, full blocks only allowed ones, and every
    block with an allowed pair is listed: the sparsity is exact, not just safe."""
    cover, lengths, global_length, block = layout
    dense = regional_attention_mask(cover, lengths, global_length)[:, 0]
    length = dense.shape[-1]
    blocks = -(-length // block)
    padded = torch.full((dense.shape[0], blocks * block, blocks * block), -1, dtype=torch.int8)
    padded[:, :length, :length] = dense.to(torch.int8)
    tiles = padded.view(dense.shape[0], blocks, block, blocks, block).permute(0, 1, 3, 2, 4)
    any_on = (tiles == 1).any(-1).any(-1)
    all_on = ((tiles == 1) | (tiles == -1)).all(-1).all(-1)
    mask = regional_block_mask(cover, lengths, global_length, block_size=block)
    for b in range(dense.shape[0]):
        for q in range(blocks):
            partial = set(mask.kv_indices[b, 0, q, : mask.kv_num_blocks[b, 0, q]].tolist())
            full = set(mask.full_kv_indices[b, 0, q, : mask.full_kv_num_blocks[b, 0, q]].tolist())
            assert not partial & full
            for k in range(blocks):
                if not any_on[b, q, k]:
                    assert k not in partial and k not in full
                elif all_on[b, q, k]:
                    assert k in full
                else:
                    assert k in partial


@settings(max_examples=15, deadline=None)
@given(layouts())
def test_flex_attention_equals_dense_sdpa(layout):
    cover, lengths, global_length, block = layout
    dense = regional_attention_mask(cover, lengths, global_length)
    batch, length = dense.shape[0], dense.shape[-1]
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(batch, 2, length, 8, generator=g) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    out = flex_attention(q, k, v, block_mask=regional_block_mask(cover, lengths, global_length, block_size=block))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


ENTITIES = [Entity("a red circle", box=(0, 0, 20, 16)), Entity("a blue square", box=(12, 8, 32, 32)),
            Entity("a green triangle", polygon=[(0, 32), (10, 14), (20, 32)])]
CALL = dict(prompt="shapes on gray", height=32, width=32, num_inference_steps=2, max_sequence_length=16,
            output_type="latent")


def run(pipe, **overrides):
    return pipe(**{**CALL, **overrides}, generator=torch.Generator().manual_seed(3)).images


@pytest.mark.parametrize("on_negative", [False, True])
def test_pipeline_flex_equals_dense(tiny_pipe, on_negative):
    kwargs = dict(entities=ENTITIES, negative_prompt="blurry", true_cfg_scale=3.0, entities_on_negative=on_negative)
    dense = run(tiny_pipe, attention="dense", **kwargs)
    flex = run(tiny_pipe, attention="flex", **kwargs)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dense, run(tiny_pipe, attention="dense", negative_prompt="blurry", true_cfg_scale=3.0))


def test_auto_is_dense_off_cuda(tiny_pipe, monkeypatch):
    built = []
    monkeypatch.setattr(pipeline_module, "regional_block_mask", lambda *a, **k: built.append(1))
    assert torch.equal(run(tiny_pipe, entities=ENTITIES), run(tiny_pipe, entities=ENTITIES, attention="dense"))
    assert built == []


@pytest.mark.parametrize("attention", ["dense", "flex", "segmented"])
def test_masks_built_once_per_call_and_branch(tiny_pipe, monkeypatch, attention):
    name = {"flex": "regional_block_mask", "segmented": "segmented_mask"}.get(attention, "regional_attention_mask")
    original = getattr(pipeline_module, name)
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, name, counting)
    run(tiny_pipe, entities=ENTITIES, attention=attention, num_inference_steps=3, negative_prompt="",
        true_cfg_scale=2.0)
    assert len(calls) == 1  # not per block, not per step, and the negative branch has no entities
    calls.clear()
    run(tiny_pipe, entities=ENTITIES, attention=attention, entity_tokens="trim", negative_prompt="",
        true_cfg_scale=2.0, entities_on_negative=True)
    assert len(calls) == 2  # trimmed entity segments differ from the negative prompt's: one mask per branch


def test_trim_changes_only_entity_segment_lengths(tiny_pipe):
    captured = {}
    original = tiny_pipe._velocity

    def spy(latents, timestep, branch, geometry, guidance):  # the first forward of a call is the positive branch
        captured.setdefault("cond", (branch.context, branch.attention_mask))
        return original(latents, timestep, branch, geometry, guidance)

    tiny_pipe._velocity = spy
    try:
        run(tiny_pipe, entities=ENTITIES, attention="dense", num_inference_steps=1)
        full_context, _ = captured.pop("cond")
        run(tiny_pipe, entities=ENTITIES, attention="dense", num_inference_steps=1, entity_tokens="trim")
        trim_context, trim_mask = captured.pop("cond")
    finally:
        del tiny_pipe._velocity
    seg = CALL["max_sequence_length"]
    counts = [len(ids) for ids in tiny_pipe.tokenizer_2([e.prompt for e in ENTITIES], max_length=seg,
                                                         truncation=True).input_ids]
    kept = [min(c + TRIM_MARGIN, seg) for c in counts]
    assert trim_context.shape[1] == sum(kept) + seg
    assert sum(kept) < len(ENTITIES) * seg
    start = 0
    for i, n in enumerate(kept):  # each entity segment is the prefix of its full segment
        torch.testing.assert_close(trim_context[:, start:start + n], full_context[:, i * seg:i * seg + n])
        start += n
    torch.testing.assert_close(trim_context[:, start:], full_context[:, len(ENTITIES) * seg:])  # global unchanged
    expected = regional_attention_mask(tiny_pipe.entity_token_covers(
        [e.rasterize(32, 32) for e in ENTITIES], 32, 32).to(trim_mask.device), kept, seg)
    assert torch.equal(trim_mask, expected)


def test_bad_speed_options(tiny_pipe):
    with pytest.raises(ValueError, match="attention"):
        run(tiny_pipe, entities=ENTITIES, attention="fast")
    with pytest.raises(ValueError, match="entity_tokens"):
        run(tiny_pipe, entities=ENTITIES, entity_tokens="short")


def test_flex_refuses_layers_pinned_to_another_backend(tiny_pipe):
    processor = tiny_pipe.transformer.transformer_blocks[0].attn.processor
    processor._attention_backend = "native"
    try:
        with pytest.raises(ValueError, match="pinned"):
            run(tiny_pipe, entities=ENTITIES, attention="flex")
        run(tiny_pipe, entities=ENTITIES, attention="dense")  # a native pin is fine for the dense mask
    finally:
        processor._attention_backend = None


def test_compile_flag_compiles_once(tiny_pipeline_dir, monkeypatch):
    from eligen import EliGenPipeline

    pipe = EliGenPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    monkeypatch.setattr(pipe.transformer, "compile_repeated_blocks", lambda **kw: calls.append(kw))
    run(pipe, entities=ENTITIES, compile=True, num_inference_steps=1)
    run(pipe, entities=ENTITIES, compile=True, num_inference_steps=1)
    assert calls == [{"fullgraph": True}]


def test_slot_masks_do_not_recompile_for_a_new_layout():
    """Under torch.compile a new layout of the same shape reuses the graph (the mask_mod is stable per slot)."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def attend(q, k, v, block_mask):
        return flex_attention(q, k, v, block_mask=block_mask)

    lengths, global_length, n_img = [5, 7], 6, 30
    length = sum(lengths) + global_length + n_img
    q = torch.randn(1, 2, length, 8)
    for seed in range(3):
        cover = torch.rand(1, 2, n_img, generator=torch.Generator().manual_seed(seed)) < 0.5
        mask = regional_block_mask(cover, lengths, global_length, block_size=16, slot="test")
        expected = F.scaled_dot_product_attention(q, q, q, attn_mask=regional_attention_mask(cover, lengths,
                                                                                              global_length))
        torch.testing.assert_close(attend(q, q, q, mask), expected, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1


def test_flex_inpainting_equals_dense(tiny_pipe):
    image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    kwargs = dict(entities=ENTITIES[:2], image=image, inpaint=True, negative_prompt="", true_cfg_scale=2.0)
    torch.testing.assert_close(run(tiny_pipe, attention="flex", **kwargs), run(tiny_pipe, attention="dense",
                                                                                 **kwargs), atol=1e-5, rtol=1e-5)


@SETTINGS
@given(layouts())
def test_segmented_attention_equals_dense_sdpa(layout):
    from eligen.regional.segmented import segmented_attention, segmented_mask

    cover, lengths, global_length, _ = layout
    cover = cover[:1]  # one layout for the whole batch
    dense = regional_attention_mask(cover, lengths, global_length)
    length = dense.shape[-1]
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(2, length, 2, 8, generator=g) for _ in range(3))  # (B, L, H, D), diffusers' layout
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=dense).transpose(1, 2)
    out = segmented_attention(q, k, v, segmented_mask(cover, lengths, global_length))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [None, 0.3])
def test_attend_lse_kernels_equal_the_formula(scale):
    from eligen.regional.segmented import _lse_formula, attend_lse

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 8, generator=g) for n in (5, 7, 7))  # (B, S, H, D)
    out, lse = attend_lse(q, k, v, scale)
    expected_out, expected_lse = _lse_formula(*(t.transpose(1, 2) for t in (q, k, v)), scale or 8**-0.5)
    assert out.shape == (2, 5, 3, 8) and lse.shape == (2, 3, 5) and lse.dtype == torch.float32
    torch.testing.assert_close(out, expected_out.transpose(1, 2), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, expected_lse, atol=1e-6, rtol=1e-5)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (scale or 8**-0.5)  # the formula itself, once more
    torch.testing.assert_close(lse, scores.logsumexp(-1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("dtype", "flash"), [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, True)])
def test_cuda_lse_kernels_are_called_with_their_signatures(dtype, flash):
    """The CUDA kernels run here on meta tensors: argument order and output shapes (the efficient kernel pads
    its log-sum-exp rows to a multiple of 32)."""
    from eligen.regional.segmented import _lse_kernel

    q, k, v = (torch.empty(2, 3, n, 128, device="meta", dtype=dtype) for n in (40, 70, 70))  # (B, H, S, D)
    out, lse = _lse_kernel(q, k, v, 0.1, flash)
    assert out.shape == (2, 3, 40, 128) and lse.shape == (2, 3, 40) and lse.dtype == torch.float32


def test_merge_attention_is_attention_over_the_union():
    from eligen.regional.segmented import attend_lse, merge_attention

    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 4, 2, 8, generator=g), torch.randn(1, 9, 2, 8, generator=g), torch.randn(1, 9, 2, 8,
                                                                                                     generator=g)
    parts = [attend_lse(q, k[:, a:b], v[:, a:b], None) for a, b in ((0, 2), (2, 6), (6, 9))]
    merged, lse = merge_attention([o for o, _ in parts], [lse for _, lse in parts])
    expected, expected_lse = attend_lse(q, k, v, None)
    torch.testing.assert_close(merged, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, expected_lse, atol=1e-6, rtol=1e-5)
    # a set that is empty for a row (log-sum-exp -inf) drops out of that row
    lses = [parts[0][1], parts[1][1].clone(), parts[2][1]]
    lses[1][..., 0] = float("-inf")
    keep = torch.cat([torch.arange(0, 2), torch.arange(6, 9)])
    merged, _ = merge_attention([o for o, _ in parts], lses)
    torch.testing.assert_close(merged[:, :1], attend_lse(q[:, :1], k[:, keep], v[:, keep], None)[0], atol=1e-6,
                               rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_segmented_half_precision_is_as_close_as_the_dense_mask(dtype):
    """Merging in fp32 keeps half-precision outputs within the dense mask's own rounding error."""
    from eligen.regional.segmented import segmented_attention, segmented_mask

    lengths, global_length, n_img = [16, 16, 16], 16, 64
    cover = torch.rand(1, 3, n_img, generator=torch.Generator().manual_seed(3)) < 0.4
    g = torch.Generator().manual_seed(4)
    q, k, v = (2 * torch.randn(1, sum(lengths) + global_length + n_img, 4, 64, generator=g) for _ in range(3))
    dense = regional_attention_mask(cover, lengths, global_length)

    def sdpa(*tensors):
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in tensors), attn_mask=dense).transpose(1, 2)

    exact = sdpa(q, k, v)
    half = [t.to(dtype) for t in (q, k, v)]
    out = segmented_attention(*half, segmented_mask(cover, lengths, global_length))
    assert out.dtype == dtype
    assert (out.float() - exact).abs().max() <= 1.5 * (sdpa(*half).float() - exact).abs().max()


def test_segmented_mask_rows_and_covers():
    from eligen.regional.segmented import segmented_mask

    cover = torch.tensor([[[1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]]], dtype=torch.bool)
    mask = segmented_mask(cover, [2, 3, 1], 4)
    assert (mask.global_slice.start, mask.global_slice.stop, mask.image_start, mask.length) == (6, 10, 10, 15)
    assert [(s.start, s.stop) for s in mask.entity_slices] == [(0, 2), (2, 5), (5, 6)]
    assert [c.tolist() for c in mask.entity_image] == [[0, 1], [1, 2], []]  # among the image tokens
    assert [k.tolist() for k in mask.entity_keys] == [[0, 1, 10, 11], [2, 3, 4, 11, 12], [5]]
    assert not mask.flash
    with pytest.raises(ValueError, match="one layout"):
        segmented_mask(cover.expand(2, -1, -1), [2, 3, 1], 4)


@pytest.mark.parametrize("on_negative", [False, True])
def test_pipeline_segmented_equals_dense(tiny_pipe, on_negative):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    native = _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE]
    kwargs = dict(entities=ENTITIES, negative_prompt="blurry", true_cfg_scale=3.0, entities_on_negative=on_negative)
    torch.testing.assert_close(run(tiny_pipe, attention="segmented", **kwargs),
                               run(tiny_pipe, attention="dense", **kwargs), atol=1e-5, rtol=1e-5)
    assert _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE] is native  # restored after the call


def test_auto_picks_the_exact_fast_mode_per_device(tiny_pipe):
    assert tiny_pipe.attention_mode("auto", torch.device("cpu")) == "dense"
    assert tiny_pipe.attention_mode("auto", torch.device("cuda")) == "segmented"
    tiny_pipe.transformer._eligen_compiled = True  # one compiled graph serves every layout: segmented still wins
    try:
        assert tiny_pipe.attention_mode("auto", torch.device("cuda")) == "segmented"
    finally:
        del tiny_pipe.transformer._eligen_compiled
    assert tiny_pipe.attention_mode("segmented", torch.device("cpu")) == "segmented"


@pytest.mark.parametrize("attention", ["dense", "flex", "segmented"])
def test_compiled_transformer_does_not_recompile_per_step_or_layout(tiny_pipeline_dir, attention):
    """Regional compilation: graphs are made on the first step, then reused by later steps and by a new layout."""
    from torch._dynamo.testing import CompileCounter

    from eligen import EliGenPipeline

    torch._dynamo.reset()
    pipe = EliGenPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    counter = CompileCounter()
    pipe.compile_transformer(backend=counter)
    kwargs = dict(attention=attention, negative_prompt="", true_cfg_scale=2.0)
    run(pipe, entities=ENTITIES, num_inference_steps=1, **kwargs)
    first = counter.frame_count
    assert first > 0
    run(pipe, entities=ENTITIES, num_inference_steps=3, **kwargs)
    moved = [Entity(e.prompt, box=(4, 4, 28, 28)) for e in ENTITIES]  # same shapes, another layout
    run(pipe, entities=moved, num_inference_steps=2, **kwargs)
    assert counter.frame_count == first
    torch._dynamo.reset()
