"""EliGenZImagePipeline on the tiny random Z-Image (docs/design.md section 18).

The tiny pipeline has VAE scale factor 2: a 40x48 image has a 20x24 latent and a 10x12 token grid (n_img = 120,
padded inside the transformer to 128). The reference here is written from the rules and runs inside stock
ZImagePipeline's loop (its sigmas, CFG, negation and scheduler): its transformer forward is replaced, sample by
sample, by one that pads every text segment on its own to a multiple of 32 with the learned token, restarts every
segment's positions at 1, starts the image after the longest padded segment, refines each segment alone, lays the
sequence out in the model's own order ``[image | image padding | segments]`` and attends with an explicit masked
softmax under the suite's oracle mask (:func:`families.oracles.regional_mask`, the segments at their padded
lengths, the image padding as image tokens no entity covers).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline
from einops import rearrange
from PIL import Image

from eligen import EliGenZImagePipeline, Entity
from eligen.families.z_image.testing import save_tiny_pipeline
from families import oracles

H, W = 40, 48
N_IMG = (H // 4) * (W // 4)
PAD_IMG = (-N_IMG) % 32
MSL = 64
PROMPT = "a red circle"
NEGATIVE = "blurry"
LONG = ("a large brown dog and a small black cat near a red house under the blue sky with a green tree and a "
        "yellow car on the grass next to a white table")  # longer than 32 tokens: its padded segment is 64
ENTITIES = [Entity("a dog", box=(2, 2, 18, 14)), Entity(LONG, box=(20, 16, 46, 38))]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-z-image") / "pipe", seed=0)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    p = EliGenZImagePipeline.from_pretrained(tiny_dir)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def stock(tiny_dir):
    p = ZImagePipeline.from_pretrained(tiny_dir)
    p.set_progress_bar_config(disable=True)
    return p


def kwargs(**overrides):
    base = dict(prompt=PROMPT, height=H, width=W, num_inference_steps=2, max_sequence_length=MSL, output_type="latent")
    base.update(overrides)
    return base


# -- zero entities: stock ZImagePipeline, bit for bit --------------------------------------------------------------


@pytest.mark.parametrize("cfg", [{"guidance_scale": 0.0}, {"guidance_scale": 2.0, "negative_prompt": NEGATIVE},
                                 {"guidance_scale": 3.0, "cfg_normalization": 1.1, "cfg_truncation": 0.5}],
                         ids=["no-cfg", "cfg", "normalised-truncated"])
@pytest.mark.parametrize("output_type", ["latent", "pt"])
def test_zero_entities_equal_stock(pipe, stock, cfg, output_type):
    ours = pipe(**kwargs(output_type=output_type, **cfg), generator=gen(1)).images
    theirs = stock(**kwargs(output_type=output_type, **cfg), generator=gen(1)).images
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert torch.equal(ours, theirs)


def test_true_cfg_scale_is_one_plus_guidance_scale(pipe, stock):
    theirs = stock(**kwargs(guidance_scale=2.0, negative_prompt=NEGATIVE), generator=gen(2)).images
    assert torch.equal(pipe(**kwargs(true_cfg_scale=3.0, negative_prompt=NEGATIVE), generator=gen(2)).images, theirs)
    with pytest.raises(ValueError, match=r"guidance_scale=1\.0 and true_cfg_scale=3\.0 disagree"):
        pipe(**kwargs(guidance_scale=1.0, true_cfg_scale=3.0))


def test_step_callbacks_see_what_stock_callbacks_see(pipe, stock):
    def recorder(seen):
        def callback(p, i, t, tensors):
            seen.append((tensors["latents"].clone(), [e.clone() for e in tensors["prompt_embeds"]]))
            return {"latents": tensors["latents"] * 0.5}
        return callback

    ours, theirs = [], []
    inputs = ["latents", "prompt_embeds"]
    a = pipe(**kwargs(), guidance_scale=0.0, callback_on_step_end=recorder(ours),
             callback_on_step_end_tensor_inputs=inputs, generator=gen(3)).images
    b = stock(**kwargs(), guidance_scale=0.0, callback_on_step_end=recorder(theirs),
              callback_on_step_end_tensor_inputs=inputs, generator=gen(3)).images
    assert torch.equal(a, b)
    for (lat_a, emb_a), (lat_b, emb_b) in zip(ours, theirs, strict=True):
        assert lat_a.shape == (1, 4, H // 2, W // 2) and torch.equal(lat_a, lat_b)
        assert len(emb_a) == len(emb_b) == 1 and torch.equal(emb_a[0], emb_b[0])


# -- the reference ------------------------------------------------------------------------------------------------


def covers_of(entities) -> list[list[bool]]:
    """The oracle's token cover of each entity's box (VAE scale factor 2, 2x2 patches)."""
    return [oracles.token_cover(e.rasterize(W, H), H, W, 2, 2) for e in entities]


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE on ``(B, L, H, D)``: consecutive pairs rotated by the complex ``freqs (B, L, D/2)``."""
    pairs = x.float().unflatten(-1, (-1, 2))
    cos, sin = freqs.real[:, :, None], freqs.imag[:, :, None]
    first, second = pairs[..., 0], pairs[..., 1]
    return torch.stack([first * cos - second * sin, first * sin + second * cos], dim=-1).flatten(-2).type_as(x)


