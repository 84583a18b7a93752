"""EliGenKrea2Pipeline on the tiny random Krea 2 (docs/design.md section 19).

The tiny pipeline has VAE scale factor 2: a 32x48 image has an 8x12 token grid (n_img = 96). The reference here is
written from the rules, on the model's own terms: every prompt (entities and global) encoded alone by stock
Krea2Pipeline, padded to ``max_sequence_length`` as the model pads it and with its padding mask; the text
``[e_1 | ... | e_N | global]``; every text position zero (the stock pipeline's); in each single-stream block the
suite's oracle mask over those padded segments joined with the model's padding mask, in each text-refiner block the
same-segment part of it joined with the padding mask, attention written out as a masked softmax. Stock
Krea2Pipeline runs the loop around it. EliGen drops the masked padding instead: equal to 1e-5.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import Krea2Pipeline
from diffusers.models.embeddings import apply_rotary_emb

from eligen import EliGenKrea2Pipeline, Entity, speedups
from eligen.families.krea2.model import KREA2, RegionalKrea2AttnProcessor, TextSegments
from eligen.families.krea2.testing import save_tiny_pipeline
from eligen.lora import LoraFormatError, LoraLayer, lora_info, read_lora, write_lora
from families import oracles

H, W = 32, 48
N_IMG = (H // 4) * (W // 4)
MSL = 16
PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
ENTITIES = [Entity("a dog", box=(2, 2, 14, 10)), Entity("a cat on a red background", box=(20, 12, 46, 30))]
CFG = {"guidance_scale": 2.0, "negative_prompt": NEGATIVE}  # Krea2Pipeline's g: eligen's true CFG 3
NO_CFG = {"guidance_scale": 0.0}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-krea2") / "pipe", seed=0)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    p = EliGenKrea2Pipeline.from_pretrained(tiny_dir)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def stock(tiny_dir):
    p = Krea2Pipeline.from_pretrained(tiny_dir)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def pipe64(pipe):
    """The module's pipeline in float64 for the test (the comparisons with the reference below are about the rule,
    not float32 rounding, which true CFG amplifies past 1e-5 on some CPUs); float32 again after it (exactly)."""
    pipe.to(torch.float64)
    yield pipe
    pipe.to(torch.float32)


@pytest.fixture
def stock64(stock):
    stock.to(torch.float64)
    yield stock
    stock.to(torch.float32)


def kwargs(**overrides):
    base = dict(prompt=PROMPT, height=H, width=W, num_inference_steps=2, max_sequence_length=MSL,
                output_type="latent")
    base.update(overrides)
    return base


# -- zero entities: stock Krea2Pipeline -----------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [{}, NO_CFG, {"guidance_scale": 0.3, "negative_prompt": NEGATIVE}],
                         ids=["default-cfg", "no-cfg", "cfg-0.3"])
@pytest.mark.parametrize("output_type", ["latent", "np"])
def test_zero_entities_equal_stock(pipe, stock, cfg, output_type):
    ours = pipe(**kwargs(output_type=output_type, **cfg), generator=gen(1)).images
    theirs = stock(**kwargs(output_type=output_type, **cfg), generator=gen(1)).images
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_the_distilled_checkpoint_keeps_its_fixed_shift(pipe, stock):
    for p in (pipe, stock):
        p.register_to_config(is_distilled=True)
    try:
        ours = pipe(**kwargs(**NO_CFG), generator=gen(1)).images
        theirs = stock(**kwargs(**NO_CFG), generator=gen(1)).images
    finally:
        for p in (pipe, stock):
            p.register_to_config(is_distilled=False)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, pipe(**kwargs(**NO_CFG), generator=gen(1)).images)  # the shift matters


def test_true_cfg_scale_is_one_plus_guidance_scale(pipe):
    krea = pipe(**kwargs(**CFG), generator=gen(2)).images
    eligen = pipe(**kwargs(true_cfg_scale=3.0, negative_prompt=NEGATIVE), generator=gen(2)).images
    assert torch.equal(krea, eligen)
    with pytest.raises(ValueError, match="not both"):
        pipe(**kwargs(true_cfg_scale=3.0, guidance_scale=2.0), generator=gen(2))


# -- the reference --------------------------------------------------------------------------------------------------


def covers_of(entities, height=H, width=W) -> list[list[bool]]:
    """The oracle's token cover of each entity's box (VAE scale factor 2, 2x2 patches)."""
    return [oracles.token_cover(e.rasterize(width, height), height, width, 2, 2) for e in entities]


class ReferenceProcessor:
    """One Krea 2 attention written out: grouped-query heads repeated, q/k norms, RoPE, an explicit softmax under
    the model's own padding mask (``attention_mask``, ``(B, 1, 1, L)``) joined with ``structure`` (``(L, L)``) in the
    branches that carry the entities, told apart by their text padding masks (``branches``, ``(T,)`` each: stock
    Krea2Pipeline gives both CFG branches one text length); the sigmoid output gate."""

    def __init__(self, structure: torch.Tensor | None = None, branches: tuple[torch.Tensor, ...] = ()):
        self.structure, self.branches = structure, branches

    def regional(self, attention_mask) -> bool:
        if self.structure is None or attention_mask is None:
            return False
        text = attention_mask[0, 0, 0, : self.branches[0].numel()]
        return any(torch.equal(text, valid) for valid in self.branches)

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        q = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (attn.num_heads, -1)))
        k = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (attn.num_kv_heads, -1)))
        v = attn.to_v(hidden_states).unflatten(-1, (attn.num_kv_heads, -1))
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        groups = attn.num_heads // attn.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
        allowed = torch.ones(scores.shape[-2:], dtype=torch.bool)
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()
        if self.regional(attention_mask):
            allowed = allowed & self.structure
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).flatten(2)
        return attn.to_out[0](out * torch.sigmoid(attn.to_gate(hidden_states)))


def padded(stock, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stock Krea2Pipeline's encoding of one prompt: ``(1, MSL, L, D)`` and its ``(1, MSL)`` padding mask."""
    return stock.get_text_hidden_states(text, MSL)


