"""EliGenQwenImage21Pipeline on the tiny random Qwen-Image 2.1 (docs/design.md section 20).

The tiny pipeline has the real VAE scale factor 16 and one token per latent pixel: a 32x64 image is a 2x4 token
grid (n_img = 8). The reference here is written from the rules: each prompt encoded alone (true lengths),
``[e_1 | ... | e_N | global | image]``, text RoPE restarting at the global prompt's offset for every segment and the
image at the positions it has after the global prompt alone, the suite's oracle mask (:mod:`families.oracles`)
restricted by the model's own rule (text causal, text never sees the image), attention as an explicit masked
softmax; stock QwenImage21Pipeline runs the loop around it, without its KV cache, while ours keeps the cache on.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import QwenImage21Pipeline
from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21AttnProcessor, apply_rotary_emb_qwen
from PIL import Image

from eligen import EliGenQwenImage21Pipeline, EliGenQwenImagePipeline, Entity, speedups
from eligen.families.qwen_image21.model import RegionalQwenImage21AttnProcessor
from eligen.families.qwen_image21.testing import save_tiny_pipeline
from families import oracles

H, W = 32, 64
TOKEN = 16  # pixels per token side: VAE scale factor 16, patch 1
N_IMG = (H // TOKEN) * (W // TOKEN)
PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
TRUE_CFG = 3.0
STEPS = 2
# e_1 covers the left half (4 tokens), e_2 the top right (2 tokens); two tokens stay uncovered
ENTITIES = [Entity("a dog", box=(0, 0, 30, 32)), Entity("a green tree", box=(34, 0, 64, 14))]
CFG = {"none": {}, "true-cfg": {"negative_prompt": NEGATIVE, "true_cfg_scale": TRUE_CFG},
       "entities-on-negative": {"negative_prompt": NEGATIVE, "true_cfg_scale": TRUE_CFG, "entities_on_negative": True}}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kwargs(**overrides):
    base = dict(prompt=PROMPT, height=H, width=W, num_inference_steps=STEPS, output_type="latent")
    base.update(overrides)
    return base


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-qwen21") / "pipe", seed=0)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    p = EliGenQwenImage21Pipeline.from_pretrained(tiny_dir)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def stock(tiny_dir):
    p = QwenImage21Pipeline.from_pretrained(tiny_dir)
    p.set_progress_bar_config(disable=True)
    return p


# -- the reference ------------------------------------------------------------------------------------------------


def covers_of(entities) -> list[list[bool]]:
    """The oracle's token cover of each entity's box (VAE scale factor 16, one latent pixel per token)."""
    return [oracles.token_cover(e.rasterize(W, H), H, W, TOKEN, 1) for e in entities]


def reference_mask(covers, entity_lengths, global_length) -> torch.Tensor:
    """The oracle's EliGen mask, and the model's rule on top: a text row sees no image and only earlier keys."""
    allowed = oracles.regional_mask(covers, entity_lengths, global_length, N_IMG)
    text = sum(entity_lengths) + global_length
    for q in range(text):
        for k in range(allowed.shape[1]):
            allowed[q, k] = allowed[q, k] and k <= q
    return torch.from_numpy(allowed)


def reference_rotary(rope, lengths) -> torch.Tensor:
    """RoPE rows of ``[segments | image]``: text position ``p`` on all three axes, ``p`` restarting per segment; the
    image at frame ``len(global)`` on a height/width grid centred on zero (the model's image rule)."""
    frame, height, width = rope.freqs
    rows = [torch.cat([frame[p], height[p], width[p]]) for n in lengths for p in range(n)]
    h, w = H // TOKEN, W // TOKEN
    rows += [torch.cat([frame[lengths[-1]], height[r], width[c]])  # negative positions index the table's tail
             for r in range(-(h - h // 2), h // 2) for c in range(-(w - w // 2), w // 2)]
    return torch.stack(rows)


class ReferenceProcessor:
    """One block's attention written out, for the whole sequence (no KV cache): the layout of a sequence is looked
    up by its length (``layouts``: length -> segment lengths and mask); any other sequence is one plain segment."""

    def __init__(self, rope, layouts):
        self.rope, self.layouts = rope, layouts

    def __call__(self, attn, hidden_states, attention_mask=None, rotary_emb=None, layer_cache=None,
                 kv_cache_mode=None, cache_write_slice=None, segments=None, key_valid=None):
        assert layer_cache is None and kv_cache_mode is None and key_valid is None
        length = hidden_states.shape[1]
        lengths, mask = self.layouts.get(length, ([length - N_IMG], None))
        if mask is None:
            mask = reference_mask([], [], lengths[0])
        rotary = reference_rotary(self.rope, lengths)

        def heads(x):
            return x.unflatten(-1, (attn.heads, -1))

        q = apply_rotary_emb_qwen(attn.norm_q(heads(attn.to_q(hidden_states))), rotary, use_real=False)
        k = apply_rotary_emb_qwen(attn.norm_k(heads(attn.to_k(hidden_states))), rotary, use_real=False)
        v = heads(attn.to_v(hidden_states))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        out = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)
        return attn.to_out[1](attn.to_out[0](out.flatten(2)))


def reference_run(stock, entities, seed, negative_prompt=None, true_cfg_scale=1.0, entities_on_negative=False):
    """Stock QwenImage21Pipeline on the joined text, without its KV cache, with :class:`ReferenceProcessor`."""
    segments = [stock._get_qwen_prompt_embeds(e.prompt)[0] for e in entities]
    global_embeds = stock._get_qwen_prompt_embeds(PROMPT)[0]
    lengths = [s.shape[1] for s in segments] + [global_embeds.shape[1]]
    assert len(set(lengths)) == len(lengths)  # the segments really have different lengths
    covers = covers_of(entities)
    context = torch.cat([*segments, global_embeds], dim=1)
    layouts = {context.shape[1] + N_IMG: (lengths, reference_mask(covers, lengths[:-1], lengths[-1]))}
    call = {}
    if negative_prompt is not None:
        negative = stock._get_qwen_prompt_embeds(negative_prompt)[0]
        if entities_on_negative:  # the negative prompt in every entity slot, under the same covers
            n = negative.shape[1]
            negative = torch.cat([negative] * (len(entities) + 1), dim=1)
            layouts[negative.shape[1] + N_IMG] = ([n] * (len(entities) + 1),
                                                  reference_mask(covers, [n] * len(entities), n))
        assert len(layouts) == (2 if entities_on_negative else 1)  # the two branches' lengths differ
        call = {"negative_prompt_embeds": negative, "true_cfg_scale": true_cfg_scale}
    transformer = stock.transformer
    originals = dict(transformer.attn_processors)
    transformer.set_attn_processor(ReferenceProcessor(transformer.pos_embed, layouts))
    try:
        return stock(**kwargs(prompt=None, prompt_embeds=context, **call), use_kv_cache=False,
                     generator=gen(seed)).images
    finally:
        transformer.set_attn_processor(originals)


REFERENCES: dict[str, torch.Tensor] = {}


@pytest.mark.parametrize(("attention", "cfg"), [(a, c) for a in ("dense", "flex", "segmented") for c in CFG
                                                 if (a, c) != ("flex", "entities-on-negative")])  # slow eager flex
def test_entities_equal_the_reference(pipe, stock, attention, cfg):
    if cfg not in REFERENCES:
        REFERENCES[cfg] = reference_run(stock, ENTITIES, 3, **CFG[cfg])
    ours = pipe(**kwargs(**CFG[cfg]), entities=ENTITIES, attention=attention, generator=gen(3)).images
    torch.testing.assert_close(ours, REFERENCES[cfg], atol=1e-5, rtol=1e-5)
    if attention == "dense":
        plain = pipe(**kwargs(**CFG[cfg]), generator=gen(3)).images
        assert (ours - plain).abs().max() > 1e-3  # the entities matter
        uncached = pipe(**kwargs(**CFG[cfg]), entities=ENTITIES, use_kv_cache=False, generator=gen(3)).images
        torch.testing.assert_close(uncached, ours, atol=1e-5, rtol=1e-5)


def test_the_text_kv_cache_runs_with_entities(pipe):
    """The first step of each branch fills the cache, later steps read it; the entity segments are in it."""
    modes, texts = [], []

    def record(module, args, kwargs):
        modes.append(kwargs["kv_cache_mode"])
        if kwargs["kv_cache_mode"] == "cached":
            texts.append(kwargs["kv_cache"].get_layer(0).get()[0].shape[1])

    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipe(**kwargs(**CFG["true-cfg"]), entities=ENTITIES, generator=gen(0))
    finally:
        handle.remove()
    assert modes == ["extract", "extract", "cached", "cached"]  # cond, uncond at each of the 2 steps
    lengths = [pipe._get_qwen_prompt_embeds(t)[0].shape[1] for t in [e.prompt for e in ENTITIES] + [PROMPT, NEGATIVE]]
    assert texts == [sum(lengths[:3]), lengths[3]]


def test_segments_are_unpadded_and_positions_restart(pipe):
    seen = {}
    original = pipe._velocity

    def spy(latents, timestep, branch, geometry, guidance):
        seen.setdefault("cond", (branch, geometry))
        return original(latents, timestep, branch, geometry, guidance)

    pipe._velocity = spy
    try:
        pipe(**kwargs(num_inference_steps=1), entities=ENTITIES, generator=gen(0))
    finally:
        del pipe._velocity
    branch, geometry = seen["cond"]
    lengths = [pipe._get_qwen_prompt_embeds(p)[0].shape[1] for p in [e.prompt for e in ENTITIES] + [PROMPT]]
    assert branch.context.shape[1] == sum(lengths)
    assert branch.positions.tolist() == [j for n in lengths for j in range(n)]
    assert branch.text_mask is None
    assert geometry == [[(1, H // TOKEN, W // TOKEN)]]  # one token per latent pixel
    assert pipe.family.patch_size == 1 and pipe.patch_grid == 2 * TOKEN
    covers = pipe.entity_token_covers([e.rasterize(W, H) for e in ENTITIES], H, W)
    assert covers[0].tolist() == covers_of(ENTITIES)


# -- the stock pipeline's own settings ---------------------------------------------------------------------------


def test_sizes_round_down_and_configured_sigmas_apply_as_in_diffusers(pipe, stock):
    """48x80 renders 32x64 in both; a pipeline's ``sample_sigmas`` replace the step count in both."""
    ours = pipe(**kwargs(height=48, width=80), generator=gen(1)).images
    theirs = stock(**kwargs(height=48, width=80), generator=gen(1)).images
    assert ours.shape == (1, N_IMG, 4) and torch.equal(ours, theirs)
    sigmas = [1.0, 0.7, 0.3]
    try:
        for p in (pipe, stock):
            p.register_to_config(sample_sigmas=sigmas)
        ours, theirs = (p(**kwargs(), generator=gen(1)).images for p in (pipe, stock))
        assert torch.equal(ours, theirs)
        assert pipe.num_timesteps == len(sigmas)
    finally:
        for p in (pipe, stock):
            p.register_to_config(sample_sigmas=None)


# -- speed options ------------------------------------------------------------------------------------------------


def test_first_block_cache(pipe, stock):
    """Refused beside the text KV cache (by name); exact at threshold 0 without it; stock's without entities."""
    call = kwargs(**CFG["true-cfg"], num_inference_steps=4)
    exact = pipe(**call, entities=ENTITIES, generator=gen(2)).images
    try:
        speedups.enable_first_block_cache(pipe, 0)
        with pytest.raises(ValueError, match="use_kv_cache=False"):
            pipe(**call, entities=ENTITIES, generator=gen(2))
        torch.testing.assert_close(pipe(**call, entities=ENTITIES, use_kv_cache=False, generator=gen(2)).images,
                                   exact, atol=1e-5, rtol=1e-5)
        speedups.disable_step_cache(pipe)
        for p in (pipe, stock):
            speedups.enable_first_block_cache(p, 1e3)  # every step after the first reuses the cache
        ours, theirs = (p(**call, use_kv_cache=False, generator=gen(2)).images for p in (pipe, stock))
        assert torch.equal(ours, theirs)
        assert (pipe(**call, entities=ENTITIES, use_kv_cache=False, generator=gen(2)).images - exact).abs().max() > 1e-3
    finally:
        for p in (pipe, stock):
            if p.transformer.is_cache_enabled:
                p.transformer.disable_cache()


def test_entity_steps_and_mask_only_in_blocks(pipe):
    call = kwargs(**CFG["true-cfg"], num_inference_steps=3)
    exact = pipe(**call, entities=ENTITIES, generator=gen(4)).images
    assert torch.equal(pipe(**call, entities=ENTITIES, entity_steps=0, generator=gen(4)).images,
                       pipe(**call, generator=gen(4)).images)
    assert torch.equal(pipe(**call, entities=ENTITIES, entity_steps=3, generator=gen(4)).images, exact)
    names = speedups.transformer_block_names(pipe)
    assert names == ["transformer_blocks.0", "transformer_blocks.1"]
    seen = {}

    def spy(name):
        def hook(module, args, kwargs):
            seen.setdefault(name, "attention_mask" in (kwargs.get("attention_mask") or {}))
        return hook

    spies = [pipe.transformer.get_submodule(f"{n}.attn").register_forward_pre_hook(spy(n), with_kwargs=True)
             for n in names]
    hooks = speedups.mask_only_in_blocks(pipe, names[:1])
    try:
        some = pipe(**call, entities=ENTITIES, generator=gen(4)).images
    finally:
        hooks.remove()
        for handle in spies:
            handle.remove()
    assert seen == {names[0]: True, names[1]: False}
    assert (some - exact).abs().max() > 1e-4
    every = speedups.mask_only_in_blocks(pipe, names)
    try:
        assert torch.equal(pipe(**call, entities=ENTITIES, generator=gen(4)).images, exact)
    finally:
        every.remove()


def test_compiled_blocks_give_the_eager_result(tiny_dir):
    """Regional compilation traces eligen's processor and block hook whole (fullgraph); a new layout of the same
    shapes reuses the graphs."""
    from torch._dynamo.testing import CompileCounter

    fresh = EliGenQwenImage21Pipeline.from_pretrained(tiny_dir)
    fresh.set_progress_bar_config(disable=True)
    call = kwargs(num_inference_steps=1)
    eager = fresh(**call, entities=ENTITIES, generator=gen(5)).images
    torch._dynamo.reset()
    counter = CompileCounter()
    try:
        fresh.compile_transformer(backend=counter)
        compiled = fresh(**call, entities=ENTITIES, generator=gen(5)).images
        frames = counter.frame_count
        moved = [Entity(e.prompt, box=(x, 0, x + 30, 32)) for e, x in zip(ENTITIES, (34, 0), strict=True)]
        fresh(**call, entities=moved, generator=gen(5))
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert frames > 0 and counter.frame_count == frames


def test_gradient_checkpointing_recomputes_under_the_mask(tiny_dir):
    """Training's forward: the backward pass recomputes each block after the forward has ended, with the mask."""
    from eligen.families.base import Branch
    from eligen.regional.sequence import TokenSequence

    fresh = EliGenQwenImage21Pipeline.from_pretrained(tiny_dir)
    family, transformer = fresh.family, fresh.transformer
    entity, caption = (fresh._get_qwen_prompt_embeds(t)[0] for t in ("a dog", PROMPT))
    sequence = TokenSequence.of([entity.shape[1]], caption.shape[1])
    cover = torch.tensor([[covers_of(ENTITIES[:1])[0]]])
    branch = Branch(sequence.join([entity], caption), attention_mask=sequence.mask(cover), sequence=sequence,
                    positions=family.positions(sequence, torch.device("cpu"), torch.float32))
    latents, timestep = torch.randn(1, N_IMG, 4, generator=gen(0)), torch.tensor([0.6])
    geometry = family.geometry(fresh, 1, H // TOKEN, W // TOKEN, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        expected = family.forward(transformer, latents, timestep, branch, geometry, None)
        unmasked = family.forward(transformer, latents, timestep, Branch(branch.context, sequence=sequence,
                                  positions=branch.positions), geometry, None)
    transformer.enable_gradient_checkpointing()
    transformer.train()
    latents.requires_grad_(True)
    out = family.forward(transformer, latents, timestep, branch, geometry, None)
    out.square().mean().backward()  # raises if the recomputation differs from the forward
    torch.testing.assert_close(out.detach(), expected, atol=1e-6, rtol=1e-6)
    assert (expected - unmasked).abs().max() > 1e-3 and latents.grad.abs().sum() > 0


# -- refusals -----------------------------------------------------------------------------------------------------


def test_the_family_of_a_checkpoint(tiny_dir):
    from eligen.families import model_family

    assert model_family(tiny_dir) == "qwen_image21"  # its model_index.json names QwenImage21Pipeline
    assert model_family("Qwen/Qwen-Image-2.1") == "qwen_image21"  # an uncached hub id, by its name
    assert model_family("Qwen/Qwen-Image-2512") == model_family("Qwen/Qwen-Image") == "qwen_image"
    with pytest.raises(ValueError, match="EliGenQwenImage21Pipeline"):
        EliGenQwenImagePipeline.from_pretrained(tiny_dir)


def test_what_cannot_run_is_refused_by_name(pipe, tiny_dir):
    with pytest.raises(ValueError, match="inpaint=True"):  # diffusers' condition images are not EliGen's input
        pipe(**kwargs(), image=np.zeros((H, W, 3), np.uint8), generator=gen(0))
    padded = kwargs(prompt=["a cat", "a very long caption of a red square"])
    with pytest.raises(ValueError, match="attention='dense'"):
        pipe(**padded, entities=ENTITIES, attention="flex", generator=gen(0))
    assert pipe(**padded, entities=ENTITIES, attention="dense", generator=gen(0)).images.shape == (2, N_IMG, 4)
    other = EliGenQwenImage21Pipeline.from_pretrained(tiny_dir)
    other.set_progress_bar_config(disable=True)

    class Custom(QwenImage21AttnProcessor):  # a user's processor: it takes attention_mask, but not eligen's
        pass

    other.transformer.transformer_blocks[1].attn.set_processor(Custom())
    with pytest.raises(ValueError, match=r"transformer_blocks\.1 cannot take the EliGen regional mask"):
        other(**kwargs(), entities=ENTITIES, generator=gen(0))
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.processor, RegionalQwenImage21AttnProcessor)
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.processor, QwenImage21AttnProcessor)


# -- the commands -------------------------------------------------------------------------------------------------


def test_cli_generate_reproduce_inpaint_train_and_data(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    from eligen.cli import main
    from eligen.generate import read_metadata
    from eligen.lora import lora_info
    from eligen.tiny.toy_data import write_box_dataset

    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"prompt": PROMPT, "negative_prompt": NEGATIVE, "width": W, "height": H, "seed": 3,
                                  "entities": [{"prompt": e.prompt, "box": list(e.box)} for e in ENTITIES]}))
    fast = ["--model", str(tiny_dir), "--steps", "2", "--true-cfg", "2"]
    assert main(["generate", str(layout), "-o", str(tmp_path / "out.png"), *fast]) == 0
    meta = read_metadata(tmp_path / "out.png")
    assert meta["params"]["cfg_mode"] == "plain" and len(meta["layout"]["entities"]) == 2
    assert main(["generate", "--from", str(tmp_path / "out.png"), "-o", str(tmp_path / "again.png")]) == 0
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert out.shape == (H, W, 4)  # the VAE decodes RGBA, as the stock pipeline's images
    assert np.array_equal(out, np.asarray(Image.open(tmp_path / "again.png")))

    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((H, W, 3)) * 255).astype(np.uint8)).save(photo)
    assert main(["inpaint", str(photo), str(layout), "-o", str(tmp_path / "inpainted.png"), *fast]) == 0
    before, after = np.asarray(Image.open(photo)), np.asarray(Image.open(tmp_path / "inpainted.png"))
    assert after.shape == (H, W, 3)
    assert np.array_equal(before[16:, 32:], after[16:, 32:])  # outside both boxes: untouched
    assert not np.array_equal(before[:, :30], after[:, :30])

    data = write_box_dataset(tmp_path / "boxes", 4, 32, 32, seed=1)
    out_dir = tmp_path / "lora"
    assert main(["train", "--model", str(tiny_dir), "--dataset", str(data), "--output-dir", str(out_dir),
                 "--resolution", "32", "--rank", "4", "--max-steps", "3", "--batch-size", "2",
                 "--max-sequence-length", "16", "--gradient-checkpointing", "--no-progress"]) == 0
    assert not (out_dir / "eligen_lora_diffsynth.safetensors").exists()  # no DiffSynth or kohya form
    state = load_file(str(out_dir / "eligen_lora.safetensors"))
    info = lora_info(state)
    assert info.family == "qwen_image21" and info.layers == 2 * 7 and info.single_blocks == [0, 1]
    pipe = EliGenQwenImage21Pipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.load_eligen_lora(out_dir / "eligen_lora.safetensors") == "diffusers"
    assert main(["lora", "info", str(out_dir / "eligen_lora.safetensors")]) == 0

    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\na blue square on a gray background\n")
    assert main(["data", "generate", str(captions), "--model", str(tiny_dir), "--out", str(tmp_path / "data"),
                 "--steps", "2", "--width", "32", "--height", "32", "--batch-size", "2"]) == 0
    assert len(list((tmp_path / "data" / "images").glob("*.png"))) == 2