class PlainAttention:
    """Attention written out: projections, q/k norms, RoPE, an explicit masked softmax."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        q, k, v = (p(hidden_states).unflatten(-1, (attn.heads, -1)) for p in (attn.to_q, attn.to_k, attn.to_v))
        q, k = rotate(attn.norm_q(q), freqs_cis), rotate(attn.norm_k(k), freqs_cis)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        return attn.to_out[0](torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).flatten(2))


def positions(first: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return torch.stack([first, rows, cols], dim=-1).int()


def reference_sample(model, image, time, caption, lengths, covers):
    """One sample through the rules: ``image (C, 1, h, w)``, ``caption (T, D)`` = segments of ``lengths``."""
    adaln = model.t_embedder((time * model.t_scale)[None]).type_as(image)
    segments, segment_freqs, start = [], [], 0
    for n in lengths:
        tokens = caption[start: start + n]
        start += n
        size = n + (-n) % 32  # padded on its own, its last token repeated, then the learned pad token
        embedded = model.cap_embedder(torch.cat([tokens, tokens[-1:].expand(size - n, -1)])).clone()
        embedded[n:] = model.cap_pad_token
        zero = torch.zeros(size)
        freqs = model.rope_embedder(positions(torch.arange(1, size + 1), zero, zero))  # 1 .. P for every segment
        hidden = embedded[None]
        for layer in model.context_refiner:  # each segment alone
            hidden = layer(hidden, None, freqs[None])
        segments.append(hidden[0])
        segment_freqs.append(freqs)
    first = max(len(s) for s in segments) + 1  # the image after the longest padded segment
    rows, cols = image.shape[-2] // 2, image.shape[-1] // 2
    patches = rearrange(image[:, 0], "c (i p) (j q) -> (i j) (p q c)", p=2, q=2)
    n = len(patches)
    embedded = model.all_x_embedder["2-1"](torch.cat([patches, patches[-1:].expand(PAD_IMG, -1)])).clone()
    embedded[n:] = model.x_pad_token
    grid_i, grid_j = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    image_pos = torch.cat([positions(torch.full((n,), first), grid_i.flatten(), grid_j.flatten()),
                           torch.zeros(PAD_IMG, 3, dtype=torch.int32)])
    image_freqs = model.rope_embedder(image_pos)
    hidden = embedded[None]
    for layer in model.noise_refiner:
        hidden = layer(hidden, None, image_freqs[None], adaln)
    joint = torch.cat([hidden[0], *segments])[None]  # the model's own order: image, image padding, segments
    freqs = torch.cat([image_freqs, *segment_freqs])[None]
    mask = None
    if covers is not None:
        padded = [len(s) for s in segments]
        oracle = oracles.regional_mask([c + [False] * PAD_IMG for c in covers], padded[:-1], padded[-1], n + PAD_IMG)
        text = sum(padded)
        order = [text + i for i in range(n + PAD_IMG)] + list(range(text))
        mask = torch.from_numpy(oracle)[order][:, order][None, None]
    for layer in model.layers:
        joint = layer(joint, mask, freqs, adaln)
    out = model.all_final_layer["2-1"](joint, c=adaln)[0, :n]
    return rearrange(out, "(i j) (p q c) -> c (i p) (j q)", i=rows, p=2, q=2)[:, None]


def reference_run(stock, entities, seed, negative=None, guidance=0.0, on_negative=False):
    """Stock ZImagePipeline on the joined text ``[e_1 | ... | e_N | global]`` with :func:`reference_sample` as its
    transformer's forward (a caption whose length is a joined one's gets that layout and the oracle's mask)."""
    encode = lambda text: stock._encode_prompt([text], device="cpu", max_sequence_length=MSL)[0]  # noqa: E731
    segments = [encode(e.prompt) for e in entities] + [encode(PROMPT)]
    lengths = [len(s) for s in segments]
    assert max(lengths[:-1]) > 32 >= lengths[-1]  # an entity segment pads longer than the global prompt's
    layouts = {sum(lengths): lengths}
    negatives = None
    if negative is not None:
        plain = encode(negative)
        negatives = [torch.cat([plain] * (len(entities) + 1)) if on_negative else plain]
        if on_negative:
            layouts[len(negatives[0])] = [len(plain)] * (len(entities) + 1)
        assert len(negatives[0]) not in (sum(lengths),) or on_negative
    covers = covers_of(entities)
    model = stock.transformer
    originals = {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}

    def forward(x, t, cap_feats, return_dict=False, joint_attention_kwargs=None, **unused):
        out = []
        for image, time, caption in zip(x, t, cap_feats, strict=True):
            layout = layouts.get(len(caption))
            out.append(reference_sample(model, image, time, caption, layout or [len(caption)],
                                        covers if layout else None))
        return (out,)

    for name, module in model.named_modules():
        if name in originals:
            module.processor = PlainAttention()
    model.forward = forward
    try:
        return stock(**kwargs(prompt=None), prompt_embeds=[torch.cat(segments)], negative_prompt_embeds=negatives,
                     negative_prompt=None, guidance_scale=guidance, generator=gen(seed)).images
    finally:
        del model.forward
        for name, module in model.named_modules():
            if name in originals:
                module.processor = originals[name]