def reference_run(stock, entities, seed, guidance_scale=0.0, negative=None, on_negative=False):
    """Stock Krea2Pipeline on the joined padded text with :class:`ReferenceProcessor` in every attention. Without
    ``on_negative`` the negative prompt is padded further to the joined length (stock Krea2Pipeline gives both branches
    one set of positions); that padding is masked like the rest."""
    parts = [padded(stock, text) for text in [e.prompt for e in entities] + [PROMPT]]
    context, valid = (torch.cat(x, dim=1) for x in zip(*parts, strict=True))
    n = len(entities)
    assert not valid.all()  # the reference keeps the model's padding, masked
    regional = torch.from_numpy(oracles.regional_mask(covers_of(entities), [MSL] * n, MSL, N_IMG))
    text = (n + 1) * MSL
    call, branches = {}, [valid[0]]
    if negative is not None:
        neg, neg_valid = padded(stock, negative)
        if on_negative:  # the negative prompt in every slot
            neg, neg_valid = torch.cat([neg] * (n + 1), dim=1), torch.cat([neg_valid] * (n + 1), dim=1)
            branches.append(neg_valid[0])
        else:
            neg = torch.cat([neg, neg.new_zeros(1, n * MSL, *neg.shape[2:])], dim=1)
            neg_valid = torch.cat([neg_valid, neg_valid.new_zeros(1, n * MSL)], dim=1)
        call = {"negative_prompt_embeds": neg, "negative_prompt_embeds_mask": neg_valid}
    processors = {}
    for name in stock.transformer.attn_processors:
        if name.startswith("transformer_blocks."):
            processors[name] = ReferenceProcessor(regional, tuple(branches))
        elif ".refiner_blocks." in name:  # text alone: within one segment only
            processors[name] = ReferenceProcessor(regional[:text, :text], tuple(branches))
        else:  # the layer-wise fusion: across one token's encoder layers
            processors[name] = ReferenceProcessor()
    originals = dict(stock.transformer.attn_processors)
    stock.transformer.set_attn_processor(processors)
    try:
        return stock(**kwargs(prompt=None, prompt_embeds=context, prompt_embeds_mask=valid,
                              guidance_scale=guidance_scale, **call), generator=gen(seed)).images
    finally:
        stock.transformer.set_attn_processor(originals)


@pytest.mark.parametrize("attention, cfg", [("dense", NO_CFG), ("flex", NO_CFG), ("segmented", NO_CFG),
                                             ("dense", CFG), ("segmented", CFG)],
                         ids=["dense", "flex", "segmented", "dense-cfg", "segmented-cfg"])
def test_entities_equal_the_reference(pipe64, stock64, attention, cfg):
    pipe, stock = pipe64, stock64
    ours = pipe(**kwargs(**cfg), entities=ENTITIES, attention=attention, generator=gen(3)).images
    expected = reference_run(stock, ENTITIES, 3, cfg["guidance_scale"], cfg.get("negative_prompt"))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    plain = pipe(**kwargs(**cfg), generator=gen(3)).images
    assert (ours - plain).abs().max() > 1e-3  # the entities matter


@pytest.mark.parametrize("attention", ["dense", "segmented"])
def test_entities_on_negative_equal_the_reference(pipe64, stock64, attention):
    pipe, stock = pipe64, stock64
    ours = pipe(**kwargs(**CFG), entities=ENTITIES, entities_on_negative=True, attention=attention,
                generator=gen(4)).images
    expected = reference_run(stock, ENTITIES, 4, CFG["guidance_scale"], NEGATIVE, on_negative=True)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    off = pipe(**kwargs(**CFG), entities=ENTITIES, attention=attention, generator=gen(4)).images
    assert (ours - off).abs().max() > 1e-4


def test_the_refiner_keeps_the_segments_apart(pipe, stock):
    """With a stock refiner (attention across all text under the padding mask only) the segments mix: the result
    leaves the reference."""
    class StockRefiner(RegionalKrea2AttnProcessor):
        def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
            self.regional = None  # the segments handed over are ignored
            return super().__call__(attn, hidden_states, attention_mask, image_rotary_emb)

    expected = reference_run(stock, ENTITIES, 3)
    refiners = [block.attn for block in pipe.transformer.text_fusion.refiner_blocks]
    try:
        for attn in refiners:
            attn.processor = StockRefiner()
        mixed = pipe(**kwargs(**NO_CFG), entities=ENTITIES, generator=gen(3)).images
        attn.processor = ReferenceProcessor()  # a processor that cannot take the segments: refused by name
        with pytest.raises(ValueError, match=r"ReferenceProcessor at text_fusion\.refiner_blocks\.1 cannot"):
            pipe(**kwargs(**NO_CFG), entities=ENTITIES, generator=gen(3))
    finally:
        for attn in refiners:
            attn.processor = RegionalKrea2AttnProcessor()
    assert (mixed - expected).abs().max() > 1e-4
    torch.testing.assert_close(pipe(**kwargs(**NO_CFG), entities=ENTITIES, generator=gen(3)).images, expected,
                               atol=1e-5, rtol=1e-5)


def test_segments_are_the_pipelines_encoding_without_its_padding(pipe):
    seen = {}
    original = pipe._velocity

    def spy(latents, timestep, branch, geometry, guidance):
        seen.setdefault("cond", branch)
        return original(latents, timestep, branch, geometry, guidance)

    pipe._velocity = spy
    try:
        pipe(**kwargs(num_inference_steps=1, **NO_CFG), entities=ENTITIES, generator=gen(0))
    finally:
        del pipe._velocity
    branch = seen["cond"]
    segments = []
    for text in [e.prompt for e in ENTITIES] + [PROMPT]:
        hidden, valid = pipe.get_text_hidden_states(text, MSL)
        assert 5 < int(valid.sum()) < MSL  # the prompt's tokens and the 5 suffix tokens; the padding is dropped
        segments.append(hidden[:, valid[0]].flatten(-2))
    assert branch.sequence.lengths == tuple(s.shape[1] for s in segments)
    torch.testing.assert_close(branch.context, torch.cat(segments, dim=1), atol=1e-6, rtol=0)
    assert branch.text_mask is None and branch.positions is not None
    assert not branch.positions.any() and branch.positions.shape == (branch.context.shape[1], 3)


def test_a_padded_prompt_batch_masks_its_padding(pipe):
    """Prompts of unequal lengths keep a padding mask with entities: each image is its single-prompt call's (dense);
    the flex and segmented forms, which cannot take the padding, are refused by name."""
    prompts = ["a dog", PROMPT]
    batch = pipe(**kwargs(prompt=prompts, **NO_CFG), entities=ENTITIES, attention="dense",
                 generator=[gen(0), gen(1)]).images
    for i, text in enumerate(prompts):
        alone = pipe(**kwargs(prompt=text, **NO_CFG), entities=ENTITIES, generator=gen(i)).images
        torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attention='dense'"):
        pipe(**kwargs(prompt=prompts, **NO_CFG), entities=ENTITIES, attention="flex", generator=[gen(0), gen(1)])


def test_cfg_modes(pipe):
    g = gen(2)
    pos, neg = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    plain, rescaled = KREA2.combine("plain"), KREA2.combine("rescaled")
    assert torch.equal(plain(pos, neg, 3.0), pos + 2.0 * (pos - neg))  # Krea2Pipeline's order, g = s - 1
    combined = pos + 2.0 * (pos - neg)
    torch.testing.assert_close(rescaled(pos, neg, 3.0), combined * pos.norm(dim=-1, keepdim=True)
                               / combined.norm(dim=-1, keepdim=True))
    a = pipe(**kwargs(**CFG), entities=ENTITIES, generator=gen(4)).images
    b = pipe(**kwargs(**CFG), entities=ENTITIES, cfg_mode="rescaled", generator=gen(4)).images
    assert (a - b).abs().max() > 1e-4