@pytest.fixture(scope="module")
def expected(stock):
    return {"no-cfg": reference_run(stock, ENTITIES, 3),
            "cfg": reference_run(stock, ENTITIES, 3, negative=NEGATIVE, guidance=2.0)}


@pytest.mark.parametrize("attention", ["dense", "flex", "segmented"])
@pytest.mark.parametrize("cfg", ["no-cfg", "cfg"])
def test_entities_equal_the_reference(pipe, expected, attention, cfg):
    call = dict(guidance_scale=2.0, negative_prompt=NEGATIVE) if cfg == "cfg" else dict(guidance_scale=0.0)
    ours = pipe(**kwargs(**call), entities=ENTITIES, attention=attention, generator=gen(3)).images
    assert ours.shape == (1, 4, H // 2, W // 2)
    torch.testing.assert_close(ours, expected[cfg], atol=1e-5, rtol=1e-5)
    plain = pipe(**kwargs(**call), generator=gen(3)).images
    assert (ours - plain).abs().max() > 1e-3  # the entities matter


def test_entities_on_negative_equal_the_reference(pipe, stock):
    call = dict(guidance_scale=2.0, negative_prompt=NEGATIVE)
    ours = pipe(**kwargs(**call), entities=ENTITIES, entities_on_negative=True, attention="segmented",
                generator=gen(4)).images
    expected = reference_run(stock, ENTITIES, 4, negative=NEGATIVE, guidance=2.0, on_negative=True)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


# -- options --------------------------------------------------------------------------------------------------------


def test_speed_options(pipe):
    from eligen.speedups import enable_first_block_cache, mask_only_in_blocks

    base = pipe(**kwargs(guidance_scale=0.0), entities=ENTITIES, generator=gen(5)).images
    with pytest.raises(ValueError, match=r"first-block cache is not available for Z-Image.*not a CacheMixin"):
        enable_first_block_cache(pipe, 0.0)
    hooks = mask_only_in_blocks(pipe, ["layers.0"])
    try:
        half = pipe(**kwargs(guidance_scale=0.0), entities=ENTITIES, generator=gen(5)).images
    finally:
        hooks.remove()
    assert (half - base).abs().max() > 1e-4  # layers.1 ran unmasked
    hooks = mask_only_in_blocks(pipe, ["layers.0", "layers.1"])
    try:
        assert torch.equal(pipe(**kwargs(guidance_scale=0.0), entities=ENTITIES, generator=gen(5)).images, base)
    finally:
        hooks.remove()
    late = pipe(**kwargs(guidance_scale=0.0), entities=ENTITIES, entity_steps=1, generator=gen(5)).images
    assert (late - base).abs().max() > 1e-4
    trimmed = pipe(**kwargs(guidance_scale=0.0), entities=ENTITIES, entity_tokens="trim", generator=gen(5)).images
    assert torch.equal(trimmed, base)  # unpadded segments: nothing to trim


def test_compile_traces_the_regional_forward(tiny_dir):
    """Regional compilation of the blocks (a counting backend: what dynamo traces, without a C++ compiler): the
    regional mask in the block argument traces, and a second call reuses the graphs."""
    from torch._dynamo.testing import CompileCounter

    compiled = EliGenZImagePipeline.from_pretrained(tiny_dir)
    compiled.set_progress_bar_config(disable=True)
    call = dict(**kwargs(num_inference_steps=1, guidance_scale=0.0), entities=ENTITIES[:1], attention="dense")
    base = compiled(**call, generator=gen(5)).images
    counter = CompileCounter()
    torch._dynamo.reset()
    try:
        compiled.compile_transformer(backend=counter)
        out = compiled(**call, compile=True, generator=gen(5)).images
        frames = counter.frame_count
        assert frames > 0
        compiled(**call, compile=True, generator=gen(5))
        assert counter.frame_count == frames
        torch.testing.assert_close(out, base, atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()


def test_prompts_of_unequal_lengths_in_one_call(pipe):
    prompts = [PROMPT, LONG]
    both = pipe(**kwargs(prompt=prompts, guidance_scale=0.0), entities=ENTITIES, attention="dense",
                generator=[gen(6), gen(7)]).images
    for i, prompt in enumerate(prompts):
        alone = pipe(**kwargs(prompt=prompt, guidance_scale=0.0), entities=ENTITIES, generator=gen(6 + i)).images
        torch.testing.assert_close(both[i: i + 1], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="segmented attention takes one layout"):
        pipe(**kwargs(prompt=prompts, guidance_scale=0.0), entities=ENTITIES, attention="segmented")


def test_an_entity_reference_image_and_off_grid_sizes_are_refused(pipe):
    from eligen.entities import LayoutError

    entity = Entity("a cat", box=[0, 0, 16, 16], image=np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(LayoutError, match=r"entity 0, field 'image'.*no IP-Adapter"):
        pipe(**kwargs(), entities=[entity])
    with pytest.raises(ValueError, match="Height must be divisible by 4"):
        pipe(**kwargs(height=42))


# -- the commands ---------------------------------------------------------------------------------------------------


def test_cli_generate_inpaint_train_and_data_generate(pipe, tiny_dir, tmp_path, capsys):
    from eligen.cli import main
    from eligen.generate import read_metadata
    from eligen.tiny.toy_data import write_box_dataset

    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"prompt": PROMPT, "negative_prompt": NEGATIVE, "width": W, "height": H, "seed": 3,
                                  "entities": [{"prompt": "a dog", "box": [2, 2, 18, 14]},
                                               {"prompt": "a cat", "box": [20, 16, 46, 38]}]}))
    fast = ["--model", str(tiny_dir), "--steps", "2", "--max-sequence-length", "32", "--true-cfg", "2"]
    assert main(["generate", str(layout), "-o", str(tmp_path / "out.png"), *fast]) == 0
    meta = read_metadata(tmp_path / "out.png")
    assert meta["params"]["true_cfg"] == 2 and len(meta["layout"]["entities"]) == 2
    assert main(["generate", "--from", str(tmp_path / "out.png"), "-o", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(Image.open(tmp_path / "again.png")))
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((H, W, 3)) * 255).astype(np.uint8)).save(photo)
    assert main(["inpaint", str(photo), str(layout), "-o", str(tmp_path / "inpainted.png"), *fast]) == 0
    before, after = np.asarray(Image.open(photo)), np.asarray(Image.open(tmp_path / "inpainted.png"))
    assert np.array_equal(before[:, :2], after[:, :2])  # the left edge lies outside both boxes: untouched
    assert not np.array_equal(before, after)
    assert main(["generate", str(layout), "-o", str(tmp_path / "bad.png"), *fast, "--guidance", "3"]) != 0
    assert "guidance_scale" in capsys.readouterr().err  # Z-Image's CFG is one scale: --guidance is refused

    dataset = write_box_dataset(tmp_path / "boxes", 4, 32, 32, seed=1)
    out = tmp_path / "train"
    assert main(["train", "--model", str(tiny_dir), "--dataset", str(dataset), "--output-dir", str(out),
                 "--resolution", "32", "--rank", "4", "--max-steps", "3", "--batch-size", "2",
                 "--max-sequence-length", "16", "--no-progress"]) == 0
    assert sorted(p.name for p in out.glob("eligen_lora*.safetensors")) == ["eligen_lora.safetensors"]
    capsys.readouterr()
    assert main(["lora", "info", str(out / "eligen_lora.safetensors")]) == 0
    info = capsys.readouterr().out
    assert "family: z_image" in info and "format: diffusers" in info and "single blocks: 0-1" in info
    trained = EliGenZImagePipeline.from_pretrained(tiny_dir)
    trained.set_progress_bar_config(disable=True)
    assert trained.load_eligen_lora(out) == "diffusers"
    adapted = {n.removesuffix(".lora_A.eligen") for n, _ in trained.transformer.named_modules()
               if n.endswith(".lora_A.eligen")}
    assert adapted == set(pipe.family.lora_train_names(pipe.transformer))  # every linear of the main layers
    assert all(n.startswith("layers.") for n in adapted)

    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\na blue square on a gray background\n")
    assert main(["data", "generate", str(captions), "--model", str(tiny_dir), "--out", str(tmp_path / "data"),
                 "--steps", "2", "--width", "32", "--height", "32", "--batch-size", "2"]) == 0
    assert len(list((tmp_path / "data" / "images").glob("*.png"))) == 2