# -- speed options --------------------------------------------------------------------------------------------------


def test_mask_only_in_blocks_and_entity_steps(pipe):
    exact = pipe(**kwargs(**NO_CFG), entities=ENTITIES, generator=gen(5)).images
    plain = pipe(**kwargs(**NO_CFG), generator=gen(5)).images
    hooks = speedups.mask_only_in_blocks(pipe, speedups.transformer_block_names(pipe))  # every block: exact
    assert hooks.unmasked == []
    assert torch.equal(pipe(**kwargs(**NO_CFG), entities=ENTITIES, generator=gen(5)).images, exact)
    hooks.remove()
    hooks = speedups.mask_only_in_blocks(pipe, ["transformer_blocks.0"])
    assert hooks.unmasked == ["transformer_blocks.1"]
    some = pipe(**kwargs(**NO_CFG), entities=ENTITIES, generator=gen(5)).images
    hooks.remove()
    assert (some - exact).abs().max() > 1e-5 and (some - plain).abs().max() > 1e-5
    assert torch.equal(pipe(**kwargs(**NO_CFG), entities=ENTITIES, generator=gen(5)).images, exact)
    assert torch.equal(pipe(**kwargs(**NO_CFG), entities=ENTITIES, entity_steps=2, generator=gen(5)).images, exact)
    late = pipe(**kwargs(**NO_CFG), entities=ENTITIES, entity_steps=1, generator=gen(5)).images
    assert (late - exact).abs().max() > 1e-5 and (late - plain).abs().max() > 1e-5


def test_model_cpu_offload_keeps_the_regional_mask(tiny_dir):
    """accelerate's hooks wrap the transformer's forward; the hand-over hook still runs on every call. Equal up to
    float rounding (diffusers' "cpu:0" copies change the kernels' strides, see tests/test_offload.py)."""
    p = EliGenKrea2Pipeline.from_pretrained(tiny_dir)
    p.set_progress_bar_config(disable=True)
    expected = p(**kwargs(**CFG), entities=ENTITIES, generator=gen(7)).images
    plain = p(**kwargs(**CFG), generator=gen(7)).images
    p.enable_model_cpu_offload(device="cpu")
    assert hasattr(p.transformer, "_hf_hook")
    out = p(**kwargs(**CFG), entities=ENTITIES, generator=gen(7)).images.cpu()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert (out - plain).abs().max() > 1e-2


def test_the_first_block_cache_is_refused_by_name(pipe):
    with pytest.raises(ValueError, match="Krea2Transformer2DModel has no step cache"):
        speedups.enable_first_block_cache(pipe, 0.05)


def test_compiled_blocks_equal_eager_and_keep_their_graphs(tiny_dir):
    """``compile=True`` (regional compilation; the processors read the mask inside the compiled blocks): the eager
    result, and a new layout of the same shapes reuses the graphs."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    p = EliGenKrea2Pipeline.from_pretrained(tiny_dir)
    p.set_progress_bar_config(disable=True)
    call = kwargs(**NO_CFG, num_inference_steps=1)
    expected = p(**call, entities=ENTITIES, attention="segmented", generator=gen(6)).images
    counter = CompileCounter()
    p.compile_transformer(backend=counter)
    try:
        out = p(**call, entities=ENTITIES, attention="segmented", compile=True, generator=gen(6)).images
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
        first = counter.frame_count
        assert first > 0
        moved = [Entity(e.prompt, box=(4, 4, 28, 28)) for e in ENTITIES]  # same shapes, another layout
        p(**call, entities=moved, attention="segmented", compile=True, generator=gen(6))
        assert counter.frame_count == first
    finally:
        torch._dynamo.reset()


# -- LoRA -----------------------------------------------------------------------------------------------------------


def test_lora_formats(pipe):
    names = KREA2.lora_train_names(pipe.transformer)
    assert len(names) == 8 * len(pipe.transformer.transformer_blocks)  # q, k, v, gate, out; SwiGLU gate, up, down
    weights = {n: LoraLayer(torch.ones(2, 4), torch.ones(4, 2), None) for n in names}
    for fmt in ("diffsynth", "kohya"):
        with pytest.raises(LoraFormatError, match=f"Krea 2 has no {fmt} LoRA form"):
            write_lora(weights, fmt, family="krea2")
    state = write_lora(weights, "diffusers")
    assert any(".ff.gate." in k for k in state)  # `ff` is also a FLUX.1 marker: the name tells nothing alone
    assert read_lora(state)[1] == "diffusers" and lora_info(state).family == "krea2"


# -- the CLI --------------------------------------------------------------------------------------------------------


def test_cli_generate_inpaint_train_and_data_generate(tiny_dir, tmp_path, capsys):
    from PIL import Image

    from eligen.cli import main
    from eligen.generate import read_metadata
    from eligen.tiny.toy_data import write_box_dataset

    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"prompt": PROMPT, "negative_prompt": NEGATIVE, "width": W, "height": H, "seed": 3,
                                  "entities": [{"prompt": "a dog", "box": [2, 2, 14, 10]},
                                               {"prompt": "a cat", "box": [20, 12, 46, 30]}]}))
    fast = ["--model", str(tiny_dir), "--steps", "2", "--max-sequence-length", str(MSL), "--true-cfg", "3"]
    assert main(["generate", str(layout), "-o", str(tmp_path / "out.png"), *fast]) == 0
    meta = read_metadata(tmp_path / "out.png")
    assert meta["params"]["model"] == str(tiny_dir) and meta["params"]["true_cfg"] == 3
    assert main(["generate", "--from", str(tmp_path / "out.png"), "-o", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(Image.open(tmp_path / "again.png")))

    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((H, W, 3)) * 255).astype(np.uint8)).save(photo)
    assert main(["inpaint", str(photo), str(layout), "-o", str(tmp_path / "inpainted.png"), *fast]) == 0
    before, after = np.asarray(Image.open(photo)), np.asarray(Image.open(tmp_path / "inpainted.png"))
    assert np.array_equal(before[:, :2], after[:, :2])  # the left edge lies outside both boxes: untouched
    assert not np.array_equal(before, after)

    data = write_box_dataset(tmp_path / "boxes", 4, 32, 32, seed=1)
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_dir), "--dataset", str(data), "--output-dir", str(out),
                 "--max-steps", "3", "--rank", "4", "--resolution", "32", "--batch-size", "2",
                 "--max-sequence-length", str(MSL), "--learning-rate", "5e-2", "--no-progress"]) == 0
    lora = out / "eligen_lora.safetensors"
    assert sorted(p.name for p in out.glob("eligen_lora*")) == [lora.name]  # Krea 2 has no diffsynth/kohya form
    capsys.readouterr()
    assert main(["lora", "info", str(lora)]) == 0
    info = capsys.readouterr().out
    assert "family: krea2" in info and "single blocks: 0-1" in info
    assert main(["generate", str(layout), "-o", str(tmp_path / "lora.png"), *fast, "--lora", str(lora)]) == 0
    plain, tuned = (np.asarray(Image.open(tmp_path / name)) for name in ("out.png", "lora.png"))
    assert not np.array_equal(plain, tuned)

    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\na blue square on a gray background\n")
    assert main(["data", "generate", str(captions), "--model", str(tiny_dir), "--out", str(tmp_path / "data"),
                 "--steps", "2", "--width", "32", "--height", "32", "--batch-size", "2",
                 "--max-sequence-length", str(MSL)]) == 0
    assert len(list((tmp_path / "data" / "images").glob("*.png"))) == 2


def test_another_familys_checkpoint_is_refused(tiny_dir, tmp_path):
    from eligen import EliGenQwenImagePipeline

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    with pytest.raises(ValueError, match="EliGenQwenImagePipeline"):
        EliGenKrea2Pipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"is a Krea 2 checkpoint; load it with eligen\.EliGenKrea2Pipeline"):
        EliGenQwenImagePipeline.from_pretrained(tiny_dir)


def test_text_segments_state_is_per_call(pipe):
    """No state outlives its call: after a call with entities, one without runs the stock attention everywhere."""
    pipe(**kwargs(**NO_CFG, num_inference_steps=1), entities=ENTITIES, generator=gen(0))
    pipe(**kwargs(**NO_CFG, num_inference_steps=1), generator=gen(0))
    states = [p.regional for p in pipe.transformer.attn_processors.values()]
    assert all(s is None for s in states)
    pipe(**kwargs(**NO_CFG, num_inference_steps=1), entities=ENTITIES, generator=gen(0))
    refiner = pipe.transformer.text_fusion.refiner_blocks[0].attn.processor
    assert isinstance(refiner.regional, TextSegments) and len(refiner.regional.slices) == len(ENTITIES) + 1
